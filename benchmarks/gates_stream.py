"""Inference-time head gating on a shifting stream (issue 14): does the gate controller track the heads that matter?

The issue: "a stream where the useful heads shift, and the controller tracking it", on the real model. SmolLM2-135M
(30 layers x 9 query heads on 3 KV heads, 270 heads) serves a stream of batches at a fixed budget of heads (50 %,
`budget`) with no training: only the gates change. The stream has phases (`phases`, `phase_steps` batches each):

  * natural: plain prompts + answers of SST-2, BoolQA and MNLI rows (cl_benchmark eval split), whole text; per
    task the first 8 rows are held out, the next 16 rank the heads (validation), the next 160 feed the stream
    (3 x 160 rows: no row is served twice at 3 x 20 batches of 8);
  * repeated: the first `repeat_tokens` tokens of such a row, then the same tokens again. The second copy is
    predictable by copying, which induction heads do (Olsson et al., 2022); on natural text they matter less.
    So the heads that matter shift at the phase boundary, on real text and the real model, by construction.

The shift is measured, not assumed: Michel importance (`head_importance`) on each phase's validation rows, the
overlap of the two top-k sets, and the held-out loss of each phase under the other phase's top-k heads.

Protocol, the same for every arm. At step t the arm serves batch x_t with the gates g_t it chose from the batches
before (the online loss L(x_t; g_t) is what the stream pays; nothing looks ahead), then may use x_t to choose
g_{t+1}. Every arm keeps exactly k heads:

  * dense: all heads (the reference, not at the budget);
  * static: Michel's top-k on the natural validation rows, never changed (what offline pruning ships);
  * oracle: Michel's top-k on the current phase's validation rows; it is told the phase (a reference, not a method);
  * michel_online: Michel importance of x_t under its own gates, an exponential average (`michel_decay`) over the
    stream, top-k: a greedy tracker without learning;
  * controller: the package's `GateController` (PPO, exact budget `min_active_heads = max_active_heads = k`, at
    most `max_changes` flips per step), warm-started from the static gates, its state fed the importance and
    attention entropy of x_t under its gates. Its reward is paired: the loss of x_t under the gates it just chose
    against the loss of x_t under the gates that served it (`RewardTracker.previous_loss` set to the served loss
    before `feedback`), so a harder batch is not mistaken for a worse action;
  * controller_prior: the same controller with the importance prior (`hf_adaptive.control.importance_prior`,
    `prior_strength`): its policy starts as the greedy swap rule (flips go to heads across the top-k cut of the
    importance it is fed) and PPO refines it. Added after the first SmolLM2 run, where the plain controller drifted.

Report: per phase, each arm's mean online loss over the phase's second half (after adapting) and its paired
difference to static (mean and standard error over those batches), the share of the static-to-oracle gap each
tracker closes, the held-out loss of each arm's gates at the phase's end, and per step the overlap of each tracker's
heads with the current phase's oracle set (the tracking, `stream_tracking.png`). Verdict per shifted phase: the
controller "tracks" when its second-half online loss is below static's by more than two standard errors of the
paired difference, "worse" when above it by as much, else "no better than static" (per controller arm).

    python benchmarks/gates_stream.py                # SmolLM2 (~30-40 min on 2 cores): docs/results/gates_stream.*
    python benchmarks/gates_stream.py --quick [--out DIR]   # tiny GQA Llama, seconds, a temporary folder

Quick mode is gates_real.py's tiny GQA Llama trained briefly on built-in tasks: it checks the pipeline; its numbers
say nothing about the goal (a model that small has no induction heads to find).

Cost: a smoke run of 3 phases x 2 steps took 17 min on 2 threads sharing the 2 cores with another 2-thread job
(load and rankings ~5 min, ~2 min a step with the held-out losses at every phase end). Per step: 4-5 online
forwards (arms serving the same gates share one), the controller's importance, entropy and paired forward, and
michel_online's importance. The default 3 x 20 steps: ~30-40 min on quiet cores (not measured yet).
"""

from __future__ import annotations

