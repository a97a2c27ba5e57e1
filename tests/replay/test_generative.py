"""GenerativeReplayPlugin: the quality filter, well-formed pseudo-examples, the LM term, the prototype variant."""

from __future__ import annotations

import copy
import re
from types import SimpleNamespace

import pytest
import torch

from hf_adaptive.replay import GenerativeReplayPlugin, TaskSpec, parse_generated
from hf_adaptive.replay._common import task_row_indices
from hf_adaptive.replay.feature import extract_features, prompt_tokens
from hf_adaptive.replay.generative import lm_loss
from hf_adaptive.tasks import CausalLMCollator, encode_example, tokenize_task
from hf_adaptive.utils.io import load_state, save_state
from hf_adaptive.utils.validation import OptionError

SPEC = TaskSpec("first_color", "first_color : {text} ?", ["yes", "no"])


@pytest.mark.parametrize(
    "text, expected",
    [
        ("first_color : red cat dog ? yes", ("red cat dog", 0)),
        ("first_color :   blue   ? no", ("blue", 1)),
    ],
)
def test_filter_accepts_well_formed_rows(text, expected):
    assert parse_generated(text, SPEC) == expected


def test_filter_with_multi_word_labels_and_a_suffix_free_template():
    spec = TaskSpec("rte", "rte : {text} answer :", ["entailment", "not entailment"])
    assert parse_generated("rte : a b answer : not entailment", spec) == ("a b", 1)
    assert parse_generated("rte : a b answer : entailment", spec) == ("a b", 0)
    assert parse_generated("rte : a b answer : not", spec) is None
    assert parse_generated("rte : answer : entailment", spec) is None
    bare = TaskSpec("t", "{text}", ["yes", "no"])
    assert parse_generated("red cat yes", bare) == ("red cat", 0)
    assert parse_generated("yes", bare) is None


@pytest.mark.parametrize(
    "text",
    [
        "last_color : red cat ? yes",  # another task's prefix
        "first_color red cat ? yes",  # template broken
        "first_color : red cat ? maybe",  # label not in the verbalizer
        "first_color : ? yes",  # empty text
        "first_color : red cat yes",  # no "?"
        "first_color : red cat ? yes no",  # trailing words
        "first_color : red <unk> cat ? yes",  # unknown token
        "first_color : red : cat ? yes",  # template literal inside the text
        "first_color : red first_color cat ? no",  # run-on into another example
        "",
    ],
)
def test_filter_rejects_malformed_rows(text):
    assert parse_generated(text, SPEC) is None


