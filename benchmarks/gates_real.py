"""Head gates on a real GQA model: which query heads of SmolLM2-135M to keep at a budget, and what pruning them buys.

SmolLM2-135M is a Llama-architecture GQA model: 30 layers x 9 query heads sharing 3 KV heads (groups of 3), 270
query heads. One gate per query head (`gate_model`, the o_proj pre-hook of `hf_adaptive.models.gates`). At every
budget (75 / 50 / 25 % of the heads kept, `--budgets`) each strategy picks exactly k = int(fraction x 270 + 0.5)
heads and the model is scored with the other gates at 0, with no fine-tuning after the choice, so the table measures
the choice of heads alone:

  * random: a uniformly random subset, one per seed (`--seeds`, default 0,1,2), reported as mean and spread;
  * magnitude: the largest `o_proj_magnitude` (o_proj input-column norms; weights only, no data);
  * michel: the largest Michel et al. importance (`head_importance`: E|dL/dgate| on the validation half, one shot);
  * l0: hard-concrete L0 gates (`gate_model(mode="hard_concrete")` + `HeadGatePlugin`'s penalty): only the gates'
    log_alpha train, briefly (`l0.steps` Adam steps on the validation batches, the model frozen), then the top-k
    heads by each gate's expected value E[z] (`GatedModel.expected_gates()`; E[z] rises with log_alpha);
  * michel_iterated: Michel importance re-measured under the gates it chose (`iterate_importance`): from Michel's
    top-k, each of `iterated.rounds` rounds measures the importance on the validation half with the current gates
    (a pruned head's |dL/dgate| says what bringing it back would change), folds it into an exponential average
    (`iterated.decay`) and keeps the top-k of the average; the round with the lowest validation loss wins. Not one of
    the issue's four baselines: added because the greedy rule it is (the `michel_online` tracker of gates_stream.py)
    beat every static ranking there, so a controller must beat it too to be worth its cost;
  * controller_<algorithm>[_warm|_best]: `GateController` (PPO by default, `--algorithm reinforce,a2c,ppo` runs others)
    with min_active_heads = max_active_heads = k (the exact budget, whatever k; swaps of at most `max_changes`
    flips per step), its state fed
    Michel importance and attention entropy of one spread-out stats batch measured under the current gates (what the
    baselines know, plus the sensitivity of bringing a pruned head back), rewarded by the validation loss
    (efficiency factor 0: the budget is fixed), `--controller-steps` steps, then the best validated gates (lowest
    validation loss among the archived points with k heads). `--controller-init`: `cold` starts, as the package does,
    from all heads on (its first action prunes to the budget almost at random); `michel` starts from Michel's top-k
    (`GateController.set_gates`, a warm start checked against the budget), so it can only refine a static ranking;
    `best` starts from the static ranking (magnitude, Michel, L0, michel_iterated) with the lowest validation loss
    at the budget (`best_static`: the issue's "warm start from the best static ranking"; the first SmolLM2 run,
    session 10, had cold and michel only, and L0 was the best ranking at every budget). `--controller-prior`:
    `none` is the plain `GateController`; `importance` (run name `_prior`) is `PriorGateController`, whose policy
    adds the importance prior (`hf_adaptive.control.importance_prior`, strength `prior_strength`) to its logits: it
    starts as the greedy swap rule on the state's importance and PPO refines it.
  * michel_kv_groups (at 50 % only): whole KV groups (all 3 query heads of a group) ranked by their summed Michel
    importance (`kv_group_gates`), so that pruning shrinks the K/V projections and the KV cache too.

Metric: whole-text next-token cross-entropy (every token of prompt + answer + eos, pads excluded; the package's
`validation_loss`, token-weighted). Why whole text rather than the answer tokens: a pretrained model not tuned to
these tasks has a noisy loss on 1-2 answer tokens per row, while ~90 tokens per row give a stable signal about the
language modelling the heads do, for the baselines, the L0 gates and the controller's rewards alike (Michel
importance is then taken on the same loss). Data: the eval rows of SST-2, BoolQA and MNLI (cl_benchmark, plain
prompts cut to 96 tokens); each task's first `rows_per_task` rows are the validation half (what every strategy may
look at: importance, L0 training, the controller's rewards), the next `rows_per_task` the test half (what the table
reports). Verdict per budget: the best static baseline is the lowest test loss among random (mean), magnitude,
michel and l0; a controller "beats" it by more than the random seeds' standard deviation, "matches" within it,
else "loses" (`verdict`).

Physical pruning at 50 % (`prune_heads`): (a) query heads only, Michel's top half (a kv head stays while any of its
query heads does; per layer, groups left with unequal sizes are stored either with duplicated kv heads or padded
with zero query slots so that each kv head is stored once, whichever needs fewer projection weights,
`pruning.choose_plan`), (b) whole KV groups.
Each pruned model is checked against the gated model (same logits), its test loss taken, saved with
`save_pruned_model` and reloaded with `load_pruned_model` (no gates, no wrapper) with equal logits. CPU latency:
compression.py's `measure_latency` (prefill of a batch x prompt_tokens block of real prompts and one decode token,
A/B rounds interleaved in one process, ratio = median of the per-round ratios) for (a) vs dense, (b) vs dense and
(b) vs (a). Optional (`--lora-accuracy`, off: minutes per arm): rank-classification accuracy on the test half
after a short LoRA adaptation (r=8 on q/k/v/o, `lora.steps` steps of 8 answer-labelled training rows) with the
chosen gates fixed, for the dense model and each strategy's heads (random: its first seed).

    python benchmarks/gates_real.py [--budgets 0.75,0.5,0.25] [--controller-steps 40] [--algorithm ppo]
                                    [--controller-init best] [--controller-prior none,importance]
                                    [--seeds 0,1,2] [--lora-accuracy]
    python benchmarks/gates_real.py --quick [--out DIR]    # tiny GQA Llama + built-in tasks, seconds

Real mode writes docs/results/gates_real.{md,json} and docs/results/gates_real_pareto.png; --quick writes to --out
or a fresh temporary folder (never docs/results). Quick mode: a tiny Llama (4 layers x 6 query heads, 2 kv heads:
groups of 3 like SmolLM2) trained briefly on three built-in tasks' whole text.

Estimated real-mode cost on 2 CPU cores (`estimated_seconds`, also printed at the start and stored in the JSON;
estimates from unit costs, not measurements: a SmolLM2 forward of 8 rows x ~90 tokens ~0.7 s on 2 threads, a
forward + backward of 8 rows ~2.4 s like a LoRA training step, Michel importance one such pass per 8 validation
rows). Defaults (63 validation + 63 test rows, 3 budgets, 3 random seeds, 40 L0 steps, 4 iterated rounds, PPO
from the best static ranking with and without the prior, 40 steps each): loading ~0.5 min; dense, random,
magnitude, Michel and L0 ~5 min; michel_iterated ~4.5 min (a round: importance 8 x 2.4 + validation 8 x 0.7 s);
the controller ~8.9 s per step (importance 2.4 + entropy 0.9 + validation 8 x 0.7) x 40 steps x 2 arms x 3
budgets ~37 min; pruning, save / reload and latency ~1.5 min; about 48 min in all. The controller dominates: one
arm gives ~30 min, `--controller-steps 60` ~67 min, `--controller-init cold,michel,best` ~104 min;
`--lora-accuracy` adds ~1.1 min per arm (24 steps + scoring) x 20 arms ~22 min.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import itertools
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

import compression  # noqa: E402  (latency helpers, model loading, rank-classification scoring)
import gate_control  # noqa: E402  (batching, the tiny model's training loop, top-k gates)
from cl_real import CodeVersion, _json_safe, version_stamp  # noqa: E402

from hf_adaptive.control.config import ALGORITHMS  # noqa: E402

NAME = "gates_real"
#: what the code stamp hashes besides the package modules the run imported: this file and the scripts it imports
SCRIPTS = tuple(
    Path(__file__).resolve().with_name(n)
    for n in ("gates_real.py", "common.py", "compression.py", "gate_control.py", "cl_real.py")
)
INITS = ("cold", "michel", "best")
#: run-name suffix of each controller start
INIT_SUFFIX = {"cold": "", "michel": "_warm", "best": "_best"}
#: the controller's policy: plain, or with the importance prior (`PriorGateController`)
PRIORS = ("none", "importance")
PRIOR_SUFFIX = {"none": "", "importance": "_prior"}
#: the static rankings a `best` start chooses from (by validation loss at the budget; random is not a ranking)
RANKINGS = ("magnitude", "michel", "l0", "michel_iterated")
#: the issue's static baselines, and every static baseline the verdicts compare against
ISSUE_STATIC = ("random", "magnitude", "michel", "l0")
STATIC = (*ISSUE_STATIC, "michel_iterated")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]

#: real mode: SmolLM2-135M on three cl_benchmark tasks (`rows_per_task` eval rows per half and task)
SETTINGS: dict[str, Any] = {
    "model": "smollm2-135m",
    "task_source": "cl_benchmark",
    "tasks": ["SST-2", "BoolQA", "MNLI"],
    "layers": 30,
    "heads": 9,
    "kv_heads": 3,
    "rows_per_task": 21,
    "train_rows_per_task": 64,
    "data_seed": 0,
    "seed": 0,
    "threads": 2,
    "prompt_max_length": 96,
    "prompt_format": "plain",
    "batch_size": 8,
    "pretrain_steps": 0,
    "controller_steps": 40,
    "prune_fraction": 0.5,
    "l0": {"steps": 40, "weight": 1.0, "lr": 0.05, "init_log_alpha": 1.0},
    "iterated": {"rounds": 4, "decay": 0.5},
    "controller": {"max_changes": 4, "rollout_steps": 4, "keep_bias": 1.0, "efficiency_factor": 0.0},
    "prior_strength": 50.0,
    "latency": {"batch": 4, "prompt_tokens": 64, "warmup": 3, "reps": 20},
    "lora": {"steps": 24, "batch": 8, "lr": 2e-3, "r": 8, "alpha": 16},
}
#: `--quick`: a tiny GQA Llama (groups of 3 query heads per kv head, like SmolLM2) on three built-in tasks
QUICK_SETTINGS: dict[str, Any] = SETTINGS | dict(
    model="tiny-llama-gqa", task_source="builtin", tasks=["first_color", "last_color", "has_cat"],
    layers=4, heads=6, kv_heads=2, rows_per_task=8, train_rows_per_task=128, threads=1, pretrain_steps=150,
    controller_steps=4, l0=SETTINGS["l0"] | {"steps": 30}, lora=SETTINGS["lora"] | {"steps": 3},
    latency={"batch": 2, "prompt_tokens": 16, "warmup": 1, "reps": 3},
)  # fmt: skip
#: unit costs of the real-mode estimate (seconds on 2 threads; estimates, see the module docstring)
FORWARD_8, BACKWARD_8, ENTROPY_8, LOAD = 0.7, 2.4, 0.9, 30.0


# ------------------------------------------------------------------------------------------------------ options
def _fail(parser: argparse.ArgumentParser, option: str, value: str, allowed: str) -> None:
    parser.error(f"{option}={value!r} is not allowed: {allowed}")


def _split(value: str) -> list[str]:
    return [part.strip() for part in str(value).split(",")]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, validated: a bad value exits (status 2) with `<option>=<value> is not allowed: ...`."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny GQA Llama + built-in tasks, seconds")
    p.add_argument("--budgets", default="0.75,0.5,0.25", help="fractions of heads kept, comma-separated, in (0, 1)")
    p.add_argument("--seeds", default="0,1,2", help="random-strategy seeds, comma-separated integers >= 0")
    p.add_argument("--controller-steps", default=None, help="controller steps per budget and run (real 40)")
    p.add_argument("--algorithm", default="ppo", help=f"controller algorithms, comma-separated, from {ALGORITHMS}")
    p.add_argument("--controller-init", default="best", help=f"controller starts, comma-separated, {INITS}")
    p.add_argument("--controller-prior", default="none,importance", help=f"controller policies, comma-sep., {PRIORS}")
    p.add_argument("--l0-steps", default=None, help="Adam steps of the L0 gates (real 40)")
    p.add_argument("--rows-per-task", default=None, help="eval rows per task in each half (real 21)")
    p.add_argument("--lora-accuracy", action="store_true", help="task accuracy after a short LoRA (minutes per arm)")
    p.add_argument("--lora-steps", default=None, help="LoRA steps per arm (real 24)")
    p.add_argument("--data", default=str(compression.DEFAULT_DATA), help="cl_benchmark folder (real mode)")
    p.add_argument("--out", default=None, help="results folder (real: docs/results; quick: a temporary folder)")
    args = p.parse_args(argv)
    base = QUICK_SETTINGS if args.quick else SETTINGS
    total = base["layers"] * base["heads"]

    budgets = []
    for part in _split(args.budgets):
        try:
            b = float(part)
        except ValueError:
            b = float("nan")
        if not (0 < b < 1) or not 1 <= budget_heads(b, total) < total:
            _fail(p, "--budgets", args.budgets, f"comma-separated fractions in (0, 1) keeping 1..{total - 1} heads")
        budgets.append(b)
    if len({budget_heads(b, total) for b in budgets}) != len(budgets):
        _fail(p, "--budgets", args.budgets, "distinct budgets (two of them keep the same number of heads)")
    args.budgets = budgets

    if not all(s.isdigit() for s in _split(args.seeds)) or len(set(_split(args.seeds))) != len(_split(args.seeds)):
        _fail(p, "--seeds", args.seeds, "distinct comma-separated integers >= 0")
    args.seeds = [int(s) for s in _split(args.seeds)]

    for option, attr, choices in (
        ("--algorithm", "algorithm", ALGORITHMS),
        ("--controller-init", "controller_init", INITS),
        ("--controller-prior", "controller_prior", PRIORS),
    ):
        names = _split(getattr(args, attr))
        if not all(n in choices for n in names) or len(set(names)) != len(names):
            _fail(p, option, getattr(args, attr), f"distinct comma-separated names from {list(choices)}")
        setattr(args, attr, names)

    for option, attr, low in (
        ("--controller-steps", "controller_steps", 1),
        ("--l0-steps", "l0_steps", 1),
        ("--rows-per-task", "rows_per_task", 2),
        ("--lora-steps", "lora_steps", 1),
    ):
        value = getattr(args, attr)
        if value is None:
            continue
        if not value.strip().isdigit() or int(value) < low:
            _fail(p, option, value, f"an integer >= {low}")
        setattr(args, attr, int(value))
    if not args.quick and not Path(args.data).is_dir():
        _fail(p, "--data", args.data, "an existing cl_benchmark folder (one sub-folder per task)")
    return args


def resolve_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The mode's settings with the command line applied (what the run records and its code stamp hashes)."""
    s = copy.deepcopy(QUICK_SETTINGS if args.quick else SETTINGS)
    for attr in ("rows_per_task", "controller_steps"):
        if getattr(args, attr) is not None:
            s[attr] = getattr(args, attr)
    if args.l0_steps is not None:
        s["l0"]["steps"] = args.l0_steps
    if args.lora_steps is not None:
        s["lora"]["steps"] = args.lora_steps
    s.update(
        budgets=list(args.budgets),
        seeds=list(args.seeds),
        algorithms=list(args.algorithm),
        inits=list(args.controller_init),
        priors=list(args.controller_prior),
        lora_accuracy=bool(args.lora_accuracy),
    )
    return s


