"""A small Hub-compatible HTTP server for the tests (stdlib only; files on disk).

It speaks the endpoints that `huggingface_hub` (and through it peft/transformers) really calls:

    POST /api/repos/create                              create a repo (409 if it exists)
    POST /api/validate-yaml                             README front matter check
    POST /api/{type}s/{ns}/{name}/preupload/{rev}       upload modes: always "regular" (no LFS/Xet)
    POST /api/{type}s/{ns}/{name}/commit/{rev}          NDJSON commit: header, file (base64), deletedFile/Folder
    GET  /api/{type}s/{ns}/{name}[/revision/{rev}]      repo info (sha, siblings)
    GET  /api/{type}s/{ns}/{name}/tree/{rev}[/{path}]   tree listing (?recursive=)
    POST /api/{type}s/{ns}/{name}/paths-info/{rev}      form field `paths` (repeated)
    HEAD|GET /{ns}/{name}/resolve/{rev}/{path}          file with X-Repo-Commit, ETag, X-Linked-Etag, Range
    errors: 404 with X-Error-Code RepoNotFound / RevisionNotFound / EntryNotFound

Storage: `<root>/<ns>/<name>/blobs/<git-blob-sha1>`, `commits/<sha>.json` (path -> blob oid) and
`refs/<branch>`. `fail` injects errors: {"commit": 500} answers commit requests with HTTP 500 (`fail_times`, e.g.
{"preupload": 1}, limits how many requests fail before the server recovers).
`requests` records (method, path) of every request.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

_API = re.compile(
    r"^/api/(models|datasets|spaces)/([^/]+/[^/]+?)(?:/(preupload|commit|tree|paths-info|revision)/([^/]+)(/.*)?)?$"
)
_RESOLVE = re.compile(r"^/(?:(datasets|spaces)/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")


def git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class Repo:
    """One repository on disk."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def head(self, rev: str) -> str | None:
        if re.fullmatch(r"[0-9a-f]{40}", rev) and (self.root / "commits" / f"{rev}.json").is_file():
            return rev
        ref = self.root / "refs" / rev
        return ref.read_text().strip() if ref.is_file() else None

    def files(self, sha: str) -> dict[str, str]:
        return json.loads((self.root / "commits" / f"{sha}.json").read_text())["files"]

    def blob(self, oid: str) -> bytes:
        return (self.root / "blobs" / oid).read_bytes()

    def commit(self, rev: str, changes: dict[str, bytes | None], deleted_folders: list[str], summary: str) -> str:
        parent = self.head(rev)
        files = dict(self.files(parent)) if parent else {}
        for folder in deleted_folders:
            prefix = folder.rstrip("/") + "/"
            files = {p: o for p, o in files.items() if not p.startswith(prefix)}
        for path, data in changes.items():
            if data is None:
                files.pop(path, None)
                continue
            oid = git_blob_oid(data)
            blob = self.root / "blobs" / oid
            if not blob.exists():
                blob.parent.mkdir(parents=True, exist_ok=True)
                blob.write_bytes(data)
            files[path] = oid
        sha = hashlib.sha1(json.dumps([parent, sorted(files.items()), summary, time.time_ns()]).encode()).hexdigest()
        (self.root / "commits").mkdir(parents=True, exist_ok=True)
        (self.root / "commits" / f"{sha}.json").write_text(
            json.dumps({"parent": parent, "files": files, "summary": summary})
        )
        (self.root / "refs").mkdir(parents=True, exist_ok=True)
        (self.root / "refs" / rev).write_text(sha)
        return sha


