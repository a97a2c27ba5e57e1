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
from typing import TYPE_CHECKING

from .library import EXPERTS_DIR, LIBRARY_FILE, ROUTER_DIR

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .library import ExpertLibrary

#: templates of the model cards; a checkout keeps them at the repository root
DEFAULT_TEMPLATE_DIR = Path(__file__).resolve().parents[1] / "model_cards"  # also linked as ./model_cards


class HubPushError(RuntimeError):
    """A push to the Hub failed; the local library is unchanged."""


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
    rows = "\n".join(f"| {k} | {v:.4f} |" for k, v in sorted(metrics.items()))
    return "| metric | value |\n|---|---|\n" + rows


def expert_card(library: ExpertLibrary, name: str, repo_id: str, template_dir: Path = DEFAULT_TEMPLATE_DIR) -> str:
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
    return _template(template_dir, "expert_card.md").substitute(
        name=name,
        repo_id=repo_id,
        base_model=library.base_model_name or "unknown",
        task_id=info.task_id or "-",
        experiment_id=info.experiment_id or "-",
        parent=f"`{info.parent}`" if info.parent else "-",
        merged_from=", ".join(f"`{m}`" for m in info.merged_from) or "-",
        uses=info.uses,
        rank=getattr(config, "r", "-"),
        alpha=getattr(config, "lora_alpha", "-"),
        target_modules=", ".join(f"`{t}`" for t in sorted(getattr(config, "target_modules", None) or [])) or "-",
        description=info.description,
        metrics=_fmt_metrics(info.metrics),
        signature=signature,
        subfolder=f"{EXPERTS_DIR}/{name}",
    )


def library_card(library: ExpertLibrary, repo_id: str, template_dir: Path = DEFAULT_TEMPLATE_DIR) -> str:
    rows = "\n".join(
        f"| `{i.name}` | {i.task_id or '-'} | {i.parent or '-'} | {i.uses} | "
        + (", ".join(f"{k}={v:.3f}" for k, v in sorted(i.metrics.items())) or "-")
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
    return _template(template_dir, "library_card.md").substitute(
        repo_id=repo_id,
        base_model=library.base_model_name or "unknown",
        experiment_id=library.experiment_id or "-",
        n_experts=len(library),
        expert_rows=rows,
        router=router_text,
    )


def push_library(
    library: ExpertLibrary,
    repo_id: str,
    *,
    endpoint: str | None = None,
    token: str | bool | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str = "Upload hf_adaptive expert library",
    template_dir: str | Path | None = None,
) -> str:
    """Push the library to `repo_id`; returns the commit id. Raises `HubPushError` on any failure."""
    from huggingface_hub import CommitOperationAdd, HfApi

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
        operations = [
            CommitOperationAdd(path_in_repo=path.relative_to(staging).as_posix(), path_or_fileobj=str(path))
            for path in sorted(staging.rglob("*"))
            if path.is_file() and not any(part.startswith(".") for part in path.relative_to(staging).parts)
        ]
        step = "creating the repository"
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            step = f"committing {len(operations)} files"
            info = api.create_commit(repo_id, operations=operations, commit_message=commit_message, revision=revision)
        except Exception as err:
            status = getattr(getattr(err, "response", None), "status_code", None)
            detail = f" (HTTP {status})" if status is not None else ""
            raise HubPushError(
                f"push of the expert library to {repo_id!r} at {api.endpoint} failed while {step}{detail}: "
                f"{type(err).__name__}: {err}. Nothing was changed locally; the remote repository keeps its "
                "previous commit (the push is a single commit)."
            ) from err
    return info.oid


def pull_library(
    repo_id: str,
    base_model: torch.nn.Module,
    *,
    endpoint: str | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    is_trainable: bool = True,
) -> ExpertLibrary:
    """Download `repo_id` (snapshot) and load it onto `base_model` with `ExpertLibrary.load`."""
    from huggingface_hub import snapshot_download

    from .library import ExpertLibrary

    try:
        local = snapshot_download(
            repo_id,
            revision=revision,
            endpoint=endpoint,
            token=token,
            cache_dir=str(cache_dir) if cache_dir is not None else None,
            allow_patterns=[LIBRARY_FILE, f"{EXPERTS_DIR}/*", f"{ROUTER_DIR}/*", "README.md"],
        )
    except Exception as err:
        raise HubPullError(f"could not download the expert library {repo_id!r}: {type(err).__name__}: {err}") from err
    if not (Path(local) / LIBRARY_FILE).is_file():
        raise HubPullError(f"{repo_id!r} holds no {LIBRARY_FILE}: it is not an hf_adaptive expert library")
    library = ExpertLibrary.load(local, base_model, is_trainable=is_trainable)
    return library
