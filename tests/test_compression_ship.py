"""benchmarks/compression_ship.py: one `--quick` run end to end on the tiny Gemma (quantize, save, reload, push to
the local Hub stand-in, download, reload: equal accuracies; the card states scheme, bits and every task's
accuracy), and the refusal of an arm that is not a post-training quantization."""

from __future__ import annotations

import json
import socket

import pytest
from benchmark_loader import load_benchmark


@pytest.fixture(scope="module")
def cs():
    yield from load_benchmark("compression_ship")


@pytest.fixture(scope="module")
def quick_run(cs, tmp_path_factory):
    """(exit status, folder) of `--quick --out <tmp>`: the tiny finished sequence, the fp32 and arm records, the
    ship."""
    pytest.importorskip("torchao")
    with socket.socket() as probe:  # the local Hub stand-in listens on the loopback interface
        probe.bind(("127.0.0.1", 0))
    out = tmp_path_factory.mktemp("ship")
    return cs.main(["--quick", "--out", str(out)]), out


def test_quick_ships_with_equal_accuracies_and_a_card_stating_them(quick_run):
    status, out = quick_run
    assert status == 0
    data = json.loads((out / "compression_ship.json").read_text())
    names, acc = data["task_names"], data["accuracy"]
    assert names == ["first_color", "last_color", "has_cat"] and data["arm"] == "ptq_int8_weight_only"
    assert acc["in_memory"] == acc["reloaded"] == acc["downloaded"] and set(acc["in_memory"]) == set(names)
    assert data["equal_in_memory_reloaded_downloaded"] is True
    # the stored record is the arm compression.py made from the same finished model, here on the same CPU
    assert data["stored_record"]["status"] == "current" and acc["stored_record"] == acc["in_memory"]
    assert data["difference_to_stored_record"] == {n: 0.0 for n in names}
    assert data["size"]["bytes"] == data["size"]["stored_record_bytes"] == sum(data["size"]["files"].values())
    assert 0 < data["size"]["ratio_to_fp32"] < 0.5
    hub = data["hub"]
    assert len(hub["commit"]) == 40 and hub["repo"] == "hf-adaptive/tiny-gemma-cl-int8wo"
    assert {"README.md", "config.json", "model.safetensors", "tokenizer.json"} <= set(hub["files"])
    assert hub["card_is_the_rendered_card"] and all(hub["card_states"].values())
    assert {f"accuracy[{n}]" for n in names} <= set(hub["card_states"])
    assert set(data["seconds"]) >= {"quantize", "evaluate", "save", "reload", "push", "download", "total"}
    report = (out / "compression_ship.md").read_text()
    assert "**equal** accuracies on every task" in report
    card = report.split("````markdown\n", 1)[1]
    assert "| scheme | `int8_weight_only` |" in card and "| weight bits | 8 |" in card
    assert "| activation bits | float |" in card and "post-training quantization" in card
    for n in names:
        row = f"| {n} | {acc['in_memory'][n]:.4f} | {acc['fp32_record'][n]:.4f} |"
        assert row in card, row


def test_a_non_ptq_arm_is_refused_naming_it(cs, capsys, tmp_path):
    for arm in ("prune50", "qat_8da4w", "fp32", "nope"):
        with pytest.raises(ValueError, match=rf"--arm '{arm}' is refused .*ptq_int8_weight_only"):
            cs.check_arm(arm)
    with pytest.raises(SystemExit) as exit_info:
        cs.main(["--arm", "prune70", "--quick", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "'prune70' is refused (a non-PTQ arm)" in err and "ptq_8da4w" in err
    assert not list(tmp_path.iterdir())  # refused before anything ran


def test_quick_needs_out(cs, capsys):
    with pytest.raises(SystemExit):
        cs.main(["--quick"])
    assert "--quick needs --out" in capsys.readouterr().err
