"""A library of LoRA experts: named peft adapters on one `PeftModel`, with the bookkeeping a router needs.

All LoRA work is peft's (`get_peft_model`, `add_adapter`, `set_adapter`, `add_weighted_adapter`,
`delete_adapter`, `save_pretrained`, `load_adapter`). The library adds what peft does not keep: which
experiment and task each expert belongs to, where it was forked from, how often it was used, its metrics,
and a versioned `library.json` next to one standard peft adapter folder per expert, so that every expert
loads with plain `PeftModel.from_pretrained(base, folder)`.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..adapters import LORA_DEFAULTS, lora_config
from ..utils.io import StateLoadError, atomic_write_json, check_tensor, read_json, read_tensors
from .hub import DEFAULT_TIMEOUT, HubPullError, download_library, push_library
from .layout import ADAPTER_FILES, EXPERTS_DIR, LIBRARY_FILE, LIBRARY_FORMAT_VERSION, ROUTER_DIR

if TYPE_CHECKING:  # pragma: no cover
    from peft import LoraConfig

    from .router import Router

__all__ = [
    "ADAPTER_FILES",
    "EXPERTS_DIR",
    "LIBRARY_FILE",
    "LIBRARY_FORMAT_VERSION",
    "MERGE_TYPES",
    "ROUTER_DIR",
    "ExpertInfo",
    "ExpertLibrary",
    "default_lora_config",
    "pull_library",
]

MERGE_TYPES = ("cat", "svd")
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")


@dataclass
class ExpertInfo:
    """What the library knows about one expert besides its weights."""

    name: str
    task_id: str = ""
    experiment_id: str = ""
    parent: str | None = None
    merged_from: list[str] = field(default_factory=list)
    uses: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    description: str = ""

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExpertInfo:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


def default_lora_config(r: int = 8, lora_alpha: float = 16.0, target_modules: list[str] | None = None) -> LoraConfig:
    """The experts' LoRA config by default (`hf_adaptive.adapters.lora_config`, no dropout)."""
    return lora_config(r, lora_alpha, 0.0, list(target_modules or LORA_DEFAULTS["target_modules"]))


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name) or name == "default":
        raise ValueError(
            f"ExpertLibrary.name={name!r} is not allowed: use letters, digits, '_' or '-', starting with a letter "
            "or '_', and not 'default'"
        )
    return name


def _check_path_name(name: Any, source: str) -> str:
    """An expert name that is safe as one folder name (no separators, no '..', not absolute), or a clear error.

    Names that reach the disk come from `library.json` too, which may have been pulled from anyone's repository:
    an absolute or '..' name would read adapters from, and on the next save delete, folders outside the library.
    """
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(
            f"ExpertLibrary.name={name!r} is not allowed ({source}): use letters, digits, '_' or '-', starting with "
            "a letter or '_' (no path separators, no '.', not absolute)"
        )
    return name


def _inside(root: Path, path: Path, what: str) -> Path:
    """`path` resolved (symlinks followed), refused unless it stays inside `root` (also resolved)."""
    resolved, base = path.resolve(), root.resolve()
    if resolved != base and base not in resolved.parents:
        raise ValueError(
            f"ExpertLibrary {what}={str(path)!r} is not allowed: it resolves to {resolved}, outside {base}"
        )
    return resolved


def _check_info_types(info: ExpertInfo, source: Path) -> None:
    """The metadata fields of a manifest entry have the types the library and the model cards rely on."""

    def bad(field_name: str, allowed: str) -> None:
        value = getattr(info, field_name)
        raise StateLoadError(
            f"ExpertInfo.{field_name}={value!r:.200} is not allowed (expert {info.name!r} in {source}): {allowed}"
        )

    for f in ("task_id", "experiment_id", "description"):
        if not isinstance(getattr(info, f), str):
            bad(f, "expected a string")
    if info.parent is not None:
        _check_path_name(info.parent, f"parent of {info.name!r} in {source}")
    if not isinstance(info.merged_from, list) or not all(isinstance(m, str) for m in info.merged_from):
        bad("merged_from", "expected a list of expert names")
    if isinstance(info.uses, bool) or not isinstance(info.uses, int) or info.uses < 0:
        bad("uses", "expected an integer >= 0")
    if not isinstance(info.metrics, dict) or not all(
        isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) for k, v in info.metrics.items()
    ):
        bad("metrics", "expected an object of metric name -> number")


