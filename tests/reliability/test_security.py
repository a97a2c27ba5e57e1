"""Security of the expert library and its Hub round trip (issue #11 §3).

A library may be pulled from anyone's repository: its manifest names, folders and files must never reach outside
the library (reading adapters from elsewhere, deleting folders on the next save), the model cards must not let a
value add front-matter keys or break out of a code snippet, a silent server must not hang a push or a pull, and
a repository with files missing must fail with an error naming the file.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import socket
import sys
import threading
from pathlib import Path

import pytest
import torch
import yaml

from hf_adaptive.experts import ExpertLibrary, HubPullError, HubPushError, Router, RouterConfig
from hf_adaptive.experts.hub import expert_card, library_card
from hf_adaptive.models import build_tiny_gemma

_TESTS = Path(__file__).resolve().parents[1]
if str(_TESTS) not in sys.path:
    sys.path.insert(0, str(_TESTS))

from hub_server import HubServer  # noqa: E402

REPO = "tester/lib"


@pytest.fixture
def hub(tmp_path, monkeypatch):
    import huggingface_hub.constants as constants

    server = HubServer(tmp_path / "hub").start()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    yield server
    server.stop()


@pytest.fixture
def silent_endpoint():
    """A server on 127.0.0.1 that accepts every connection and never answers."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    sock.settimeout(0.2)
    conns: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conns.append(sock.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    stop.set()
    thread.join()
    for c in conns:
        c.close()
    sock.close()


def _library(tokenizer, with_router: bool = True) -> ExpertLibrary:
    lib = ExpertLibrary(build_tiny_gemma(tokenizer, seed=0)[0], experiment_id="exp", base_model_name="tiny-gemma")
    gen = torch.Generator().manual_seed(0)
    if with_router:
        lib.router = Router(RouterConfig(dim=4))
    for name in ("alpha", "beta"):
        lib.create(name, task_id=name)
        with torch.no_grad():
            for n, p in lib.model.named_parameters():
                if f".{name}." in n:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
        if with_router:
            lib.router.add_expert(name, torch.randn(4, generator=gen))
    return lib


def _outside_adapter(lib: ExpertLibrary, tmp_path: Path) -> Path:
    """A valid peft adapter folder outside any library, standing for a user's own files."""
    outside = tmp_path / "users_own_adapter"
    lib.save_expert("alpha", outside)
    (outside / "precious.txt").write_text("keep me")
    return outside


def _rewrite_manifest(directory: Path, edit) -> None:
    path = directory / "library.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("kind", ["absolute", "dotdot", "separator", "dot", "not_a_string", "empty"])
def test_manifest_names_that_leave_the_library_are_refused(tokenizer, tmp_path, kind):
    lib = _library(tokenizer, with_router=False)
    outside = _outside_adapter(lib, tmp_path)
    saved = lib.save(tmp_path / "lib")
    bad = {
        "absolute": str(outside),
        "dotdot": "../../users_own_adapter",
        "separator": "alpha/../beta",
        "dot": ".",
        "not_a_string": 7,
        "empty": "",
    }[kind]

    def edit(m):
        m["experts"][0]["name"] = bad

    _rewrite_manifest(saved, edit)
    with pytest.raises(ValueError, match=re.escape(f"ExpertLibrary.name={bad!r} is not allowed")) as err:
        ExpertLibrary.load(saved, build_tiny_gemma(tokenizer, seed=0)[0])
    assert "library.json" in str(err.value)
    assert (outside / "precious.txt").read_text() == "keep me"


def test_a_library_holding_an_absolute_name_never_deletes_outside_on_save(tokenizer, tmp_path):
    """The state the original code reached after loading such a manifest (a peft adapter named by an absolute path):
    its `save` removed the outside folder (`shutil.rmtree(experts_dir / name)` with `name` absolute)."""
    import copy

    from hf_adaptive.experts.library import ExpertInfo

    lib = _library(tokenizer, with_router=False)
    outside = _outside_adapter(lib, tmp_path)
    lib.model.add_adapter(str(outside), copy.deepcopy(lib.lora_config))
    lib.experts[str(outside)] = ExpertInfo(name=str(outside))
    with pytest.raises(ValueError, match=re.escape(f"ExpertLibrary.name={str(outside)!r} is not allowed")):
        lib.save(tmp_path / "lib")
    assert (outside / "precious.txt").read_text() == "keep me"


def test_symlinked_expert_folder_is_refused_on_load_and_never_followed_on_save(tokenizer, tmp_path):
    lib = _library(tokenizer, with_router=False)
    outside = _outside_adapter(lib, tmp_path)
    saved = lib.save(tmp_path / "lib")
    shutil.rmtree(saved / "experts" / "alpha")
    os.symlink(outside, saved / "experts" / "alpha")
    with pytest.raises(ValueError, match="outside"):
        ExpertLibrary.load(saved, build_tiny_gemma(tokenizer, seed=0)[0])
    # saving over it replaces the link, it does not write into or delete the folder it points to
    os.symlink(outside, saved / "experts" / "stale_link")
    lib.save(saved)
    assert not (saved / "experts" / "alpha").is_symlink() and not (saved / "experts" / "stale_link").exists()
    assert (outside / "precious.txt").read_text() == "keep me"
    assert sorted(p.name for p in outside.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "precious.txt",
    ]
    assert ExpertLibrary.load(saved, build_tiny_gemma(tokenizer, seed=0)[0]).names == ["alpha", "beta"]


def test_symlinked_adapter_file_is_refused(tokenizer, tmp_path):
    lib = _library(tokenizer, with_router=False)
    outside = _outside_adapter(lib, tmp_path)
    saved = lib.save(tmp_path / "lib")
    target = saved / "experts" / "beta" / "adapter_model.safetensors"
    target.unlink()
    os.symlink(outside / "adapter_model.safetensors", target)
    with pytest.raises(ValueError, match="adapter_model.safetensors.*outside"):
        ExpertLibrary.load(saved, build_tiny_gemma(tokenizer, seed=0)[0])


def test_duplicate_expert_in_the_manifest_is_refused(tokenizer, tmp_path):
    saved = _library(tokenizer, with_router=False).save(tmp_path / "lib")
    _rewrite_manifest(saved, lambda m: m["experts"].append(dict(m["experts"][0])))
    with pytest.raises(
        ValueError, match=r"ExpertLibrary.name='alpha' is not allowed: it is listed twice in .*library.json"
    ):
        ExpertLibrary.load(saved, build_tiny_gemma(tokenizer, seed=0)[0])


def test_malicious_manifest_pulled_from_the_hub_is_refused(hub, tokenizer, tmp_path):
    from huggingface_hub import CommitOperationAdd, HfApi

    lib = _library(tokenizer, with_router=False)
    outside = _outside_adapter(lib, tmp_path)
    lib.push_to_hub(REPO, endpoint=hub.endpoint)
    manifest = lib.manifest()
    manifest["experts"][0]["name"] = str(outside)
    HfApi(endpoint=hub.endpoint).create_commit(
        REPO,
        operations=[CommitOperationAdd("library.json", json.dumps(manifest).encode())],
        commit_message="evil",
    )
    with pytest.raises(HubPullError, match=re.escape(f"ExpertLibrary.name={str(outside)!r} is not allowed")):
        ExpertLibrary.from_pretrained(
            REPO, build_tiny_gemma(tokenizer, seed=0)[0], endpoint=hub.endpoint, cache_dir=tmp_path / "cache"
        )
    assert (outside / "precious.txt").read_text() == "keep me"


def test_a_clean_pull_still_loads(hub, tokenizer, tmp_path):
    """The checks accept the Hub cache layout (snapshot files are links into blobs/)."""
    lib = _library(tokenizer)
    lib.push_to_hub(REPO, endpoint=hub.endpoint)
    back = ExpertLibrary.from_pretrained(
        REPO, build_tiny_gemma(tokenizer, seed=0)[0], endpoint=hub.endpoint, cache_dir=tmp_path / "cache"
    )
    assert back.names == ["alpha", "beta"] and back.router is not None
    torch.testing.assert_close(back.router.profiles, lib.router.profiles)


@pytest.mark.parametrize(
    "missing",
    ["experts/beta/adapter_model.safetensors", "experts/alpha/adapter_config.json", "router/tensors.safetensors"],
)
def test_pull_with_a_missing_file_names_it(hub, tokenizer, tmp_path, missing):
    from huggingface_hub import CommitOperationDelete, HfApi

    _library(tokenizer).push_to_hub(REPO, endpoint=hub.endpoint)
    HfApi(endpoint=hub.endpoint).create_commit(
        REPO, operations=[CommitOperationDelete(missing)], commit_message="lose a file"
    )
    with pytest.raises(HubPullError, match=re.escape(missing) + " is missing"):
        ExpertLibrary.from_pretrained(
            REPO, build_tiny_gemma(tokenizer, seed=0)[0], endpoint=hub.endpoint, cache_dir=tmp_path / "cache"
        )


def test_pull_without_the_router_folder_of_a_library_saved_with_one(hub, tokenizer, tmp_path):
    from huggingface_hub import CommitOperationDelete, HfApi

    _library(tokenizer).push_to_hub(REPO, endpoint=hub.endpoint)
    HfApi(endpoint=hub.endpoint).create_commit(
        REPO, operations=[CommitOperationDelete("router/")], commit_message="lose the router"
    )
    with pytest.raises(HubPullError, match=r"router/state.json is missing"):
        ExpertLibrary.from_pretrained(
            REPO, build_tiny_gemma(tokenizer, seed=0)[0], endpoint=hub.endpoint, cache_dir=tmp_path / "cache"
        )


@pytest.mark.timeout(120)
def test_push_to_a_silent_server_fails_within_the_timeout(tokenizer, silent_endpoint, monkeypatch):
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    lib = _library(tokenizer, with_router=False)
    with pytest.raises(HubPushError, match=r"creating the repository.*no answer within timeout=2 s"):
        lib.push_to_hub(REPO, endpoint=silent_endpoint, token="hf_test", timeout=2)
    assert lib.names == ["alpha", "beta"]


@pytest.mark.timeout(120)
def test_pull_from_a_silent_server_fails_within_the_timeout(tokenizer, silent_endpoint, monkeypatch, tmp_path):
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(HubPullError, match=r"tester/lib.*no answer within timeout=2 s"):
        ExpertLibrary.from_pretrained(
            REPO, build_tiny_gemma(tokenizer, seed=0)[0], endpoint=silent_endpoint, cache_dir=tmp_path, timeout=2
        )


@pytest.mark.parametrize("timeout", [0, -1, float("nan"), float("inf"), "5", True])
def test_bad_timeout_is_refused(tokenizer, timeout):
    lib = _library(tokenizer, with_router=False)
    with pytest.raises(ValueError, match=re.escape(f"push_library.timeout={timeout!r} is not allowed")):
        lib.push_to_hub(REPO, endpoint="http://127.0.0.1:9", timeout=timeout)


HOSTILE = [
    "tiny\nlicense: mit\nextra_gated_prompt: give me your token",
    "x: y",
    "- a",
    "true",
    "null",
    "1.5",
    "'quoted\"",
    "a\\b # comment",
    "---\nlicense: other",
    'x")\nimport os; os.system("id")  #',
    "résumé ✓",
    "",
]


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card[4 : card.index("\n---\n", 4)])


