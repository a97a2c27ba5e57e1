"""Replay through the real ContinualTrainer: a 2-task sequence logs loss_replay during the second task only."""

from __future__ import annotations

from hf_adaptive.replay import ReplayPlugin
from hf_adaptive.trainer import ContinualTrainer


def test_two_task_sequence_with_replay(tiny_model, tokenizer, tmp_path, make_args):
    from hf_adaptive.tasks import builtin_suite

    tasks = builtin_suite(["first_color", "last_color"], n_train=32, n_eval=8, seed=0)
    args = make_args(
        tmp_path,
        learning_rate=5e-3,
        replay_alpha=0.5,
        replay_buffer_size=16,
        replay_policy="balanced",
        replay_batch_size=4,
        seed=0,
        evaluate_unseen_tasks=False,
        save_results_plot=False,
        save_strategy="steps",  # end-of-task snapshots (read below) follow the save settings
        save_steps=10_000,
    )
    plugin = ReplayPlugin.from_config(args)
    trainer = ContinualTrainer(model=tiny_model, args=args, processing_class=tokenizer, callbacks=[plugin])
    result = trainer.train_sequence(tasks, evaluate_baseline=False)

    assert len(result.matrix) == 2
    assert plugin.memory.counts() == {"first_color": 8, "last_color": 8}
    train_logs = [log for log in trainer.state.log_history if "loss" in log]
    assert len(train_logs) == 4  # this trainer's state covers the second task: 32 rows / batch 8
    replay = [log["loss_replay"] for log in train_logs if "loss_replay" in log]
    assert len(replay) == 4 and all(v > 0 for v in replay)
    assert all(log["weight_replay"] == 0.5 for log in train_logs)
    # the restored plugin state written with the end-of-task snapshot holds the memory
    from hf_adaptive.utils.io import load_state

    saved = next(tmp_path.glob("**/continual/replay"))
    restored = ReplayPlugin.from_config(args)
    restored.load_state_dict(load_state(saved))
    assert restored.memory.counts() == plugin.memory.counts()


def test_generative_and_feature_replay_in_a_sequence(tiny_model, tokenizer, tmp_path, make_args):
    """Both plugins run inside the real trainer: their terms are logged and their memories are built."""
    from hf_adaptive.replay import FeatureReplayPlugin, GenerativeReplayPlugin
    from hf_adaptive.tasks import builtin_suite

    tasks = builtin_suite(["first_color", "has_cat"], n_train=16, n_eval=8, seed=0)
    args = make_args(
        tmp_path,
        learning_rate=5e-3,
        replay_alpha=0.2,
        generative_replay_ratio=0.5,
        feature_replay_alpha=0.3,
        replay_batch_size=4,
        evaluate_unseen_tasks=False,
        save_results_plot=False,
    )
    generative = GenerativeReplayPlugin.from_config(args, max_new_tokens=16)
    feature = FeatureReplayPlugin.from_config(args, samples_per_task=8)
    trainer = ContinualTrainer(model=tiny_model, args=args, processing_class=tokenizer, callbacks=[generative, feature])
    trainer.train_sequence(tasks, evaluate_baseline=False)

    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert logs and all("loss_generative_lm" in log and "loss_feature_replay" in log for log in logs)
    assert generative.stats["first_color"]["generated"] > 0  # it tried; a 2-step model rarely writes valid rows
    assert set(feature.memory) == {"first_color", "has_cat"}