class ExpertLibrary:
    """LoRA experts on one backbone.

    `model` is a plain transformers model (wrapped by peft on the first `create`) or a `PeftModel` whose
    adapters all become experts. `self.model` is always the current model (the `PeftModel` once one exists):
    hand that to the trainer.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        lora_config: LoraConfig | None = None,
        experiment_id: str = "",
        base_model_name: str | None = None,
        router: Router | None = None,
    ) -> None:
        self.model = model
        self.lora_config = lora_config or default_lora_config()
        self.experiment_id = experiment_id
        self.router = router
        self.experts: dict[str, ExpertInfo] = {}
        self.base_model_name = base_model_name or getattr(getattr(model, "config", None), "_name_or_path", "") or ""
        if self._is_peft():
            for name in self.model.peft_config:
                self.experts[name] = ExpertInfo(name=name, experiment_id=experiment_id)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_base(
        cls,
        model_name_or_path: str,
        quantization: str | None = None,
        attn_implementation: str | None = None,
        lora_config: LoraConfig | None = None,
        **kwargs: Any,
    ) -> tuple[ExpertLibrary, Any]:
        """`(library, tokenizer)` on a backbone loaded by name, optionally 8-bit/4-bit (QLoRA) via bitsandbytes.

        With `quantization`, the frozen backbone's linear layers are bitsandbytes modules (on CPU or CUDA; 4-bit
        computes in float32 on CPU, bfloat16 on CUDA) and it is prepared for k-bit training with peft's
        `prepare_model_for_kbit_training` (norms in float32, input gradients, non-reentrant gradient
        checkpointing); the LoRA experts created on it train in full precision. The embedded `tiny-gemma` cannot be
        quantized by name: save it and pass the folder. flash-attn is passed through
        `attn_implementation="flash_attention_2"`.
        """
        from ..models import load_model_and_tokenizer

        model, tokenizer = load_model_and_tokenizer(
            model_name_or_path, attn_implementation=attn_implementation, quantization=quantization
        )
        if quantization is not None:
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, gradient_checkpointing_kwargs={"use_reentrant": False})
        return cls(model, lora_config=lora_config, base_model_name=model_name_or_path, **kwargs), tokenizer

    # ------------------------------------------------------------------ helpers
    def _is_peft(self) -> bool:
        from peft import PeftModel

        return isinstance(self.model, PeftModel)

    def _require(self, name: str) -> ExpertInfo:
        if name not in self.experts:
            raise KeyError(f"unknown expert {name!r}; the library holds {sorted(self.experts)}")
        return self.experts[name]

    @property
    def names(self) -> list[str]:
        return list(self.experts)

    def __len__(self) -> int:
        return len(self.experts)

    def __contains__(self, name: object) -> bool:
        return name in self.experts

    @property
    def active(self) -> list[str]:
        """Names of the active experts (empty before the first one exists)."""
        if not self._is_peft():
            return []
        active = self.model.base_model.active_adapters
        return [active] if isinstance(active, str) else list(active)

    def base_model(self) -> torch.nn.Module:
        """The backbone without the peft wrapper (adapters stay injected; use `disable_adapters` for pure base)."""
        return self.model.get_base_model() if self._is_peft() else self.model

    def disable_adapters(self):
        """Context manager: the backbone alone (no expert active)."""
        if self._is_peft():
            return self.model.disable_adapter()
        from contextlib import nullcontext

        return nullcontext()

    # ------------------------------------------------------------------ lifecycle
    def create(
        self,
        name: str,
        task_id: str = "",
        experiment_id: str | None = None,
        lora_config: LoraConfig | None = None,
        description: str = "",
        activate: bool = True,
    ) -> ExpertInfo:
        """A fresh LoRA expert (peft's initialisation: B = 0, so the model is unchanged until it trains)."""
        _check_name(name)
        if name in self.experts:
            raise ValueError(f"ExpertLibrary.name={name!r} is not allowed: an expert with that name exists")
        config = copy.deepcopy(lora_config or self.lora_config)
        if self._is_peft():
            self.model.add_adapter(name, config)
        else:
            from peft import get_peft_model

            self.model = get_peft_model(self.model, config, adapter_name=name)
        info = ExpertInfo(
            name=name,
            task_id=task_id,
            experiment_id=self.experiment_id if experiment_id is None else experiment_id,
            description=description,
        )
        self.experts[name] = info
        if activate:
            self.activate(name)
        return info

    def activate(self, name: str, trainable: bool = True) -> None:
        """Make `name` the single active expert (trainable unless `trainable=False`) and count the use."""
        self._require(name)
        self.model.set_adapter(name)
        if not trainable:
            for n, p in self.model.named_parameters():
                if f".{name}." in n:
                    p.requires_grad_(False)
        self.experts[name].uses += 1

    def compose(self, names: list[str]) -> None:
        """Several experts active at once: their LoRA updates add up (peft multi-adapter inference)."""
        if not names:
            raise ValueError("ExpertLibrary.compose names=[] is not allowed: give at least one expert")
        for n in names:
            self._require(n)
        self.model.base_model.set_adapter(list(names))
        for n in names:
            self.experts[n].uses += 1

    def delete(self, name: str) -> None:
        """Remove an expert (its weights and its router profile)."""
        self._require(name)
        if len(self.experts) == 1:
            raise ValueError(f"ExpertLibrary.delete name={name!r} is not allowed: it is the last expert of the library")
        if name in self.active:
            other = next(n for n in self.experts if n != name)
            self.model.set_adapter(other)
        self.model.delete_adapter(name)
        del self.experts[name]
        if self.router is not None and name in self.router:
            self.router.remove_expert(name)

    def fork(self, source: str, name: str, task_id: str = "", activate: bool = True) -> ExpertInfo:
        """A new expert warm-started from a copy of `source`'s weights (same LoRA config)."""
        from peft import get_peft_model_state_dict, set_peft_model_state_dict

        src = self._require(source)
        config = copy.deepcopy(self.model.peft_config[source])
        info = self.create(name, task_id=task_id, lora_config=config, description=src.description, activate=False)
        info.parent = source
        state = get_peft_model_state_dict(self.model, adapter_name=source)
        set_peft_model_state_dict(self.model, {k: v.clone() for k, v in state.items()}, adapter_name=name)
        if activate:
            self.activate(name)
        return info

    def merge(
        self,
        sources: list[str],
        name: str,
        weights: list[float] | None = None,
        combination_type: str = "cat",
        task_id: str = "",
    ) -> ExpertInfo:
        """One expert from several, through peft's `add_weighted_adapter`.

        Only `cat` (exact: the ranks are concatenated, so the update is Σ wᵢ·Bᵢ·Aᵢ·scalingᵢ) and `svd`
        (the same sum truncated to the largest rank by SVD) are offered: peft's `linear` requires equal ranks
        and mixes A and B factors, which is not the weighted sum of the updates.
        """
        if combination_type not in MERGE_TYPES:
            raise ValueError(
                f"ExpertLibrary.combination_type={combination_type!r} is not allowed: use one of {MERGE_TYPES}"
            )
        if not sources:
            raise ValueError("ExpertLibrary.merge sources=[] is not allowed: give at least one expert")
        for s in sources:
            self._require(s)
        _check_name(name)
        if name in self.experts:
            raise ValueError(f"ExpertLibrary.name={name!r} is not allowed: an expert with that name exists")
        weights = [1.0 / len(sources)] * len(sources) if weights is None else list(weights)
        if len(weights) != len(sources):
            raise ValueError(
                f"ExpertLibrary.weights={weights!r} is not allowed: give one weight per source ({len(sources)})"
            )
        kwargs: dict[str, Any] = {}
        if combination_type == "svd":
            kwargs["svd_rank"] = max(self.model.peft_config[s].r for s in sources)
        self.model.add_weighted_adapter(
            adapters=list(sources), weights=weights, adapter_name=name, combination_type=combination_type, **kwargs
        )
        info = ExpertInfo(name=name, task_id=task_id, experiment_id=self.experiment_id, merged_from=list(sources))
        self.experts[name] = info
        return info

    def prune(self, min_uses: int = 1, keep: list[str] | None = None) -> list[str]:
        """Drop experts used fewer than `min_uses` times (never those in `keep`, never the last one)."""
        keep_set = set(keep or [])
        dropped = []
        for name in list(self.experts):
            if name in keep_set or len(self.experts) == 1:
                continue
            if self.experts[name].uses < min_uses:
                self.delete(name)
                dropped.append(name)
        return dropped

    def set_metrics(self, name: str, **metrics: float) -> None:
        self._require(name).metrics.update({k: float(v) for k, v in metrics.items()})

    # ------------------------------------------------------------------ persistence
    def manifest(self) -> dict[str, Any]:
        return {
            "format_version": LIBRARY_FORMAT_VERSION,
            "base_model": self.base_model_name,
            "experiment_id": self.experiment_id,
            "experts": [asdict(info) for info in self.experts.values()],
            "router": self.router is not None,
        }

    def save_expert(self, name: str, directory: str | os.PathLike) -> Path:
        """Write one expert as a standard peft adapter folder (adapter_config.json + adapter_model.safetensors)."""
        self._require(name)
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
        try:
            self.model.save_pretrained(str(tmp), selected_adapters=[name], safe_serialization=True)
            # peft writes the "default" adapter at the root, any other into a subfolder named after it
            produced = tmp if name == "default" else tmp / name
            if directory.is_symlink():  # replace the link itself, never what it points to
                directory.unlink()
            elif directory.exists():
                shutil.rmtree(directory)
            if produced == tmp:
                shutil.copytree(tmp, directory)
            else:
                os.replace(produced, directory)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return directory

    def save(self, directory: str | os.PathLike) -> Path:
        """`directory/library.json`, `directory/experts/<name>/` (peft adapters), `directory/router/` (if any)."""
        if not self.experts:
            raise ValueError("ExpertLibrary.save is not allowed on an empty library: create an expert first")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        experts_dir = directory / EXPERTS_DIR
        for name in self.experts:  # every name checked before anything is written or removed
            _check_path_name(name, "saving the library")
        for name in self.experts:
            self.save_expert(name, experts_dir / name)
        if experts_dir.is_dir():  # experts deleted since the last save
            for stale in experts_dir.iterdir():
                if stale.name in self.experts or stale.name.startswith("."):
                    continue
                if stale.is_symlink():  # remove the link, never the folder it points to
                    stale.unlink()
                elif stale.is_dir():
                    shutil.rmtree(stale)
        if self.router is not None:
            self.router.save(directory / ROUTER_DIR)
        atomic_write_json(directory / LIBRARY_FILE, self.manifest())
        return directory

    @classmethod
    def load(
        cls,
        directory: str | os.PathLike,
        base_model: torch.nn.Module,
        is_trainable: bool = True,
        trusted_root: str | os.PathLike | None = None,
    ) -> ExpertLibrary:
        """Inverse of `save`: every expert loaded onto `base_model` with peft, router restored if saved.

        Everything is checked before use, because a library may come from anyone's repository: expert names (no
        path tricks, no duplicates), every folder and file resolving inside `directory` (or `trusted_root`, e.g. the
        Hub cache whose snapshot files are links to its blobs), adapter files present, readable, finite and holding
        every weight the expert needs. Errors name the file: `StateLoadError` (a `ValueError`) for bad content,
        `FileNotFoundError` for a missing file, `ValueError` for a refused name or path.
        """
        from peft import PeftModel

        directory = Path(directory)
        root = Path(trusted_root) if trusted_root is not None else directory
        manifest_file = directory / LIBRARY_FILE
        if not manifest_file.is_file():
            raise FileNotFoundError(f"no expert library in {directory} (missing {LIBRARY_FILE})")
        _inside(root, manifest_file, LIBRARY_FILE)
        infos = cls._read_manifest(manifest_file)
        manifest = read_json(manifest_file)
        experts_dir = directory / EXPERTS_DIR
        adapters = {info.name: cls._check_adapter_folder(experts_dir, info.name, root) for info in infos}
        model: Any = base_model
        for i, info in enumerate(infos):
            path = str(experts_dir / info.name)
            try:
                if i == 0:
                    model = PeftModel.from_pretrained(model, path, adapter_name=info.name, is_trainable=is_trainable)
                else:
                    model.load_adapter(path, adapter_name=info.name, is_trainable=is_trainable)
            except Exception as err:
                raise StateLoadError(
                    f"the adapter in {path} does not load onto the base model: {type(err).__name__}: {err}"
                ) from err
            cls._check_loaded_adapter(model, info.name, adapters[info.name], experts_dir / info.name / ADAPTER_FILES[1])
        library = cls(
            model, experiment_id=manifest.get("experiment_id", ""), base_model_name=manifest.get("base_model")
        )
        library.lora_config = copy.deepcopy(model.peft_config[infos[0].name])
        library.experts = {info.name: info for info in infos}
        model.set_adapter(infos[0].name)
        router_dir = directory / ROUTER_DIR
        if router_dir.is_dir() or manifest.get("router") is True:
            from ..utils.io import META_FILE, TENSORS_FILE
            from .router import Router

            for f in (META_FILE, TENSORS_FILE):
                if not (router_dir / f).is_file():
                    raise FileNotFoundError(f"{router_dir / f} is missing: the library was saved with a router")
                _inside(root, router_dir / f, f"{ROUTER_DIR}/{f}")
            library.router = Router.load(router_dir)
        return library

    @staticmethod
    def _read_manifest(manifest_file: Path) -> list[ExpertInfo]:
        """The experts of `library.json`, every name, type and duplicate checked (errors name the file)."""
        manifest = read_json(manifest_file)
        if not isinstance(manifest, dict):
            raise StateLoadError(f"{manifest_file} holds a {type(manifest).__name__}, not a library manifest object")
        version = manifest.get("format_version")
        if version != LIBRARY_FORMAT_VERSION:
            raise ValueError(
                f"ExpertLibrary.format_version={version!r} is not allowed: this version reads {LIBRARY_FORMAT_VERSION}"
                f" (in {manifest_file})"
            )
        for key in ("base_model", "experiment_id"):
            if not isinstance(manifest.get(key) or "", str):
                raise StateLoadError(f"{manifest_file}: {key}={manifest.get(key)!r} is not allowed: expected a string")
        entries = manifest.get("experts")
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise StateLoadError(f"{manifest_file}: 'experts' must be a list of objects, got {entries!r:.200}")
        if not entries:
            raise ValueError(f"the library in {manifest_file.parent} holds no expert ({manifest_file})")
        infos: list[ExpertInfo] = []
        seen: set[str] = set()
        for entry in entries:
            name = _check_path_name(entry.get("name"), f"in {manifest_file}")
            if name in seen:
                raise ValueError(f"ExpertLibrary.name={name!r} is not allowed: it is listed twice in {manifest_file}")
            seen.add(name)
            try:
                info = ExpertInfo.from_dict(entry)
            except TypeError as err:
                raise StateLoadError(f"{manifest_file}: the entry of expert {name!r} is malformed: {err}") from err
            _check_info_types(info, manifest_file)
            infos.append(info)
        return infos

    @staticmethod
    def _check_adapter_folder(experts_dir: Path, name: str, root: Path) -> dict[str, torch.Tensor]:
        """The adapter weights of `name`, after checking that its folder and files are there and stay inside `root`."""
        folder = experts_dir / name
        _inside(root, folder, f"{EXPERTS_DIR}/{name}")
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} is missing: expert {name!r} is listed in {LIBRARY_FILE}")
        for f in ADAPTER_FILES:
            if not (folder / f).is_file():
                raise FileNotFoundError(f"{folder / f} is missing: every expert folder holds {list(ADAPTER_FILES)}")
            _inside(root, folder / f, f"{EXPERTS_DIR}/{name}/{f}")
        weights_file = folder / ADAPTER_FILES[1]
        weights = read_tensors(weights_file)
        if not weights:
            raise StateLoadError(f"{weights_file} holds no tensor: expert {name!r} would load untrained")
        for key, tensor in weights.items():
            check_tensor(key, tensor, floating=True, file=weights_file)
        return weights

    @staticmethod
    def _check_loaded_adapter(model: Any, name: str, weights: dict[str, torch.Tensor], weights_file: Path) -> None:
        """Every weight the expert has in the model came from the file (peft only warns about missing keys)."""
        from peft import get_peft_model_state_dict

        expected = get_peft_model_state_dict(model, adapter_name=name)
        missing = sorted(k for k in expected if k not in weights)
        if missing:
            raise StateLoadError(
                f"{weights_file} lacks {len(missing)} of the {len(expected)} weights of expert {name!r} "
                f"(e.g. {missing[:3]}): it would load partly untrained"
            )
        for key, tensor in expected.items():
            check_tensor(key, weights[key], shape=tensor.shape, file=weights_file)

    # ------------------------------------------------------------------ the Hub
    def push_to_hub(self, repo_id: str, **kwargs: Any) -> str:
        """Push every expert (standard peft adapter per subfolder), router and model cards; see `hub.push_library`."""
        return push_library(self, repo_id, **kwargs)

    @classmethod
    def from_pretrained(cls, repo_id: str, base_model: torch.nn.Module, **kwargs: Any) -> ExpertLibrary:
        """Restore a library pushed with `push_to_hub` (experts, metadata, router)."""
        return pull_library(repo_id, base_model, **kwargs)


def pull_library(
    repo_id: str,
    base_model: torch.nn.Module,
    *,
    endpoint: str | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    is_trainable: bool = True,
    timeout: float = DEFAULT_TIMEOUT,
) -> ExpertLibrary:
    """Download `repo_id` (snapshot, `hub.download_library`) and load it onto `base_model` with `ExpertLibrary.load`.

    Everything pulled is checked before use (see `ExpertLibrary.load`: names, paths inside the snapshot, files
    present, complete and finite); any failure is a `HubPullError` naming the repository and the file.
    `timeout`: seconds each HTTP request may wait for the server.
    """
    local_path, trusted_root = download_library(
        repo_id, endpoint=endpoint, token=token, revision=revision, cache_dir=cache_dir, timeout=timeout
    )
    try:
        return ExpertLibrary.load(local_path, base_model, is_trainable=is_trainable, trusted_root=trusted_root)
    except (OSError, ValueError) as err:  # StateLoadError is a ValueError; a missing file an OSError
        raise HubPullError(
            f"the expert library {repo_id!r} (snapshot {local_path}) is not loadable: {type(err).__name__}: {err}"
        ) from err