import argparse
import copy
import math
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, write_results  # noqa: E402, I001  (first: sets the single-threaded, offline environment)
import torch  # noqa: E402

import compression  # noqa: E402  (model loading)
import gate_control  # noqa: E402  (batching, top-k gates)
import gates_real  # noqa: E402  (the tiny GQA Llama, task loading, tokenized rows, budgets)
from cl_real import CodeVersion, _json_safe, version_stamp  # noqa: E402

NAME = "gates_stream"
SCRIPTS = tuple(
    Path(__file__).resolve().with_name(n)
    for n in ("gates_stream.py", "gates_real.py", "common.py", "compression.py", "gate_control.py", "cl_real.py")
)
PHASES = ("natural", "repeated")
CONTROLLERS = ("controller", "controller_prior")
ARMS = ("dense", "static", "oracle", "michel_online", *CONTROLLERS)
TRACKERS = ("michel_online", *CONTROLLERS)
#: one colour per arm in both panels of the plot
COLORS = dict(zip(ARMS, ("0.4", "tab:orange", "tab:green", "tab:blue", "tab:purple", "tab:red"), strict=True))

#: the model, its shape, the tasks and their prompts: gates_real's (the same SmolLM2 heads)
MODEL_KEYS = ("model", "task_source", "tasks", "layers", "heads", "kv_heads", "threads", "seed", "data_seed")
SETTINGS: dict[str, Any] = {
    **{key: gates_real.SETTINGS[key] for key in MODEL_KEYS},
    "prompt_max_length": gates_real.SETTINGS["prompt_max_length"],
    "prompt_format": gates_real.SETTINGS["prompt_format"],
    "train_rows_per_task": 8,
    "pretrain_steps": 0,
    "batch_size": 8,
    "budget": 0.5,
    "phases": ["natural", "repeated", "natural"],
    "phase_steps": 20,
    "repeat_tokens": 40,
    "heldout_rows_per_task": 8,
    "validation_rows_per_task": 16,
    "stream_rows_per_task": 160,
    "michel_decay": 0.5,
    "controller": {
        "algorithm": "ppo",
        "max_changes": 4,
        "rollout_steps": 4,
        "keep_bias": 1.0,
        "efficiency_factor": 0.0,
    },
    "prior_strength": 50.0,
}
QUICK_SETTINGS: dict[str, Any] = SETTINGS | dict(
    model="tiny-llama-gqa", task_source="builtin", tasks=["first_color", "last_color", "has_cat"],
    layers=4, heads=6, kv_heads=2, threads=1, pretrain_steps=150, train_rows_per_task=128, batch_size=4,
    phase_steps=4, repeat_tokens=6, heldout_rows_per_task=4, validation_rows_per_task=4, stream_rows_per_task=8,
)  # fmt: skip


# ---------------------------------------------------------------------------------------------------- data
def repeated_row(row: dict[str, Any], tokens: int) -> dict[str, Any]:
    """The first `tokens` tokens of `row` (no padding), then the same tokens again, every token labelled."""
    ids = [t for t, m in zip(row["input_ids"], row["attention_mask"], strict=True) if m][:tokens]
    twice = ids + ids
    return {"input_ids": twice, "attention_mask": [1] * len(twice), "labels": list(twice)}


def split_rows(rows_by_task: list[list[dict]], s: dict[str, Any]) -> dict[str, list[dict]]:
    """Per task: the first rows held out, the next for validation, the rest the stream pool (disjoint), natural."""
    h, v, p = s["heldout_rows_per_task"], s["validation_rows_per_task"], s["stream_rows_per_task"]
    out: dict[str, list[dict]] = {"heldout": [], "validation": [], "stream": []}
    for rows in rows_by_task:
        if len(rows) < h + v + p:
            raise ValueError(f"a task has {len(rows)} eval rows; the settings need {h + v + p}")
        out["heldout"] += rows[:h]
        out["validation"] += rows[h : h + v]
        out["stream"] += rows[h + v : h + v + p]
    return out


