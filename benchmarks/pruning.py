"""Forward and train-step time: plain vs gated vs physically pruned (0 / 25 / 50 % of heads), as ratios.

Every variant is a copy of the same Gemma (hidden 256, 8 heads / 4 kv heads, head_dim 32, seq 128 by default, so
attention time is measurable). Repetitions are interleaved (A B C ... A B C ...) and medians taken, and every
number is reported as a ratio to the plain model measured in the same run. Attention time alone is measured
with forward hooks on the attention modules (same hook cost in every variant).

    python benchmarks/pruning.py [--quick] [--device cpu|cuda] [--threads N]

Writes docs/results/pruning.md and docs/results/pruning.json.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, write_results  # noqa: E402, I001  (first: sets the offline environment)
import torch  # noqa: E402
from transformers import GemmaForCausalLM  # noqa: E402

from hf_adaptive.models import gate_model  # noqa: E402
from hf_adaptive.models.gates import attention_modules  # noqa: E402
from hf_adaptive.models.pruning import prune_heads  # noqa: E402
from hf_adaptive.models.tiny import TINY_PRESETS, tiny_gemma_config  # noqa: E402

PRESET = TINY_PRESETS["pruning"]


def build(args) -> GemmaForCausalLM:
    config = tiny_gemma_config(
        1024,
        "pruning",
        hidden_size=args.hidden,
        intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers,
        head_dim=args.hidden // PRESET["num_attention_heads"],
        max_position_embeddings=max(PRESET["max_position_embeddings"], args.seq),
    )
    config._attn_implementation = args.attn
    torch.manual_seed(0)
    return GemmaForCausalLM(config)


def pruned_heads(fraction: float, layers: int) -> dict[int, list[int]]:
    """The last `fraction` of each layer's heads: whole kv groups go, so k/v shrink too."""
    n = round(8 * fraction)
    return {i: list(range(8 - n, 8)) for i in range(layers)}


def variants(base: GemmaForCausalLM, layers: int) -> dict[str, GemmaForCausalLM]:
    out = {"plain": base}
    m = copy.deepcopy(base)
    gate_model(m)
    out["gated_ones"] = m  # identity fast path: gates all 1
    m = copy.deepcopy(base)
    gate_model(m)._identity = False
    out["gated_ones_multiply"] = m  # the multiply every forward, as with any non-trivial gates
    for frac in (0.25, 0.5):
        m = copy.deepcopy(base)
        g = torch.ones(layers, 8)
        for i, heads in pruned_heads(frac, layers).items():
            g[i, heads] = 0
        gate_model(m).set_gates(g)
        out[f"gated_{int(frac * 100)}"] = m
        m = copy.deepcopy(base)
        prune_heads(m, pruned_heads(frac, layers))
        out[f"pruned_{int(frac * 100)}"] = m
    return out


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_forward(model, ids, device) -> float:
    with torch.no_grad():
        sync(device)
        t = time.perf_counter()
        model(input_ids=ids)
        sync(device)
    return time.perf_counter() - t


def time_train_step(model, ids, opt, device) -> float:
    sync(device)
    t = time.perf_counter()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    sync(device)
    return time.perf_counter() - t


