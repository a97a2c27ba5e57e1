"""Sharing an expert library on the Hugging Face Hub (or any Hub-compatible server).

Layout of the repository:

    README.md                          library card (from `hf_adaptive/model_cards/library_card.md`)
    library.json                       expert metadata (format-versioned)
    router/state.json, router/tensors.safetensors   router profiles and state (if the library has a router)
    experts/<name>/adapter_config.json, adapter_model.safetensors, README.md
                                       one standard peft adapter per expert, loadable with plain
                                       `PeftModel.from_pretrained(base, repo_id, subfolder="experts/<name>")`

A push writes the library into a temporary folder (the local library is only read), creates the repository
and sends everything in a single commit through `HfApi.create_commit`, so the remote repository never holds
half a library. Transient errors are retried by `huggingface_hub` where it supports it (preupload); any
failure is raised as `HubPushError` naming the repository and the step.
"""

from __future__ import annotations

import string
import tempfile
from pathlib import Path
from typing import Any

from ..utils.hub import DEFAULT_TIMEOUT, HubPushError, commit_folder
from ..utils.hub import check_timeout as _check_timeout
from ..utils.hub import http_timeout as _http_timeout
from ..utils.hub import is_timeout as _is_timeout
from ..utils.hub import md as _md
from ..utils.hub import py as _py
from ..utils.hub import yaml_value as _yaml_value
from .layout import EXPERTS_DIR, LIBRARY_FILE, ROUTER_DIR

#: templates of the model cards; a checkout keeps them at the repository root
DEFAULT_TEMPLATE_DIR = Path(__file__).resolve().parents[1] / "model_cards"  # also linked as ./model_cards


class HubPullError(RuntimeError):
    """A library could not be fetched from the Hub."""


def _template(template_dir: Path, name: str) -> string.Template:
    path = template_dir / name
    if not path.is_file():
        raise FileNotFoundError(f"model card template {path} is missing (template_dir={str(template_dir)!r})")
    return string.Template(path.read_text(encoding="utf-8"))


def _fmt_metrics(metrics: dict[str, float]) -> str:
    if not metrics:
        return "No metrics recorded."
    rows = "\n".join(f"| {_md(k)} | {float(v):.4f} |" for k, v in sorted(metrics.items()))
    return "| metric | value |\n|---|---|\n" + rows


def expert_card(library: Any, name: str, repo_id: str, template_dir: Path = DEFAULT_TEMPLATE_DIR) -> str:
    """The model card of one expert (base model, task, metrics, router signature)."""
    info = library.experts[name]
    config = library.model.peft_config[name]
    router = library.router
    if router is not None and name in router:
        vec = router.profiles[router.names.index(name)]
        head = ", ".join(f"{v:.3f}" for v in vec[:8].tolist())
        signature = (
            f"Profile of dimension {vec.numel()} in `router/` (first values: {head}, ...); "
            f"decision rule `{router.config.decision}`, scorer `{router.config.scorer}`."
        )
    else:
        signature = "No router profile."
    base_model = library.base_model_name or "unknown"
    return _template(template_dir, "expert_card.md").substitute(
        name=_md(name),
        repo_id=_md(repo_id),
        repo_id_py=_py(repo_id),
        base_model=_md(base_model),
        base_model_yaml=_yaml_value(base_model),
        base_model_py=_py(base_model),
        task_id=_md(info.task_id or "-"),
        experiment_id=_md(info.experiment_id or "-"),
        parent=f"`{_md(info.parent)}`" if info.parent else "-",
        merged_from=", ".join(f"`{_md(m)}`" for m in info.merged_from) or "-",
        uses=info.uses,
        rank=_md(getattr(config, "r", "-")),
        alpha=_md(getattr(config, "lora_alpha", "-")),
        target_modules=", ".join(f"`{_md(t)}`" for t in sorted(getattr(config, "target_modules", None) or [])) or "-",
        description=_md(info.description),
        metrics=_fmt_metrics(info.metrics),
        signature=signature,
        subfolder=f"{EXPERTS_DIR}/{name}",
        subfolder_py=_py(f"{EXPERTS_DIR}/{name}"),
    )


