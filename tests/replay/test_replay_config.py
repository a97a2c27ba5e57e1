"""The replay configs: defaults, refusals naming the field, option names (those users wrote keep working), the
restatement of an error under the option name, and the replay loss computed as before (numerics kept)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from hf_adaptive.replay.config import (
    FEATURE_REPLAY_OPTIONS,
    GENERATIVE_REPLAY_OPTIONS,
    REPLAY_OPTIONS,
    FeatureReplayConfig,
    GenerativeReplayConfig,
    ReplayConfig,
)
from hf_adaptive.utils.options import build_config, check_unique_options, options_dataclass
from hf_adaptive.utils.validation import OptionError

#: every replay option `ContinualConfig` had before the options moved to `replay/config.py`, with its default
#: there (the three `*alpha` / `ratio` defaults changed on purpose, see `test_defaults_make_each_plugin_act`)
FORMER_OPTIONS = {
    "replay_alpha": 0.0,
    "replay_buffer_size": 200,
    "replay_policy": "balanced",
    "replay_batch_size": 8,
    "replay_examples_per_task": None,
    "generative_replay_ratio": 0.0,
    "generative_replay_lm_lambda": 0.25,
    "generative_replay_conditioning": "task",
    "generative_replay_max_new_tokens": 32,
    "generative_replay_top_k": 0,
    "generative_replay_temperature": 1.0,
    "generative_replay_max_rounds": 3,
    "generative_replay_prototype_samples": 64,
    "generative_replay_prototypes_per_class": 2,
    "generative_replay_prefix_words": 1,
    "feature_replay_alpha": 0.0,
    "feature_replay_samples_per_task": 64,
    "feature_replay_target": "features",
    "feature_replay_k_per_class": 1,
    "feature_replay_dtype": "float32",
}
CHANGED_DEFAULTS = {"replay_alpha": 0.2, "generative_replay_ratio": 0.2, "feature_replay_alpha": 0.1}

ALL_SOURCES = [*REPLAY_OPTIONS, *GENERATIVE_REPLAY_OPTIONS, *FEATURE_REPLAY_OPTIONS]


def test_option_names_are_the_former_ones_and_unique():
    check_unique_options(ALL_SOURCES, reserved=("seed", "output_dir"))  # `seed` is the run's, never redeclared
    mixin = options_dataclass("ReplayOptions", ALL_SOURCES)
    defaults = {f.name: f.default for f in dataclasses.fields(mixin)}
    assert set(defaults) == set(FORMER_OPTIONS)
    assert defaults == {**FORMER_OPTIONS, **CHANGED_DEFAULTS}
    assert len(mixin.option_sources) == 3  # the shared replay source is taken once


def test_defaults_make_each_plugin_act():
    assert ReplayConfig().alpha > 0
    generative = GenerativeReplayConfig()
    assert generative.ratio > 0 and generative.alpha > 0
    assert FeatureReplayConfig().alpha > 0
    # mirrored fields keep the one default of the shared option
    assert generative.alpha == ReplayConfig().alpha and generative.batch_size == ReplayConfig().batch_size
    assert FeatureReplayConfig().batch_size == ReplayConfig().batch_size
    assert FeatureReplayConfig().max_rows == ReplayConfig().buffer_size


@pytest.mark.parametrize(
    "config_class, field, value",
    [
        (ReplayConfig, "alpha", 1.5),
        (ReplayConfig, "buffer_size", 2.5),
        (ReplayConfig, "policy", "lifo"),
        (ReplayConfig, "batch_size", 0),
        (ReplayConfig, "examples_per_task", 0),
        (GenerativeReplayConfig, "ratio", -0.5),
        (GenerativeReplayConfig, "alpha", float("nan")),
        (GenerativeReplayConfig, "conditioning", "label"),
        (GenerativeReplayConfig, "temperature", 0.0),
        (GenerativeReplayConfig, "top_k", -1),
        (GenerativeReplayConfig, "prefix_words", True),
        (FeatureReplayConfig, "alpha", 2.0),
        (FeatureReplayConfig, "max_rows", 0),
        (FeatureReplayConfig, "target", "logits"),
        (FeatureReplayConfig, "feature_dtype", "int8"),
    ],
)
def test_a_bad_value_names_the_config_field(config_class, field, value):
    with pytest.raises(OptionError, match=rf"^{config_class.__name__}\.{field}=") as err:
        config_class(**{field: value})
    assert (err.value.owner, err.value.field) == (config_class.__name__, field)


@pytest.mark.parametrize(
    "source, option, value",
    [
        (REPLAY_OPTIONS[0], "replay_alpha", 3),
        (REPLAY_OPTIONS[0], "replay_examples_per_task", -1),
        (GENERATIVE_REPLAY_OPTIONS[0], "generative_replay_conditioning", "label"),
        (FEATURE_REPLAY_OPTIONS[0], "feature_replay_dtype", "int8"),
        (FEATURE_REPLAY_OPTIONS[0], "feature_replay_k_per_class", 0),
    ],
)
def test_build_config_restates_the_error_under_the_option(source, option, value):
    with pytest.raises(OptionError, match=rf"^ContinualConfig\.{option}={value!r} is not allowed"):
        build_config(source, SimpleNamespace(**{option: value}), owner="ContinualConfig")


def test_build_config_reads_the_options():
    config = build_config(REPLAY_OPTIONS[0], SimpleNamespace(replay_alpha=0.5, replay_policy="reservoir", seed=3))
    assert (config.alpha, config.policy, config.seed) == (0.5, "reservoir", 0)  # `seed` is no option of its own
    feature = build_config(FEATURE_REPLAY_OPTIONS[0], SimpleNamespace(feature_replay_dtype="bfloat16"))
    assert feature.feature_dtype == "bfloat16"


def test_the_config_module_is_light():
    """`replay.config` imports no plugin module (the registry composes options without importing plugins)."""
    code = (
        "import sys, hf_adaptive.replay.config; "
        "bad = [m for m in sys.modules if m.startswith(('hf_adaptive.replay.', 'transformers', 'hf_adaptive.tasks'))"
        " and m != 'hf_adaptive.replay.config']; print(bad); assert not bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


# ---------------------------------------------------------------------------------------------- numerics kept
def _former_answer_loss(model, batch, epsilon):
    """The replay loss as computed before `answer_cross_entropy`: the model's own loss, or `LabelSmoother`."""
    if epsilon <= 0:
        return model(**batch).loss
    from transformers.trainer_pt_utils import LabelSmoother

    outputs = model(**{k: v for k, v in batch.items() if k != "labels"})
    return LabelSmoother(epsilon=epsilon)(outputs, batch["labels"], shift_labels=True)


@pytest.mark.parametrize("epsilon", [0.0, 0.1])
def test_answer_loss_equals_the_former_computation(tiny_model, tokenizer, two_tasks, epsilon):
    from hf_adaptive.replay._common import answer_loss, collate, task_rows

    rows = task_rows(two_tasks[0], tokenizer, limit=7, seed=0)
    rows[0] = {**rows[0], "input_ids": rows[0]["input_ids"][:-2] + rows[0]["input_ids"][-1:]}  # lengths differ
    rows[0]["labels"] = rows[0]["labels"][: len(rows[0]["input_ids"]) - 1] + rows[0]["input_ids"][-1:]
    batch = collate(rows, tokenizer, torch.device("cpu"))
    with torch.no_grad():
        tiny_model.model.norm.weight.mul_(5).add_(4)  # a peaked output: smoothing matters
        trainer = SimpleNamespace(args=SimpleNamespace(label_smoothing_factor=epsilon))
        new = answer_loss(trainer, tiny_model, batch)
        old = _former_answer_loss(tiny_model, batch, epsilon)
    torch.testing.assert_close(new, old, atol=1e-6, rtol=1e-6)
