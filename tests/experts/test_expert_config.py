"""The routing options, declared once in `hf_adaptive.experts.config`: defaults, validation naming the field, and
errors restated under the option name by `build_config`."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import types

import pytest

from hf_adaptive.experts.config import (
    EXPERT_ROUTING_OPTIONS,
    ExpertRoutingConfig,
    RouterConfig,
    SignatureConfig,
)
from hf_adaptive.utils.options import build_config, check_unique_options, options_dataclass
from hf_adaptive.utils.validation import OptionError

#: the routing option names (and defaults) `ContinualConfig` had before the options moved here: kept exactly
FORMER_OPTIONS = {
    "router_scorer": "cosine",
    "router_decision": "threshold",
    "router_normalize": "standardize",
    "router_reuse_threshold": 0.5,
    "router_fork_threshold": 0.3,
    "router_bootstrap_experts": 0,
    "router_index": "exact",
    "router_top_k": 8,
    "router_tolerance": 0.05,
    "router_eval_limit": 64,
    "router_verify_reuse": True,
    "signature_parts": ["text", "gradient", "context"],
    "signature_layers": None,
    "signature_sketch_dim": 64,
    "signature_text_dim": 128,
    "signature_text_encoder": None,
    "signature_n_examples": 16,
}


def _options() -> dict[str, object]:
    """option name -> default, as the composed options dataclass offers them."""
    cls = options_dataclass("RoutingOptions", EXPERT_ROUTING_OPTIONS)
    return {k: v for k, v in dataclasses.asdict(cls()).items()}


def test_every_former_option_keeps_its_name_and_default():
    options = _options()
    for name, default in FORMER_OPTIONS.items():
        assert options[name] == default, name
    check_unique_options(EXPERT_ROUTING_OPTIONS)


def test_every_field_is_an_option_except_dim_and_weights():
    options = _options()
    for cls, prefix in ((RouterConfig, "router_"), (SignatureConfig, "signature_"), (ExpertRoutingConfig, "router_")):
        for f in dataclasses.fields(cls):
            assert (prefix + f.name in options) == (f.name not in ("dim", "weights")), f.name
            assert f.name in ("dim",) or f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help"
    assert {"router_hnsw_m", "router_ucb_c", "router_tau_lr", "signature_sketch_method", "signature_seed"} <= set(
        options
    )


def test_defaults():
    assert ExpertRoutingConfig() == ExpertRoutingConfig(tolerance=0.05, eval_limit=64, verify_reuse=True)
    assert SignatureConfig().parts == ("text", "gradient", "context") and SignatureConfig().text_dim == 128
    assert RouterConfig(dim=4).scorer == "cosine"
    assert SignatureConfig(parts="text").parts == ("text",)  # a lone part is one part, not its characters


@pytest.mark.parametrize(
    "cls, field, value",
    [
        (ExpertRoutingConfig, "tolerance", 1.5),
        (ExpertRoutingConfig, "tolerance", float("nan")),
        (ExpertRoutingConfig, "eval_limit", 0),
        (ExpertRoutingConfig, "verify_reuse", "yes"),
        (SignatureConfig, "batch_size", 0),
        (SignatureConfig, "text_encoder", ""),
        (SignatureConfig, "seed", 1.5),
        (RouterConfig, "hnsw_m", 0),
        (RouterConfig, "ucb_reward_weight", float("inf")),
        (RouterConfig, "seed", "0"),
    ],
)
def test_a_bad_value_names_the_config_field(cls, field, value):
    kwargs = {"dim": 4} if cls is RouterConfig else {}
    with pytest.raises(OptionError, match=rf"^{cls.__name__}\.{field}="):
        cls(**kwargs, **{field: value})


def test_build_config_restates_errors_under_the_option_name():
    router_source, signature_source, plugin_source, _meta_init_source = EXPERT_ROUTING_OPTIONS
    options = types.SimpleNamespace(**FORMER_OPTIONS)
    assert build_config(router_source, options, owner="ContinualConfig", dim=5) == RouterConfig(dim=5)
    assert build_config(signature_source, options, owner="ContinualConfig") == SignatureConfig()
    assert build_config(plugin_source, options, owner="ContinualConfig") == ExpertRoutingConfig()
    for source, option, value in (
        (plugin_source, "router_tolerance", 2.0),
        (plugin_source, "router_verify_reuse", 1),
        (router_source, "router_fork_threshold", 0.9),
        (router_source, "router_hnsw_ef_search", 0),
        (signature_source, "signature_parts", ["text", "nope"]),
        (signature_source, "signature_sketch_method", "fft"),
    ):
        bad = types.SimpleNamespace(**{**FORMER_OPTIONS, option: value})
        with pytest.raises(OptionError, match=rf"^ContinualConfig\.{option}="):
            build_config(source, bad, owner="ContinualConfig", **({"dim": 5} if source is router_source else {}))


def test_the_config_module_is_light():
    code = (
        "import sys, hf_adaptive.experts.config as c; "
        "heavy = [m for m in ('peft', 'faiss', 'sentence_transformers', 'hf_adaptive.experts.router', "
        "'hf_adaptive.experts.plugin', 'hf_adaptive.trainer', 'hf_adaptive.config') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
