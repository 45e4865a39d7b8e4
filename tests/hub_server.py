"""A loopback stand-in for the Hugging Face Hub: the HTTP API that huggingface_hub's ``create_repo``,
``create_branch``, ``upload_folder`` (preupload, LFS batch + PUT, ndjson commit) and ``snapshot_download`` use,
with repositories kept in memory and every request recorded (method, path, Authorization header)."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Optional
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

#: Files stored through LFS (the Hub decides from the name and size; we use the name only).
LFS_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt")


@dataclass
class Commit:
    oid: str
    summary: str
    description: str
    files: dict[str, bytes]  # the whole tree at this commit
    lfs: set[str]  # paths of ``files`` stored through LFS


@dataclass
class Repo:
    private: bool
    branches: dict[str, list[Commit]] = field(default_factory=dict)  # branch → its commits, oldest first


@dataclass
class Request:
    method: str
    path: str
    authorization: Optional[str]
    body: bytes


def git_blob_oid(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


class FakeHub:
    """``with FakeHub(token="...") as hub:`` serves on ``hub.url`` (127.0.0.1, a free port).

    Args:
        token: when given, every API request must carry ``Authorization: Bearer <token>`` (401 otherwise); the LFS
            PUT goes to a storage URL and carries none, as on the Hub.
        echo_headers: answer every error with the request's headers (Authorization included) in its message and
            its ``X-Error-Message`` header, as a debugging proxy or a hostile endpoint does.
    """

    def __init__(self, token: Optional[str] = None, echo_headers: bool = False):
        self.token = token
        self.echo_headers = echo_headers
        self.repos: dict[str, Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.requests: list[Request] = []
        self.fail_commits = False  # answer 500 to commits (upload failures)
        self._commit_count = 0
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> "FakeHub":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    # --- what the tests read -----------------------------------------------------------------------------------------
    def commits(self, repo_id: str, branch: str = "main") -> list[Commit]:
        return self.repos[repo_id].branches[branch]

    def files(self, repo_id: str, branch: str = "main") -> dict[str, bytes]:
        return self.commits(repo_id, branch)[-1].files

    def write_tree(self, repo_id: str, folder: Path, branch: str = "main") -> Path:
        """The files of the branch's head, written to ``folder``."""
        folder.mkdir(parents=True, exist_ok=True)
        for path, content in self.files(repo_id, branch).items():
            (folder / path).parent.mkdir(parents=True, exist_ok=True)
            (folder / path).write_bytes(content)
        return folder

    # --- the Hub's side ----------------------------------------------------------------------------------------------
    def create_repo(self, payload: dict) -> tuple[int, dict]:
        if payload.get("organization") is None:
            return 400, {"error": "this fake Hub has no user namespace: give the repo id as owner/name"}
        repo_id = f"{payload['organization']}/{payload['name']}"
        if repo_id in self.repos:
            return 409, {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"}
        repo = Repo(private=payload.get("visibility") == "private")
        attributes = "".join(f"*{suffix} filter=lfs diff=lfs merge=lfs -text\n" for suffix in LFS_SUFFIXES).encode()
        repo.branches["main"] = [Commit(self._commit_oid(repo_id, "initial"), "initial commit", "",
                                        {".gitattributes": attributes}, set())]  # fmt: skip
        self.repos[repo_id] = repo
        return 200, {"url": f"{self.url}/{repo_id}", "name": repo_id}

    def create_branch(self, repo: Repo, branch: str, payload: dict) -> tuple[int, dict]:
        if branch in repo.branches:
            return 409, {"error": f"Reference {branch} already exists"}
        start = payload.get("startingPoint") or "main"
        head = self._find_commit(repo, start)
        if head is None:
            return 404, {"error": f"Invalid rev id: {start}"}
        repo.branches[branch] = [head]
        return 200, {}

    def preupload(self, repo: Repo, branch: str, payload: dict) -> tuple[int, dict]:
        head = repo.branches[branch][-1]
        answer = []
        for item in payload["files"]:
            path = item["path"]
            lfs = path.endswith(LFS_SUFFIXES)
            entry = {"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False}
            if path in head.files:  # lets the client skip unchanged files, as the Hub does
                content = head.files[path]
                entry["oid"] = hashlib.sha256(content).hexdigest() if lfs else git_blob_oid(content)
            answer.append(entry)
        return 200, {"files": answer, "commitOid": head.oid}

    def lfs_batch(self, payload: dict) -> tuple[int, dict]:
        if payload.get("operation") != "upload" or "basic" not in payload.get("transfers", ["basic"]):
            return 422, {"message": "this fake Hub speaks the basic LFS upload transfer only"}
        objects = []
        for item in payload["objects"]:
            entry = {"oid": item["oid"], "size": item["size"], "authenticated": True}
            if item["oid"] not in self.lfs_objects:
                entry["actions"] = {"upload": {"href": f"{self.url}/lfs-storage/{item['oid']}", "header": {}}}
            objects.append(entry)
        return 200, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"}

    def lfs_put(self, oid: str, body: bytes) -> tuple[int, dict]:
        if hashlib.sha256(body).hexdigest() != oid:
            return 400, {"error": "content does not match its oid"}
        self.lfs_objects[oid] = body
        return 200, {}

    def commit(self, repo_id: str, repo: Repo, branch: str, body: bytes) -> tuple[int, dict]:
        if self.fail_commits:
            return 500, {"error": "the fake Hub was told to fail commits"}
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        if not lines or lines[0]["key"] != "header":
            return 400, {"error": "the commit payload must start with a header line"}
        head = repo.branches[branch][-1]
        files, lfs = dict(head.files), set(head.lfs)
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            if key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
                lfs.discard(value["path"])
            elif key == "lfsFile":
                if value["oid"] not in self.lfs_objects:
                    return 422, {"error": f"LFS object {value['oid']} of {value['path']} was never uploaded"}
                files[value["path"]] = self.lfs_objects[value["oid"]]
                lfs.add(value["path"])
            elif key == "deletedFile":
                files.pop(value["path"], None)
            else:
                return 400, {"error": f"unsupported commit operation {key}"}
        header = lines[0]["value"]
        commit = Commit(self._commit_oid(repo_id, body), header["summary"], header.get("description", ""), files, lfs)
        repo.branches[branch].append(commit)
        return 200, {"commitUrl": f"{self.url}/{repo_id}/commit/{commit.oid}", "commitOid": commit.oid,
                     "pullRequestUrl": None}  # fmt: skip

    def repo_info(self, repo_id: str, repo: Repo, commit: Commit) -> tuple[int, dict]:
        siblings = [{"rfilename": path} for path in sorted(commit.files)]
        return 200, {"id": repo_id, "modelId": repo_id, "sha": commit.oid, "private": repo.private,
                     "siblings": siblings}  # fmt: skip

    def tree(self, commit: Commit) -> tuple[int, list]:
        entries = []
        for path, content in sorted(commit.files.items()):
            entry = {"type": "file", "path": path, "size": len(content), "oid": git_blob_oid(content)}
            if path in commit.lfs:
                entry["lfs"] = {"oid": hashlib.sha256(content).hexdigest(), "size": len(content), "pointerSize": 134}
            entries.append(entry)
        return 200, entries

    def _commit_oid(self, repo_id: str, salt) -> str:
        self._commit_count += 1  # under the request lock
        return hashlib.sha1(f"{repo_id}:{self._commit_count}:{salt!r}".encode()).hexdigest()

    @staticmethod
    def _find_commit(repo: Repo, revision: str) -> Optional[Commit]:
        if revision in repo.branches:
            return repo.branches[revision][-1]
        for commits in repo.branches.values():
            for commit in commits:
                if commit.oid == revision:
                    return commit
        return None


REPO = r"(?P<repo>[^/]+/[^/]+)"
ROUTES = [  # (method, pattern, handler name)
    ("POST", r"/api/repos/create", "create"),
    ("POST", r"/api/validate-yaml", "validate_yaml"),
    ("POST", rf"/api/models/{REPO}/preupload/(?P<rev>[^/]+)", "preupload"),
    ("POST", rf"/api/models/{REPO}/commit/(?P<rev>[^/]+)", "commit"),
    ("POST", rf"/api/models/{REPO}/branch/(?P<rev>[^/]+)", "branch"),
    ("GET", rf"/api/models/{REPO}(?:/revision/(?P<rev>[^/]+))?", "info"),
    ("GET", rf"/api/models/{REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?", "tree"),
    ("POST", rf"/{REPO}\.git/info/lfs/objects/batch", "lfs_batch"),
    ("PUT", r"/lfs-storage/(?P<oid>[0-9a-f]{64})", "lfs_put"),
    ("GET", rf"/{REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
    ("HEAD", rf"/{REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
]


def _handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # httpx keeps connections alive: every answer carries its length

        def log_message(self, *args) -> None:  # keep test output clean
            pass

        def do_GET(self):
            self._dispatch("GET")

        def do_HEAD(self):
            self._dispatch("HEAD")

        def do_POST(self):
            self._dispatch("POST")

        def do_PUT(self):
            self._dispatch("PUT")

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                    if size == 0:
                        self.rfile.readline()
                        return b"".join(chunks)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _dispatch(self, method: str) -> None:
            url = urlsplit(self.path)
            body = self._body() if method in ("POST", "PUT") else b""
            with hub._lock:
                hub.requests.append(Request(method, url.path, self.headers.get("Authorization"), body))
            for route_method, pattern, name in ROUTES:
                match = re.fullmatch(pattern, url.path)
                if route_method == method and match:
                    break
            else:
                return self._send(404, {"error": f"the fake Hub does not serve {method} {url.path}"})
            args = {key: unquote(value) for key, value in match.groupdict().items() if value is not None}
            if (
                name != "lfs_put"
                and hub.token is not None
                and self.headers.get("Authorization") != f"Bearer {hub.token}"
            ):
                return self._send(401, {"error": "Invalid credentials in Authorization header"})
            with hub._lock:
                getattr(self, f"_{name}")(body, parse_qs(url.query), **args)

        # --- routes ---
        def _create(self, body, query):
            self._send(*hub.create_repo(json.loads(body)))

        def _validate_yaml(self, body, query):
            content = json.loads(body)["content"]
            match = re.match(r"---\n(.*?)\n---\n", content, re.S)
            try:
                if match:
                    yaml.safe_load(match.group(1))
            except yaml.YAMLError as error:
                return self._send(400, {"errors": [{"message": str(error)}]})
            self._send(200, {"warnings": []})

        def _preupload(self, body, query, repo, rev):
            if (found := self._repo(repo, rev)) is not None:
                self._send(*hub.preupload(found, rev, json.loads(body)))

        def _commit(self, body, query, repo, rev):
            if (found := self._repo(repo, rev)) is not None:
                self._send(*hub.commit(repo, found, rev, body))

        def _branch(self, body, query, repo, rev):
            if (found := self._repo(repo)) is not None:
                self._send(*hub.create_branch(found, rev, json.loads(body or b"{}")))

        def _info(self, body, query, repo, rev="main"):
            if (found := self._repo(repo)) is not None and (commit := self._commit_of(found, rev)) is not None:
                self._send(*hub.repo_info(repo, found, commit))

        def _tree(self, body, query, repo, rev, path=""):
            if (found := self._repo(repo)) is not None and (commit := self._commit_of(found, rev)) is not None:
                self._send(*hub.tree(commit))

        def _lfs_batch(self, body, query, repo):
            if self._repo(repo) is not None:
                self._send(*hub.lfs_batch(json.loads(body)))

        def _lfs_put(self, body, query, oid):
            self._send(*hub.lfs_put(oid, body))

        def _resolve(self, body, query, repo, rev, path):
            found = self._repo(repo)
            if found is None or (commit := self._commit_of(found, rev)) is None:
                return
            if path not in commit.files:
                return self._send(404, {"error": f"{path} not found"}, {"X-Error-Code": "EntryNotFound"})
            content = commit.files[path]
            headers = {"X-Repo-Commit": commit.oid, "ETag": f'"{git_blob_oid(content)}"'}
            if path in commit.lfs:
                headers.update({"X-Linked-Etag": f'"{hashlib.sha256(content).hexdigest()}"',
                                "X-Linked-Size": str(len(content))})  # fmt: skip
            self._send_bytes(200, content, "application/octet-stream", headers)

        # --- helpers ---
        def _repo(self, repo_id: str, branch: Optional[str] = None) -> Optional[Repo]:
            repo = hub.repos.get(repo_id)
            if repo is None:
                self._send(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
            elif branch is not None and branch not in repo.branches:
                self._send(404, {"error": f"Invalid rev id: {branch}"}, {"X-Error-Code": "RevisionNotFound"})
                return None
            return repo

        def _commit_of(self, repo: Repo, revision: str) -> Optional[Commit]:
            commit = hub._find_commit(repo, revision)
            if commit is None:
                self._send(404, {"error": f"Invalid rev id: {revision}"}, {"X-Error-Code": "RevisionNotFound"})
            return commit

        def _send(self, status: int, payload, headers: Optional[dict] = None) -> None:
            headers = dict(headers or {})
            if status >= 400 and isinstance(payload, dict) and hub.echo_headers:
                said = payload.get("error") or payload.get("message", "")
                payload = {**payload, "error": f"{said} (your request's headers: {dict(self.headers)})"}
            if status >= 400 and isinstance(payload, dict):
                headers.setdefault("X-Error-Message", payload.get("error") or payload.get("message", ""))
            self._send_bytes(status, json.dumps(payload).encode(), "application/json", headers)

        def _send_bytes(self, status: int, data: bytes, content_type: str, headers: dict) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            for key, value in headers.items():
                self.send_header(key, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

    return Handler
