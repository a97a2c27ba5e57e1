"""Task signatures: determinism, dimensions, layer validation, and each part against a slow reference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hf_adaptive.experts import SignatureConfig, TaskSignature, count_sketch, gaussian_project
from hf_adaptive.experts.signature import _CHUNK
from hf_adaptive.models import build_tiny_gemma
from hf_adaptive.tasks import encode_example

CFG = dict(n_examples=6, batch_size=4, sketch_dim=16)


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
    with pytest.raises(ValueError, match="SignatureConfig.layers entry 'model.layers.9.mlp'"):
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
    got = signer.gradient_sketch(task, split="eval")
    # reference: example by example, summed token losses of the answer, one backward per example
    rows = signer._examples(task, "eval")
    tiny_model.eval()
    params = dict(tiny_model.named_parameters())
    tiny_model.zero_grad()
    n_tokens = 0
    for row in rows:
        enc = encode_example(task, row, tokenizer)
        ids = torch.tensor([enc["input_ids"]])
        labels = torch.tensor([enc["labels"]])
        logits = tiny_model(input_ids=ids).logits[0, :-1]
        loss = F.cross_entropy(logits, labels[0, 1:], reduction="sum")
        loss.backward()
        n_tokens += int((labels[0, 1:] != -100).sum())
    flat = torch.cat([params[n].grad.flatten() for n in signer.layer_names]) / n_tokens
    project = gaussian_project if method == "gaussian" else count_sketch
    torch.testing.assert_close(got, project(flat, 16, 0), atol=1e-5, rtol=1e-4)


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
    signer = TaskSignature(tiny_model, tokenizer)
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
    signer = TaskSignature(tiny_model, tokenizer, SignatureConfig(text_dim=8, **CFG))
    assert signer.part_dims["text"] == 8 and signer.dim == 8 + 16 + 6
    raw = TaskSignature(tiny_model, tokenizer).text_embedding("does the word cat appear")
    torch.testing.assert_close(signer.text_embedding("does the word cat appear"), gaussian_project(raw, 8, seed=1))
    assert signer.compute(small_tasks[0]).dim == 30
    with pytest.raises(ValueError, match="SignatureConfig.text_dim=0"):
        SignatureConfig(text_dim=0)
