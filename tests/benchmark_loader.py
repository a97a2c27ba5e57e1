"""Loading a benchmark script (benchmarks/<name>.py) as a module for its tests, under its own name."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str) -> Iterator[ModuleType]:
    """Yield benchmarks/<name>.py as module `<name>_under_test` (a module fixture's body: `yield from`); it stays in
    `sys.modules` meanwhile, because dataclasses resolve a module's annotations through it."""
    spec = importlib.util.spec_from_file_location(f"{name}_under_test", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)
