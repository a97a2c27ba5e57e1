"""ExpertRoutingPlugin through the real ContinualTrainer: a recurring task reuses its expert."""

from __future__ import annotations

import dataclasses

import torch

from hf_adaptive.config import ContinualConfig
from hf_adaptive.experts import ExpertLibrary, ExpertRoutingPlugin, Router, RouterConfig, SignatureConfig
from hf_adaptive.tasks import builtin_suite
from hf_adaptive.trainer import ContinualTrainer
from hf_adaptive.utils.io import load_state


def test_routing_plugin_in_a_sequence(tiny_model, tokenizer, tmp_path):
    first, cat = builtin_suite(["first_color", "has_cat"], n_train=16, n_eval=16, seed=0)
    again = dataclasses.replace(
        builtin_suite(["first_color"], n_train=16, n_eval=16, seed=1)[0], name="first_color_again"
    )
    sig = SignatureConfig(n_examples=8, batch_size=8, sketch_dim=16)
    library = ExpertLibrary(tiny_model, experiment_id="routing-test")
    router = Router(RouterConfig(dim=64 + 16 + 6, reuse_threshold=0.93, fork_threshold=0.5))
    plugin = ExpertRoutingPlugin(library, router, signature_config=sig, eval_limit=16)
    args = ContinualConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        num_train_epochs=1,
        learning_rate=5e-3,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        adapter_strategy="full",
        evaluate_unseen_tasks=False,
        save_results_plot=False,
        seed=0,
    )
    trainer = ContinualTrainer(model=tiny_model, args=args, processing_class=tokenizer, callbacks=[plugin])
    result = trainer.train_sequence([first, cat, again], evaluate_baseline=False)

    assert len(result.matrix) == 3
    actions = [(d["task"], d["action"]) for d in plugin.decisions]
    assert actions == [("first_color", "create"), ("has_cat", "fork"), ("first_color_again", "reuse")]
    assert plugin.task_expert == {
        "first_color": "expert_first_color",
        "has_cat": "expert_has_cat",
        "first_color_again": "expert_first_color",
    }
    assert library.names == ["expert_first_color", "expert_has_cat"]
    assert library.experts["expert_has_cat"].parent == "expert_first_color"
    assert trainer.model is library.model
    # the reuse produced an outcome for the router, and the expert's profile covers both of its tasks
    assert len(router.outcomes) == 1 and router.outcomes[0].expert == "expert_first_color"
    assert "success" in plugin.decisions[-1]
    expected = torch.nn.functional.normalize(
        (plugin.task_signatures["first_color"] + plugin.task_signatures["first_color_again"]) / 2, dim=0
    )
    torch.testing.assert_close(router.profiles[router.names.index("expert_first_color")], expected)
    assert "accuracy/first_color" in library.experts["expert_first_color"].metrics

    # the end-of-task snapshot holds the plugin state; it restores adapters, router and mapping in a fresh model
    saved = next(tmp_path.glob("**/continual/expert_routing"))
    from hf_adaptive.models import build_tiny_gemma

    fresh_lib = ExpertLibrary(build_tiny_gemma(tokenizer, seed=0)[0])
    fresh = ExpertRoutingPlugin(fresh_lib, Router(RouterConfig(dim=86)), signature_config=sig)
    fresh.load_state_dict(load_state(saved))
    assert fresh_lib.names == library.names and fresh.task_expert == plugin.task_expert
    torch.testing.assert_close(fresh.router.profiles, router.profiles)
    ids = torch.randint(4, 60, (1, 8), generator=torch.Generator().manual_seed(0))
    for name in library.names:
        library.activate(name)
        fresh_lib.activate(name)
        library.model.eval()
        fresh_lib.model.eval()
        with torch.no_grad():
            torch.testing.assert_close(fresh_lib.model(input_ids=ids).logits, library.model(input_ids=ids).logits)
