"""The embedded default: a tiny Gemma built from a config and a word-level tokenizer built offline.

Nothing is downloaded. The tokenizer knows the words of the built-in task suite plus a small general
vocabulary, so task descriptions and generated text stay mostly in-vocabulary.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from transformers import GemmaConfig, GemmaForCausalLM, PreTrainedTokenizerFast

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


def tiny_gemma_config(vocab_size: int, **overrides) -> GemmaConfig:
    """A 2-layer Gemma small enough to train on one CPU core in seconds per task."""
    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=128,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
        tie_word_embeddings=True,
    )
    kwargs.update(overrides)
    return GemmaConfig(**kwargs)


def build_tiny_gemma(
    tokenizer: PreTrainedTokenizerFast | None = None, seed: int = 0, attn_implementation: str = "sdpa", **overrides
) -> tuple[GemmaForCausalLM, PreTrainedTokenizerFast]:
    """A freshly initialised tiny Gemma and its tokenizer (same seed, same weights)."""
    tokenizer = tokenizer or build_tokenizer()
    config = tiny_gemma_config(len(tokenizer), **overrides)
    config._attn_implementation = attn_implementation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GemmaForCausalLM(config)
    return model, tokenizer