def real_settings(s: dict[str, Any]) -> dict[str, Any]:
    """The real-mode settings with the run's list options (budgets, seeds, algorithms, inits, LoRA): a quick run
    records what the same options would cost on SmolLM2."""
    if s["model"] == SETTINGS["model"]:
        return s
    keys = ("budgets", "seeds", "algorithms", "inits", "priors", "lora_accuracy")
    return {**copy.deepcopy(SETTINGS), **{k: s[k] for k in keys}}


# ---------------------------------------------------------------------------------------------------- helpers
def budget_heads(fraction: float, total: int) -> int:
    """Heads kept at `fraction` of `total`: rounded half up (75 % of 270 = 202.5 -> 203)."""
    return int(fraction * total + 0.5)


def random_gates(layers: int, heads: int, k: int, seed: int) -> torch.Tensor:
    """A uniformly random subset of k heads (seeded), as (layers, heads) 0/1 gates."""
    g = torch.zeros(layers * heads)
    g[torch.randperm(layers * heads, generator=torch.Generator().manual_seed(seed))[:k]] = 1
    return g.view(layers, heads)


def kv_group_gates(importance: torch.Tensor, kv_heads: int, keep_groups: int) -> torch.Tensor:
    """Gates that keep the `keep_groups` KV groups of largest summed query-head importance, whole (all query heads
    of a kept group on, all of a dropped group off). Query head j is served by kv head j // (heads / kv_heads), as in
    transformers' `repeat_kv` and `pruning._plan`."""
    layers, heads = importance.shape
    if heads % kv_heads:
        raise ValueError(f"kv_group_gates: kv_heads={kv_heads!r} is not allowed: must divide heads={heads}")
    group = heads // kv_heads
    scores = importance.reshape(layers, kv_heads, group).sum(-1).flatten()
    keep = torch.zeros(layers * kv_heads)
    keep[torch.argsort(scores, descending=True, stable=True)[:keep_groups]] = 1
    return keep.view(layers, kv_heads).repeat_interleave(group, dim=1)