@pytest.fixture(scope="module")
def generator_model(tokenizer, test_seed):
    """A tiny Gemma trained (150 full-batch steps of answer + LM loss) on first_color, so it can write examples.

    150 Adam steps on one batch of 64 rows memorise the row format, whatever the seed: the share of valid rows
    asserted below holds by construction (checked for seeds 0-2 and 1 or 2 threads), not on one trajectory.
    """
    from hf_adaptive.models import build_tiny_gemma
    from hf_adaptive.tasks import builtin_suite

    task = builtin_suite(["first_color"], n_train=64, n_eval=8, seed=test_seed)[0]
    model, _ = build_tiny_gemma(tokenizer, seed=test_seed)
    batch = CausalLMCollator(tokenizer)(list(tokenize_task(task, tokenizer)))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    torch.manual_seed(test_seed)
    for _ in range(150):
        out = model(**batch)
        loss = out.loss + lm_loss(out.logits, batch["input_ids"], batch["attention_mask"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, task


def _check_row(row, tokenizer, spec):
    """A pseudo row is exactly what `encode_example` makes of a well-formed (text, label)."""
    decoded = tokenizer.decode(row["input_ids"], skip_special_tokens=True)
    parsed = parse_generated(decoded, spec)
    assert parsed is not None, decoded
    again = encode_example(spec.as_task(), {"text": parsed[0], "label": parsed[1]}, tokenizer)
    assert row["input_ids"] == again["input_ids"] and row["labels"] == again["labels"]
    assert row["input_ids"][0] == tokenizer.bos_token_id and row["input_ids"][-1] == tokenizer.eos_token_id
    n_answer = sum(lab != -100 for lab in row["labels"])
    assert n_answer == 2 and row["labels"][-2] in tokenizer.convert_tokens_to_ids(spec.verbalizer)
    return parsed


def test_generates_filtered_pseudo_examples_before_a_new_task(
    generator_model, tokenizer, two_tasks, test_seed, contexts, context_of
):
    model, first = generator_model
    trainer = SimpleNamespace(model=copy.deepcopy(model), processing_class=tokenizer)
    plugin = GenerativeReplayPlugin(ratio=0.5, alpha=0.2, batch_size=4, seed=test_seed)
    plugin.on_task_begin(trainer, context_of(first, 0))
    assert len(plugin.pseudo) == 0  # nothing to replay before the first task
    plugin.on_task_end(trainer, context_of(first, 0))
    plugin.on_task_begin(trainer, contexts[1])
    wanted = round(0.5 * len(two_tasks[1].train_dataset))
    stats = plugin.stats["first_color"]
    assert stats["wanted"] == wanted and stats["accepted"] == len(plugin.pseudo) > 0
    assert stats["generated"] >= stats["accepted"] >= wanted // 2, stats  # a trained model mostly writes valid rows
    for task, item in plugin.pseudo.items():
        assert task == "first_color"
        _check_row({k: v.tolist() for k, v in item.items()}, tokenizer, SPEC)
    # the model was left in the mode it was in
    assert trainer.model.training


def test_generation_rejects_what_the_filter_rejects(tokenizer, two_tasks):
    """An untrained model writes mostly junk: whatever passes is still well-formed, the rest is dropped."""

    from hf_adaptive.models import build_tiny_gemma

    model, _ = build_tiny_gemma(tokenizer, seed=1)
    plugin = GenerativeReplayPlugin(ratio=1.0, max_rounds=1, max_new_tokens=12)
    rows, generated = plugin.generate(model, tokenizer, SPEC, 20, seed=0)
    assert generated == 30 and len(rows) < generated
    for row in rows:
        _check_row(row, tokenizer, SPEC)


def test_loss_terms_replay_and_lm(generator_model, tokenizer, two_tasks, contexts, context_of):
    model, first = generator_model
    model = copy.deepcopy(model).train()
    trainer = SimpleNamespace(model=model, processing_class=tokenizer)
    plugin = GenerativeReplayPlugin(ratio=0.5, alpha=0.3, lm_lambda=0.25, batch_size=4, seed=0)
    plugin.on_task_end(trainer, context_of(first, 0))
    plugin.on_task_begin(trainer, contexts[1])
    batch = CausalLMCollator(tokenizer)([tokenize_task(two_tasks[1], tokenizer)[i] for i in range(4)])
    outputs = model(**batch)
    state = plugin.pseudo.generator.get_state()
    terms = {t.name: t for t in plugin.loss_terms(trainer, model, batch, outputs)}
    assert set(terms) == {"generative_replay", "generative_lm"}
    assert terms["generative_replay"].weight == 0.3 and terms["generative_lm"].weight == 0.25
    plugin.pseudo.generator.set_state(state)
    rows = plugin.pseudo.sample(4)
    pseudo = CausalLMCollator(tokenizer)(rows)
    pseudo_out = model(**pseudo)
    torch.testing.assert_close(terms["generative_replay"].value, pseudo_out.loss)

    def full_nll(ids, mask):  # every non-padding next token, by hand
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1], -1)
        tgt, m = ids[:, 1:], mask[:, 1:].bool()
        return -logp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)[m].mean()

    expected = (
        full_nll(batch["input_ids"], batch["attention_mask"]) + full_nll(pseudo["input_ids"], pseudo["attention_mask"])
    ) / 2
    torch.testing.assert_close(terms["generative_lm"].value, expected, atol=1e-5, rtol=1e-5)
    assert plugin.loss_terms(trainer, model.eval(), batch, outputs) == []


def test_prototype_conditioned_generation(generator_model, tokenizer, two_tasks, contexts, context_of):
    model, first = generator_model
    trainer = SimpleNamespace(model=copy.deepcopy(model), processing_class=tokenizer)
    plugin = GenerativeReplayPlugin(
        ratio=1.0, conditioning="prototype", prototype_samples=32, prototypes_per_class=2, prefix_words=1, seed=0
    )
    plugin.on_task_end(trainer, context_of(first, 0))
    stored = plugin.prototypes["first_color"]
    # by hand: per class, the distinct first words of the rows nearest (L2 of answer-position features) the class mean
    idx = task_row_indices(first, 32, seed=0, task_index=0)  # the seeded, label-stratified rows it keeps
    rows = [dict(r) for r in tokenize_task(first, tokenizer).select(idx)]
    feats = extract_features(trainer.model, prompt_tokens(rows), 0)
    labels = torch.tensor([first.train_dataset["label"][i] for i in idx])
    words = [first.train_dataset["text"][i].split()[0] for i in idx]
    expected_prefixes, expected_classes = [], []
    for c in (0, 1):
        idx = (labels == c).nonzero().flatten()
        order = idx[(feats[idx] - feats[idx].mean(0)).pow(2).sum(-1).argsort()].tolist()
        firsts = list(dict.fromkeys(words[i] for i in order))[:2]
        expected_prefixes += [[tokenizer.convert_tokens_to_ids(w)] for w in firsts]
        expected_classes += [c] * len(firsts)
    assert stored["prefixes"] == expected_prefixes and stored["prefix_classes"] == expected_classes
    plugin.on_task_begin(trainer, contexts[1])
    assert len(plugin.pseudo) > 0
    allowed = {tokenizer.convert_ids_to_tokens(p[0]) for p in stored["prefixes"]}
    for _, item in plugin.pseudo.items():
        text, _ = _check_row({k: v.tolist() for k, v in item.items()}, tokenizer, SPEC)
        assert text.split()[0] in allowed


