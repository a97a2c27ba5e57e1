"""What every push to / pull from the Hugging Face Hub shares: a bounded HTTP timeout and the escaping of values
written into model cards (expert libraries and compressed models both push through these)."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


class HubPushError(RuntimeError):
    """A push to the Hub failed; nothing local was changed."""


#: seconds one HTTP request may wait for the server (connect, each read, each write) before the push/pull fails
DEFAULT_TIMEOUT = 60.0


def check_timeout(owner: str, timeout: Any) -> float:
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not math.isfinite(timeout) or timeout <= 0:
        raise ValueError(f"{owner}.timeout={timeout!r} is not allowed: a finite number of seconds > 0")
    return float(timeout)


@contextmanager
def http_timeout(seconds: float) -> Iterator[None]:
    """Every request of huggingface_hub's shared client waits at most `seconds` while inside the block.

    huggingface_hub >= 1.0 builds its shared httpx client with `timeout=None` (wait forever) and sends some
    requests (repository creation, commits, `repo_info` of a snapshot) with no timeout or an explicit `None`: a
    server that accepts the connection and never answers hangs a push or a pull indefinitely. Through
    `set_client_factory`, its documented knob, the client gets `seconds` as its default and a request hook caps
    every request's own timeouts (connect, read, write, pool) at `seconds`. The previous factory (the user's, if
    any) is wrapped, not replaced, and restored afterwards. The client is process-wide, so requests that other
    threads send meanwhile get the same bound.
    """
    from huggingface_hub import set_client_factory
    from huggingface_hub.utils import _http

    previous = getattr(_http, "_GLOBAL_CLIENT_FACTORY", _http.default_client_factory)

    def cap(request: Any) -> None:
        given = dict(request.extensions.get("timeout") or {})
        request.extensions["timeout"] = {
            key: seconds if given.get(key) is None else min(float(given[key]), seconds)
            for key in ("connect", "read", "write", "pool")
        }

    def factory() -> Any:
        client = previous()
        client.timeout = type(client.timeout)(seconds)
        client.event_hooks = {**client.event_hooks, "request": [*client.event_hooks.get("request", []), cap]}
        return client

    set_client_factory(factory)
    try:
        yield
    finally:
        set_client_factory(previous)


_PLAIN_YAML = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-/]*")


def yaml_value(value: Any) -> str:
    """A YAML scalar that parses back to exactly `str(value)`: plain when that is safe, else double-quoted.

    Model-card values come from users and from pulled manifests; written raw, a newline in a base model name adds
    keys to the front matter (`license`, `extra_gated_prompt`, ...).
    """
    import yaml

    text = str(value)
    if _PLAIN_YAML.fullmatch(text) and yaml.safe_load(f"k: {text}") == {"k": text}:
        return text
    return json.dumps(text)  # a JSON string is a valid YAML double-quoted scalar (escapes included)


def md(value: Any) -> str:
    """Text safe inside a Markdown table cell or inline code: one line, no cell separator, no backtick."""
    text = " ".join(str(value).split())
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("`", "'").replace("<", "&lt;")


def py(value: Any) -> str:
    """A Python string literal for the code snippets of the cards (a quote in a name cannot close it)."""
    return json.dumps(str(value))


def is_timeout(err: BaseException) -> bool:
    """Whether `err` (or what caused it) is an HTTP timeout of the client huggingface_hub uses."""
    seen: BaseException | None = err
    while seen is not None:
        if "Timeout" in type(seen).__name__ or isinstance(seen, TimeoutError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def commit_folder(
    api: Any,
    staging: Path,
    repo_id: str,
    what: str,
    *,
    timeout: float,
    private: bool,
    commit_message: str,
    revision: str | None,
    unchanged: str = "",
) -> str:
    """Create `repo_id` if needed and send every file of `staging` (hidden ones left out) in a single commit;
    returns its id. Any failure is a `HubPushError` naming `what`, the repository, the step and the HTTP status."""
    from huggingface_hub import CommitOperationAdd

    operations = [
        CommitOperationAdd(path_in_repo=path.relative_to(staging).as_posix(), path_or_fileobj=str(path))
        for path in sorted(staging.rglob("*"))
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(staging).parts)
    ]
    step = "creating the repository"
    try:
        with http_timeout(timeout):
            api.create_repo(repo_id, private=private, exist_ok=True)
            step = f"committing {len(operations)} files"
            commit = api.create_commit(repo_id, operations=operations, commit_message=commit_message, revision=revision)
    except Exception as err:
        status = getattr(getattr(err, "response", None), "status_code", None)
        detail = f" (HTTP {status})" if status is not None else ""
        if is_timeout(err):
            detail += f" (no answer within timeout={timeout:g} s)"
        raise HubPushError(
            f"push of {what} to {repo_id!r} at {api.endpoint} failed while {step}{detail}: "
            f"{type(err).__name__}: {err}.{unchanged} The remote repository keeps its previous commit (the push is a "
            "single commit)."
        ) from err
    return commit.oid


__all__ = [
    "DEFAULT_TIMEOUT",
    "HubPushError",
    "check_timeout",
    "commit_folder",
    "http_timeout",
    "is_timeout",
    "md",
    "py",
    "yaml_value",
]