def verdict(candidate: float, best: float, spread: float) -> str:
    """'beats' (lower by more than `spread`), 'matches' (within it) or 'loses' (higher by more than it)."""
    if candidate < best - spread:
        return "beats"
    return "matches" if candidate <= best + spread else "loses"


def kept_ids(gates: torch.Tensor) -> list[int]:
    return [int(i) for i in torch.nonzero(gates.flatten() > 0.5).flatten()]


def estimated_seconds(s: dict[str, Any]) -> dict[str, float]:
    """Real-mode cost from the unit costs `FORWARD_8`, `BACKWARD_8`, `ENTROPY_8` (estimates, not measurements)."""
    rows = s["rows_per_task"] * len(s["tasks"])
    vb = tb = math.ceil(rows / s["batch_size"])
    budgets, seeds = len(s["budgets"]), len(s["seeds"])
    runs = len(s["algorithms"]) * len(s["inits"]) * len(s["priors"])
    step = BACKWARD_8 + ENTROPY_8 + vb * FORWARD_8
    lat = s["latency"]
    one_round = 2 * (lat["batch"] * lat["prompt_tokens"] / (8 * 90) * FORWARD_8 + 0.05)
    out = {
        "load": LOAD,
        # dense and the kv-group row (val + test), Michel, L0, then per budget the seeds and three static rankings
        "baselines_michel_l0": (vb + tb) * FORWARD_8
        + vb * BACKWARD_8
        + s["l0"]["steps"] * BACKWARD_8
        + budgets * (seeds * tb + 3 * (vb + tb)) * FORWARD_8
        + (vb + tb) * FORWARD_8,
        # per budget: the start's validation, then per round importance + validation, and the winner's test loss
        "michel_iterated": budgets
        * (vb * FORWARD_8 + s["iterated"]["rounds"] * vb * (BACKWARD_8 + FORWARD_8) + tb * FORWARD_8),
        # per run: its steps, the start's validation, the best gates' test loss
        "controller": budgets * runs * (s["controller_steps"] * step + vb * FORWARD_8 + tb * FORWARD_8),
        "pruning_latency": 2 * (20.0 + tb * FORWARD_8) + 3 * (lat["warmup"] + lat["reps"]) * one_round,
    }
    if s["lora_accuracy"]:
        arms = 1 + budgets * (len(STATIC) + runs) + 1
        out["lora"] = arms * (s["lora"]["steps"] * BACKWARD_8 + tb * FORWARD_8 * 1.5)
    out["total"] = sum(out.values())
    return {k: round(v, 1) for k, v in out.items()}


# --------------------------------------------------------------------------------------------- model and data
def build_tiny_llama(tokenizer, seed: int, s: dict[str, Any]):
    """A tiny Llama with GQA: the `gates` layout (head_dim 16) with `heads` query heads on `kv_heads` kv heads, hidden
    size heads x 16 (Llama wants it a multiple of the head count)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_adaptive.models.tiny import TINY_TOKEN_IDS, tiny_layout

    h = s["heads"]
    layout = tiny_layout(
        "gates", num_hidden_layers=s["layers"], num_attention_heads=h, num_key_value_heads=s["kv_heads"],
        hidden_size=16 * h, intermediate_size=32 * h,
    )  # fmt: skip
    config = LlamaConfig(vocab_size=len(tokenizer), **TINY_TOKEN_IDS, **layout)
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def load_tasks(s: dict[str, Any], data: Path) -> list:
    per_task = {**s, "n_train": s["train_rows_per_task"], "n_eval": 2 * s["rows_per_task"]}
    tasks = compression.load_tasks(per_task, data)
    short = [t.name for t in tasks if len(t.eval_dataset) < 2 * s["rows_per_task"]]
    if short:
        raise ValueError(f"tasks {short} have fewer than 2 x rows_per_task={s['rows_per_task']} eval rows")
    return tasks


def split_halves(tasks: list, n: int) -> tuple[list, list]:
    """(validation tasks, test tasks): each task's first n eval rows, and the next n."""
    val = [dataclasses.replace(t, eval_dataset=t.eval_dataset.select(range(n))) for t in tasks]
    test = [dataclasses.replace(t, eval_dataset=t.eval_dataset.select(range(n, 2 * n))) for t in tasks]
    return val, test


def text_rows(tasks: list, tokenizer, s: dict[str, Any], split: str, whole_text: bool) -> list[dict]:
    """Tokenized rows (plain prompt + answer + eos); `whole_text`: every token labelled, else the answer only."""
    from hf_adaptive.tasks import tokenize_task

    rows = []
    for task in tasks:
        data = tokenize_task(task, tokenizer, split, s["prompt_max_length"], prompt_format=s["prompt_format"])
        for r in data:
            labels = list(r["input_ids"]) if whole_text else r["labels"]
            rows.append({"input_ids": r["input_ids"], "attention_mask": r["attention_mask"], "labels": labels})
    return rows


