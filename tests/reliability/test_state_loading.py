"""Loading state (issue #11 §4): every bad saved state is refused at load with an error naming the file.

Truncated or corrupt JSON / safetensors, a JSON that refers to a missing tensor file, NaN or wrongly shaped
tensors (EWC Fisher, router profiles, gate controller, LoRA adapters) and adapters with missing weights must not
load and fail (or silently mis-train) later.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_adaptive.consolidation.ewc import EWCPlugin
from hf_adaptive.control.gate_controller import GateController
from hf_adaptive.experts import ExpertLibrary, Router, RouterConfig
from hf_adaptive.models import build_tiny_gemma
from hf_adaptive.utils.io import (
    META_FILE,
    TENSORS_FILE,
    StateLoadError,
    check_tensor,
    load_state,
    load_state_into,
    save_state,
)


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


# ------------------------------------------------------------------------------------------------ generic files
@pytest.fixture
def saved(tmp_path):
    save_state(tmp_path / "s", {"w": torch.ones(3), "nested": {"b": torch.zeros(2, 2)}, "n": 4})
    return tmp_path / "s"


def test_round_trip_still_loads(saved):
    state = load_state(saved)
    torch.testing.assert_close(state["w"], torch.ones(3))
    assert state["n"] == 4 and state["nested"]["b"].shape == (2, 2)


def test_truncated_json_names_the_file(saved):
    _truncate(saved / META_FILE)
    with pytest.raises(StateLoadError, match=re.escape(str(saved / META_FILE)) + ".*not readable JSON"):
        load_state(saved)


@pytest.mark.parametrize("keep", [0.0, 0.05, 0.5, 0.99])
def test_truncated_safetensors_names_the_file(saved, keep):
    _truncate(saved / TENSORS_FILE, keep)
    with pytest.raises(StateLoadError, match=re.escape(str(saved / TENSORS_FILE)) + ".*not a readable safetensors"):
        load_state(saved)


def test_missing_tensor_file_names_it(saved):
    (saved / TENSORS_FILE).unlink()
    with pytest.raises(StateLoadError, match=re.escape(str(saved / TENSORS_FILE)) + " is missing.*refers to 2"):
        load_state(saved)


def test_tensor_file_without_a_referenced_tensor(saved):
    save_file({"w": torch.ones(3)}, str(saved / TENSORS_FILE))
    with pytest.raises(StateLoadError, match=r"lacks 1 tensors .*'nested.b'"):
        load_state(saved)


def test_json_that_is_not_an_object(saved):
    (saved / META_FILE).write_text("[1, 2]")
    with pytest.raises(StateLoadError, match="holds a list"):
        load_state(saved)


def test_state_without_tensors_needs_no_tensor_file(tmp_path):
    save_state(tmp_path / "s", {"n": 1, "xs": [1.5, "a"]})
    (tmp_path / "s" / TENSORS_FILE).unlink()
    assert load_state(tmp_path / "s") == {"n": 1, "xs": [1.5, "a"]}


def test_check_tensor():
    check_tensor("x", torch.ones(2, 3), (2, 3), nonnegative=True, floating=True)
    with pytest.raises(
        StateLoadError, match=r"x.shape=\(2, 3\) is not allowed \(in f.safetensors\): expected \(3, 2\)"
    ):
        check_tensor("x", torch.ones(2, 3), (3, 2), file="f.safetensors")
    with pytest.raises(StateLoadError, match="x holds 1 NaN/inf values"):
        check_tensor("x", torch.tensor([1.0, float("nan")]))
    with pytest.raises(StateLoadError, match="x holds 1 NaN/inf values"):
        check_tensor("x", torch.tensor([1.0, float("inf")], dtype=torch.bfloat16))
    with pytest.raises(StateLoadError, match="negative"):
        check_tensor("x", torch.tensor([-1.0]), nonnegative=True)
    with pytest.raises(StateLoadError, match="x=list is not allowed"):
        check_tensor("x", [1.0])
    with pytest.raises(StateLoadError, match="dtype=torch.int64 is not allowed"):
        check_tensor("x", torch.ones(2, dtype=torch.long), floating=True)


def test_load_state_into_names_the_folder_on_a_missing_key(tmp_path):
    class Needs:
        def load_state_dict(self, state):
            return state["absent"]

    save_state(tmp_path / "p", {"present": 1})
    with pytest.raises(StateLoadError, match=re.escape(str(tmp_path / "p")) + r".*missing key 'absent'"):
        load_state_into(Needs(), tmp_path / "p")


# ---------------------------------------------------------------------------------------------------------- EWC
def _ewc_state(**change):
    fisher = {"a": torch.rand(3, 2), "b": torch.rand(4)}
    anchor = {"a": torch.randn(3, 2), "b": torch.randn(4)}
    for key, value in change.items():
        group, name = key.split("_")
        (fisher if group == "fisher" else anchor)[name] = value
    return {"mode": "separate", "entries": [{"task": "t", "gamma_gain": 1.0, "fisher": fisher, "anchor": anchor}]}


def test_ewc_good_state_loads():
    plugin = EWCPlugin(progress_bar=False)
    plugin.load_state_dict(_ewc_state())
    assert plugin.entries[0]["fisher"]["a"].shape == (3, 2)


@pytest.mark.parametrize(
    "change, message",
    [
        # non-finite tensors: refused by `load_state` itself, for every plugin (the file and the tensor named)
        (
            {"fisher_a": torch.full((3, 2), float("nan"))},
            r"tensors\.safetensors holds non-finite values \(NaN or inf\) in 1 tensors: \['entries\.0\.fisher\.a'\]",
        ),
        ({"fisher_a": torch.ones(1)}, r"anchor\['a'\].shape=\(3, 2\) is not allowed: expected \(1,\)"),
        ({"anchor_b": torch.ones(2, 2)}, r"anchor\['b'\].shape=\(2, 2\) is not allowed: expected \(4,\)"),
        ({"fisher_a": -torch.ones(3, 2)}, r"fisher\['a'\] holds negative values"),
        ({"anchor_c": torch.ones(1)}, "fisher and anchor name different parameters"),
        (
            {"anchor_a": torch.tensor([[float("inf")] * 2] * 3)},
            r"holds non-finite values \(NaN or inf\) in 1 tensors: \['entries\.0\.anchor\.a'\]",
        ),
    ],
)
def test_ewc_bad_state_is_refused_and_the_old_one_kept(change, message, tmp_path):
    plugin = EWCPlugin(progress_bar=False)
    save_state(tmp_path / "ewc", _ewc_state(**change))
    with pytest.raises(StateLoadError, match=message) as err:
        load_state_into(plugin, tmp_path / "ewc")
    assert str(tmp_path / "ewc") in str(err.value)
    assert plugin.entries == []


def test_ewc_fisher_of_another_shape_than_the_parameter_does_not_broadcast():
    model = torch.nn.Linear(2, 3)
    plugin = EWCPlugin(progress_bar=False)
    # a consistent (fisher, anchor) pair, but of the wrong shape for this model's weight: it used to broadcast
    plugin.load_state_dict(
        {"mode": "separate", "entries": [{"task": "t", "gamma_gain": 1.0, "fisher": {"weight": torch.ones(1)},
                                          "anchor": {"weight": torch.zeros(1)}}]}
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"EWCPlugin.fisher\['weight'\].shape=\(1,\) is not allowed.*\(3, 2\)"):
        plugin.penalty(model)


# ------------------------------------------------------------------------------------------------------- router
def _router() -> Router:
    router = Router(RouterConfig(dim=4))
    gen = torch.Generator().manual_seed(0)
    for name in ("a", "b"):
        router.add_expert(name, torch.randn(4, generator=gen))
    router.record_outcome(torch.randn(4, generator=gen), "a", 0.5, True)
    return router


def _edit_tensor(folder: Path, key: str, value: torch.Tensor) -> None:
    tensors = load_file(str(folder / TENSORS_FILE))
    tensors[key] = value
    save_file(tensors, str(folder / TENSORS_FILE))


def test_router_round_trip_still_loads(tmp_path):
    router = _router()
    back = Router.load(router.save(tmp_path / "r"))
    torch.testing.assert_close(back.profiles, router.profiles)


#: what `load_state` says of a tensor file holding NaN or inf (it names the file and the tensors)
NON_FINITE = r"non-finite values \(NaN or inf\) in 1 tensors: "


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("profiles", torch.tensor([[float("nan")] * 4, [0.0, 1.0, 0.0, 0.0]]), NON_FINITE + r"\['profiles'\]"),
        ("profiles", torch.ones(2, 3), r"profiles.shape=\(2, 3\) is not allowed: expected \(2, 4\)"),
        ("outcome_queries", torch.full((1, 4), float("inf")), NON_FINITE + r"\['outcome_queries'\]"),
        ("observed_sum", torch.ones(5, dtype=torch.float64), r"observed_sum.shape=\(5,\)"),
    ],
)
def test_router_bad_tensors_are_refused_naming_the_folder(tmp_path, key, value, message):
    folder = _router().save(tmp_path / "r")
    _edit_tensor(folder, key, value)
    with pytest.raises(StateLoadError, match=message) as err:
        Router.load(folder)
    assert str(folder) in str(err.value)


def test_router_with_a_missing_entry_names_the_folder(tmp_path):
    folder = _router().save(tmp_path / "r")
    meta = json.loads((folder / META_FILE).read_text())
    del meta["tau"]
    (folder / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(StateLoadError, match=re.escape(str(folder)) + ".*missing key 'tau'"):
        Router.load(folder)


# ---------------------------------------------------------------------------------------------- gate controller
def test_gate_controller_round_trip_still_loads(tmp_path):
    ctrl = GateController(2, 3)
    ctrl.save(str(tmp_path / "g"))
    back = GateController.load(str(tmp_path / "g"))
    torch.testing.assert_close(back.gates, ctrl.gates)


def test_gate_controller_bad_state_is_refused(tmp_path):
    ctrl = GateController(2, 3)
    ctrl.save(str(tmp_path / "g"))
    _edit_tensor(tmp_path / "g", "gates", torch.ones(3, 2))
    with pytest.raises(StateLoadError, match=r"gates.shape=\(3, 2\) is not allowed: expected \(2, 3\)") as err:
        GateController.load(str(tmp_path / "g"))
    assert str(tmp_path / "g") in str(err.value)
    ctrl.save(str(tmp_path / "h"))
    key = next(k for k in load_file(str(tmp_path / "h" / TENSORS_FILE)) if k.startswith("policy."))
    tensors = load_file(str(tmp_path / "h" / TENSORS_FILE))
    _edit_tensor(tmp_path / "h", key, torch.full_like(tensors[key], float("nan")))
    fresh = GateController(2, 3)
    with pytest.raises(StateLoadError, match=r"non-finite values \(NaN or inf\) in 1 tensors: \['policy\..*'\]"):
        load_state_into(fresh, tmp_path / "h")
    # nothing was replaced: the fresh controller still acts on finite weights
    assert all(torch.isfinite(p).all() for p in fresh.policy.parameters())


# ------------------------------------------------------------------------------------------------ LoRA adapters
@pytest.fixture
def saved_library(tokenizer, tmp_path):
    lib = ExpertLibrary(build_tiny_gemma(tokenizer, seed=0)[0], base_model_name="tiny-gemma")
    for name in ("alpha", "beta"):
        lib.create(name, task_id=name)
    return lib.save(tmp_path / "lib")


def _adapter(saved_library: Path, name: str = "beta") -> Path:
    return saved_library / "experts" / name / "adapter_model.safetensors"


def test_adapter_with_no_tensors_is_refused(saved_library, tokenizer):
    save_file({}, str(_adapter(saved_library)))
    with pytest.raises(StateLoadError, match=re.escape(str(_adapter(saved_library))) + " holds no tensor"):
        ExpertLibrary.load(saved_library, build_tiny_gemma(tokenizer, seed=0)[0])


def test_adapter_with_a_missing_weight_is_refused(saved_library, tokenizer):
    tensors = load_file(str(_adapter(saved_library)))
    dropped = sorted(tensors)[0]
    del tensors[dropped]
    save_file(tensors, str(_adapter(saved_library)))
    with pytest.raises(StateLoadError, match=re.escape(str(_adapter(saved_library))) + r" lacks 1 of the \d+ weights"):
        ExpertLibrary.load(saved_library, build_tiny_gemma(tokenizer, seed=0)[0])


def test_adapter_with_nan_is_refused(saved_library, tokenizer):
    tensors = load_file(str(_adapter(saved_library, "alpha")))
    key = sorted(tensors)[0]
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    save_file(tensors, str(_adapter(saved_library, "alpha")))
    with pytest.raises(StateLoadError, match=re.escape(key) + " holds .* NaN/inf.*adapter_model.safetensors"):
        ExpertLibrary.load(saved_library, build_tiny_gemma(tokenizer, seed=0)[0])


def test_truncated_adapter_and_manifest_name_the_file(saved_library, tokenizer):
    _truncate(_adapter(saved_library))
    with pytest.raises(StateLoadError, match=re.escape(str(_adapter(saved_library))) + ".*not a readable safetensors"):
        ExpertLibrary.load(saved_library, build_tiny_gemma(tokenizer, seed=0)[0])
    _truncate(saved_library / "library.json")
    with pytest.raises(StateLoadError, match=re.escape(str(saved_library / "library.json")) + ".*not readable JSON"):
        ExpertLibrary.load(saved_library, build_tiny_gemma(tokenizer, seed=0)[0])


def test_adapter_of_the_wrong_shape_is_refused(saved_library, tokenizer):
    tensors = load_file(str(_adapter(saved_library)))
    key = sorted(tensors)[0]
    tensors[key] = torch.zeros(tensors[key].shape[0] + 1, *tensors[key].shape[1:])
    save_file(tensors, str(_adapter(saved_library)))
    with pytest.raises(StateLoadError, match=r"experts/beta"):
        ExpertLibrary.load(saved_library, build_tiny_gemma(tokenizer, seed=0)[0])


def test_manifest_entry_of_the_wrong_type_is_refused(saved_library, tokenizer):
    manifest = json.loads((saved_library / "library.json").read_text())
    manifest["experts"][0]["metrics"] = {"acc": "high"}
    (saved_library / "library.json").write_text(json.dumps(manifest))
    with pytest.raises(StateLoadError, match=r"ExpertInfo.metrics=\{'acc': 'high'\} is not allowed"):
        ExpertLibrary.load(saved_library, build_tiny_gemma(tokenizer, seed=0)[0])


def test_atomic_writes_get_the_mode_a_plain_open_would_give(tmp_path):
    import os

    from hf_adaptive.utils.io import atomic_write_text

    atomic_write_text(tmp_path / "results.md", "x")
    (tmp_path / "plain.md").write_text("x")
    assert os.stat(tmp_path / "results.md").st_mode == os.stat(tmp_path / "plain.md").st_mode


def test_any_plugin_state_with_a_non_finite_tensor_is_refused_naming_the_file(tmp_path):
    """The generic check in `load_state` covers every plugin's state (replay memories, scheduler, freezing, ...),
    beyond the plugins that check their own tensors."""
    import torch

    from hf_adaptive.utils.io import TENSORS_FILE, StateLoadError, load_state, save_state

    save_state(tmp_path / "ok", {"features": torch.ones(2, 3), "ids": torch.tensor([1, 2]), "step": 3})
    assert load_state(tmp_path / "ok")["step"] == 3
    for bad in (float("nan"), float("inf")):
        folder = tmp_path / f"bad_{bad}"
        save_state(folder, {"features": torch.tensor([[1.0, bad]]), "ids": torch.tensor([1, 2])})
        with pytest.raises(StateLoadError, match=rf"{TENSORS_FILE} holds non-finite values .*'features'"):
            load_state(folder)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"fisher_a": torch.full((3, 2), float("nan"))}, r"fisher\['a'\] holds 6 NaN/inf"),
        ({"anchor_a": torch.tensor([[float("inf")] * 2] * 3)}, r"anchor\['a'\] holds 6 NaN/inf"),
    ],
)
def test_ewc_checks_its_own_tensors_when_given_state_directly(change, message):
    """Without the file layer (`load_state_dict` on an in-memory state), EWC's own check refuses NaN/inf."""
    plugin = EWCPlugin(progress_bar=False)
    with pytest.raises(StateLoadError, match=message):
        plugin.load_state_dict(_ewc_state(**change))
    assert plugin.entries == []
