"""Figures (and one table) of issue 14's freezing, routing and head-gate measurements, drawn from their stored
results (no model is loaded).

freezing_real.py and routing_real.py / routing_reuse_cost.py report their numbers as tables only, and
gates_real_followup.py judges LoRA accuracy on plain accuracy; this script draws and re-reads them, so every section
of issue 14 in docs/results.md has its plot, without touching (and so staling) the scripts whose runs made the
numbers:

* ``freezing_real_figure.png``: step-time speedup of each frozen configuration over its unfrozen baseline
  (`freezing_real_speed.json`, with the issue's 1.3x target), accuracy against training time per arm and seed, and
  the number of frozen layers at each step per arm and seed (`freezing_real.json`): the time saved per task and
  which layers froze when;
* ``gates_real_lora_figure.png`` and ``gates_real_lora.md|json``: accuracy and balanced accuracy (the mean of the
  per-class recalls, averaged over the tasks) after gates_real's short LoRA with each strategy's heads at each
  budget (`gates_real_followup/lora_*.json`), against the strategy's test loss (`gates_real.json`), with the
  balanced accuracy of a constant prediction (the mean over the tasks of 1 / labels, from the tasks' `labels.json`):
  plain accuracy credits a model that predicts each task's majority label, balanced accuracy does not;
* ``routing_real_figure.png``: the router's score of its best match at every decision of routing_real's stream,
  recurring and new tasks apart, with the reuse and fork thresholds and the wrong decisions marked
  (`routing_real.json`), and each forced decision's two-task average against create's, per case and seed, with
  routing_reuse_cost's 1-point band (`routing_reuse_cost.json`).

    python benchmarks/issue14_figures.py [--results DIR] [--out DIR] [--data DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, write_results  # noqa: E402

#: the stored results each figure reads (a name ending in "/": a folder of per-part JSON files)
INPUTS = {
    "freezing_real_figure.png": ("freezing_real_speed.json", "freezing_real.json"),
    "routing_real_figure.png": ("routing_real.json", "routing_reuse_cost.json"),
    "gates_real_lora_figure.png": ("gates_real.json", "gates_real_followup/"),
}
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cl_benchmark"
GATES_TABLE = "gates_real_lora"
#: the issue's freezing target (step-time ratio with half the layers frozen)
SPEEDUP_TARGET = 1.3
ARMS_ORDER = ("create", "reuse", "reuse_unchecked", "fork")


def load(results: Path, name: str) -> dict[str, Any]:
    path = results / name
    if name.endswith("/"):
        if not path.is_dir():
            raise FileNotFoundError(f"{path} is missing: run the benchmark that writes {name} first")
        return {p.stem: load(path, p.name) for p in sorted(path.glob("*.json"))}
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run the benchmark that writes {name} first")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err


def _need(data: dict[str, Any], key: str, source: str) -> Any:
    if key not in data:
        raise KeyError(f"{source} has no '{key}' entry (keys: {sorted(data)}): not the benchmark's result file")
    return data[key]


def _save(fig, path: Path) -> None:
    """Written under a temporary name, then renamed: a stopped run leaves no half-written figure."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def freezing_figure(speed: dict[str, Any], runs: dict[str, Any], path: Path) -> dict[str, Any]:
    """Draws the freezing figure; returns what it drew (speedup per frozen configuration, frozen layers per run)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = _need(speed, "speed", "freezing_real_speed.json")
    arms = _need(runs, "runs", "freezing_real.json")
    fig, (ax_s, ax_a, ax_f) = plt.subplots(1, 3, figsize=(17, 4.8))
    frozen = {k: v for k, v in configs.items() if "half" in k}  # the unfrozen baselines are 1.0 by definition
    names = sorted(frozen)
    ax_s.barh(names, [frozen[n]["speedup"] for n in names], color="tab:blue")
    ax_s.axvline(SPEEDUP_TARGET, color="k", ls="--", lw=1, label=f"target {SPEEDUP_TARGET}x")
    ax_s.axvline(1.0, color="grey", lw=0.8)
    for i, n in enumerate(names):
        ax_s.text(frozen[n]["speedup"], i, f" {frozen[n]['speedup']:.2f}x", va="center", fontsize=7)
    ax_s.set(xlabel="step-time speedup over the unfrozen run", title="Layers 0-14 frozen: step speed")
    ax_s.tick_params(axis="y", labelsize=7)
    ax_s.legend(fontsize=7)
    markers = ("o", "s")
    arm_names = list(dict.fromkeys(r["arm"] for r in arms))
    colors = {a: f"C{i}" for i, a in enumerate(arm_names)}
    for r in arms:
        m = markers[int(r["seed"]) % len(markers)]
        ax_a.scatter(r["train_s"], r["accuracy"], color=colors[r["arm"]], marker=m)
        ax_f.plot(range(1, len(r["frozen_layers_per_step"]) + 1), r["frozen_layers_per_step"], color=colors[r["arm"]],
                  ls="-" if m == "o" else "--", lw=1)  # fmt: skip
    for a in arm_names:
        ax_a.scatter([], [], color=colors[a], label=a)
        ax_f.plot([], [], color=colors[a], label=a)
    ax_a.set(xlabel="training time (s)", ylabel="accuracy", title="Accuracy vs training time (o seed 0, s seed 1)")
    ax_a.legend(fontsize=7)
    ax_f.set(xlabel="step", ylabel="frozen layers", title="Layers frozen per step (solid seed 0, dashed seed 1)")
    ax_f.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return {
        "speedup": {n: frozen[n]["speedup"] for n in names},
        "frozen_layers": {(r["arm"], r["seed"]): r["frozen_layers_per_step"] for r in arms},
    }


def routing_figure(real: dict[str, Any], cost: dict[str, Any], path: Path) -> dict[str, Any]:
    """Draws the routing figure; returns what it drew (the wrong decisions, each arm's points vs create by seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    decisions = _need(real, "decisions", "routing_real.json")
    settings = _need(_need(real, "meta", "routing_real.json"), "settings", "routing_real.json's meta")
    cases = _need(cost, "cases", "routing_reuse_cost.json")
    band = _need(cost, "cost_points", "routing_reuse_cost.json")  # its rule: a cost is below create by more than this
    fig, (ax_d, ax_c) = plt.subplots(1, 2, figsize=(15, 4.8))
    for truth, color in (("reuse", "tab:green"), ("new", "tab:orange")):
        pts = [(i, d) for i, d in enumerate(decisions) if d["truth"] == truth and d["best_score"] is not None]
        label = "recurring task" if truth == "reuse" else "new task"
        ax_d.scatter([i for i, _ in pts], [d["best_score"] for _, d in pts], color=color, s=18, label=label)
    wrong = [(i, d) for i, d in enumerate(decisions) if not d["correct"]]
    ax_d.scatter([i for i, _ in wrong], [d["best_score"] for _, d in wrong], marker="x", color="r", s=60,
                 label="wrong decision")  # fmt: skip
    for i, d in wrong:
        ax_d.annotate(f"{d['task']} -> {d['best']}", (i, d["best_score"]), fontsize=7, xytext=(4, 4),
                      textcoords="offset points")  # fmt: skip
    ax_d.axhline(settings["reuse_threshold"], color="k", ls="--", lw=1, label="reuse threshold")
    ax_d.axhline(settings["fork_threshold"], color="grey", ls=":", lw=1, label="fork threshold")
    ax_d.set(xlabel="decision (stream order)", ylabel="best match's score",
             title="Router on SmolLM2 signatures: every decision")  # fmt: skip
    ax_d.legend(fontsize=7)
    labels, positions, x, drawn = [], [], 0.0, {}
    for case, data in cases.items():
        for arm in ARMS_ORDER[1:]:
            entry = data["arms"].get(arm)
            points = (entry or {}).get("vs_create_points") or {}
            if not points:
                continue
            diffs = [points[k] for k in sorted(points)]
            drawn[(case, arm)] = diffs
            ax_c.bar(x, sum(diffs) / len(diffs), color="tab:grey", alpha=0.6)
            ax_c.scatter([x] * len(diffs), diffs, color="k", s=14, zorder=3)
            labels.append(f"{case}\n{arm}")
            positions.append(x)
            x += 1
        x += 0.5  # a gap between the cases
    ax_c.axhspan(-band, band, color="tab:green", alpha=0.15, label=f"within {band:g} point of create")
    ax_c.axhline(0.0, color="k", lw=0.8)
    ax_c.set_xticks(positions, labels, fontsize=7)
    ax_c.set(ylabel="two-task average vs create (points)",
             title="Forced decision for the related task vs create (bars: seed mean, dots: seeds)")  # fmt: skip
    ax_c.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return {"wrong": [(d["task"], d["best"]) for _, d in wrong], "vs_create_points": drawn}


def chance_balanced(tasks: list[str], data: Path) -> float:
    """The balanced accuracy of a constant prediction: per task 1 / its number of labels, averaged over `tasks`."""
    counts = []
    for task in tasks:
        path = data / task / "labels.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: --data={data} must be the CL benchmark folder with {task}")
        counts.append(len(json.loads(path.read_text())))
    return sum(1.0 / c for c in counts) / len(counts)


