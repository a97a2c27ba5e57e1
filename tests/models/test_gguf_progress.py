"""The GGUF conversion (about a minute for SmolLM2 on 2 cores) shows a progress bar over its stages."""

from __future__ import annotations

import pytest

pytest.importorskip("gguf")

from test_gguf_loading import write_tiny_llama_gguf  # noqa: E402 - the tiny GQA Llama GGUF the loading tests write

from hf_adaptive.models import gguf as gguf_loading  # noqa: E402


def test_the_conversion_shows_its_stages_and_is_quiet_when_asked(tmp_path, capsys):
    path = write_tiny_llama_gguf(tmp_path / "tiny-llama.gguf")
    gguf_loading.convert_gguf(path, tmp_path / "out")
    err = capsys.readouterr().err
    assert "converting tiny-llama.gguf" in err and "save safetensors" in err
    gguf_loading.convert_gguf(path, tmp_path / "quiet", progress_bar=False)
    assert "converting tiny-llama.gguf" not in capsys.readouterr().err
    assert (tmp_path / "quiet" / "model.safetensors").is_file()


def test_no_bar_on_a_secondary_process(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    gguf_loading.convert_gguf(write_tiny_llama_gguf(tmp_path / "m.gguf"), tmp_path / "out")
    assert "converting m.gguf" not in capsys.readouterr().err
