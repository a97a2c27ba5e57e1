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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


#: what `open()` would give a new file (0o666 less the umask): mkstemp's private 0o600 is not what a user expects of
#: results and checkpoints, and the rename keeps the temporary file's mode
_FILE_MODE = 0o666 & ~_umask()


def _tmp_path(path: Path) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, _FILE_MODE)
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


class StateLoadError(ValueError):
    """Saved state that cannot be restored: unreadable, truncated, incomplete or with wrong values.

    The message always names the file (or folder) it came from, so that a bad checkpoint can be found.
    """


def _tensor_refs(obj: Any, out: list[str]) -> list[str]:
    if isinstance(obj, dict):
        if set(obj) == {_TENSOR_REF}:
            out.append(obj[_TENSOR_REF])
        else:
            for v in obj.values():
                _tensor_refs(v, out)
    elif isinstance(obj, list):
        for v in obj:
            _tensor_refs(v, out)
    return out


def read_json(path: str | os.PathLike) -> Any:
    """`json.loads` of a file, with a `StateLoadError` naming the file when it is unreadable or truncated."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        detail = f"{type(err).__name__}: {err}"
        raise StateLoadError(f"{path} is not readable JSON (truncated or corrupt?): {detail}") from err


def read_tensors(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """`safetensors.load_file` with a `StateLoadError` naming the file when it is missing, truncated or corrupt."""
    path = Path(path)
    if not path.is_file():
        raise StateLoadError(f"{path} is missing")
    try:
        return load_file(str(path), device=str(device))
    except Exception as err:  # safetensors raises its own SafetensorError, OSError, or RuntimeError
        raise StateLoadError(
            f"{path} is not a readable safetensors file (truncated or corrupt?): {type(err).__name__}: {err}"
        ) from err


def load_state(directory: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Inverse of `save_state`.

    Raises `FileNotFoundError` when there is no `state.json`, and `StateLoadError` naming the file when the JSON
    or the safetensors file is truncated or corrupt, when the JSON refers to tensors that are not there, or when a
    floating-point tensor holds NaN or inf.
    """
    directory = Path(directory)
    meta = directory / META_FILE
    if not meta.is_file():
        raise FileNotFoundError(f"no saved state in {directory} (missing {META_FILE})")
    skeleton = read_json(meta)
    if not isinstance(skeleton, dict):
        raise StateLoadError(f"{meta} holds a {type(skeleton).__name__}, not an object of saved state")
    refs = _tensor_refs(skeleton, [])
    tensor_file = directory / TENSORS_FILE
    if refs and not tensor_file.is_file():
        raise StateLoadError(f"{tensor_file} is missing: {meta} refers to {len(refs)} tensors (e.g. {refs[0]!r})")
    tensors = read_tensors(tensor_file, device) if tensor_file.is_file() else {}
    missing = [r for r in refs if not isinstance(r, str) or r not in tensors]
    if missing:
        raise StateLoadError(f"{tensor_file} lacks {len(missing)} tensors that {meta} refers to: {missing[:5]!r}")
    # every plugin's state, whatever its own checks: a NaN or inf tensor would only break the run later, far away
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise StateLoadError(f"{tensor_file} holds non-finite values (NaN or inf) in {len(bad)} tensors: {bad[:5]!r}")
    return _join(skeleton, tensors)


def check_tensor(
    name: str,
    tensor: Any,
    shape: tuple[int, ...] | list[int] | torch.Size | None = None,
    *,
    finite: bool = True,
    floating: bool = False,
    nonnegative: bool = False,
    file: str | os.PathLike | None = None,
) -> torch.Tensor:
    """Check one loaded tensor (type, shape, finiteness, sign); `StateLoadError` names `name`, the value and `file`.

    Loading is where wrong state must be caught: a NaN or a wrongly shaped tensor that loads silently breaks a run
    much later (broadcasting, NaN losses), far from its cause.
    """
    where = f" (in {file})" if file is not None else ""
    if not isinstance(tensor, torch.Tensor):
        raise StateLoadError(f"{name}={type(tensor).__name__} is not allowed{where}: expected a tensor")
    if shape is not None and tuple(tensor.shape) != tuple(shape):
        raise StateLoadError(f"{name}.shape={tuple(tensor.shape)} is not allowed{where}: expected {tuple(shape)}")
    if floating and not tensor.is_floating_point():
        raise StateLoadError(f"{name}.dtype={tensor.dtype} is not allowed{where}: expected a floating point tensor")
    if finite and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise StateLoadError(f"{name} holds {bad} NaN/inf values, which is not allowed{where}: expected finite values")
    if nonnegative and bool((tensor < 0).any()):
        raise StateLoadError(f"{name} holds negative values, which is not allowed{where}: expected values >= 0")
    return tensor


def load_state_into(target: Any, directory: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, Any]:
    """`target.load_state_dict(load_state(directory))`, with every error raised as `StateLoadError` naming the folder.

    `load_state_dict` methods see a dict, not a file; this is where the file name is added to what they reject
    (missing keys, wrong shapes, NaN).
    """
    directory = Path(directory)
    state = load_state(directory, device=device)
    try:
        target.load_state_dict(state)
    except (StateLoadError, KeyError, ValueError, TypeError, IndexError, RuntimeError, AttributeError) as err:
        owner = type(target).__name__
        detail = f"missing key {err}" if isinstance(err, KeyError) else f"{type(err).__name__}: {err}"
        raise StateLoadError(
            f"{owner} state in {directory / META_FILE} + {directory / TENSORS_FILE} cannot be loaded: {detail}"
        ) from err
    return state