def phase_rows(natural: list[dict], phase: str, s: dict[str, Any]) -> list[dict]:
    if phase not in PHASES:
        raise ValueError(f"phase={phase!r} is not allowed: one of {PHASES}")
    return natural if phase == "natural" else [repeated_row(r, s["repeat_tokens"]) for r in natural]


def stream_batches(pool: list[dict], s: dict[str, Any], collate) -> list[tuple[str, dict]]:
    """(phase, batch) per step: each phase draws `phase_steps` batches from the shuffled pool (cycling), the
    repeated phases as repeated rows; a phase that comes back draws fresh rows where the pool has them."""
    order = list(range(len(pool)))
    random.Random(s["data_seed"]).shuffle(order)
    bs, out, cursor = s["batch_size"], [], 0
    for phase in s["phases"]:
        for _ in range(s["phase_steps"]):
            rows = [pool[order[(cursor + i) % len(order)]] for i in range(bs)]
            cursor += bs
            out.append((phase, collate(phase_rows(rows, phase, s))))
    return out


# --------------------------------------------------------------------------------------------- measurement
def overlap(gates: torch.Tensor, reference: torch.Tensor) -> float:
    """Share of `reference`'s kept heads that `gates` keeps too."""
    ref = reference.flatten() > 0.5
    return float(((gates.flatten() > 0.5) & ref).sum()) / max(1, int(ref.sum()))


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error (0 for fewer than two values)."""
    m = statistics.mean(values)
    return m, (statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0)


def loss_under(model, gated, gates: torch.Tensor, batches: list[dict]) -> float:
    from hf_adaptive.control.feedback import validation_loss

    gated.set_gates(gates)
    return validation_loss(model, batches)


def online_losses(model, gated, gates: dict[str, torch.Tensor], batch: dict) -> dict[str, float]:
    """Each arm's loss on `batch` under its gates; arms that serve the same gates share one forward (the oracle is
    the static set on natural text)."""
    seen: dict[bytes, float] = {}
    out = {}
    for arm, g in gates.items():
        key = (g > 0.5).numpy().tobytes()
        if key not in seen:
            seen[key] = loss_under(model, gated, g, [batch])
        out[arm] = seen[key]
    return out


def importance_under(model, gated, gates: torch.Tensor, batches: list[dict]) -> torch.Tensor:
    from hf_adaptive.models import head_importance

    gated.set_gates(gates)
    return head_importance(model, batches)


class MichelTracker:
    """Top-k of an exponential average of Michel importance measured on each served batch under its own gates."""

    def __init__(self, start: torch.Tensor, k: int, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"MichelTracker: decay={decay!r} is not allowed: a number in [0, 1)")
        self.gates, self.k, self.decay, self.average = start.clone(), k, decay, None

    def update(self, importance: torch.Tensor) -> torch.Tensor:
        imp = importance.float()
        self.average = imp if self.average is None else self.decay * self.average + (1 - self.decay) * imp
        self.gates = gate_control.top_k_gates(self.average, self.k)
        return self.gates


def controller_step(ctrl, model, gated, batch: dict, served_loss: float, step: int) -> torch.Tensor:
    """Act from x_t's statistics under the controller's gates, then the paired reward on x_t (new vs served)."""
    from hf_adaptive.models import attention_entropy, head_importance

    gated.set_gates(ctrl.gates)
    imp, ent = head_importance(model, [batch]), attention_entropy(model, [batch])
    new = ctrl.act(imp, ent)
    # the paired baseline: the same batch under the serving gates
    ctrl.feedback(loss_under(model, gated, new, [batch]), step=step, reference_loss=served_loss)
    return new


def verdict(diff: dict[str, float]) -> str:
    """'tracks' (below static by more than 2 standard errors of the paired difference), 'worse' (above by more),
    else 'no better than static'."""
    if diff["mean"] < -2 * diff["se"]:
        return "tracks"
    return "no better than static" if diff["mean"] <= 2 * diff["se"] else "worse"


def phase_spans(s: dict[str, Any]) -> list[tuple[int, str, int, int]]:
    """(index, phase, first step, end step) of every phase of the stream (steps counted from 0)."""
    n = s["phase_steps"]
    return [(i, p, i * n, (i + 1) * n) for i, p in enumerate(s["phases"])]


def summarize(log: list[dict[str, Any]], s: dict[str, Any], heldout: dict[int, dict[str, float]]) -> list[dict]:
    """Per phase: second-half online loss per arm, paired differences to static, gap closed, tracking overlap."""
    out = []
    for index, phase, start, end in phase_spans(s):
        half = log[start + (end - start) // 2 : end]
        row: dict[str, Any] = {"index": index, "phase": phase, "steps": [start, end]}
        row["online_loss"] = {a: statistics.mean(r["online"][a] for r in half) for a in ARMS}
        row["vs_static"] = {}
        for a in ARMS:
            m, se = mean_se([r["online"][a] - r["online"]["static"] for r in half])
            row["vs_static"][a] = {"mean": m, "se": se}
        gap = row["online_loss"]["static"] - row["online_loss"]["oracle"]
        row["static_oracle_gap"] = gap
        row["gap_closed"] = {
            a: ((row["online_loss"]["static"] - row["online_loss"][a]) / gap if gap > 0 else None) for a in TRACKERS
        }
        row["overlap_with_oracle"] = {
            a: {"first": log[start]["overlap"][a], "last": log[end - 1]["overlap"][a]} for a in TRACKERS + ("static",)
        }
        row["heldout_loss"] = heldout[index]
        row["verdicts"] = {a: verdict(row["vs_static"][a]) for a in CONTROLLERS}
        out.append(row)
    return out


# ------------------------------------------------------------------------------------------------- the run
def run(s: dict[str, Any], data: Path) -> dict[str, Any]:
    from hf_adaptive.control.config import GateControllerConfig
    from hf_adaptive.control.gate_controller import GateController
    from hf_adaptive.control.importance_prior import ImportancePriorConfig, PriorGateController
    from hf_adaptive.models import gate_model
    from hf_adaptive.tasks import CausalLMCollator

    torch.set_num_threads(s["threads"])
    started = time.perf_counter()
    per_task = {
        **s,
        "rows_per_task": (s["heldout_rows_per_task"] + s["validation_rows_per_task"] + s["stream_rows_per_task"] + 1)
        // 2,
    }
    model, tokenizer, tasks = gates_real.load_model(per_task, data)
    collate = CausalLMCollator(tokenizer)
    rows = split_rows([gates_real.text_rows([t], tokenizer, s, "eval", whole_text=True) for t in tasks], s)
    L, H = s["layers"], s["heads"]
    n = L * H
    k = gates_real.budget_heads(s["budget"], n)
    gated = gate_model(model)
    bs = s["batch_size"]
    val = {p: gate_control.batches(phase_rows(rows["validation"], p, s), collate, bs) for p in PHASES}
    held = {p: gate_control.batches(phase_rows(rows["heldout"], p, s), collate, bs) for p in PHASES}
    dense = torch.ones(L, H)
    ranking = {p: importance_under(model, gated, dense, val[p]) for p in PHASES}
    oracle = {p: gate_control.top_k_gates(ranking[p], k) for p in PHASES}
    shift = {
        "top_k_overlap": overlap(oracle["repeated"], oracle["natural"]),
        "heldout_loss": {
            f"{p}_text": {
                "dense": loss_under(model, gated, dense, held[p]),
                **{f"{q}_top_k": loss_under(model, gated, oracle[q], held[p]) for q in PHASES},
            }
            for p in PHASES
        },
    }
    print(f"loaded and ranked in {time.perf_counter() - started:.0f}s; shift: {shift}", flush=True)

    cfg = GateControllerConfig(min_active_heads=k, max_active_heads=k, seed=s["seed"], **s["controller"])
    ctrls = {
        "controller": GateController(L, H, cfg),
        "controller_prior": PriorGateController(L, H, cfg, ImportancePriorConfig(strength=s["prior_strength"])),
    }
    for ctrl in ctrls.values():
        ctrl.set_gates(oracle["natural"])
    michel = MichelTracker(oracle["natural"], k, s["michel_decay"])
    stream = stream_batches(rows["stream"], s, collate)
    log: list[dict[str, Any]] = []
    heldout: dict[int, dict[str, float]] = {}
    spans = phase_spans(s)
    t0 = time.perf_counter()
    for step, (phase, batch) in enumerate(stream):
        gates = {
            "dense": dense,
            "static": oracle["natural"],
            "oracle": oracle[phase],
            "michel_online": michel.gates.clone(),
            **{a: c.gates.clone() for a, c in ctrls.items()},
        }
        online = online_losses(model, gated, gates, batch)
        log.append(
            {
                "step": step,
                "phase": phase,
                "online": online,
                "overlap": {a: overlap(gates[a], oracle[phase]) for a in TRACKERS + ("static",)},
                "kept": {a: int((g > 0.5).sum()) for a, g in gates.items()},
            }
        )
        michel.update(importance_under(model, gated, gates["michel_online"], [batch]))
        for a, c in ctrls.items():
            controller_step(c, model, gated, batch, online[a], step)
        log[-1]["reward"] = {a: c.log[-1]["reward"] for a, c in ctrls.items()}
        ends = next((i for i, _, _, end in spans if end == step + 1), None)
        if ends is not None:  # the gates each arm would serve next, on the phase's held-out rows
            fixed = shift["heldout_loss"][f"{phase}_text"]  # the fixed arms' gates: measured before the stream
            after = {"michel_online": michel.gates, **{a: c.gates for a, c in ctrls.items()}}
            heldout[ends] = {
                "dense": fixed["dense"],
                "static": fixed["natural_top_k"],
                "oracle": fixed[f"{phase}_top_k"],
                **{a: loss_under(model, gated, g, held[phase]) for a, g in after.items()},
            }
            print(f"phase {ends} ({phase}) done at {time.perf_counter() - t0:.0f}s: {heldout[ends]}", flush=True)
    gated.remove()
    phases = summarize(log, s, heldout)
    return _json_safe(
        {
            "meta": {
                "settings": s,
                "model": f"{s['model']}: {L} layers x {H} query heads on {s['kv_heads']} kv heads ({n} heads)",
                "heads_kept": k,
                "quick": s["model"] != SETTINGS["model"],
                "seconds": round(time.perf_counter() - started, 1),
                "stream_seconds": round(time.perf_counter() - t0, 1),
                **version_stamp(CodeVersion(s, compression.PACKAGE, SCRIPTS)),
            },
            "shift": shift,
            "phases": phases,
            "log": log,
            "controller_updates": {a: c.updates for a, c in ctrls.items()},
        }
    )


# ---------------------------------------------------------------------------------------------- the report
def _f(v: float | None, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def markdown(result: dict[str, Any], png: str) -> str:
    m, s, sh = result["meta"], result["meta"]["settings"], result["shift"]
    lines = [
        "# Head gates on a shifting stream (gates_stream.py)",
        "",
        f"{m['model']}; {m['heads_kept']} heads kept; stream {' -> '.join(s['phases'])}, {s['phase_steps']} batches "
        f"of {s['batch_size']} per phase; {m['seconds'] / 60:.1f} min ({s['threads']} threads); code "
        f"{m['code_version']}." + (" **Quick mode: a pipeline check, not a measurement.**" if m["quick"] else ""),
        "",
        "## The shift",
        "",
        f"Michel top-{m['heads_kept']} on repeated text keeps {sh['top_k_overlap']:.1%} of the natural top-k. "
        "Held-out loss (whole text) under each phase's top-k:",
        "",
        "| text | dense | natural top-k | repeated top-k |",
        "|---|---|---|---|",
    ]
    for text, v in sh["heldout_loss"].items():
        lines.append(f"| {text} | {_f(v['dense'])} | {_f(v['natural_top_k'])} | {_f(v['repeated_top_k'])} |")
    lines += [
        "",
        "## Tracking (online loss, second half of each phase; paired difference to static: mean ± s.e.)",
        "",
        "| phase | "
        + " | ".join(ARMS)
        + " | "
        + " | ".join(f"{a} − static" for a in TRACKERS)
        + " | gap closed ("
        + " / ".join(TRACKERS)
        + ") | overlap with oracle, first → last ("
        + " / ".join(CONTROLLERS)
        + ") | verdict ("
        + " / ".join(CONTROLLERS)
        + ") |",
        "|---" * (len(ARMS) + len(TRACKERS) + 4) + "|",
    ]
    for p in result["phases"]:
        vs, gc, ov = p["vs_static"], p["gap_closed"], p["overlap_with_oracle"]
        lines.append(
            f"| {p['index']} {p['phase']} | "
            + " | ".join(_f(p["online_loss"][a]) for a in ARMS)
            + " | "
            + " | ".join(f"{vs[a]['mean']:+.3f} ± {vs[a]['se']:.3f}" for a in TRACKERS)
            + " | "
            + " / ".join(_f(gc[a], 2) for a in TRACKERS)
            + " | "
            + " / ".join(f"{ov[a]['first']:.2f} → {ov[a]['last']:.2f}" for a in CONTROLLERS)
            + " | "
            + " / ".join(p["verdicts"][a] for a in CONTROLLERS)
            + " |"
        )
    lines += [
        "",
        "Held-out loss of the gates each arm serves at a phase's end:",
        "",
        "| phase | " + " | ".join(ARMS) + " |",
        "|---" * (len(ARMS) + 1) + "|",
    ]
    for p in result["phases"]:
        lines.append(f"| {p['index']} {p['phase']} | " + " | ".join(_f(p["heldout_loss"][a]) for a in ARMS) + " |")
    lines += ["", f"![online loss and overlap with the phase's oracle heads per step]({png})", ""]
    return "\n".join(lines)


def plot(path: Path, result: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    log, s = result["log"], result["meta"]["settings"]
    steps = [r["step"] for r in log]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for a in ARMS:
        top.plot(steps, [r["online"][a] - r["online"]["static"] for r in log], label=a, lw=1, color=COLORS[a])
    top.set_ylabel("online loss − static")
    for a in TRACKERS + ("static",):
        bottom.plot(steps, [r["overlap"][a] for r in log], label=a, lw=1, color=COLORS[a])
    bottom.set_ylabel("overlap with phase oracle")
    bottom.set_xlabel("stream step")
    for _, phase, start, end in phase_spans(s):
        for ax in (top, bottom):
            if phase == "repeated":
                ax.axvspan(start - 0.5, end - 0.5, color="0.9")
    top.legend(fontsize=7, ncol=3)
    bottom.legend(fontsize=7)
    top.set_title("shaded: repeated text")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------- the CLI
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny GQA Llama + built-in tasks, seconds")
    p.add_argument("--phase-steps", type=int, default=None, help="batches per phase (real 20)")
    p.add_argument("--data", default=str(compression.DEFAULT_DATA), help="cl_benchmark folder (real mode)")
    p.add_argument("--out", default=None, help="results folder (real: docs/results; quick: a temporary folder)")
    args = p.parse_args(argv)
    if args.phase_steps is not None and args.phase_steps < 2:
        p.error(f"--phase-steps {args.phase_steps} is not allowed: an integer >= 2 (a phase needs a second half)")
    if args.quick and args.out and Path(args.out).resolve() == RESULTS.resolve():
        p.error(f"--out {args.out} is not allowed with --quick: quick numbers never go into docs/results")
    if not args.quick and not Path(args.data).is_dir():
        p.error(f"--data {args.data} is not allowed: an existing cl_benchmark folder (one sub-folder per task)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    s = copy.deepcopy(QUICK_SETTINGS if args.quick else SETTINGS)
    if args.phase_steps is not None:
        s["phase_steps"] = args.phase_steps
    out = Path(args.out) if args.out else (Path(tempfile.mkdtemp(prefix="gates_stream_")) if args.quick else RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    result = run(s, Path(args.data))
    png = "gates_stream_tracking.png"
    plot(out / png, result)
    write_results(NAME, result, markdown(result, png), out=out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