class AttnTimer:
    """Wall time spent inside attention modules (pre/post hooks)."""

    def __init__(self, model, device) -> None:
        self.total, self.device, self._t = 0.0, device, 0.0
        for a in attention_modules(model):
            a.register_forward_pre_hook(self.pre)
            a.register_forward_hook(self.post)

    def pre(self, *args) -> None:
        sync(self.device)
        self._t = time.perf_counter()

    def post(self, *args) -> None:
        sync(self.device)
        self.total += time.perf_counter() - self._t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="few repetitions, small batch (smoke run)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--hidden", type=int, default=PRESET["hidden_size"])
    p.add_argument("--layers", type=int, default=PRESET["num_hidden_layers"])
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--attn", default="sdpa", choices=["eager", "sdpa"])
    p.add_argument("--out", default=str(RESULTS / "pruning"))
    args = p.parse_args()
    if args.quick:
        args.reps, args.batch = 3, 2
    torch.set_num_threads(args.threads)
    base = build(args).to(args.device)
    models = {k: m.to(args.device) for k, m in variants(base, args.layers).items()}
    ids = torch.randint(4, 1024, (args.batch, args.seq), device=args.device)
    fwd = {k: [] for k in models}
    step = {k: [] for k in models}
    attn = {k: [] for k in models}
    opts = {k: torch.optim.AdamW([q for q in m.parameters() if q.requires_grad], lr=1e-4) for k, m in models.items()}
    for k, m in models.items():  # warm-up
        m.train()
        time_train_step(m, ids, opts[k], args.device)
        m.eval()
        time_forward(m, ids, args.device)
    for _ in range(args.reps):
        for k, m in models.items():
            m.eval()
            fwd[k].append(time_forward(m, ids, args.device))
        for k, m in models.items():
            m.train()
            step[k].append(time_train_step(m, ids, opts[k], args.device))
    timers = {}
    for k, m in models.items():  # attention-only time in a separate pass (the hooks' syncs would skew the above)
        timers[k] = AttnTimer(m, args.device)
    for _ in range(args.reps):
        for k, m in models.items():
            m.eval()
            timers[k].total = 0.0
            time_forward(m, ids, args.device)
            attn[k].append(timers[k].total)

    med = {
        k: {
            "forward_ms": 1e3 * statistics.median(fwd[k]),
            "train_step_ms": 1e3 * statistics.median(step[k]),
            "attention_forward_ms": 1e3 * statistics.median(attn[k]),
        }
        for k in models
    }
    base_m = med["plain"]
    rows = []
    for k, v in med.items():
        rows.append(
            {
                "variant": k,
                **{n: round(x, 3) for n, x in v.items()},
                "forward_ratio": round(v["forward_ms"] / base_m["forward_ms"], 4),
                "train_step_ratio": round(v["train_step_ms"] / base_m["train_step_ms"], 4),
                "attention_ratio": round(v["attention_forward_ms"] / base_m["attention_forward_ms"], 4),
            }
        )
    cpu_name = platform.processor() or platform.machine()
    meta = {
        "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device == "cuda" else cpu_name,
        "threads": args.threads,
        "torch": torch.__version__,
        "hidden": args.hidden,
        "layers": args.layers,
        "heads": 8,
        "kv_heads": 4,
        "seq": args.seq,
        "batch": args.batch,
        "reps": args.reps,
        "attn_implementation": args.attn,
        "quick": args.quick,
    }
    out = Path(args.out)
    lines = [
        "# Head pruning: time of plain vs gated vs physically pruned models",
        "",
        f"Gemma, hidden {args.hidden}, {args.layers} layers, 8 heads / 4 kv heads, seq {args.seq}, batch "
        f"{args.batch}, {args.attn}, device {meta['device_name']} ({args.device}, {args.threads} thread(s)), "
        f"{args.reps} interleaved repetitions, medians. Ratios are to `plain` in the same run.",
        "",
        "`gated_ones`: gates attached, all 1 (identity fast path). `gated_ones_multiply`: gates all 1 but "
        "the multiply done (the cost of any non-trivial gates). `gated_N`: N% of heads gated to 0. "
        "`pruned_N`: the same heads removed physically (whole kv groups, so k/v shrink too).",
        "",
        "| variant | forward ms | ratio | train step ms | ratio | attention fwd ms | ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['forward_ms']:.2f} | {r['forward_ratio']:.3f} | {r['train_step_ms']:.2f} | "
            f"{r['train_step_ratio']:.3f} | {r['attention_forward_ms']:.2f} | {r['attention_ratio']:.3f} |"
        )
    write_results(out.name, {"meta": meta, "results": rows}, "\n".join(lines), out=out.parent)


if __name__ == "__main__":
    main()
