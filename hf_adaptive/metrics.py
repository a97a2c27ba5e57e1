"""Continual-learning metrics over the accuracy matrix, as defined in the literature.

`R[i][j]` is the accuracy on task j after training task i (i, j = 0..T-1); `b[j]` the accuracy on task j
before any training. With T tasks:

* average accuracy  ACC = 1/T · Σ_j R[T-1][j]
* backward transfer BWT = 1/(T-1) · Σ_{j<T-1} (R[T-1][j] − R[j][j])            (Lopez-Paz & Ranzato 2017)
* forward transfer  FWT = 1/(T-1) · Σ_{j>0} (R[j-1][j] − b[j])                  (Lopez-Paz & Ranzato 2017)
* forgetting        F   = 1/(T-1) · Σ_{j<T-1} (max_{j≤l<T-1} R[l][j] − R[T-1][j])  (Chaudhry et al. 2018)

Forgetting takes the best accuracy on task j once it was learned (l ≥ j): entries above the diagonal are the
accuracy on a task not trained yet (NaN when `evaluate_unseen_tasks=False`) and are not part of it.
With one task, BWT, FWT and forgetting are undefined (None). `results.json` is strict JSON: a NaN (an entry not
evaluated) is written as `null` and read back as NaN.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .utils.io import atomic_write_json

Matrix = Sequence[Sequence[float]]


def _check_matrix(matrix: Matrix) -> int:
    t = len(matrix)
    if t == 0:
        raise ValueError("accuracy matrix is empty")
    for i, row in enumerate(matrix):
        if len(row) < t:
            raise ValueError(f"accuracy matrix row {i} has {len(row)} entries, needs at least {t} (square matrix)")
    return t


def average_accuracy(matrix: Matrix) -> float:
    t = _check_matrix(matrix)
    return sum(matrix[t - 1][j] for j in range(t)) / t


def backward_transfer(matrix: Matrix) -> float | None:
    t = _check_matrix(matrix)
    if t < 2:
        return None
    return sum(matrix[t - 1][j] - matrix[j][j] for j in range(t - 1)) / (t - 1)


def forward_transfer(matrix: Matrix, baseline: Sequence[float] | None) -> float | None:
    t = _check_matrix(matrix)
    if t < 2 or baseline is None:
        return None
    if len(baseline) < t:
        raise ValueError(f"baseline has {len(baseline)} entries, needs {t}")
    return sum(matrix[j - 1][j] - baseline[j] for j in range(1, t)) / (t - 1)


def forgetting(matrix: Matrix) -> float | None:
    t = _check_matrix(matrix)
    if t < 2:
        return None
    return sum(max(matrix[k][j] for k in range(j, t - 1)) - matrix[t - 1][j] for j in range(t - 1)) / (t - 1)


def _json_safe(value: Any) -> Any:
    """`value` with every non-finite float replaced by None (JSON has no NaN; `null` means 'not measured')."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _nan_for_null(values: Sequence[float | None] | None) -> list[float] | None:
    return None if values is None else [float("nan") if v is None else float(v) for v in values]


@dataclass
class ContinualResult:
    """What a continual run produced: the accuracy matrix, its summary metrics and per-task timings."""

    task_names: list[str]
    matrix: list[list[float]]
    baseline: list[float] | None = None
    train_time: list[float] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    @property
    def avg_acc(self) -> float:
        return average_accuracy(self.matrix)

    @property
    def bwt(self) -> float | None:
        return backward_transfer(self.matrix)

    @property
    def fwt(self) -> float | None:
        return forward_transfer(self.matrix, self.baseline)

    @property
    def forgetting(self) -> float | None:
        return forgetting(self.matrix)

    def metrics(self, names: Sequence[str] = ("avg_acc", "bwt", "fwt", "forgetting")) -> dict[str, float | None]:
        return {name: getattr(self, name) for name in names}

    def to_dict(self) -> dict:
        """Plain JSON values: NaN (not evaluated) and other non-finite floats become None."""
        out = asdict(self)
        out["metrics"] = self.metrics()
        return _json_safe(out)

    @classmethod
    def from_dict(cls, data: dict) -> ContinualResult:
        """Inverse of `to_dict`: `null` entries of the matrix and baseline are NaN again."""
        values = {k: data[k] for k in ("task_names", "matrix", "baseline", "train_time", "extra") if k in data}
        if "matrix" in values:
            values["matrix"] = [_nan_for_null(row) for row in values["matrix"]]
        if "baseline" in values:
            values["baseline"] = _nan_for_null(values["baseline"])
        return cls(**values)

    def save(self, directory: str | Path, plot: bool = True) -> dict[str, Path]:
        """Write `results.json` (and `accuracy_matrix.png`) into `directory`."""
        directory = Path(directory)
        paths = {"json": directory / "results.json"}
        atomic_write_json(paths["json"], self.to_dict())
        if plot:
            paths["png"] = directory / "accuracy_matrix.png"
            plot_accuracy_matrix(self, paths["png"])
        return paths

    @classmethod
    def load(cls, path: str | Path) -> ContinualResult:
        path = Path(path)
        if path.is_dir():
            path = path / "results.json"
        return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))

    def format_table(self) -> str:
        """The matrix and metrics as a markdown table."""
        names = self.task_names
        head = "| after \\ on | " + " | ".join(names) + " |"
        lines = [head, "|" + "---|" * (len(names) + 1)]
        if self.baseline is not None:
            lines.append("| (untrained) | " + " | ".join(f"{v:.3f}" for v in self.baseline) + " |")
        for i, row in enumerate(self.matrix):
            lines.append(f"| {names[i]} | " + " | ".join(f"{v:.3f}" for v in row) + " |")
        summary = ", ".join(
            f"{k}={v:+.4f}" if k != "avg_acc" else f"{k}={v:.4f}" for k, v in self.metrics().items() if v is not None
        )
        return "\n".join(lines) + "\n\n" + summary


def plot_accuracy_matrix(result: ContinualResult, path: str | Path) -> None:
    """A heatmap of R with the values written in, saved atomically as PNG."""
    import os
    import tempfile

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = result.matrix
    t = len(result.task_names)
    fig, ax = plt.subplots(figsize=(1.2 * t + 2.5, 1.0 * len(matrix) + 2))
    im = ax.imshow(matrix, vmin=0.0, vmax=1.0, cmap="viridis")
    ax.set_xticks(range(t), result.task_names, rotation=45, ha="right")
    ax.set_yticks(range(len(matrix)), [f"after {n}" for n in result.task_names[: len(matrix)]])
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            if not math.isnan(value):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", color="w" if value < 0.6 else "k")
    bwt = result.bwt
    ax.set_title(f"ACC {result.avg_acc:.3f}" + (f"  BWT {bwt:+.3f}" if bwt is not None else ""))
    fig.colorbar(im, ax=ax, label="accuracy")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
