"""A tiny in-memory Hugging Face Hub on 127.0.0.1, for testing pushes and downloads end to end.

It speaks just enough of the Hub's HTTP API for the real `huggingface_hub` client: `create_repo`,
`upload_folder` / `create_commit` (every file "regular", so no LFS or Xet storage is involved),
`repo_info` / `model_info`, `list_repo_tree`, and file downloads (`hf_hub_download`,
`snapshot_download`). Errors carry the `X-Error-Code` headers the client maps to
`RepositoryNotFoundError`, `RevisionNotFoundError` and `EntryNotFoundError`.

    with FakeHub() as hub:                       # hub.endpoint == "http://127.0.0.1:PORT"
        HfApi(endpoint=hub.endpoint).create_repo("user/name")
        hub.files("user/name")                   # {path: bytes} at main
        hub.requests                             # [(method, path), ...] as received
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}


def git_blob_sha(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool = False
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # sha -> full tree
    refs: dict[str, str] = field(default_factory=dict)  # branch -> sha
    messages: list[str] = field(default_factory=list)

    def resolve(self, revision: str) -> dict[str, bytes] | None:
        sha = self.refs.get(revision, revision)
        return self.commits.get(sha)

    def sha_of(self, revision: str) -> str:
        return self.refs.get(revision, revision)


class FakeHub:
    def __init__(self) -> None:
        self.repos: dict[tuple[str, str], Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self.uploads: list[dict] = []  # one entry per commit: {"repo", "repo_type", "files": {path: bytes}, "summary"}
        self.lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_GET(self):
                hub._dispatch(self, "GET")

            def do_HEAD(self):
                hub._dispatch(self, "HEAD")

            def do_POST(self):
                hub._dispatch(self, "POST")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    # -- lifecycle ---------------------------------------------------------------------
    def __enter__(self) -> "FakeHub":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    # -- inspection helpers ---------------------------------------------------------------
    def files(self, repo_id: str, repo_type: str = "model", revision: str = "main") -> dict[str, bytes]:
        return dict(self.repos[(repo_type, repo_id)].resolve(revision) or {})

    def head(self, repo_id: str, repo_type: str = "model") -> str:
        return self.repos[(repo_type, repo_id)].refs["main"]

    # -- request handling -------------------------------------------------------------------
    def _dispatch(self, h: BaseHTTPRequestHandler, method: str) -> None:
        url = urlsplit(h.path)
        path, query = unquote(url.path), parse_qs(url.query)
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        with self.lock:
            self.requests.append((method, path))
            try:
                status, headers, payload = self._route(method, path, query, body)
            except Exception as err:  # a bug in the fake: make it visible in the client's error
                status, headers, payload = 500, {"X-Error-Message": f"fake hub: {err!r}"}, b""
        if isinstance(payload, (dict, list)):
            payload = json.dumps(payload).encode()
            headers.setdefault("Content-Type", "application/json")
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(payload)))
        h.end_headers()
        if method != "HEAD":
            h.wfile.write(payload)

    def _route(self, method: str, path: str, query: dict, body: bytes):
        parts = path.strip("/").split("/")
        if method == "POST" and path == "/api/repos/create":
            return self._create_repo(json.loads(body))
        if method == "POST" and path == "/api/validate-yaml":
            return 200, {}, {"errors": [], "warnings": []}
        if method == "GET" and path == "/api/whoami-v2":
            return 200, {}, {"type": "user", "name": "user", "orgs": [], "auth": {"accessToken": {"role": "write"}}}
        if parts[0] == "api" and len(parts) >= 4 and parts[1] in REPO_TYPES:
            return self._api(method, REPO_TYPES[parts[1]], f"{parts[2]}/{parts[3]}", parts[4:], query, body)
        # File downloads: /{repo_id}/resolve/{rev}/{path}, /datasets/{repo_id}/resolve/...
        repo_type = "model"
        if parts[0] in ("datasets", "spaces"):
            repo_type, parts = REPO_TYPES[parts[0]], parts[1:]
        if len(parts) >= 5 and parts[2] == "resolve" and method in ("GET", "HEAD"):
            return self._resolve(repo_type, f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]))
        return 404, {"X-Error-Message": f"fake hub: no route for {method} {path}"}, b""

    def _repo(self, repo_type: str, repo_id: str) -> Repo | None:
        return self.repos.get((repo_type, repo_id))

    @staticmethod
    def _not_found(what: str, code: str):
        return 404, {"X-Error-Code": code, "X-Error-Message": what}, {"error": what}

    def _create_repo(self, payload: dict):
        repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else f"user/{payload['name']}"
        repo_type = payload.get("type") or "model"
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        if (repo_type, repo_id) in self.repos:  # the real Hub answers 409; create_repo(exist_ok=True) accepts it
            return 409, {"X-Error-Message": "You already created this repo"}, {"error": "You already created this repo", "url": f"{self.endpoint}/{prefix}{repo_id}"}
        repo = Repo(repo_type, repo_id, private=payload.get("visibility") == "private")
        initial = {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"}
        sha = hashlib.sha1(f"{repo_type}/{repo_id}/initial".encode()).hexdigest()
        repo.commits[sha], repo.refs["main"] = initial, sha
        self.repos[(repo_type, repo_id)] = repo
        return 200, {}, {"url": f"{self.endpoint}/{prefix}{repo_id}", "name": repo_id}

    def _api(self, method: str, repo_type: str, repo_id: str, rest: list[str], query: dict, body: bytes):
        repo = self._repo(repo_type, repo_id)
        if repo is None:
            return self._not_found(f"Repository {repo_id} not found", "RepoNotFound")
        action = rest[0] if rest else None
        revision = unquote(rest[1]) if len(rest) > 1 else "main"
        if method == "POST" and action in ("preupload", "commit") and revision not in repo.refs:
            return self._not_found(f"Invalid rev id: {revision}", "RevisionNotFound")
        if method == "POST" and action == "preupload":
            files = json.loads(body)["files"]
            return 200, {}, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None} for f in files]}
        if method == "POST" and action == "commit":
            return self._commit(repo, revision, body)
        if method == "GET" and action in (None, "revision"):
            tree = repo.resolve(revision)
            if tree is None:
                return self._not_found(f"Invalid rev id: {revision}", "RevisionNotFound")
            return 200, {}, {
                "id": repo_id, "sha": repo.sha_of(revision), "private": repo.private, "disabled": False, "gated": False,
                "siblings": [{"rfilename": p, "size": len(b)} for p, b in sorted(tree.items())],
                "lastModified": "2026-11-01T00:00:00.000Z", "tags": [], "downloads": 0, "likes": 0,
            }
        if method == "GET" and action == "tree":
            tree = repo.resolve(revision)
            if tree is None:
                return self._not_found(f"Invalid rev id: {revision}", "RevisionNotFound")
            under = "/".join(rest[2:])
            return 200, {}, _tree_listing(tree, under, recursive=query.get("recursive", ["false"])[0].lower() in ("1", "true"))
        return 404, {"X-Error-Message": f"fake hub: no route for {method} api/{repo_type}s/{repo_id}/{'/'.join(rest)}"}, b""

    def _commit(self, repo: Repo, revision: str, body: bytes):
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        header = next(item["value"] for item in lines if item["key"] == "header")
        tree = dict(repo.commits[repo.refs[revision]])
        added: dict[str, bytes] = {}
        for item in lines:
            key, value = item["key"], item["value"]
            if key == "file":
                added[value["path"]] = base64.b64decode(value["content"]) if value.get("encoding") == "base64" else value["content"].encode()
            elif key == "deletedFile":
                tree.pop(value["path"], None)
            elif key == "deletedFolder":
                for p in [p for p in tree if p.startswith(value["path"].rstrip("/") + "/")]:
                    tree.pop(p)
            elif key == "lfsFile":
                return 422, {"X-Error-Message": "fake hub: LFS uploads are not supported"}, {"error": "lfs"}
        tree.update(added)
        sha = hashlib.sha1(json.dumps(sorted((p, git_blob_sha(b)) for p, b in tree.items())).encode() + repo.refs[revision].encode()).hexdigest()
        repo.commits[sha], repo.refs[revision] = tree, sha
        repo.messages.append(header["summary"])
        self.uploads.append({"repo": repo.repo_id, "repo_type": repo.repo_type, "files": added, "summary": header["summary"]})
        prefix = "" if repo.repo_type == "model" else f"{repo.repo_type}s/"
        return 200, {}, {"commitUrl": f"{self.endpoint}/{prefix}{repo.repo_id}/commit/{sha}", "commitOid": sha, "success": True}

    def _resolve(self, repo_type: str, repo_id: str, revision: str, filename: str):
        repo = self._repo(repo_type, repo_id)
        if repo is None:
            return self._not_found(f"Repository {repo_id} not found", "RepoNotFound")
        tree = repo.resolve(revision)
        if tree is None:
            return self._not_found(f"Invalid rev id: {revision}", "RevisionNotFound")
        if filename not in tree:
            headers = {"X-Error-Code": "EntryNotFound", "X-Error-Message": f"{filename} does not exist", "X-Repo-Commit": repo.sha_of(revision)}
            return 404, headers, b""
        data = tree[filename]
        return 200, {"X-Repo-Commit": repo.sha_of(revision), "ETag": f'"{git_blob_sha(data)}"', "Content-Type": "application/octet-stream"}, data


def _tree_listing(tree: dict[str, bytes], under: str, recursive: bool) -> list[dict]:
    prefix = under.rstrip("/") + "/" if under else ""
    entries, folders = [], set()
    for p, data in sorted(tree.items()):
        if not p.startswith(prefix):
            continue
        rel = p[len(prefix):]
        if "/" in rel and not recursive:
            folders.add(prefix + rel.split("/")[0])
            continue
        if recursive:
            parts = rel.split("/")[:-1]
            folders.update(prefix + "/".join(parts[: i + 1]) for i in range(len(parts)))
        entries.append({"type": "file", "oid": git_blob_sha(data), "size": len(data), "path": p})
    return [{"type": "directory", "oid": "0" * 40, "size": 0, "path": f} for f in sorted(folders)] + entries
