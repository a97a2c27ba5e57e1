"""Options declared once (utils/options.py) and refused clearly (utils/validation.py)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
from transformers import HfArgumentParser

from hf_adaptive.utils.options import OptionSource, build_config, check_unique_options, options_dataclass
from hf_adaptive.utils.validation import OptionError, check_number, check_order, check_str_list


@dataclass
class Knobs:
    low: float = field(default=0.1, metadata={"help": "the low one"})
    high: float = field(default=0.5, metadata={"help": "the high one", "option": "ceiling"})
    names: tuple[str, ...] = field(default=("a",), metadata={"help": "some names"})
    size: int = 0  # excluded below: known only at run time

    def __post_init__(self):
        check_number("Knobs", "low", self.low, 0, 1)
        check_number("Knobs", "high", self.high, 0, 1)
        check_order("Knobs", "low", self.low, "high", self.high)
        self.names = tuple(check_str_list("Knobs", "names", self.names))


SOURCE = OptionSource(Knobs, "knob_", exclude=("size",), placeholders=(("size", 1),))


def test_fields_become_prefixed_options_with_their_defaults_help_and_types():
    Options = options_dataclass("Options", [SOURCE])
    fields = {f.name: f for f in dataclasses.fields(Options)}
    assert set(fields) == {"knob_low", "ceiling", "knob_names"}
    assert Options().knob_low == 0.1 and Options().ceiling == 0.5 and Options().knob_names == ["a"]
    assert fields["knob_low"].metadata == {"help": "the low one"}  # "option" is not handed to argparse
    (parsed,) = HfArgumentParser(Options).parse_args_into_dataclasses(["--knob_low", "0.2", "--knob_names", "x", "y"])
    assert parsed.knob_low == 0.2 and parsed.knob_names == ["x", "y"]


def test_build_config_restates_errors_under_the_option_names_both_sides_of_a_comparison():
    with pytest.raises(OptionError) as err:
        build_config(SOURCE, SimpleNamespace(knob_low=0.9, ceiling=0.2, knob_names=["a"]), owner="Run")
    assert str(err.value) == "Run.knob_low=0.9 is not allowed: must be <= Run.ceiling=0.2"
    with pytest.raises(OptionError, match=r"^Run\.knob_names=5 is not allowed: a list of non-empty strings$"):
        build_config(SOURCE, SimpleNamespace(knob_names=5), owner="Run")
    built = build_config(SOURCE, SimpleNamespace(knob_low=0.3), owner="Run", size=7)
    assert (built.low, built.high, built.size) == (0.3, 0.5, 7)  # missing options keep their defaults


def test_two_sources_may_not_offer_one_option():
    with pytest.raises(TypeError, match="'knob_low'"):
        options_dataclass("Twice", [SOURCE, OptionSource(Knobs, "knob_", exclude=("size", "high", "names"))])
    with pytest.raises(TypeError, match="'ceiling'"):
        check_unique_options([SOURCE], reserved=["ceiling"])
