"""Issue #11 §5: `hf-adaptive run CONFIG.yaml` converts and checks the file's values by the dataclass field types,
the same with and without extra flags; a bad value is an error naming the file, the key and what is allowed."""

from __future__ import annotations

import json
import typing

import pytest
import yaml

from hf_adaptive.cli import parse_run_arguments

FORMS = {"file only": [], "file and flags": ["--seed", "3"]}


def _parse(tmp_path, options: dict, form: str, suffix: str = ".yaml"):
    path = tmp_path / f"c{suffix}"
    options = {"output_dir": str(tmp_path / "o"), "report_to": "none", **options}
    path.write_text(json.dumps(options) if suffix == ".json" else yaml.safe_dump(options))
    return parse_run_arguments([str(path), *FORMS[form]])


def _value(parsed, key):
    return next(getattr(dc, key) for dc in parsed if hasattr(dc, key))


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("save_results_plot", "false", False),
        ("evaluate_unseen_tasks", "false", False),
        ("evaluate_unseen_tasks", "False", False),
        ("append_eos_token", "no", False),
        ("gamma_gated_ewc", "true", True),
        ("plugins", "ewc", ["ewc"]),
        ("tasks", "first_color", ["first_color"]),
        ("lora_target_modules", "q_proj", ["q_proj"]),
        ("signature_layers", "input_embeddings", ["input_embeddings"]),
        ("continual_metrics", "bwt", ["bwt"]),
        ("n_train", "8", 8),
        ("learning_rate", "1e-3", 0.001),  # YAML reads 1e-3 (no dot) as a string
        ("ewc_lambda", 3, 3.0),
        ("run_name", 123, "123"),
        ("continual_eval_limit", None, None),
        ("replay_examples_per_task", 11, 11),
    ],
)
def test_file_values_are_converted_like_flags(tmp_path, form, key, value, expected):
    parsed = _parse(tmp_path, {key: value}, form)
    got = _value(parsed, key)
    assert got == expected and type(got) is type(expected)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize(
    ("key", "value", "allowed"),
    [
        ("n_train", "eight", "must be an integer"),
        ("n_train", 8.5, "must be an integer"),
        ("save_results_plot", 2, "must be true or false"),
        ("save_results_plot", "maybe", "must be true or false"),
        ("plugins", {"ewc": 1}, "not a mapping"),
        ("tasks", [1.5, {"a": 1}], "entry 1"),
        ("gate_mode", False, "quote it"),
        ("continual_metrics", None, "not null"),
        ("ewc_lambda", "strong", "must be a number"),
        ("early_stopping_patience", None, "not null"),
    ],
)
def test_a_badly_typed_value_names_the_file_and_the_key(tmp_path, form, key, value, allowed):
    with pytest.raises(ValueError) as err:
        _parse(tmp_path, {key: value}, form)
    message = str(err.value)
    assert f"{key}={value!r} is not allowed: " in message and allowed in message
    assert f"key {key!r} in config file {tmp_path / 'c.yaml'}" in message


@pytest.mark.parametrize("form", FORMS)
def test_a_value_the_config_refuses_names_the_file(tmp_path, form):
    with pytest.raises(ValueError) as err:
        _parse(tmp_path, {"ewc_lambda": float("inf")}, form)
    assert "ContinualConfig.ewc_lambda=inf is not allowed: must be finite" in str(err.value)
    assert str(tmp_path / "c.yaml") in str(err.value)


@pytest.mark.parametrize("form", FORMS)
def test_json_files_take_the_same_path(tmp_path, form):
    parsed = _parse(tmp_path, {"plugins": "replay", "save_results_plot": "false"}, form, suffix=".json")
    assert _value(parsed, "plugins") == ["replay"] and _value(parsed, "save_results_plot") is False


def test_flags_override_the_converted_file_values(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"output_dir": str(tmp_path), "plugins": "ewc", "n_train": "8"}))
    _, task_args, _ = parse_run_arguments([str(path), "--plugins", "replay", "ewc"])
    assert task_args.plugins == ["replay", "ewc"] and task_args.n_train == 8


@pytest.mark.parametrize("text", ["a: [1, 2\nb: c\n", "n_train: 8\n  bad indent: 1\n", "- just\n- a list\n"])
def test_a_malformed_file_is_an_error_naming_it(tmp_path, text):
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    with pytest.raises(SystemExit) as err:
        parse_run_arguments([str(path)])
    assert str(path) in str(err.value)


def test_malformed_json_names_the_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"n_train": 8,}')
    with pytest.raises(SystemExit, match="broken.json cannot be read"):
        parse_run_arguments([str(path)])


def test_unknown_key_names_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"n_trian": 8}))
    with pytest.raises(SystemExit, match=r"unknown option\(s\) \['n_trian'\] in config file"):
        parse_run_arguments([str(path)])


def test_output_dir_default_is_the_same_with_and_without_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"report_to": "none"}))
    assert parse_run_arguments([str(path)])[2].output_dir == "outputs/run"
    assert parse_run_arguments([str(path), "--seed", "1"])[2].output_dir == "outputs/run"


@pytest.mark.parametrize(
    ("tp", "value", "expected"),
    [
        (int | None, "7", 7),
        (float | None, 2, 2.0),
        (str | None, None, None),
        (list[str] | None, "x", ["x"]),
        (list[int], ["1", 2], [1, 2]),
        (dict | str | None, {"a": 1}, {"a": 1}),
        (str | list[str], ["a"], ["a"]),
        (str | bool, True, True),
        (typing.Literal["a", "b"], "b", "b"),
    ],
)
def test_coerce_value_against_the_obvious_answer(tp, value, expected):
    from hf_adaptive.cli import coerce_value

    assert coerce_value(tp, value) == expected


@pytest.mark.parametrize("form", FORMS)
def test_replay_memory_size_is_reachable_from_yaml(tmp_path, form):
    """#17: `examples_per_task` of the replay plugin was settable only in Python."""
    from hf_adaptive.registry import build_plugins

    _, task_args, config = _parse(
        tmp_path, {"plugins": "replay", "replay_examples_per_task": 11, "replay_buffer_size": 40}, form
    )
    (plugin,) = build_plugins(task_args.plugins, config)
    assert plugin.examples_per_task == 11 and plugin.memory.capacity == 40
