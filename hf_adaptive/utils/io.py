"""Atomic files and the one on-disk format for state: safetensors for tensors, JSON for the rest.

Nothing shared is pickled. Every file is written under a temporary name in the same folder and renamed,
so a crash never leaves a half-written file behind.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

TENSORS_FILE = "tensors.safetensors"
META_FILE = "state.json"
_TENSOR_REF = "__tensor__"


def _tmp_path(path: Path) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return Path(tmp)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(path)
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, allow_nan=True))


def atomic_save_tensors(
    path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: dict | None = None
) -> None:
    """`safetensors.save_file` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(path)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _split(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj
        return {_TENSOR_REF: prefix}
    if isinstance(obj, Mapping):
        for key in obj:
            if not isinstance(key, str):
                raise TypeError(f"state keys must be strings, got {key!r} at '{prefix}'")
        return {k: _split(v, f"{prefix}.{k}" if prefix else k, tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_split(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot save a {type(obj).__name__} at '{prefix}': only tensors, dicts, lists and JSON scalars")


def _join(obj: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {_TENSOR_REF}:
            return tensors[obj[_TENSOR_REF]]
        return {k: _join(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join(v, tensors) for v in obj]
    return obj


def save_state(directory: str | os.PathLike, state: Mapping[str, Any]) -> None:
    """Save a nested dict of tensors and JSON values as `tensors.safetensors` + `state.json`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _split(dict(state), "", tensors)
    atomic_save_tensors(directory / TENSORS_FILE, tensors)
    atomic_write_json(directory / META_FILE, skeleton)


def load_state(directory: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Inverse of `save_state`."""
    directory = Path(directory)
    meta = directory / META_FILE
    if not meta.is_file():
        raise FileNotFoundError(f"no saved state in {directory} (missing {META_FILE})")
    skeleton = json.loads(meta.read_text(encoding="utf-8"))
    tensor_file = directory / TENSORS_FILE
    tensors = load_file(str(tensor_file), device=str(device)) if tensor_file.is_file() else {}
    return _join(skeleton, tensors)
