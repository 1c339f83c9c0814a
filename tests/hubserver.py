"""A small stand-in for the Hugging Face Hub on 127.0.0.1, for the tests of ``push``.

It answers the endpoints the official ``huggingface_hub`` client calls to create a repo and a
branch, validate a card, upload (regular files inline in the commit, ``*.safetensors`` through the
git-LFS batch API and a PUT, as the Hub does when Xet is disabled), commit (NDJSON, optionally as a
pull request) and download (``HEAD``/``GET .../resolve/{rev}/{path}``). Tokens, private repos and
revisions behave as on the Hub as far as the client can tell. Every request is logged.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlparse

import yaml

LICENSES = {"apache-2.0", "mit", "llama3", "llama3.1", "gemma", "other", "cc-by-4.0", "openrail"}
_FRONT = re.compile(r"^---\s*\n(.*?)\n---\s*(\n|$)", re.S)


@dataclass
class Repo:
    owner: str
    private: bool
    branches: dict[str, dict[str, bytes]] = field(default_factory=lambda: {"main": {}})
    heads: dict[str, str] = field(default_factory=lambda: {"main": "0" * 40})
    prs: int = 0


class FakeHub:
    def __init__(self, tokens: dict[str, str]) -> None:
        self.tokens = tokens  # token -> user name
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}
        self.log: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        handler = type("Handler", (_Handler,), {"hub": self})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FakeHub":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def paths(self, method: str | None = None) -> list[str]:
        return [p for m, p in self.log if method is None or m == method]


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    # -- plumbing -------------------------------------------------------------------------
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, payload=None, headers: dict | None = None, body: bytes | None = None) -> None:
        data = body if body is not None else (json.dumps(payload).encode() if payload is not None else b"")
        self.send_response(status)
        self.send_header("Content-Type", "application/json" if body is None else "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _error(self, status: int, message: str, code: str | None = None) -> None:
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._send(status, {"error": message}, headers)

    def _user(self) -> tuple[bool, str | None]:
        """(token valid or absent, user)."""
        auth = self.headers.get("Authorization", "")
        if not auth:
            return True, None
        token = auth.removeprefix("Bearer ").strip()
        user = self.hub.tokens.get(token)
        return user is not None, user

    def _auth(self) -> str | None:
        ok, user = self._user()
        if not ok:
            self._error(401, "Invalid credentials in Authorization header")
            return None
        if user is None:
            self._error(401, "You must be authenticated to do this")
            return None
        return user

    def _repo_for_write(self, repo_id: str, user: str) -> Repo | None:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            self._error(404, f"Repository {repo_id} not found", "RepoNotFound")
            return None
        if repo.owner != user:
            self._error(403, f"You don't have the rights to write to {repo_id}")
            return None
        return repo

    # -- verbs ----------------------------------------------------------------------------
    def do_POST(self) -> None:
        url = urlparse(self.path)
        path = unquote(url.path)
        self.hub.log.append(("POST", path))
        body = self._body()
        with self.hub.lock:
            if path == "/api/repos/create":
                return self._create(json.loads(body))
            if path == "/api/validate-yaml":
                return self._validate(json.loads(body))
            match = re.match(r"^/api/models/([^/]+/[^/]+)/(preupload|commit|branch)/(.+)$", path)
            if match:
                repo_id, action, rev = match.groups()
                user = self._auth()
                if user is None:
                    return
                repo = self._repo_for_write(repo_id, user)
                if repo is None:
                    return
                if action == "preupload":
                    return self._preupload(repo, rev, json.loads(body))
                if action == "branch":
                    return self._branch(repo, rev)
                return self._commit(repo_id, repo, rev, body, "create_pr" in parse_qs(url.query))
            match = re.match(r"^/([^/]+/[^/]+)\.git/info/lfs/objects/batch$", path)
            if match:
                user = self._auth()
                if user is None or self._repo_for_write(match.group(1), user) is None:
                    return
                return self._lfs_batch(json.loads(body))
        self._error(404, f"no route POST {path}")

    def do_PUT(self) -> None:
        path = unquote(urlparse(self.path).path)
        self.hub.log.append(("PUT", path))
        body = self._body()
        match = re.match(r"^/lfs-upload/([0-9a-f]{64})$", path)
        if not match:
            return self._error(404, f"no route PUT {path}")
        if hashlib.sha256(body).hexdigest() != match.group(1):
            return self._error(400, "uploaded content does not match its oid")
        with self.hub.lock:
            self.hub.lfs[match.group(1)] = body
        self._send(200, {})

    def do_HEAD(self) -> None:
        self._resolve()

    def do_GET(self) -> None:
        self._resolve()

    # -- endpoints ------------------------------------------------------------------------
    def _create(self, payload: dict) -> None:
        user = self._auth()
        if user is None:
            return
        namespace = payload.get("organization") or user
        repo_id = f"{namespace}/{payload['name']}"
        if namespace != user:
            return self._error(403, f"You don't have the rights to create a repo under {namespace}")
        if repo_id in self.hub.repos:
            return self._send(409, {"error": "You already created this model repo",
                                    "url": f"{self.hub.endpoint}/{repo_id}"})
        self.hub.repos[repo_id] = Repo(owner=user, private=payload.get("visibility") == "private"
                                       or bool(payload.get("private")))
        self._send(200, {"url": f"{self.hub.endpoint}/{repo_id}", "name": repo_id})

    def _validate(self, payload: dict) -> None:
        match = _FRONT.match(payload.get("content", ""))
        errors = []
        try:
            data = yaml.safe_load(match.group(1)) if match else {}
        except yaml.YAMLError:
            data, errors = {}, [{"message": "Invalid YAML in the metadata"}]
        data = data or {}
        if not isinstance(data, dict):
            errors.append({"message": "metadata must be a mapping"})
            data = {}
        if "license" in data and data["license"] not in LICENSES:
            errors.append({"message": f'"license" must be one of the Hub licences, got {data["license"]!r}'})
        if "base_model" in data and not isinstance(data["base_model"], (str, list)):
            errors.append({"message": '"base_model" must be a string or a list of strings'})
        if errors:
            return self._send(400, {"errors": errors})
        self._send(200, {"warnings": []})

    def _preupload(self, repo: Repo, rev: str, payload: dict) -> None:
        files = []
        for item in payload["files"]:
            lfs = item["path"].endswith((".safetensors", ".bin")) or item["size"] > 10_000_000
            files.append({"path": item["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                          "oid": None})
        self._send(200, {"files": files, "commitOid": repo.heads.get(rev, repo.heads["main"])})

    def _lfs_batch(self, payload: dict) -> None:
        objects = []
        for obj in payload["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.hub.lfs:
                entry["actions"] = {"upload": {"href": f"{self.hub.endpoint}/lfs-upload/{obj['oid']}", "header": {}}}
            objects.append(entry)
        self._send(200, {"transfer": "basic", "objects": objects})

    def _branch(self, repo: Repo, branch: str) -> None:
        if branch in repo.branches:
            return self._error(409, f"Branch {branch} already exists")
        repo.branches[branch] = dict(repo.branches["main"])
        repo.heads[branch] = repo.heads["main"]
        self._send(200, {})

    def _commit(self, repo_id: str, repo: Repo, rev: str, body: bytes, create_pr: bool) -> None:
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = lines[0]["value"]
        if rev not in repo.branches:
            return self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        files = dict(repo.branches[rev])
        for line in lines[1:]:
            value = line["value"]
            if line["key"] == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif line["key"] == "lfsFile":
                if value["oid"] not in self.hub.lfs:
                    return self._error(400, f"LFS object {value['oid']} was never uploaded")
                files[value["path"]] = self.hub.lfs[value["oid"]]
            elif line["key"] == "deletedFile":
                files.pop(value["path"], None)
        target, pr_url = rev, None
        if create_pr:
            repo.prs += 1
            target = f"refs/pr/{repo.prs}"
            pr_url = f"{self.hub.endpoint}/{repo_id}/discussions/{repo.prs}"
        oid = hashlib.sha1(json.dumps([header, sorted((k, hashlib.sha256(v).hexdigest()) for k, v in files.items()),
                                        target]).encode()).hexdigest()
        repo.branches[target] = files
        repo.heads[target] = oid
        self._send(200, {"commitUrl": f"{self.hub.endpoint}/{repo_id}/commit/{oid}", "commitOid": oid,
                         "pullRequestUrl": pr_url})

    def _resolve(self) -> None:
        path = unquote(urlparse(self.path).path)
        self.hub.log.append((self.command, path))
        info = re.match(r"^/api/models/([^/]+/[^/]+)$", path)
        if info:  # repo_info, which create_repo calls when creation is refused
            repo = self.hub.repos.get(info.group(1))
            ok, user = self._user()
            if not ok:
                return self._error(401, "Invalid credentials in Authorization header")
            if repo is None or (repo.private and user != repo.owner):
                return self._error(401, "Repository not found", "RepoNotFound")
            return self._send(200, {"id": info.group(1), "private": repo.private, "sha": repo.heads["main"]})
        match = re.match(r"^/([^/]+/[^/]+)/resolve/(.+)$", path)
        if not match:
            return self._error(404, f"no route {self.command} {path}")
        repo_id, rest = match.groups()
        repo = self.hub.repos.get(repo_id)
        ok, user = self._user()
        if not ok:
            return self._error(401, "Invalid credentials in Authorization header")
        if repo is None or (repo.private and user != repo.owner):
            return self._error(401, "Repository not found", "RepoNotFound")
        revision = next((r for r in sorted(repo.branches, key=len, reverse=True) if rest.startswith(r + "/")), None)
        if revision is None:
            return self._error(404, "Invalid rev id", "RevisionNotFound")
        file = rest[len(revision) + 1:]
        content = repo.branches[revision].get(file)
        if content is None:
            return self._error(404, f"Entry not found: {file}", "EntryNotFound")
        digest = hashlib.sha256(content).hexdigest()
        headers = {"X-Repo-Commit": repo.heads[revision], "ETag": f'"{digest}"'}
        if file.endswith(".safetensors"):
            headers.update({"X-Linked-Etag": f'"{digest}"', "X-Linked-Size": str(len(content))})
        self._send(200, body=content, headers=headers)
