"""The floors of docs/architecture.md hold: no import circle, no arrow from a lower floor to a higher one.

`lint-imports` checks the layers contract of setup.cfg (TYPE_CHECKING imports included); the circle check below
looks at single modules, which the layers contract does not (two siblings of one floor may import each other, but
not in a circle).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _lint_imports() -> str:
    exe = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    if not Path(exe).exists():
        pytest.skip("import-linter is not installed (it is in the test extra)")
    run = subprocess.run([exe, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    return run.stdout


def test_the_floors_contract_is_kept():
    assert "Contracts: 1 kept, 0 broken." in _lint_imports()


def test_no_module_imports_itself_through_others():
    grimp = pytest.importorskip("grimp")
    graph = grimp.build_graph("hf_adaptive", exclude_type_checking_imports=False)
    circles = []
    for module in sorted(graph.modules):
        for imported in graph.find_modules_directly_imported_by(module):
            if imported != module and graph.find_shortest_chain(importer=imported, imported=module):
                circles.append((module, imported))
    assert not circles, f"import circles through: {circles}"


def test_the_trainer_imports_no_capability_by_name():
    grimp = pytest.importorskip("grimp")
    graph = grimp.build_graph("hf_adaptive", exclude_type_checking_imports=False)
    capabilities = ("consolidation", "replay", "experts", "control", "scheduling")
    direct = graph.find_modules_directly_imported_by("hf_adaptive.trainer")
    assert not [m for m in direct if m.split(".")[1] in capabilities], direct