def gates_lora_table(base: dict[str, Any], records: dict[str, Any], chance: float) -> dict[str, Any]:
    """Per budget, each strategy with a LoRA part: its test loss (the base's), accuracy, balanced accuracy and
    per-task accuracy; the dense model's; and the chance level of balanced accuracy."""
    # random's row holds the mean over its seeds; its LoRA part used the first seed's heads
    loss = {
        (r["strategy"], r["fraction"]): (r.get("test_loss_seeds") or [r["test_loss"]])[0]
        for r in _need(base, "results", "gates_real.json")
    }
    for r in records.values():
        if r.get("kind") == "controller":
            loss[(r["row"]["strategy"], r["row"]["fraction"])] = r["row"]["test_loss"]
    budgets: dict[float, list[dict[str, Any]]] = {}
    dense = None
    for r in records.values():
        if r.get("kind") != "lora":
            continue
        row = {
            "strategy": r["strategy"],
            "test_loss": loss.get((r["strategy"], r["fraction"])),
            "accuracy": r["accuracy"],
            "balanced": r["balanced"],
            "per_task": r["per_task"],
        }
        if r["strategy"] == "dense":
            dense = row
        else:
            budgets.setdefault(r["fraction"], []).append(row)
    return {
        "tasks": base["meta"]["settings"]["tasks"],
        "chance_balanced": chance,
        "dense": dense,
        "budgets": [
            {"fraction": f, "rows": sorted(rows, key=lambda r: -r["balanced"])}
            for f, rows in sorted(budgets.items(), reverse=True)
        ],
    }