def test_state_round_trip_and_from_config(generator_model, tokenizer, two_tasks, tmp_path, contexts, context_of):
    model, first = generator_model
    trainer = SimpleNamespace(model=copy.deepcopy(model), processing_class=tokenizer)
    args = SimpleNamespace(generative_replay_ratio=0.5, replay_alpha=0.1, replay_batch_size=3, seed=2)
    plugin = GenerativeReplayPlugin.from_config(args, conditioning="prototype")
    assert (plugin.ratio, plugin.alpha, plugin.batch_size, plugin.seed) == (0.5, 0.1, 3, 2)
    plugin.on_task_end(trainer, context_of(first, 0))
    plugin.on_task_begin(trainer, contexts[1])
    save_state(tmp_path / "gen", plugin.state_dict())
    restored = GenerativeReplayPlugin.from_config(args, conditioning="prototype")
    restored.load_state_dict(load_state(tmp_path / "gen"))
    assert restored.specs == plugin.specs and restored.stats == plugin.stats
    assert restored.prototypes["first_color"]["prefixes"] == plugin.prototypes["first_color"]["prefixes"]
    torch.testing.assert_close(
        restored.prototypes["first_color"]["prototypes"], plugin.prototypes["first_color"]["prototypes"]
    )
    assert restored.pseudo.sample(5) == plugin.pseudo.sample(5)


def test_bad_arguments_name_the_field():
    with pytest.raises(OptionError, match=re.escape("GenerativeReplayConfig.conditioning='label' is not allowed")):
        GenerativeReplayPlugin(conditioning="label")
    with pytest.raises(OptionError, match=re.escape("GenerativeReplayConfig.ratio=-1 is not allowed")):
        GenerativeReplayPlugin(ratio=-1)
    with pytest.raises(OptionError, match=re.escape("GenerativeReplayConfig.temperature=0 is not allowed")):
        GenerativeReplayPlugin(temperature=0)


def test_from_config_reads_the_shared_replay_options():
    """`replay_alpha` / `replay_batch_size` are shared with exact replay; errors name the option that was set."""
    plugin = GenerativeReplayPlugin.from_config(
        SimpleNamespace(
            generative_replay_ratio=0.5,
            generative_replay_lm_lambda=0.5,
            generative_replay_conditioning="prototype",
            generative_replay_max_new_tokens=5,
            generative_replay_top_k=4,
            generative_replay_temperature=0.7,
            generative_replay_max_rounds=6,
            generative_replay_prototype_samples=9,
            generative_replay_prototypes_per_class=4,
            generative_replay_prefix_words=3,
            replay_alpha=0.75,
            replay_batch_size=3,
            seed=7,
        )
    )
    got = {k: getattr(plugin, k) for k in ("ratio", "alpha", "lm_lambda", "batch_size", "conditioning", "seed")}
    assert got == dict(ratio=0.5, alpha=0.75, lm_lambda=0.5, batch_size=3, conditioning="prototype", seed=7)
    assert (plugin.max_new_tokens, plugin.top_k, plugin.temperature, plugin.max_rounds) == (5, 4, 0.7, 6)
    assert (plugin.prototype_samples, plugin.prototypes_per_class, plugin.prefix_words) == (9, 4, 3)
    with pytest.raises(OptionError, match=r"^SimpleNamespace.replay_alpha=2 is not allowed"):
        GenerativeReplayPlugin.from_config(SimpleNamespace(replay_alpha=2))
    with pytest.raises(OptionError, match=r"^SimpleNamespace.generative_replay_temperature=0 is not allowed"):
        GenerativeReplayPlugin.from_config(SimpleNamespace(generative_replay_temperature=0))
    # enabled by name with no options it generates and replays (generative_replay_ratio / replay_alpha were 0.0)
    default = GenerativeReplayPlugin.from_config(SimpleNamespace())
    assert (default.ratio, default.alpha) == (0.2, 0.2) and default.config == GenerativeReplayPlugin().config


def test_lm_loss_matches_the_former_cross_entropy(tiny_model, tokenizer, two_tasks):
    """`lm_loss` (now `answer_cross_entropy` over every non-padding token) = the former `F.cross_entropy` form."""
    rows = [{k: r[k] for k in ("input_ids", "labels")} for r in tokenize_task(two_tasks[0], tokenizer).select(range(6))]
    rows[0] = {"input_ids": rows[0]["input_ids"][:5], "labels": rows[0]["labels"][:5]}  # some padding
    batch = CausalLMCollator(tokenizer)(rows)
    with torch.no_grad():
        logits = tiny_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["input_ids"][:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0, -100)
    former = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100
    )
    torch.testing.assert_close(
        lm_loss(logits, batch["input_ids"], batch["attention_mask"]), former, atol=1e-6, rtol=1e-6
    )