def load_model(s: dict[str, Any], data: Path):
    """(model, tokenizer, tasks); the tiny model is first trained on the tasks' whole text."""
    from hf_adaptive.models import build_tokenizer
    from hf_adaptive.tasks import CausalLMCollator

    if s["model"] == "tiny-llama-gqa":
        tokenizer = build_tokenizer()
        tasks = load_tasks(s, data)
        model = build_tiny_llama(tokenizer, s["seed"], s)
        rows = text_rows(tasks, tokenizer, s, "train", whole_text=True)
        gate_control.train(model, rows, CausalLMCollator(tokenizer), s["pretrain_steps"], 3e-3, seed=s["seed"])
    else:
        model, tokenizer = compression.load_pretrained(s)
        tasks = load_tasks(s, data)
    model.eval()
    cfg = model.config
    shape = (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads)
    if shape != (s["layers"], s["heads"], s["kv_heads"]):
        raise ValueError(f"{s['model']} has (layers, heads, kv heads) = {shape}, the settings say otherwise")
    return model, tokenizer, tasks


# ---------------------------------------------------------------------------------------------- the strategies
def scored(model, gated, gates, val_batches, test_batches) -> dict[str, float]:
    """Validation and test loss with `gates` set (val skipped when `val_batches` is None)."""
    from hf_adaptive.control.feedback import validation_loss

    gated.set_gates(gates)
    out = {"test_loss": validation_loss(model, test_batches)}
    if val_batches is not None:
        out["val_loss"] = validation_loss(model, val_batches)
    return out


def train_l0(model, val_batches, l0: dict[str, Any], seed: int) -> dict[str, Any]:
    """Hard-concrete gates trained alone (model frozen) on the validation batches with `HeadGatePlugin`'s L0
    penalty; the gates are removed again. Returns their log_alpha, expected values and the training curve."""
    from hf_adaptive.control import HeadGatePlugin
    from hf_adaptive.models import gate_model
    from hf_adaptive.tasks.losses import answer_cross_entropy

    gated = gate_model(model, mode="hard_concrete", init_log_alpha=l0["init_log_alpha"])
    plugin = HeadGatePlugin(weight=l0["weight"], model=model)  # finds the gates just attached
    frozen = [p for p in model.parameters() if p is not gated.log_alpha]
    flags = [p.requires_grad for p in frozen]
    for p in frozen:
        p.requires_grad_(False)
    opt = torch.optim.Adam([gated.log_alpha], lr=l0["lr"])
    model.eval()
    gated.train()  # only the gates sample (hard concrete); dropout and the like stay off
    curve = []
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for step in range(l0["steps"]):
                batch = val_batches[step % len(val_batches)]
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                lm = answer_cross_entropy(logits, batch["labels"])
                (term,) = plugin.loss_terms(None, model, batch, None)
                opt.zero_grad()
                (lm + term.weight * term.value).backward()
                opt.step()
                curve.append(
                    {"step": step + 1, "lm_loss": float(lm.detach()), "expected_l0": float(term.value.detach())}
                )
        log_alpha = gated.log_alpha.detach().clone()
        expected = gated.expected_gates()
    finally:
        for p, flag in zip(frozen, flags, strict=True):
            p.requires_grad_(flag)
        gated.remove()
    return {"log_alpha": log_alpha, "expected": expected, "curve": curve}


def iterate_importance(model, gated, val_batches, start: torch.Tensor, k: int, it: dict[str, Any]) -> dict[str, Any]:
    """The `michel_iterated` ranking: from the top-k of `start` (Michel importance with every head on), `it["rounds"]`
    rounds of: importance on `val_batches` under the current gates, folded into an exponential average (weight
    `it["decay"]` on the old average), top-k of the average. Returns the gates of the round with the lowest
    validation loss (round 0: the start's top-k), that loss, the round, and every round's validation loss."""
    from hf_adaptive.control.feedback import validation_loss
    from hf_adaptive.models import head_importance

    decay = it["decay"]
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"iterate_importance: decay={decay!r} is not allowed: a number in [0, 1)")
    average = start.float()
    gates = gate_control.top_k_gates(average, k)
    gated.set_gates(gates)
    losses = [validation_loss(model, val_batches)]
    best = 0, gates
    for r in range(1, it["rounds"] + 1):
        average = decay * average + (1 - decay) * head_importance(model, val_batches).float()  # under `gates`
        gates = gate_control.top_k_gates(average, k)
        gated.set_gates(gates)
        losses.append(validation_loss(model, val_batches))
        if losses[-1] < losses[best[0]]:
            best = r, gates
    return {"gates": best[1], "val_loss": losses[best[0]], "best_round": best[0], "round_val_losses": losses}


def run_controller(
    model, gated, val_batches, stats_batches, cfg, steps: int, start: torch.Tensor | None, prior_strength: float = 0.0
):
    """`steps` rounds of act (from importance and entropy under the current gates) -> validation loss -> reward;
    `start`: gates to begin from (None: the controller's own all-on start); `prior_strength` > 0: a
    `PriorGateController` with that importance prior (0: the plain `GateController`)."""
    from hf_adaptive.control.feedback import validation_loss
    from hf_adaptive.control.gate_controller import GateController
    from hf_adaptive.control.importance_prior import ImportancePriorConfig, PriorGateController
    from hf_adaptive.models import attention_entropy, head_importance

    if prior_strength:
        ctrl = PriorGateController(gated.num_layers, gated.num_heads, cfg, ImportancePriorConfig(prior_strength))
    else:
        ctrl = GateController(gated.num_layers, gated.num_heads, cfg)
    if start is not None:
        ctrl.set_gates(start)  # the warm start: the first act() decides from these gates
    gated.set_gates(ctrl.gates)
    ctrl.feedback(validation_loss(model, val_batches), step=0)
    for step in range(1, steps + 1):
        imp, ent = head_importance(model, stats_batches), attention_entropy(model, stats_batches)
        gated.set_gates(ctrl.act(imp, ent))
        ctrl.feedback(validation_loss(model, val_batches), step=step)
    return ctrl


def best_static(rows: list[dict[str, Any]]) -> str:
    """The static ranking (`RANKINGS`) with the lowest validation loss among `rows` of one budget: what a `best`
    controller start refines (the issue: a warm start from the best static ranking, chosen without the test half)."""
    ranked = [r for r in rows if r["strategy"] in RANKINGS and r.get("val_loss") is not None]
    return min(ranked, key=lambda r: r["val_loss"])["strategy"]


