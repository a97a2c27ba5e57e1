"""Lazy package exports (PEP 562), written once: a package lists its public names and where they live, and each is
imported on first access, so importing a package (or its light `config` module) does not load the heavy ones."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """`(__getattr__, __dir__)` for `package`; `exports` maps a public name to the module that defines it, given
    relative to the package (`"config"`) or absolute (`"hf_adaptive.scheduling.early_stopping"`)."""

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        target = exports[name]
        module = importlib.import_module(target if target.startswith("hf_adaptive") else f"{package}.{target}")
        value = getattr(module, name)
        setattr(sys.modules[package], name, value)  # the next access is a plain attribute
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(exports))

    return __getattr__, __dir__