def _snippet_args(card: str) -> list:
    """The literal arguments (positional and keyword) of every call in the card's Python snippet (it must parse)."""
    code = card.split("```python\n", 1)[1].split("```", 1)[0]
    calls = [node for node in ast.walk(ast.parse(code)) if isinstance(node, ast.Call)]
    values = [a for c in calls for a in c.args] + [k.value for c in calls for k in c.keywords]
    return [v.value for v in values if isinstance(v, ast.Constant)]


def _table_rows(card: str) -> int:
    return sum(1 for line in card.splitlines() if line.startswith("|"))


@pytest.mark.parametrize("value", HOSTILE)
def test_model_card_values_cannot_add_front_matter_keys(tokenizer, value):
    lib = _library(tokenizer)
    lib.base_model_name = value
    lib.experiment_id = value
    lib.experts["alpha"].task_id = value
    lib.experts["alpha"].description = value
    lib.set_metrics("alpha", **{"acc": 0.5})
    lib.experts["alpha"].metrics[value] = 0.25
    expected_base = value or "unknown"
    for card in (library_card(lib, value), expert_card(lib, "alpha", value)):
        meta = _front_matter(card)
        assert meta == {
            "library_name": "peft",
            "base_model": expected_base,
            "tags": meta["tags"],
        }
        assert all(isinstance(t, str) and "\n" not in t for t in meta["tags"])
        assert card.count("\n---\n") == 1  # the front matter is closed once: no second block from a value
        assert value in _snippet_args(card)  # the snippet quotes the repo id exactly
    # in the Markdown body every value stays on its own table row: as many rows as with a plain value
    plain = _library(tokenizer)
    plain.set_metrics("alpha", acc=0.5, other=0.25)
    assert _table_rows(expert_card(lib, "alpha", value)) == _table_rows(expert_card(plain, "alpha", "a/b"))
    assert _table_rows(library_card(lib, value)) == _table_rows(library_card(plain, "a/b"))


def test_plain_names_keep_their_readable_cards(tokenizer):
    card = library_card(_library(tokenizer), REPO)
    assert card.startswith("---\nlibrary_name: peft\nbase_model: tiny-gemma\n")
    assert 'ExpertLibrary.from_pretrained("tester/lib", base_model)' in card