def curve_summary(log: list[dict[str, Any]], heads: int) -> dict[str, Any]:
    """A controller run's reward curve in numbers: mean reward over the first and last quarter of the steps, the
    validation loss at the start and after the first action, and, over the steps at the budget (`heads` active),
    the running best validation loss ([step, loss] pairs), the best loss and the step that found it."""
    rewards = [r["reward"] for r in log if r["reward"] is not None]
    q = max(1, len(rewards) // 4)
    running: list[list[float]] = []
    for r in log:
        if r["active_heads"] == heads and (not running or r["loss"] < running[-1][1]):
            running.append([r["step"], r["loss"]])
        elif running:
            running.append([r["step"], running[-1][1]])
    best = next(step for step, loss in running if loss == running[-1][1])
    return {
        "first_quarter_reward": statistics.mean(rewards[:q]) if rewards else None,
        "last_quarter_reward": statistics.mean(rewards[-q:]) if rewards else None,
        "start_val_loss": log[0]["loss"],
        "first_action_val_loss": log[1]["loss"] if len(log) > 1 else None,
        "best_val_loss": running[-1][1],
        "best_step": best,
        "running_best_val_loss": running,
    }


# ------------------------------------------------------------------------------------------------- pruning
def layout_summary(model) -> dict[str, Any]:
    """Physical heads of a (pruned) model: query heads computed, kv slots (k/v rows, KV-cache width), parameters."""
    from hf_adaptive.models.pruning import current_layout

    layout = current_layout(model)
    return {
        "query_heads": sum(len(e["heads"]) for e in layout.values()),
        "padding_slots": sum(len(e["padding"]) for e in layout.values()),
        "padded_layers": sum(bool(e["padding"]) for e in layout.values()),
        "kv_slots": sum(len(e["kv_heads"]) for e in layout.values()),
        "kv_groups_kept": sum(len(set(e["kv_heads"])) for e in layout.values()),
        "zeroed_layers": sum(bool(e["zeroed"]) for e in layout.values()),
        "kv_slots_per_layer": [len(layout[str(i)]["kv_heads"]) for i in range(len(layout))],
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max()) if a.shape == b.shape else float("inf")


def prune_and_check(dense, drop, probe, gated_logits, test_batches, folder: Path) -> tuple[Any, dict[str, Any]]:
    """Prune a copy of `dense`; its logits vs the gated model's, test loss, save / reload without the gates."""
    from hf_adaptive.control.feedback import validation_loss
    from hf_adaptive.models import load_pruned_model, prune_heads, save_pruned_model

    pruned = prune_heads(copy.deepcopy(dense), drop).eval()
    with torch.no_grad():
        logits = pruned(**probe).logits
    info = {"dropped": {str(k): v for k, v in drop.items() if v}, **layout_summary(pruned)}
    info["max_abs_diff_vs_gated"] = max_diff(logits, gated_logits)
    info["test_loss"] = validation_loss(pruned, test_batches)
    save_pruned_model(pruned, folder)
    info["saved_bytes"] = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    reloaded = load_pruned_model(folder)
    with torch.no_grad():
        info["max_abs_diff_reloaded"] = max_diff(reloaded(**probe).logits, logits)
    info["reload_has_gates"] = any(type(m).__name__ == "GatedModel" for m in reloaded.modules())
    info["reload_equal"] = info["max_abs_diff_reloaded"] <= 1e-5 and not info["reload_has_gates"]
    return pruned, info


def latency(model, reference, ids, lat: dict[str, Any]) -> dict[str, Any]:
    out = compression.measure_latency(model, reference, ids, lat["warmup"], lat["reps"])
    return {k.replace("fp32", "reference"): v for k, v in out.items()}


# ------------------------------------------------------------------------------------------- LoRA accuracy
def lora_accuracy(model, gated, gates, tokenizer, train_rows, test_tasks, s: dict[str, Any]) -> dict[str, Any]:
    """Test-half accuracy after a short LoRA (q/k/v/o) with `gates` fixed; the adapter is removed afterwards."""
    from peft import LoraConfig, get_peft_model

    from hf_adaptive.tasks import CausalLMCollator
    from hf_adaptive.tasks.losses import answer_cross_entropy

    lc, collate = s["lora"], CausalLMCollator(tokenizer)
    gated.set_gates(gates)
    config = LoraConfig(r=lc["r"], lora_alpha=lc["alpha"], lora_dropout=0.0, target_modules=LORA_TARGETS)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(s["seed"])
        peft_model = get_peft_model(model, config)
    try:
        params = [p for p in peft_model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=lc["lr"], weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1 - i / lc["steps"])
        rng = random.Random(s["seed"])
        peft_model.train()
        for _ in range(lc["steps"]):
            batch = collate(rng.sample(train_rows, min(lc["batch"], len(train_rows))))
            logits = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            answer_cross_entropy(logits, batch["labels"]).backward()
            opt.step()
            sched.step()
            opt.zero_grad()
        peft_model.eval()
        acc, balanced = compression.score(peft_model, tokenizer, test_tasks, {"eval": compression.EVAL_CONFIG})
    finally:
        peft_model.unload()
        model.eval()
    return {"accuracy": compression._mean(acc), "balanced": compression._mean(balanced), "per_task": acc}


# -------------------------------------------------------------------------------------------------- the run
@dataclasses.dataclass
class Bench:
    """What every phase of a run uses: the gated model, its data and the settings."""

    s: dict[str, Any]
    model: Any
    gated: Any
    tokenizer: Any
    tasks: list
    test_tasks: list
    val_batches: list
    test_batches: list
    stats_batches: list

    @property
    def shape(self) -> tuple[int, int]:
        return self.s["layers"], self.s["heads"]

    def scored(self, gates: torch.Tensor, with_val: bool = True) -> dict[str, float]:
        return scored(self.model, self.gated, gates, self.val_batches if with_val else None, self.test_batches)


def budget_rows(b: Bench, frac: float, scores: dict[str, torch.Tensor], chosen: dict) -> tuple[list, list]:
    """Every strategy at one budget: (result rows, controller runs); each strategy's gates go into `chosen`."""
    from hf_adaptive.control.config import GateControllerConfig

    L, H = b.shape
    n = L * H
    k = budget_heads(frac, n)
    per_seed = []
    for seed in b.s["seeds"]:
        g = random_gates(L, H, k, seed)
        chosen.setdefault(("random", frac), g)
        per_seed.append(b.scored(g, with_val=False)["test_loss"])
    rows = [
        {
            "strategy": "random",
            "fraction": frac,
            "heads": k,
            "test_loss": statistics.mean(per_seed),
            "test_loss_seeds": per_seed,
            "test_loss_std": statistics.stdev(per_seed) if len(per_seed) > 1 else 0.0,
            "kept": kept_ids(chosen[("random", frac)]),
        }
    ]
    for name, score in scores.items():
        g = chosen[(name, frac)] = gate_control.top_k_gates(score, k)
        rows.append({"strategy": name, "fraction": frac, "heads": k, **b.scored(g), "kept": kept_ids(g)})
    t = time.perf_counter()
    it = iterate_importance(b.model, b.gated, b.val_batches, scores["michel"], k, b.s["iterated"])
    g = chosen[("michel_iterated", frac)] = it.pop("gates")
    rows.append(
        {
            "strategy": "michel_iterated",
            "fraction": frac,
            "heads": k,
            **it,
            **b.scored(g, with_val=False),
            "kept": kept_ids(g),
            "seconds": round(time.perf_counter() - t, 1),
        }
    )
    runs = []
    for algorithm, prior, init in itertools.product(b.s["algorithms"], b.s["priors"], b.s["inits"]):
        name = f"controller_{algorithm}{PRIOR_SUFFIX[prior]}{INIT_SUFFIX[init]}"
        # the budget in heads: 75 % of 270 is 202.5 heads, which no pair of fractions can hold
        cfg = GateControllerConfig(
            algorithm=algorithm, min_active_heads=k, max_active_heads=k, seed=b.s["seed"], **b.s["controller"]
        )
        t = time.perf_counter()
        source = best_static(rows) if init == "best" else ("michel" if init == "michel" else None)
        start = chosen[(source, frac)] if source else None
        strength = b.s["prior_strength"] if prior == "importance" else 0.0
        ctrl = run_controller(
            b.model, b.gated, b.val_batches, b.stats_batches, cfg, b.s["controller_steps"], start, strength
        )
        best = min((pt for pt in ctrl.archive.points if pt.active_heads == k), key=lambda pt: pt.loss)
        g = chosen[(name, frac)] = best.gates.view(L, H)
        rows.append(
            {
                "strategy": name,
                "fraction": frac,
                "heads": k,
                "val_loss": best.loss,
                **b.scored(g, with_val=False),
                "kept": kept_ids(g),
                "best_step": best.step,
            }
        )
        runs.append(
            {
                "strategy": name,
                "algorithm": algorithm,
                "init": init,
                "prior": prior,
                "start": source,
                "fraction": frac,
                "heads": k,
                "seconds": round(time.perf_counter() - t, 1),
                "curve": [{key: r[key] for key in ("step", "loss", "reward", "active_heads")} for r in ctrl.log],
                **curve_summary(ctrl.log, k),
            }
        )
    return rows, runs


def pruning_section(b: Bench, variants: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Each gate pattern of `variants` pruned physically from the dense model (the gates are removed first):
    checks, layout, save / reload, and latency against the dense model and between the first two variants."""
    probe = {k: v for k, v in b.test_batches[0].items() if k in ("input_ids", "attention_mask")}
    gated_logits, drops = {}, {}
    for name, g in variants.items():
        b.gated.set_gates(g)
        drops[name] = b.gated.heads_to_prune()
        with torch.no_grad():
            gated_logits[name] = b.model(**probe).logits
    b.gated.remove()
    dense = b.model
    out: dict[str, Any] = {"fraction": b.s["prune_fraction"], "dense": layout_summary(dense)}
    pruned = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in variants:
            pruned[name], out[name] = prune_and_check(
                dense, drops[name], probe, gated_logits[name], b.test_batches, Path(tmp) / name
            )
    lat = b.s["latency"]
    ids = compression.latency_prompts(b.tokenizer, b.test_tasks, lat["batch"], lat["prompt_tokens"])
    first, second = list(variants)[:2]
    out["latency"] = {
        f"{first}_vs_dense": latency(pruned[first], dense, ids, lat),
        f"{second}_vs_dense": latency(pruned[second], dense, ids, lat),
        f"{second}_vs_{first}": latency(pruned[second], pruned[first], ids, lat),
    }
    return out


def run_lora(b: Bench, arms: dict[tuple[str, float], torch.Tensor]) -> dict[str, Any]:
    """Test-half accuracy after a short LoRA with each arm's gates fixed."""
    train_rows = text_rows(b.tasks, b.tokenizer, b.s, "train", whole_text=False)
    out = []
    for (name, frac), g in arms.items():
        t = time.perf_counter()
        acc = lora_accuracy(b.model, b.gated, g, b.tokenizer, train_rows, b.test_tasks, b.s)
        out.append({"strategy": name, "fraction": frac, "heads": int(g.sum()), **acc})
        out[-1]["seconds"] = round(time.perf_counter() - t, 1)
        print(f"LoRA {name} {frac}: {acc['accuracy']}")
    return {"steps": b.s["lora"]["steps"], "rows": out}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from transformers.utils import logging as hf_logging

    from hf_adaptive.models import attention_entropy, gate_model, head_importance, o_proj_magnitude
    from hf_adaptive.tasks import CausalLMCollator

    s = resolve_settings(args)
    torch.set_num_threads(s["threads"])
    hf_logging.disable_progress_bar()  # the shard bars of save_pretrained
    started = time.perf_counter()
    model, tokenizer, tasks = load_model(s, Path(args.data))
    L, H = s["layers"], s["heads"]
    n, bs = L * H, s["batch_size"]
    collate = CausalLMCollator(tokenizer)
    val_tasks, test_tasks = split_halves(tasks, s["rows_per_task"])
    val_rows = text_rows(val_tasks, tokenizer, s, "eval", whole_text=True)
    test_rows = text_rows(test_tasks, tokenizer, s, "eval", whole_text=True)
    test_batches = gate_control.batches(test_rows, collate, bs)
    print(f"loaded in {time.perf_counter() - started:.0f}s: {n} heads, {len(val_rows)} / {len(test_rows)} rows")

    # L0 first: it attaches (and removes) its own hard-concrete gates
    t = time.perf_counter()
    val_batches = gate_control.batches(val_rows, collate, bs)
    l0 = train_l0(model, val_batches, s["l0"], s["seed"])
    l0["seconds"] = round(time.perf_counter() - t, 1)
    b = Bench(
        s=s,
        model=model,
        gated=gate_model(model),
        tokenizer=tokenizer,
        tasks=tasks,
        test_tasks=test_tasks,
        val_batches=val_batches,
        test_batches=test_batches,
        stats_batches=[collate(val_rows[:: max(1, len(val_rows) // bs)][:bs])],  # one batch spread over the tasks
    )
    dense = b.scored(torch.ones(L, H))
    michel = head_importance(model, val_batches)
    entropy = attention_entropy(model, b.stats_batches)
    scores = {"magnitude": o_proj_magnitude(model), "michel": michel, "l0": l0["expected"]}
    print(f"dense: {dense}; L0 in {l0['seconds']}s")

    rows: list[dict[str, Any]] = [{"strategy": "dense", "fraction": 1.0, "heads": n, **dense, "kept": list(range(n))}]
    controllers: list[dict[str, Any]] = []
    chosen: dict[tuple[str, float], torch.Tensor] = {}
    for frac in s["budgets"]:
        more_rows, runs = budget_rows(b, frac, scores, chosen)
        rows += more_rows
        controllers += runs
        print([(r["strategy"], round(r["test_loss"], 4)) for r in more_rows])

    # whole KV groups ranked by summed Michel importance vs Michel's query heads, at the pruning fraction
    pf = s["prune_fraction"]
    variants = {
        "query_heads": gate_control.top_k_gates(michel, budget_heads(pf, n)),
        "kv_groups": kv_group_gates(michel, s["kv_heads"], budget_heads(pf, L * s["kv_heads"])),
    }
    kv = variants["kv_groups"]
    rows.append(
        {"strategy": "michel_kv_groups", "fraction": pf, "heads": int(kv.sum()), **b.scored(kv), "kept": kept_ids(kv)}
    )
    lora = None
    if s["lora_accuracy"]:
        lora = run_lora(b, {("dense", 1.0): torch.ones(L, H), **chosen, ("michel_kv_groups", pf): kv})
    pruning = pruning_section(b, variants)

    result = {
        "meta": {
            "settings": s,
            "model": f"{s['model']}: {L} layers x {H} query heads on {s['kv_heads']} kv heads ({n} query heads)",
            "quick": args.quick,
            "metric": "whole-text next-token cross-entropy (prompt + answer + eos, pads excluded), token-weighted",
            "val_rows": len(val_rows),
            "test_rows": len(test_rows),
            "test_tokens": sum(int((x["labels"][:, 1:] != -100).sum()) for x in test_batches),
            "seconds": round(time.perf_counter() - started, 1),
            "estimated_real_seconds": estimated_seconds(real_settings(s)),
        },
        "dense": dense,
        "results": rows,
        "verdicts": verdicts(rows, s),
        "pareto_front": pareto(rows),
        "controllers": controllers,
        "l0": {
            "seconds": l0["seconds"],
            "curve": l0["curve"],
            "log_alpha": [round(v, 4) for v in l0["log_alpha"].flatten().tolist()],
        },
        "statistics": {
            name: [round(v, 5) for v in x.flatten().tolist()]
            for name, x in (("michel", michel), ("magnitude", scores["magnitude"]), ("entropy", entropy))
        },
        "pruning": pruning,
        "lora": lora,
    }
    result["meta"].update(version_stamp(CodeVersion(s, compression.PACKAGE, SCRIPTS)))
    return _json_safe(result)


def verdicts(rows: list[dict[str, Any]], s: dict[str, Any]) -> list[dict[str, Any]]:
    """Per budget: the winner on test loss, the best static baseline (of all, `STATIC`, and of the issue's four,
    `ISSUE_STATIC`), each controller's verdict against both."""
    out = []
    for frac in s["budgets"]:
        at = [r for r in rows if r["fraction"] == frac]
        best = min((r for r in at if r["strategy"] in STATIC), key=lambda r: r["test_loss"])
        issue = min((r for r in at if r["strategy"] in ISSUE_STATIC), key=lambda r: r["test_loss"])
        spread = next(r["test_loss_std"] for r in at if r["strategy"] == "random")
        ctrls = [r for r in at if r["strategy"].startswith("controller")]
        out.append(
            {
                "fraction": frac,
                "heads": at[0]["heads"],
                "winner": min(at, key=lambda r: r["test_loss"])["strategy"],
                "best_static": best["strategy"],
                "best_static_test_loss": best["test_loss"],
                "best_issue_static": issue["strategy"],
                "best_issue_static_test_loss": issue["test_loss"],
                "random_std": spread,
                "controllers": {r["strategy"]: verdict(r["test_loss"], best["test_loss"], spread) for r in ctrls},
                "controllers_vs_issue_static": {
                    r["strategy"]: verdict(r["test_loss"], issue["test_loss"], spread) for r in ctrls
                },
            }
        )
    return out


def pareto(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The (heads kept, test loss) points of all strategies that no other point beats on both."""
    front = compression.pareto_front([(r["heads"], -r["test_loss"]) for r in rows])
    out = []
    for heads, neg in front:
        r = next(r for r in rows if r["heads"] == heads and -r["test_loss"] == neg)
        out.append({"heads": heads, "test_loss": r["test_loss"], "strategy": r["strategy"], "fraction": r["fraction"]})
    return out


# ---------------------------------------------------------------------------------------------- report
def _f(v: float | None, digits: int = 4) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def markdown(result: dict[str, Any], png: str) -> str:
    m, s = result["meta"], result["meta"]["settings"]
    dense = result["dense"]
    lines = [
        f"# Head gates on a GQA model: {m['model']}",
        "",
        f"Written by `python benchmarks/gates_real.py{' --quick' if m['quick'] else ''}` in {m['seconds'] / 60:.1f} "
        f"min ({s['threads']} threads). Metric: {m['metric']}. Tasks {', '.join(s['tasks'])}: per task the first "
        f"{s['rows_per_task']} eval rows are the validation half ({m['val_rows']} rows: importance, L0 training, "
        f"controller rewards), the next {s['rows_per_task']} the test half ({m['test_rows']} rows, {m['test_tokens']} "
        "tokens) reported below. No fine-tuning after the choice of heads. Random: mean of seeds "
        f"{s['seeds']} (std in brackets). L0: {s['l0']['steps']} Adam steps (lr {s['l0']['lr']}, penalty weight "
        f"{s['l0']['weight']}) on the gates alone, top-k by expected gate. Controllers: {s['controller_steps']} steps "
        f"per budget, min = max = the budget, at most {s['controller']['max_changes']} flips per step, rollouts of "
        f"{s['controller']['rollout_steps']}; `_warm` starts from Michel's top-k, `_best` from the "
        "static ranking with the lowest validation loss at the budget; `_prior`: `PriorGateController` (importance "
        f"prior, strength {s['prior_strength']}). michel_iterated: {s['iterated']['rounds']} rounds of Michel "
        f"importance under its own gates (average decay {s['iterated']['decay']}), the best validated round. "
        "Dense: validation "
        f"{_f(dense['val_loss'])}, test {_f(dense['test_loss'])}.",
        "",
        "| kept | heads | strategy | val loss | test loss | test - dense |",
        "|---|---|---|---|---|---|",
    ]
    for r in sorted(result["results"], key=lambda r: (-r["fraction"], r["test_loss"])):
        test = _f(r["test_loss"]) + (f" ({r['test_loss_std']:.4f})" if r["strategy"] == "random" else "")
        lines.append(
            f"| {r['fraction']:.2f} | {r['heads']} | {r['strategy']} | {_f(r.get('val_loss'))} | {test} | "
            f"{r['test_loss'] - dense['test_loss']:+.4f} |"
        )
    lines += ["", "## Verdicts (test loss)", ""]
    missed: dict[str, list[str]] = {"all": [], "issue": []}
    for v in result["verdicts"]:
        ctrl = ", ".join(f"{name} {word}" for name, word in v["controllers"].items())
        issue = ", ".join(f"{name} {word}" for name, word in v["controllers_vs_issue_static"].items())
        lines.append(
            f"* {v['fraction']:.0%} ({v['heads']} heads): winner **{v['winner']}**; best static baseline "
            f"{v['best_static']} ({_f(v['best_static_test_loss'])}); random-seed std {_f(v['random_std'])}; "
            f"controllers vs it: {ctrl}. Best of the issue's four ({', '.join(ISSUE_STATIC)}): "
            f"{v['best_issue_static']} ({_f(v['best_issue_static_test_loss'])}); controllers vs it: {issue}."
        )
        for key, field in (("all", "controllers"), ("issue", "controllers_vs_issue_static")):
            missed[key] += [f"{name} at {v['fraction']:.0%}" for name, word in v[field].items() if word == "loses"]

    def target(names: list[str]) -> str:
        return "met at every budget." if not names else f"**missed** for {', '.join(names)}."

    lines += [
        "",
        "Target (the controller beats or matches the best static baseline within the random-seed spread): against "
        f"the issue's four, {target(missed['issue'])} Against every static baseline (michel_iterated included), "
        f"{target(missed['all'])}",
        "",
        "## Controller reward curves",
        "",
        "Reward = tanh(relative validation-loss change) per step (efficiency factor 0). Columns: mean reward over the "
        "first and last quarter of the steps, validation loss at the start (cold: all heads; _warm: Michel's "
        "top-k; _best: the static ranking with the lowest validation loss at the budget, named in `start`), "
        "after the first action, best, and the step of the best.",
        "",
        "| kept | run | start | reward first 1/4 | reward last 1/4 | start val | first action val | best val "
        "| best step | s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in result["controllers"]:
        lines.append(
            f"| {c['fraction']:.2f} | {c['strategy']} | {c['start'] or 'all heads'} | "
            f"{_f(c['first_quarter_reward'], 3)} | "
            f"{_f(c['last_quarter_reward'], 3)} | {_f(c['start_val_loss'])} | {_f(c['first_action_val_loss'])} | "
            f"{_f(c['best_val_loss'])} | {c['best_step']} | "
            f"{c['seconds']} |"
        )
    l0 = result["l0"]["curve"]
    warm = [c for c in result["controllers"] if c["init"] != "cold"]
    cold = [c for c in result["controllers"] if c["init"] == "cold"]
    lines.append("")
    if warm:
        better = sum(c["best_step"] > 0 for c in warm)
        lines += [f"Warm runs that found gates better on validation than their start: {better} of {len(warm)}."]
    if cold:
        worse = sum(c["first_action_val_loss"] > c["best_val_loss"] for c in cold)
        lines += [
            f"Cold runs whose best gates beat their first (near-random) pruning on validation: {worse} of {len(cold)}."
        ]
    iterated = [r for r in result["results"] if r["strategy"] == "michel_iterated"]
    lines += [
        "",
        "michel_iterated, validation loss per round (round 0: Michel's top-k): "
        + "; ".join(
            f"{r['fraction']:.0%}: "
            + " -> ".join(_f(x) for x in r["round_val_losses"])
            + f" (best round {r['best_round']})"
            for r in iterated
        )
        + ".",
        "",
        f"L0 gates: {len(l0)} steps in {result['l0']['seconds']} s; expected L0 (mean open fraction) "
        f"{_f(l0[0]['expected_l0'], 3)} -> {_f(l0[-1]['expected_l0'], 3)}, LM loss {_f(l0[0]['lm_loss'])} -> "
        f"{_f(l0[-1]['lm_loss'])} (sampled gates).",
        "",
        "Pareto front over all strategies (heads kept, test loss): "
        + ", ".join(f"{p['heads']} {p['strategy']} {_f(p['test_loss'])}" for p in result["pareto_front"])
        + ".",
        "",
        f"![test loss vs heads kept, and the controllers' curves]({png})",
        "",
    ]
    lines += pruning_markdown(result["pruning"])
    if result["lora"]:
        lines += ["", f"## Accuracy after a short LoRA ({result['lora']['steps']} steps, test half)", ""]
        lines += ["| kept | strategy | accuracy | balanced |", "|---|---|---|---|"]
        for r in result["lora"]["rows"]:
            lines.append(f"| {r['fraction']:.2f} | {r['strategy']} | {_f(r['accuracy'], 3)} | {_f(r['balanced'], 3)} |")
    q, d = result["pruning"]["query_heads"], result["pruning"]["dense"]
    lines += [
        "",
        "## Package APIs this run relies on",
        "",
        "* Warm start: `GateController.set_gates` (the `_warm` runs start from Michel's top-k, checked against the "
        "budget).",
        "* `PriorGateController` (`hf_adaptive.control.importance_prior`): the `_prior` runs' policy, the greedy swap "
        "rule on the state's importance as a prior on the logits.",
        "* Head budgets as counts: `GateControllerConfig(min_active_heads=k, max_active_heads=k)` (75 % of 270 heads "
        "is 202.5, which no pair of fractions can hold).",
        "* `GatedModel.expected_gates()`: the E[z] the L0 strategy ranks heads by.",
        "* `prune_heads` stores a layer whose kv groups keep unequal numbers of query heads with duplicated kv heads "
        "or with zero padding query slots (each kv head once), whichever needs fewer projection weights: query-head "
        f"pruning here keeps {q['kv_slots']} kv slots of the dense {d['kv_slots']} ({q['kv_groups_kept']} kv groups "
        f"keep a query head; {q['padded_layers']} layers padded, {q['padding_slots']} padding slots).",
    ]
    est = m["estimated_real_seconds"]
    lines += ["", f"Estimated real-mode cost with these options on 2 cores: {est['total'] / 60:.0f} min ({est})."]
    return "\n".join(lines)


def pruning_markdown(p: dict[str, Any]) -> list[str]:
    d = p["dense"]
    lines = [
        f"## Physical pruning at {p['fraction']:.0%} (`prune_heads`)",
        "",
        "| model | query heads | padding slots | kv slots | zeroed layers | parameters | test loss | max diff vs gated "
        "| reloaded |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| dense | {d['query_heads']} | 0 | {d['kv_slots']} | 0 | {d['parameters']:,} | | | |",
    ]
    for name in ("query_heads", "kv_groups"):
        v = p[name]
        lines.append(
            f"| {name} | {v['query_heads']} | {v['padding_slots']} | {v['kv_slots']} | {v['zeroed_layers']} | "
            f"{v['parameters']:,} | "
            f"{_f(v['test_loss'])} | {v['max_abs_diff_vs_gated']:.2e} | {v['reload_equal']} "
            f"({v['max_abs_diff_reloaded']:.1e}) |"
        )
    lines += [
        "",
        "Latency (CPU, interleaved A/B rounds, ratio = median of per-round ratios; < 1: the first model is faster):",
        "",
        "| pair | prefill ms | reference prefill ms | prefill ratio | decode ms | reference decode ms | decode ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for pair, lat in p["latency"].items():
        lines.append(
            f"| {pair} | {lat['prefill_ms']:.1f} | {lat['reference_prefill_ms']:.1f} | {lat['prefill_ratio']:.3f} | "
            f"{lat['decode_ms']:.2f} | {lat['reference_decode_ms']:.2f} | {lat['decode_ratio']:.3f} |"
        )
    q, kv = p["query_heads"], p["kv_groups"]
    lat = p["latency"]
    lines += [
        "",
        f"Query-head pruning keeps {q['kv_slots']} kv slots of {d['kv_slots']} (a kv head stays while one of its query "
        f"heads does, {q['kv_groups_kept']} here; a layer whose groups are left unequal stores them duplicated or "
        "padded with zero query slots, whichever is smaller), so K/V projections and the KV cache "
        + ("do not shrink" if q["kv_slots"] >= d["kv_slots"] else f"shrink to {q['kv_slots'] / d['kv_slots']:.0%}")
        + f"; whole-group pruning keeps {kv['kv_slots']}. Faster than dense: query heads "
        f"{'yes' if lat['query_heads_vs_dense']['prefill_ratio'] < 1 else '**no**'} (prefill), "
        f"{'yes' if lat['query_heads_vs_dense']['decode_ratio'] < 1 else '**no**'} (decode); kv groups "
        f"{'yes' if lat['kv_groups_vs_dense']['prefill_ratio'] < 1 else '**no**'} (prefill), "
        f"{'yes' if lat['kv_groups_vs_dense']['decode_ratio'] < 1 else '**no**'} (decode). Pruned = gated: "
        f"{'yes' if max(q['max_abs_diff_vs_gated'], kv['max_abs_diff_vs_gated']) < 1e-3 else '**no**'}; "
        "save / reload without the wrapper with equal logits: "
        f"{'yes' if q['reload_equal'] and kv['reload_equal'] else '**no**'}.",
    ]
    return lines


def plot(path: Path, result: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["results"]
    n = next(r["heads"] for r in rows if r["strategy"] == "dense")
    fig, (ax, ax_r, ax_v) = plt.subplots(1, 3, figsize=(16, 4.6))
    names = sorted({r["strategy"] for r in rows} - {"dense", "michel_kv_groups"})
    for name in names:
        pts = sorted((r["heads"] / n, r["test_loss"], r.get("test_loss_seeds")) for r in rows if r["strategy"] == name)
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        if name == "random":
            lo = [y - min(p[2]) for y, p in zip(ys, pts)]
            hi = [max(p[2]) - y for y, p in zip(ys, pts)]
            ax.errorbar(xs, ys, yerr=[lo, hi], marker="x", capsize=3, label="random (seed min-max)")
        else:
            ax.plot(xs, ys, marker="o" if name.startswith("controller") else "s", label=name)
    for r in rows:
        if r["strategy"] in ("dense", "michel_kv_groups"):
            ax.plot(
                [r["heads"] / n],
                [r["test_loss"]],
                marker="*" if r["strategy"] == "dense" else "D",
                ls="",
                ms=10,
                label=r["strategy"],
            )
    ax.set(xlabel="fraction of query heads kept", ylabel="test loss (whole text)", title="Heads kept vs test loss")
    ax.legend(fontsize=7)
    for c in result["controllers"]:
        steps = [r["step"] for r in c["curve"] if r["reward"] is not None]
        rewards = [r["reward"] for r in c["curve"] if r["reward"] is not None]
        label = f"{c['strategy']} {c['fraction']:.0%}"
        ax_r.plot(steps, rewards, lw=1, label=label)
        best = c["running_best_val_loss"]
        ax_v.step([p[0] for p in best], [p[1] for p in best], where="post", lw=1, label=label)
    ax_r.set(xlabel="controller step", ylabel="reward", title="Controller reward per step")
    ax_v.set(xlabel="controller step", ylabel="best validation loss so far", title="Controller: best validated gates")
    ax_v.legend(fontsize=6)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out) if args.out else (Path(tempfile.mkdtemp(prefix="gates_real_")) if args.quick else RESULTS)
    if not args.quick:
        est = estimated_seconds(resolve_settings(args))
        print(f"estimated cost on 2 cores: {est['total'] / 60:.0f} min {est}")
    result = run(args)
    png = f"{NAME}_pareto.png"
    plot(out / png, result)
    write_results(NAME, result, markdown(result, png), out=out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
