"""A task sequence of your own, through the public API only: lists of dicts in, an accuracy matrix out.

EWC and replay are configured through `ContinualConfig` alone (the `ewc_*` / `replay_*` options) and built by
name with `build_plugins`. Runs in about a minute on 2 CPU cores with the embedded tiny model:

    python examples/user_sequence.py --output_dir outputs/user_sequence
"""

from __future__ import annotations

import argparse
import random

from hf_adaptive import ContinualConfig, ContinualTrainer, Task, build_plugins
from hf_adaptive.models import build_tiny_gemma

WORDS = ["red", "blue", "green", "gold", "cat", "dog", "fox", "owl"]


def make_rows(rule, n: int, seed: int) -> list[dict]:
    """`n` rows of 4 random words with the label `rule` gives them (what a user's own data looks like)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(4)]
        rows.append({"text": " ".join(words), "label": int(rule(words))})
    return rows


def user_tasks(n_train: int = 256, n_eval: int = 64) -> list[Task]:
    rules = {
        "starts_with_animal": (lambda w: w[0] in ("cat", "dog", "fox", "owl"), "is the first word an animal ?"),
        "has_red": (lambda w: "red" in w, "is red in the list ?"),
        "ends_with_color": (lambda w: w[-1] in ("red", "blue", "green", "gold"), "is the last word a color ?"),
    }
    return [
        Task(
            name=name,
            train_dataset=make_rows(rule, n_train, seed=2 * i),  # plain lists of dicts
            eval_dataset=make_rows(rule, n_eval, seed=2 * i + 1),
            verbalizer=["no", "yes"],
            template=question + " {text} :",
            description=question,
        )
        for i, (name, (rule, question)) in enumerate(rules.items())
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="outputs/user_sequence")
    parser.add_argument("--epochs", type=float, default=20)
    cli = parser.parse_args()

    model, tokenizer = build_tiny_gemma(seed=0)
    args = ContinualConfig(
        output_dir=cli.output_dir,
        num_train_epochs=cli.epochs,
        learning_rate=2e-3,
        per_device_train_batch_size=16,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        # EWC: Fisher normalised to max 1 so that lambda does not depend on how confident the model is
        ewc_lambda=100.0,
        fisher_normalization="max",
        # replay: 64 rows kept per task (a seeded, label-stratified sample), 8 replayed per step
        replay_alpha=1.0,
        replay_examples_per_task=64,
        replay_buffer_size=256,
        replay_batch_size=8,
    )
    trainer = ContinualTrainer(
        model=model, args=args, processing_class=tokenizer, callbacks=build_plugins(["ewc", "replay"], args)
    )
    result = trainer.train_sequence(user_tasks())
    print(f"\nresults written to {cli.output_dir}/results.json")
    print(f"avg_acc={result.metrics()['avg_acc']:.3f} bwt={result.metrics()['bwt']:+.3f}")


if __name__ == "__main__":
    main()
