"""FeatureReplayPlugin: prototypes by hand, zero loss for the unchanged model, positive after a change, gradient."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from hf_adaptive.replay import FeatureReplayPlugin
from hf_adaptive.replay._common import task_row_indices
from hf_adaptive.utils.io import load_state, save_state
from hf_adaptive.utils.validation import OptionError


def hand_feature(model, tokenizer, task, text) -> torch.Tensor:
    """The last hidden state at the last prompt token, for one unpadded prompt."""
    ids = [tokenizer.bos_token_id] + tokenizer(task.prompt(text), add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    return out.hidden_states[-1][0, -1].float()


def test_prototypes_equal_a_hand_computation(stand_in, two_tasks, tiny_model, tokenizer, context_of):
    task = two_tasks[0]
    plugin = FeatureReplayPlugin(alpha=0.1, samples_per_task=16)
    plugin.on_task_end(stand_in, context_of(task, 0))
    mem = plugin.memory[task.name]
    idx = task_row_indices(task, 16, seed=0, task_index=0)  # the seeded, label-stratified rows it keeps
    texts = [task.train_dataset["text"][i] for i in idx]
    labels = [task.train_dataset["label"][i] for i in idx]
    feats = torch.stack([hand_feature(tiny_model, tokenizer, task, t) for t in texts])
    labels = torch.tensor(labels)
    expected = torch.stack([feats[labels == c].mean(0) for c in (0, 1)])
    assert mem["prototype_classes"].tolist() == [0, 1]
    torch.testing.assert_close(mem["prototypes"], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mem["targets"], feats, atol=1e-5, rtol=1e-5)
    assert tokenizer.decode(mem["prompts"][0]) == "<bos> " + task.prompt(texts[0])
    torch.testing.assert_close(mem["centroids"], expected, atol=1e-5, rtol=1e-5)  # k = 1: centroids = means


def test_kmeans_centroids_are_means_of_their_clusters(stand_in, two_tasks, contexts):
    plugin = FeatureReplayPlugin(samples_per_task=24, k_per_class=3, target="prototypes", seed=0)
    plugin.on_task_end(stand_in, contexts[0])
    mem = plugin.memory["first_color"]
    assert mem["centroid_class"].tolist() == [0, 0, 0, 1, 1, 1]
    from hf_adaptive.replay.feature import extract_features

    feats = extract_features(stand_in.model, mem["prompts"], 0)
    for c in (0, 1):
        members = feats[mem["classes"] == c]
        cents = mem["centroids"][mem["centroid_class"] == c]
        nearest = torch.cdist(members, cents).argmin(1)
        for j in range(len(cents)):  # Lloyd's fixed point: each centroid is the mean of the points nearest to it
            torch.testing.assert_close(cents[j], members[nearest == j].mean(0), atol=1e-4, rtol=1e-4)
    # the per-row targets are the squared distances to the 6 centroids / hidden
    expected = torch.cdist(feats, mem["centroids"]).pow(2) / feats.shape[1]
    torch.testing.assert_close(mem["targets"], expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("target", ["features", "prototypes"])
def test_loss_zero_unchanged_positive_after_change_and_gradient(stand_in, two_tasks, tiny_model, target, contexts):
    plugin = FeatureReplayPlugin(alpha=0.4, samples_per_task=12, target=target, k_per_class=2, batch_size=10)
    for context in contexts:
        plugin.on_task_end(stand_in, context)
    tiny_model.train()
    (term,) = plugin.loss_terms(stand_in, tiny_model, {}, None)
    assert term.name == "feature_replay" and term.weight == 0.4
    assert float(term.value.detach()) < 1e-10
    with torch.no_grad():
        tiny_model.model.layers[0].mlp.down_proj.weight.add_(
            0.05 * torch.randn_like(tiny_model.model.layers[0].mlp.down_proj.weight)
        )
    (term,) = plugin.loss_terms(stand_in, tiny_model, {}, None)
    assert float(term.value.detach()) > 1e-6
    term.value.backward()
    grad = tiny_model.model.layers[0].mlp.down_proj.weight.grad
    assert grad is not None and float(grad.abs().sum()) > 0


def test_loss_equals_hand_mse(stand_in, two_tasks, tiny_model, tokenizer, context_of):
    task = two_tasks[1]
    plugin = FeatureReplayPlugin(samples_per_task=6, batch_size=4)
    plugin.on_task_end(stand_in, context_of(task, 0))
    stored = plugin.memory[task.name]["targets"].clone()
    with torch.no_grad():
        tiny_model.model.norm.weight.add_(0.3)
    picks = plugin.sample(4)
    loss = plugin.distillation_loss(tiny_model, picks)
    texts = [task.train_dataset["text"][i] for i in task_row_indices(task, 6, seed=0, task_index=0)]
    hand = torch.stack(
        [(hand_feature(tiny_model, tokenizer, task, texts[i]) - stored[i]).pow(2).mean() for _, i in picks]
    )
    torch.testing.assert_close(loss.detach(), hand.mean(), atol=1e-5, rtol=1e-4)


def test_no_term_when_disabled_or_empty(stand_in, two_tasks, tiny_model, contexts):
    assert FeatureReplayPlugin(alpha=0.5).loss_terms(stand_in, tiny_model.train(), {}, None) == []
    off = FeatureReplayPlugin(alpha=0.0, samples_per_task=4)
    off.on_task_end(stand_in, contexts[0])
    assert off.loss_terms(stand_in, tiny_model, {}, None) == []


def test_bytes_per_row(stand_in, two_tasks, contexts):
    exact = FeatureReplayPlugin(samples_per_task=8)
    exact.on_task_end(stand_in, contexts[0])
    assert exact.nbytes_per_row("first_color") == 4 * 11 + 64 * 4  # 11 prompt tokens + 64 float32
    small = FeatureReplayPlugin(samples_per_task=8, target="prototypes", k_per_class=1)
    small.on_task_end(stand_in, contexts[0])
    assert small.nbytes_per_row("first_color") == 4 * 11 + 2 * 4  # 2 centroids


def test_state_round_trip_and_from_config(stand_in, two_tasks, tiny_model, tmp_path, contexts):
    args = SimpleNamespace(feature_replay_alpha=0.25, replay_batch_size=3, seed=4)
    plugin = FeatureReplayPlugin.from_config(args, samples_per_task=5, feature_dtype=torch.bfloat16)
    assert (plugin.alpha, plugin.batch_size, plugin.seed, plugin.max_rows) == (0.25, 3, 4, 200)
    assert plugin.feature_dtype == torch.bfloat16
    for context in contexts:
        plugin.on_task_end(stand_in, context)
    save_state(tmp_path / "feat", plugin.state_dict())
    restored = FeatureReplayPlugin.from_config(args, samples_per_task=5, feature_dtype=torch.bfloat16)
    restored.load_state_dict(load_state(tmp_path / "feat"))
    assert list(restored.memory) == list(plugin.memory)
    for name, mem in plugin.memory.items():
        assert restored.memory[name]["prompts"] == mem["prompts"]
        assert restored.memory[name]["targets"].dtype == torch.bfloat16
        for key in ("prototypes", "centroids", "targets", "classes"):
            torch.testing.assert_close(restored.memory[name][key], mem[key])
    with torch.no_grad():
        tiny_model.model.norm.weight.add_(0.1)
    tiny_model.train()
    a = plugin.loss_terms(stand_in, tiny_model, {}, None)[0].value
    b = restored.loss_terms(stand_in, tiny_model, {}, None)[0].value
    torch.testing.assert_close(a, b)


def test_bad_arguments_name_the_field():
    with pytest.raises(OptionError, match=r"FeatureReplayConfig.target='logits' is not allowed"):
        FeatureReplayPlugin(target="logits")
    with pytest.raises(OptionError, match=r"FeatureReplayConfig.alpha=-0.1 is not allowed"):
        FeatureReplayPlugin(alpha=-0.1)
    with pytest.raises(OptionError, match=r"FeatureReplayConfig.k_per_class=0 is not allowed"):
        FeatureReplayPlugin(k_per_class=0)
    with pytest.raises(OptionError, match=r"FeatureReplayConfig.feature_dtype='int8' is not allowed"):
        FeatureReplayPlugin(feature_dtype="int8")


def test_from_config_reads_the_shared_replay_options():
    """`replay_buffer_size` caps the rows and `replay_batch_size` sets the batch; errors name those options."""
    plugin = FeatureReplayPlugin.from_config(
        SimpleNamespace(
            feature_replay_alpha=0.5,
            feature_replay_target="prototypes",
            feature_replay_k_per_class=2,
            feature_replay_samples_per_task=9,
            feature_replay_dtype="float16",
            replay_buffer_size=17,
            replay_batch_size=3,
            seed=7,
        )
    )
    assert (plugin.alpha, plugin.target, plugin.k_per_class, plugin.samples_per_task) == (0.5, "prototypes", 2, 9)
    assert (plugin.max_rows, plugin.batch_size, plugin.seed, plugin.feature_dtype) == (17, 3, 7, torch.float16)
    with pytest.raises(OptionError, match=r"^SimpleNamespace.replay_buffer_size=0 is not allowed"):
        FeatureReplayPlugin.from_config(SimpleNamespace(replay_buffer_size=0))
    with pytest.raises(OptionError, match=r"^SimpleNamespace.feature_replay_dtype='int8' is not allowed"):
        FeatureReplayPlugin.from_config(SimpleNamespace(feature_replay_dtype="int8"))
    # enabled by name with no options it distils (issue #12: feature_replay_alpha was 0.0, a silent no-op)
    default = FeatureReplayPlugin.from_config(SimpleNamespace())
    assert default.alpha == 0.1 and default.config == FeatureReplayPlugin().config


def test_max_rows_caps_the_memory_with_equal_shares(stand_in, two_tasks, tokenizer, contexts):
    plugin = FeatureReplayPlugin(samples_per_task=20, max_rows=15)
    plugin.on_task_end(stand_in, contexts[0])
    assert len(plugin.memory["first_color"]["prompts"]) == 15
    protos_before = plugin.memory["first_color"]["prototypes"].clone()
    plugin.on_task_end(stand_in, contexts[1])
    sizes = {name: len(mem["prompts"]) for name, mem in plugin.memory.items()}
    assert sizes == {"first_color": 8, "last_color": 7}
    mem = plugin.memory["first_color"]
    assert len(mem["classes"]) == len(mem["targets"]) == 8
    torch.testing.assert_close(mem["prototypes"], protos_before)  # the summary keeps all 20 rows
    # kept rows still carry their own targets: the loss of the unchanged model stays zero
    assert float(plugin.distillation_loss(stand_in.model, plugin.sample(15)).detach()) < 1e-10
    texts = [two_tasks[0].train_dataset["text"][i] for i in task_row_indices(two_tasks[0], 20, seed=0, task_index=0)]
    prompts = {
        tuple([tokenizer.bos_token_id] + tokenizer(two_tasks[0].prompt(t), add_special_tokens=False)["input_ids"])
        for t in texts
    }
    assert all(tuple(p) in prompts for p in mem["prompts"])
