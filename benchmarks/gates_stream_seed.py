"""gates_stream.py again with another controller seed: is the stream's verdict one lucky policy?

`gates_stream.py` stores one run (controller seed 0) in `docs/results/gates_stream.*`. This script runs the same
stream (the same rows and batches: `data_seed` is unchanged), the same model and the same static, oracle and greedy
arms, with the two PPO controllers seeded by `--seed`, and writes `gates_stream_seed<k>.md|json|png` (into
`docs/results/gates_stream_seeds/` by default). Only the controllers' rows should differ from the stored run; the
other arms repeat it, which checks the run (in `--quick` the tiny model is built from the seed too, so every arm
differs). A separate script, repeating gates_stream's `main` with the seed set, so that gates_stream's stored record,
which hashes gates_stream.py, stays current; folding `--seed` into gates_stream.py waits for its next re-run.

    python benchmarks/gates_stream_seed.py --seed 1            # SmolLM2, ~29 min on 2 cores
    python benchmarks/gates_stream_seed.py --seed 1 --quick    # tiny GQA Llama, seconds, into a temporary folder
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, write_results  # noqa: E402, I001  (first: sets the single-threaded, offline environment)

import gates_stream  # noqa: E402

OUT = RESULTS / "gates_stream_seeds"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--seed", type=int, required=True, help="the controllers' seed, >= 1 (seed 0 is gates_stream.py's run)"
    )
    p.add_argument("--quick", action="store_true", help="tiny GQA Llama + built-in tasks, seconds")
    p.add_argument("--data", default=str(gates_stream.compression.DEFAULT_DATA), help="cl_benchmark folder (real mode)")
    p.add_argument("--out", default=None, help=f"results folder (real: {OUT}; quick: a temporary folder)")
    args = p.parse_args(argv)
    if args.seed < 1:
        p.error(f"--seed {args.seed} is not allowed: an integer >= 1 (seed 0 is gates_stream.py's stored run)")
    if args.quick and args.out and Path(args.out).resolve().is_relative_to(RESULTS.resolve()):
        p.error(f"--out {args.out} is not allowed with --quick: quick numbers never go into docs/results")
    if not args.quick and not Path(args.data).is_dir():
        p.error(f"--data {args.data} is not allowed: an existing cl_benchmark folder (one sub-folder per task)")
    return args


def settings(seed: int, quick: bool) -> dict:
    """gates_stream's settings with the controllers' seed replaced; nothing else changes."""
    s = copy.deepcopy(gates_stream.QUICK_SETTINGS if quick else gates_stream.SETTINGS)
    s["seed"] = seed
    return s


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    s = settings(args.seed, args.quick)
    out = Path(args.out) if args.out else (Path(tempfile.mkdtemp(prefix="gates_stream_seed_")) if args.quick else OUT)
    out.mkdir(parents=True, exist_ok=True)
    result = gates_stream.run(s, Path(args.data))
    name = f"{gates_stream.NAME}_seed{args.seed}"
    png = f"{name}_tracking.png"
    gates_stream.plot(out / png, result)
    title, _, body = gates_stream.markdown(result, png).partition("\n\n")
    note = f"Controllers' seed {args.seed} (`benchmarks/gates_stream_seed.py`; gates_stream.py's stored run is seed 0)."
    write_results(name, result, f"{title}\n\n{note}\n\n{body}", out=out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
