"""The library on a Hub: real huggingface_hub client and plain peft against the test server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from hf_adaptive.experts import ExpertLibrary, HubPullError, HubPushError, Router, RouterConfig
from hf_adaptive.models import build_tiny_gemma

REPO = "tester/experts"


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture
def ids():
    return torch.randint(4, 60, (2, 7), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def library(tokenizer):
    lib = ExpertLibrary(build_tiny_gemma(tokenizer, seed=0)[0], experiment_id="exp-7", base_model_name="tiny-gemma")
    gen = torch.Generator().manual_seed(0)
    lib.router = Router(RouterConfig(dim=6, decision="adaptive"))
    for i, task in enumerate(["first_color", "has_cat"]):
        name = f"expert_{task}"
        lib.create(name, task_id=task)
        with torch.no_grad():
            for n, p in lib.model.named_parameters():
                if f".{name}." in n:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
        lib.set_metrics(name, accuracy=0.5 + 0.1 * i)
        lib.router.add_expert(name, torch.randn(6, generator=gen))
    lib.router.record_outcome(torch.randn(6, generator=gen), "expert_has_cat", 0.8, True)
    return lib


def _expected(library, ids):
    out = {}
    for n in library.names:
        library.activate(n)
        out[n] = _logits(library.model, ids)
    return out


def test_push_and_pull_round_trip(hub, library, ids, tokenizer, tmp_path):
    expected = _expected(library, ids)
    oid = library.push_to_hub(REPO, endpoint=hub.endpoint, token="hf_test")
    assert len(oid) == 40
    paths = {p for _, p in hub.requests}
    assert {
        "/api/repos/create",
        "/api/validate-yaml",
        f"/api/models/{REPO}/preupload/main",
        f"/api/models/{REPO}/commit/main",
    } <= paths

    back = ExpertLibrary.from_pretrained(
        REPO, build_tiny_gemma(tokenizer, seed=0)[0], endpoint=hub.endpoint, cache_dir=tmp_path / "cache"
    )
    assert back.names == library.names
    assert back.experiment_id == "exp-7" and back.base_model_name == "tiny-gemma"
    assert back.experts["expert_has_cat"].metrics == {"accuracy": pytest.approx(0.6)}
    assert back.experts["expert_first_color"].task_id == "first_color"
    for n in library.names:
        back.activate(n)
        torch.testing.assert_close(_logits(back.model, ids), expected[n])
    assert back.router is not None and back.router.names == library.router.names
    torch.testing.assert_close(back.router.profiles, library.router.profiles)
    assert back.router.tau == library.router.tau and len(back.router.outcomes) == 1
    # the normalisation statistics travel with the profiles, so the pulled router compares signatures the same way
    assert back.router.n_observed == library.router.n_observed > 0
    probe = torch.randn(library.router.config.dim, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(back.router.transform(probe), library.router.transform(probe))
    methods = {(m, p.split("/resolve/")[0]) for m, p in hub.requests if "/resolve/" in p}
    assert ("HEAD", f"/{REPO}") in methods and ("GET", f"/{REPO}") in methods
    assert any(p.startswith(f"/api/models/{REPO}/tree/") for _, p in hub.requests)


def test_model_cards(hub, library, tmp_path):
    from huggingface_hub import hf_hub_download

    library.push_to_hub(REPO, endpoint=hub.endpoint)
    root = open(hf_hub_download(REPO, "README.md", endpoint=hub.endpoint, cache_dir=tmp_path)).read()
    assert root.startswith("---\nlibrary_name: peft\nbase_model: tiny-gemma\n")
    assert "`expert_has_cat` | has_cat" in root and "accuracy=0.600" in root
    card = open(
        hf_hub_download(REPO, "experts/expert_first_color/README.md", endpoint=hub.endpoint, cache_dir=tmp_path)
    ).read()
    assert "| task | `first_color` |" in card and "| accuracy | 0.5000 |" in card
    assert "Profile of dimension 6" in card and 'subfolder="experts/expert_first_color"' in card


def test_plain_peft_loads_an_expert_from_the_hub(hub, library, ids, tmp_path):
    expected = _expected(library, ids)["expert_has_cat"]
    library.push_to_hub(REPO, endpoint=hub.endpoint)
    script = textwrap.dedent(
        f"""
        import json, torch
        from peft import PeftModel
        from hf_adaptive.models import build_tiny_gemma
        base, _ = build_tiny_gemma(seed=0)
        model = PeftModel.from_pretrained(base, "{REPO}", subfolder="experts/expert_has_cat")
        model.eval()
        ids = torch.tensor({ids.tolist()})
        with torch.no_grad():
            print(json.dumps(model(input_ids=ids).logits.flatten().tolist()))
        """
    )
    env = {
        **os.environ,
        "HF_ENDPOINT": hub.endpoint,
        "HF_HUB_OFFLINE": "0",
        "HF_HOME": str(tmp_path / "home"),
        "OMP_NUM_THREADS": "1",
    }
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    got = torch.tensor(json.loads(out.stdout.strip().splitlines()[-1])).view_as(expected)
    torch.testing.assert_close(got, expected)


def test_failed_commit_raises_clearly_and_changes_nothing(hub, library, ids, tokenizer, tmp_path):
    library.push_to_hub(REPO, endpoint=hub.endpoint)
    library.fork("expert_has_cat", "expert_new", task_id="last_color")
    before_names = list(library.names)
    expected = _expected(library, ids)
    hub.fail["commit"] = 500
    with pytest.raises(HubPushError, match=r"tester/experts.*committing \d+ files \(HTTP 500\)"):
        library.push_to_hub(REPO, endpoint=hub.endpoint)
    assert library.names == before_names
    for n, v in _expected(library, ids).items():
        torch.testing.assert_close(v, expected[n])
    # the remote still holds the previous push in full
    hub.fail.clear()
    back = ExpertLibrary.from_pretrained(
        REPO, build_tiny_gemma(tokenizer, seed=0)[0], endpoint=hub.endpoint, cache_dir=tmp_path / "c"
    )
    assert back.names == ["expert_first_color", "expert_has_cat"]
    # and once the server recovers the push goes through
    library.push_to_hub(REPO, endpoint=hub.endpoint)
    back = ExpertLibrary.from_pretrained(
        REPO, build_tiny_gemma(tokenizer, seed=0)[0], endpoint=hub.endpoint, cache_dir=tmp_path / "c2"
    )
    assert "expert_new" in back.names and back.experts["expert_new"].parent == "expert_has_cat"


def test_transient_preupload_error_is_retried(hub, library):
    hub.fail["preupload"] = 503
    hub.fail_times["preupload"] = 1
    library.push_to_hub(REPO, endpoint=hub.endpoint)
    assert [p for _, p in hub.requests].count(f"/api/models/{REPO}/preupload/main") == 2


def test_server_down_raises_clearly(hub, library):
    hub.stop()
    with pytest.raises(HubPushError, match="failed while creating the repository"):
        library.push_to_hub(REPO, endpoint=hub.endpoint)
    assert library.names == ["expert_first_color", "expert_has_cat"]


def test_pull_of_a_missing_repo(hub, tokenizer, tmp_path):
    with pytest.raises(HubPullError, match="tester/nothing"):
        ExpertLibrary.from_pretrained(
            "tester/nothing", build_tiny_gemma(tokenizer, seed=0)[0], endpoint=hub.endpoint, cache_dir=tmp_path
        )


def test_server_speaks_paths_info_and_error_codes(hub, library, tmp_path):
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    library.push_to_hub(REPO, endpoint=hub.endpoint)
    api = HfApi(endpoint=hub.endpoint)
    info = api.get_paths_info(REPO, ["library.json", "experts", "missing.txt"])
    assert [(type(e).__name__, e.path) for e in info] == [("RepoFile", "library.json"), ("RepoFolder", "experts")]
    assert api.file_exists(REPO, "experts/expert_has_cat/adapter_config.json")
    assert not api.file_exists(REPO, "experts/nope/adapter_config.json")
    tree = {e.path for e in api.list_repo_tree(REPO, path_in_repo="experts")}
    assert tree == {"experts/expert_first_color", "experts/expert_has_cat"}
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(REPO, "nope.txt", endpoint=hub.endpoint, cache_dir=tmp_path)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(REPO, "library.json", revision="v9", endpoint=hub.endpoint, cache_dir=tmp_path)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("tester/none", "library.json", endpoint=hub.endpoint, cache_dir=tmp_path)
