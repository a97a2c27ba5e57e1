"""The embedded default: a tiny Gemma built from a config and a word-level tokenizer built offline.

Nothing is downloaded. The tokenizer knows the words of the built-in task suite plus a small general
vocabulary, so task descriptions and generated text stay mostly in-vocabulary.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from transformers import GemmaConfig, GemmaForCausalLM, PreTrainedTokenizerFast

from ..utils.validation import check_choice

SPECIAL_TOKENS = {"pad_token": "<pad>", "eos_token": "<eos>", "bos_token": "<bos>", "unk_token": "<unk>"}
_GENERAL_WORDS = (
    "a an the is are was of to in on at and or not no yes word words task tasks first second third last "
    "more less than color colors animal animals appear appears does do what which label answer sentence "
    "positive negative true false good bad same different count number even odd"
).split()


def build_tokenizer(extra_words: Iterable[str] = ()) -> PreTrainedTokenizerFast:
    """A deterministic word-level tokenizer (whitespace split) covering the built-in suite."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from ..tasks.builtin import builtin_vocabulary

    words = sorted(set(builtin_vocabulary()) | set(_GENERAL_WORDS) | set(extra_words))
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS.values())}
    for w in words:
        vocab.setdefault(w, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, **SPECIAL_TOKENS)
    tok.padding_side = "right"
    return tok


#: the fields of a layout, in the column order of `TINY_PRESETS`' rows
LAYOUT_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
)
#: the tiny model layouts, written once: `tiny` is the embedded default (tests, demo); `micro` its head layout at
#: half width (the other attention families of the model tests); `gates` (benchmarks/gate_control.py: 4 layers x 8
#: heads to gate and prune); `bench` (benchmarks/overhead.py: large enough that a step's time is the model's, not the
#: Python around it); `pruning` (benchmarks/pruning.py: 8 / 4 kv heads, attention time measurable). Any Llama-like
#: config class takes a layout: `LlamaConfig(vocab_size=64, **tiny_layout("micro"))`.
TINY_PRESETS: dict[str, dict[str, int]] = {
    name: dict(zip(LAYOUT_FIELDS, row, strict=True))
    for name, row in {
        #         hidden  ffn  layers heads kv head_dim positions
        "tiny": (64, 128, 2, 4, 2, 16, 128),
        "micro": (32, 64, 2, 4, 2, 8, 64),
        "gates": (128, 256, 4, 8, 4, 16, 128),
        "bench": (256, 1024, 4, 8, 4, 32, 128),
        "pruning": (256, 512, 4, 8, 4, 32, 256),
    }.items()
}
#: the special-token ids of `build_tokenizer` (in `SPECIAL_TOKENS` order), and tied embeddings
TINY_TOKEN_IDS = dict(pad_token_id=0, eos_token_id=1, bos_token_id=2, tie_word_embeddings=True)


def tiny_layout(preset: str = "tiny", **overrides) -> dict:
    """The layout of a `TINY_PRESETS` entry (a copy), with `overrides` applied."""
    check_choice("tiny_layout", "preset", preset, sorted(TINY_PRESETS))
    return {**TINY_PRESETS[preset], **overrides}


def tiny_gemma_config(vocab_size: int, preset: str = "tiny", **overrides) -> GemmaConfig:
    """A small Gemma of a `TINY_PRESETS` layout (default `tiny`: 2 layers, trains on one CPU core in seconds per
    task), with the tokenizer's special-token ids; `overrides` replace any config value."""
    return GemmaConfig(vocab_size=vocab_size, **{**TINY_TOKEN_IDS, **tiny_layout(preset), **overrides})


def build_tiny_gemma(
    tokenizer: PreTrainedTokenizerFast | None = None,
    seed: int = 0,
    attn_implementation: str = "sdpa",
    preset: str = "tiny",
    **overrides,
) -> tuple[GemmaForCausalLM, PreTrainedTokenizerFast]:
    """A freshly initialised tiny Gemma of a `TINY_PRESETS` layout and its tokenizer (same seed, same weights)."""
    tokenizer = tokenizer or build_tokenizer()
    config = tiny_gemma_config(len(tokenizer), preset, **overrides)
    config._attn_implementation = attn_implementation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GemmaForCausalLM(config)
    return model, tokenizer