def gates_lora_markdown(table: dict[str, Any]) -> str:
    lines = [
        "# Accuracy after a short LoRA with each strategy's heads, plain and balanced (issue 14)",
        "",
        "From `gates_real_followup`'s LoRA parts and `gates_real.json`'s test losses (random: its first seed's, "
        f"whose heads the LoRA used), by `benchmarks/issue14_figures.py`. Tasks {', '.join(table['tasks'])}; a "
        f"constant prediction has balanced accuracy {table['chance_balanced']:.3f} (the mean of 1 / labels); plain "
        "accuracy gives it each task's majority share.",
        "",
    ]
    if table["dense"] is not None:
        d = table["dense"]
        lines += [f"Dense: accuracy {d['accuracy']:.3f}, balanced {d['balanced']:.3f}.", ""]
    for b in table["budgets"]:
        lines += [f"## {round(100 * b['fraction'])} % of the heads kept", ""]
        lines += ["| strategy | test loss | accuracy | balanced | per task |", "|---|---|---|---|---|"]
        for r in b["rows"]:
            test_loss = "n/a" if r["test_loss"] is None else f"{r['test_loss']:.3f}"
            per_task = ", ".join(f"{a:.2f}" for a in r["per_task"])
            lines.append(f"| {r['strategy']} | {test_loss} | {r['accuracy']:.3f} | {r['balanced']:.3f} | {per_task} |")
        lines.append("")
    return "\n".join(lines)


def gates_lora_figure(base: dict[str, Any], records: dict[str, Any], path: Path, chance: float) -> dict[str, Any]:
    """Draws balanced accuracy against heads kept per strategy, and against test loss; returns the table drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = gates_lora_table(base, records, chance)
    fig, (ax_k, ax_l) = plt.subplots(1, 2, figsize=(14, 4.8))
    series: dict[str, list[tuple[float, float]]] = {}
    for b in table["budgets"]:
        for r in b["rows"]:
            series.setdefault(r["strategy"], []).append((b["fraction"], r["balanced"]))
            if r["test_loss"] is not None:
                ax_l.scatter(r["test_loss"], r["balanced"], color=f"C{table['budgets'].index(b)}", s=18)
    for name, pts in sorted(series.items()):
        pts.sort()
        ax_k.plot([p[0] for p in pts], [p[1] for p in pts], marker="o" if name.startswith("controller") else "s",
                  lw=1, label=name)  # fmt: skip
    for i, b in enumerate(table["budgets"]):
        ax_l.scatter([], [], color=f"C{i}", label=f"{round(100 * b['fraction'])} % of heads")
    for ax in (ax_k, ax_l):
        ax.axhline(chance, color="r", ls=":", lw=1, label="constant prediction")
        if table["dense"] is not None:
            ax.axhline(table["dense"]["balanced"], color="k", ls="--", lw=1, label="dense")
    ax_k.set(xlabel="fraction of query heads kept", ylabel="balanced accuracy after the short LoRA",
             title="Balanced accuracy vs heads kept")  # fmt: skip
    ax_l.set(xlabel="test loss with the heads (no LoRA)", ylabel="balanced accuracy after the short LoRA",
             title="Does a lower loss give a better adaptation?")  # fmt: skip
    ax_k.legend(fontsize=6)
    ax_l.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of the stored results (JSON)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder of the figures (PNG) and tables")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the CL benchmark folder (labels.json)")
    ns = parser.parse_args(argv)
    for name, (first, second) in INPUTS.items():
        a, b = load(ns.results, first), load(ns.results, second)
        if name.startswith("gates"):
            chance = chance_balanced(_need(a, "meta", "gates_real.json")["settings"]["tasks"], ns.data)
            table = gates_lora_figure(a, b, ns.out / name, chance)
            write_results(GATES_TABLE, table, gates_lora_markdown(table), out=ns.out)
        else:
            (freezing_figure if name.startswith("freezing") else routing_figure)(a, b, ns.out / name)
        print(f"written: {ns.out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