def library_card(library: Any, repo_id: str, template_dir: Path = DEFAULT_TEMPLATE_DIR) -> str:
    rows = "\n".join(
        f"| `{_md(i.name)}` | {_md(i.task_id or '-')} | {_md(i.parent or '-')} | {i.uses} | "
        + (", ".join(f"{_md(k)}={float(v):.3f}" for k, v in sorted(i.metrics.items())) or "-")
        + " |"
        for i in library.experts.values()
    )
    router = library.router
    router_text = (
        f"{len(router)} profiles of dimension {router.config.dim}; scorer `{router.config.scorer}`, decision "
        f"`{router.config.decision}`, τ = {router.tau:.3f}, {len(router.outcomes)} recorded outcomes."
        if router is not None
        else "No router was saved with this library."
    )
    base_model = library.base_model_name or "unknown"
    return _template(template_dir, "library_card.md").substitute(
        repo_id=_md(repo_id),
        repo_id_py=_py(repo_id),
        base_model=_md(base_model),
        base_model_yaml=_yaml_value(base_model),
        experiment_id=_md(library.experiment_id or "-"),
        n_experts=len(library),
        expert_rows=rows,
        router=router_text,
    )


def push_library(
    library: Any,
    repo_id: str,
    *,
    endpoint: str | None = None,
    token: str | bool | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str = "Upload hf_adaptive expert library",
    template_dir: str | Path | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> str:
    """Push the library to `repo_id`; returns the commit id. Raises `HubPushError` on any failure.

    `timeout`: seconds each HTTP request may wait for the server (connect, read, write); a server that stops
    answering makes the push fail with `HubPushError` instead of hanging (retried requests wait once per try).
    """
    from huggingface_hub import HfApi

    timeout = _check_timeout("push_library", timeout)
    template_dir = Path(template_dir) if template_dir is not None else DEFAULT_TEMPLATE_DIR
    api = HfApi(endpoint=endpoint, token=token)
    with tempfile.TemporaryDirectory(prefix="hf_adaptive_push_") as tmp:
        staging = Path(tmp)
        try:
            library.save(staging)
            (staging / "README.md").write_text(library_card(library, repo_id, template_dir), encoding="utf-8")
            for name in library.experts:
                card = expert_card(library, name, repo_id, template_dir)
                (staging / EXPERTS_DIR / name / "README.md").write_text(card, encoding="utf-8")
        except Exception as err:
            raise HubPushError(
                f"push of the expert library to {repo_id!r} failed while staging its files: {err}"
            ) from err
        return commit_folder(
            api,
            staging,
            repo_id,
            "the expert library",
            timeout=timeout,
            private=private,
            commit_message=commit_message,
            revision=revision,
            unchanged=" Nothing was changed locally.",
        )


def download_library(
    repo_id: str,
    *,
    endpoint: str | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> tuple[Path, Path]:
    """Download `repo_id` (snapshot of the library's files): `(local folder, trusted root)`, the root being the
    repository's cache folder that the snapshot's links may point into. Any failure is a `HubPullError`.
    `ExpertLibrary.from_pretrained` / `pull_library` load what this downloads."""
    from huggingface_hub import snapshot_download

    timeout = _check_timeout("pull_library", timeout)
    try:
        with _http_timeout(timeout):
            local = snapshot_download(
                repo_id,
                revision=revision,
                endpoint=endpoint,
                token=token,
                cache_dir=str(cache_dir) if cache_dir is not None else None,
                allow_patterns=[LIBRARY_FILE, f"{EXPERTS_DIR}/*", f"{ROUTER_DIR}/*", "README.md"],
                etag_timeout=timeout,
            )
    except Exception as err:
        detail = f" (no answer within timeout={timeout:g} s)" if _is_timeout(err) else ""
        raise HubPullError(
            f"could not download the expert library {repo_id!r}{detail}: {type(err).__name__}: {err}"
        ) from err
    local_path = Path(local)
    if not (local_path / LIBRARY_FILE).is_file():
        raise HubPullError(f"{repo_id!r} holds no {LIBRARY_FILE}: it is not an hf_adaptive expert library")
    # snapshot files are links into the cache's blobs/: the repository's cache folder is what they may point into
    trusted_root = local_path.parents[1] if local_path.parent.name == "snapshots" else local_path
    return local_path, trusted_root