class HubServer:
    """Start with `start()`; `endpoint` is the base URL; `stop()` shuts it down."""

    def __init__(self, root: str | Path, host: str = "127.0.0.1", port: int = 0) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.fail: dict[str, int] = {}
        self.fail_times: dict[str, int] = {}
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        server = self

        class Handler(_Handler):
            hub = server

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> HubServer:
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self.thread is not None:
            self.thread.join(timeout=5)

    def repo(self, repo_id: str, repo_type: str = "model") -> Repo | None:
        path = self.root / f"{repo_type}s" / repo_id
        return Repo(path) if path.is_dir() else None

    def create(self, repo_id: str, repo_type: str = "model") -> bool:
        path = self.root / f"{repo_type}s" / repo_id
        if path.is_dir():
            return False
        path.mkdir(parents=True)
        return True


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.0"  # one request per connection: a stopped server keeps no live connection

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - silence the default stderr log
        pass

    # ------------------------------------------------------------------ responses
    def _send(
        self, status: int, body: bytes = b"", headers: dict[str, str] | None = None, ctype: str = "application/json"
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), headers)

    def _error(self, status: int, code: str | None, message: str) -> None:
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._json(status, {"error": message}, headers)

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _injected(self, kind: str) -> bool:
        status = self.hub.fail.get(kind)
        if status is None:
            return False
        with self.hub.lock:
            left = self.hub.fail_times.get(kind)
            if left is not None:
                if left <= 0:
                    return False
                self.hub.fail_times[kind] = left - 1
        self._body()
        self._error(status, None, f"injected failure on {kind}")
        return True

    # ------------------------------------------------------------------ dispatch
    def _dispatch(self) -> None:
        url = urlsplit(self.path)
        path = unquote(url.path)
        query = parse_qs(url.query)
        with self.hub.lock:
            self.hub.requests.append((self.command, path))
        if path == "/api/repos/create" and self.command == "POST":
            return self._create()
        if path == "/api/validate-yaml" and self.command == "POST":
            return self._validate_yaml()
        m = _API.match(path)
        if m:
            kind, repo_id, action, rev, rest = m.groups()
            return self._api(kind[:-1], repo_id, action, rev, rest, query)
        m = _RESOLVE.match(path)
        if m and self.command in ("GET", "HEAD"):
            kind, repo_id, rev, file_path = m.groups()
            return self._resolve((kind or "models")[:-1], repo_id, rev, file_path)
        self._error(404, None, f"no route for {self.command} {path}")

    do_GET = do_POST = do_HEAD = _dispatch

    # ------------------------------------------------------------------ endpoints
    def _create(self) -> None:
        if self._injected("create"):
            return
        payload = json.loads(self._body() or b"{}")
        name, org = payload.get("name"), payload.get("organization") or "user"
        repo_type = payload.get("type") or "model"
        repo_id = f"{org}/{name}"
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        url = f"{self.hub.endpoint}/{prefix}{repo_id}"
        if not self.hub.create(repo_id, repo_type):
            return self._json(409, {"error": "You already created this model repo", "url": url})
        self._json(200, {"url": url, "name": repo_id})

    def _validate_yaml(self) -> None:
        payload = json.loads(self._body() or b"{}")
        content = payload.get("content", "")
        errors = []
        if content.startswith("---"):
            end = content.find("\n---", 3)
            if end < 0:
                errors.append({"message": "front matter is not closed by '---'"})
            else:
                try:
                    import yaml

                    meta = yaml.safe_load(content[3:end])
                    if meta is not None and not isinstance(meta, dict):
                        errors.append({"message": "front matter must be a mapping"})
                except Exception as err:  # noqa: BLE001 - report any YAML problem as the Hub does
                    errors.append({"message": f"invalid YAML: {err}"})
        self._json(400 if errors else 200, {"errors": errors, "warnings": []})

    def _api(self, repo_type: str, repo_id: str, action: str | None, rev: str | None, rest: str | None, query) -> None:
        repo = self.hub.repo(repo_id, repo_type)
        if action == "commit" and self._injected("commit"):
            return
        if action == "preupload" and self._injected("preupload"):
            return
        if repo is None:
            self._body()
            return self._error(404, "RepoNotFound", f"Repository {repo_id} not found")
        rev = unquote(rev or "main")
        if action == "commit":
            return self._commit(repo, repo_id, repo_type, rev)
        sha = repo.head(rev)
        if action == "preupload":
            payload = json.loads(self._body())
            files = repo.files(sha) if sha else {}
            return self._json(
                200,
                {
                    "files": [
                        {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": files.get(f["path"])}
                        for f in payload["files"]
                    ],
                    "commitOid": sha,
                },
            )
        if sha is None:
            self._body()
            if action is None and rev == "main":  # an empty repo: no commit yet
                return self._json(200, {"id": repo_id, "sha": None, "siblings": [], "private": False})
            return self._error(404, "RevisionNotFound", f"Revision {rev} not found in {repo_id}")
        files = repo.files(sha)
        if action in (None, "revision"):
            return self._json(
                200,
                {
                    "id": repo_id,
                    "modelId": repo_id,
                    "sha": sha,
                    "private": False,
                    "siblings": [{"rfilename": p} for p in sorted(files)],
                },
            )
        if action == "tree":
            base = (rest or "").strip("/")
            recursive = query.get("recursive", ["false"])[0].lower() == "true"
            return self._json(200, self._tree(repo, files, base, recursive))
        if action == "paths-info":
            form = parse_qs(self._body().decode())
            wanted = form.get("paths", [])
            entries = []
            folders = {str(Path(p).parent) for p in files}
            for p in wanted:
                p = p.strip("/")
                if p in files:
                    entries.append(self._file_entry(repo, p, files[p]))
                elif any(f == p or f.startswith(p + "/") for f in folders):
                    entries.append({"type": "directory", "oid": hashlib.sha1(p.encode()).hexdigest(), "path": p})
            return self._json(200, entries)
        self._error(404, None, f"unknown action {action}")

    @staticmethod
    def _file_entry(repo: Repo, path: str, oid: str) -> dict[str, Any]:
        return {"type": "file", "oid": oid, "size": (repo.root / "blobs" / oid).stat().st_size, "path": path}

    def _tree(self, repo: Repo, files: dict[str, str], base: str, recursive: bool) -> list[dict[str, Any]]:
        prefix = base + "/" if base else ""
        entries: dict[str, dict[str, Any]] = {}
        for path, oid in sorted(files.items()):
            if not path.startswith(prefix):
                continue
            rel = path[len(prefix) :].split("/")
            for depth in range(1, len(rel)):
                folder = prefix + "/".join(rel[:depth])
                if recursive or depth == 1:
                    entries.setdefault(
                        folder, {"type": "directory", "oid": hashlib.sha1(folder.encode()).hexdigest(), "path": folder}
                    )
            if recursive or len(rel) == 1:
                entries[path] = self._file_entry(repo, path, oid)
        return list(entries.values())

    def _commit(self, repo: Repo, repo_id: str, repo_type: str, rev: str) -> None:
        body = self._body()
        changes: dict[str, bytes | None] = {}
        deleted_folders: list[str] = []
        summary = ""
        parent = None
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                summary = value.get("summary", "")
                parent = value.get("parentCommit")
            elif key == "file":
                if value.get("encoding") != "base64":
                    return self._error(400, None, f"unsupported encoding {value.get('encoding')!r}")
                changes[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                changes[value["path"]] = None
            elif key == "deletedFolder":
                deleted_folders.append(value["path"])
            else:
                return self._error(400, None, f"this test server does not support {key!r} operations")
        if parent is not None and parent != repo.head(rev):
            return self._error(412, None, "parent commit is not the head of the branch")
        sha = repo.commit(rev, changes, deleted_folders, summary)
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        self._json(
            200, {"success": True, "commitOid": sha, "commitUrl": f"{self.hub.endpoint}/{prefix}{repo_id}/commit/{sha}"}
        )

    def _resolve(self, repo_type: str, repo_id: str, rev: str, file_path: str) -> None:
        repo = self.hub.repo(repo_id, repo_type)
        if repo is None:
            return self._error(404, "RepoNotFound", f"Repository {repo_id} not found")
        sha = repo.head(unquote(rev))
        if sha is None:
            return self._error(404, "RevisionNotFound", f"Revision {rev} not found")
        files = repo.files(sha)
        if file_path not in files:
            return self._entry_missing(sha, file_path, rev)
        oid = files[file_path]
        data = repo.blob(oid)
        headers = {"X-Repo-Commit": sha, "ETag": f'"{oid}"', "X-Linked-Etag": f'"{oid}"', "Accept-Ranges": "bytes"}
        status = 200
        rng = self.headers.get("Range")
        if rng and self.command == "GET":
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng.strip())
            if m:
                start = int(m.group(1))
                end = int(m.group(2)) if m.group(2) else len(data) - 1
                headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
                data = data[start : end + 1]
                status = 206
        self._send(status, data, headers, ctype="application/octet-stream")

    def _entry_missing(self, sha: str, file_path: str, rev: str) -> None:
        self._send(
            404,
            json.dumps({"error": f"{file_path} does not exist at {rev}"}).encode(),
            {"X-Error-Code": "EntryNotFound", "X-Error-Message": "Entry not found", "X-Repo-Commit": sha},
        )
