"""Shared helpers of the benchmark scripts: a steady single-threaded setup, step timing and result files."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

# the package of this checkout, also when it is not installed
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

torch.set_num_threads(1)
RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"


class StepTimer(TrainerCallback):
    """Wall time of every optimizer step (forward, backward, plugin terms, optimizer), in seconds."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start)


def median(values):
    return statistics.median(values)


def environment() -> dict:
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
    }


def write_results(name: str, data: dict, markdown: str, out: Path | str = RESULTS) -> None:
    """`<out>/<name>.json` (`data` plus the `environment`, a script's own entries there kept) and `<out>/<name>.md`,
    each written atomically; prints the markdown. Every benchmark writes its results through here."""
    from hf_adaptive.utils.io import atomic_write_json, atomic_write_text

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = {**data, "environment": {**environment(), **data.get("environment", {})}}
    atomic_write_json(out / f"{name}.json", data)
    atomic_write_text(out / f"{name}.md", markdown.rstrip() + "\n")
    print(markdown)
    print(f"\nwritten: {out / (name + '.md')}, {out / (name + '.json')}")


def dumps(obj) -> str:
    return json.dumps(obj, indent=2)
