"""Options that live with their capability: a config dataclass is declared once, beside the code it configures,
and its fields become command-line / YAML / `ContinualConfig` options under a prefix (`RouterConfig.scorer` is the
option `router_scorer`), with the same type, default and help. Nothing is written twice, so defaults cannot drift.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterable, Sequence
from dataclasses import MISSING, dataclass
from typing import Any

from .validation import OptionError


@dataclass(frozen=True)
class OptionSource:
    """The fields of `config_class` offered as options named `prefix + field` (or the field's
    `metadata["option"]`); `exclude` lists fields that are not options (objects, sizes read from the model)."""

    config_class: type
    prefix: str = ""
    exclude: tuple[str, ...] = ()
    #: values for excluded fields that have no default, used when the options are validated without them
    #: (e.g. a router's signature size, known only from the model): `(("dim", 1),)`
    placeholders: tuple[tuple[str, Any], ...] = ()

    def fields(self) -> list[dataclasses.Field]:
        return [f for f in dataclasses.fields(self.config_class) if f.init and f.name not in self.exclude]

    def option_name(self, field: dataclasses.Field) -> str:
        return field.metadata.get("option") or self.prefix + field.name

    def names(self) -> dict[str, str]:
        """field name -> option name."""
        return {f.name: self.option_name(f) for f in self.fields()}


def _option_type(tp: Any) -> Any:
    """Tuples become lists on the command line (HfArgumentParser parses `list[str]`, not `tuple[str, ...]`)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return list[args[0]]
    if args and origin in (typing.Union, types.UnionType):
        converted = tuple(_option_type(a) for a in args)
        return typing.Union[converted]  # noqa: UP007 - a runtime union of computed members
    return tp


def option_fields(source: OptionSource) -> list[tuple[str, Any, dataclasses.Field]]:
    """`(option name, type, field)` triples for `dataclasses.make_dataclass`, copied from the source's fields."""
    hints = typing.get_type_hints(source.config_class)
    out = []
    for f in source.fields():
        # HfArgumentParser hands a field's metadata to argparse: keep what argparse knows, drop our "option" key
        kwargs: dict[str, Any] = {"metadata": {k: v for k, v in f.metadata.items() if k != "option"}}
        if f.default is not MISSING:
            default = f.default
            if isinstance(default, tuple):
                kwargs["default_factory"] = lambda d=default: list(d)
            else:
                kwargs["default"] = default
        elif f.default_factory is not MISSING:
            factory = f.default_factory
            kwargs["default_factory"] = lambda fac=factory: _listify(fac())
        else:
            raise TypeError(
                f"{source.config_class.__name__}.{f.name} has no default: exclude it from the options or give it one"
            )
        out.append((source.option_name(f), _option_type(hints[f.name]), dataclasses.field(**kwargs)))
    return out


def _listify(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def options_dataclass(name: str, sources: Iterable[OptionSource], doc: str = "") -> type:
    """A dataclass whose fields are the options of `sources` (a mixin for `ContinualConfig`); repeated sources
    are taken once, and two sources may not offer the same option name."""
    seen: dict[str, str] = {}
    fields: list[tuple[str, Any, dataclasses.Field]] = []
    unique: list[OptionSource] = []
    for source in sources:
        if source in unique:
            continue
        unique.append(source)
        for option, tp, fld in option_fields(source):
            owner = f"{source.config_class.__name__}"
            if option in seen:
                raise TypeError(f"option {option!r} is declared by both {seen[option]} and {owner}")
            seen[option] = owner
            fields.append((option, tp, fld))
    cls = dataclasses.make_dataclass(name, fields)
    cls.__doc__ = doc or f"Options of {', '.join(s.config_class.__name__ for s in unique)}."
    cls.option_sources = tuple(unique)
    return cls


def build_config(source: OptionSource, options: Any, owner: str | None = None, **fixed: Any) -> Any:
    """`source.config_class` built from the option values found on `options` (missing ones keep their default);
    its validation errors are restated under the option's name on `owner` (e.g. `ContinualConfig.router_scorer`)."""
    names = source.names()
    values = {name: getattr(options, option) for name, option in names.items() if hasattr(options, option)}
    values.update(fixed)
    try:
        return source.config_class(**values)
    except OptionError as err:
        if owner is not None and err.field in names and err.field not in fixed:
            raise err.renamed(owner, names[err.field], names) from None
        raise


def check_unique_options(sources: Sequence[OptionSource], reserved: Iterable[str] = ()) -> None:
    """Refuse two sources (or a source and a reserved name, e.g. a TrainingArguments field) sharing an option."""
    taken = {name: "reserved" for name in reserved}
    for source in dict.fromkeys(sources):
        for option in source.names().values():
            if option in taken:
                raise TypeError(f"option {option!r} of {source.config_class.__name__} is already {taken[option]}")
            taken[option] = f"declared by {source.config_class.__name__}"
