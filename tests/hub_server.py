"""A Hugging Face Hub stand-in for tests: the HTTP endpoints the real huggingface_hub 2.x client calls to create a
repository, upload a folder and download files, on 127.0.0.1 (stdlib http.server in a thread, files in a folder).

    server = HubServer(tmp_path, tokens={"hf_good": "alice"}); server.start()   # server.url -> HF_ENDPOINT
    ...
    server.commits("alice/repo")  # [(message, {path: blob sha}), ...] in order; server.files("alice/repo") the tree

Endpoints (what huggingface_hub/hf_api.py, _commit_api.py, _upload_pipeline.py, _snapshot_download.py and
file_download.py request):

* POST /api/validate-yaml                      -> a README.md's metadata must be a YAML mapping
* POST /api/repos/create                       -> {"url"}; 409 with {"url"} when it exists
* GET  /api/models/{repo}[/revision/{rev}]     -> {"id", "sha", "private", "siblings": [{"rfilename"}]}
* GET  /api/models/{repo}/tree/{rev}[/{path}]  -> [{"type": "file", "path", "size", "oid"}]
* POST /api/models/{repo}/branch/{branch}      -> a branch from main's head
* POST /api/models/{repo}/preupload/{rev}      -> every file "regular" (content then comes inline, base64, in the
                                                  commit; no LFS or Xet upload), "oid" = the blob already there
* POST /api/models/{repo}/commit/{rev}         -> ndjson header/file/deletedFile/deletedFolder lines
* GET|HEAD /{repo}/resolve/{rev}/{path}         -> the bytes, with X-Repo-Commit, ETag and Content-Length

Authentication is `Authorization: Bearer <token>`: a token not in `tokens` is answered 401 as the Hub answers it (a
missing one too, for writes and private repositories). `fail_writes[repo] = 401` makes preupload/commit of that
repository answer 401 (a token revoked during a run), `fail_writes[repo] = "down"` closes their connections
unanswered (a server going down); `stop()` takes the whole server down.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import yaml


def git_blob_sha(content: bytes) -> str:
    """The object id git (and the Hub) gives a file's content: what the client compares to skip unchanged files."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


class HubServer:
    def __init__(self, root, tokens: dict[str, str]):
        self.root = str(root)
        self.tokens = dict(tokens)
        self.repos: dict[str, dict] = {}  # repo_id -> {"private", "branches": {name: sha}, "commits": {sha: {...}}}
        self.fail_writes: dict[str, int] = {}
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        os.makedirs(os.path.join(self.root, "blobs"), exist_ok=True)
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def start(self) -> HubServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    # ------------------------------------------------------------------ what tests read

    def files(self, repo_id: str, revision: str = "main") -> dict[str, str]:
        repo = self.repos[repo_id]
        return dict(repo["commits"][repo["branches"][revision]]["files"]) if revision in repo["branches"] else {}

    def read(self, repo_id: str, path: str, revision: str = "main") -> bytes:
        with open(os.path.join(self.root, "blobs", self.files(repo_id, revision)[path]), "rb") as f:
            return f.read()

    def commits(self, repo_id: str, revision: str = "main") -> list[tuple[str, dict[str, str]]]:
        """(message, files added or changed) of each commit on `revision`, oldest first."""
        repo, history = self.repos[repo_id], []
        sha = repo["branches"].get(revision)
        while sha is not None:
            commit = repo["commits"][sha]
            history.append((commit["message"], commit["changed"]))
            sha = commit["parent"]
        return history[::-1]

    # ------------------------------------------------------------------ the repository model

    def _commit(self, repo_id: str, revision: str, message: str, changes: list[dict]) -> str:
        repo = self.repos[repo_id]
        parent = repo["branches"].get(revision)
        files = dict(repo["commits"][parent]["files"]) if parent else {}
        changed = {}
        for change in changes:
            path = change["path"]
            if change["kind"] == "file":
                content = base64.b64decode(change["content"])
                sha = git_blob_sha(content)
                with open(os.path.join(self.root, "blobs", sha), "wb") as f:
                    f.write(content)
                files[path] = changed[path] = sha
            elif change["kind"] == "deletedFile":
                files.pop(path, None)
            else:  # deletedFolder
                files = {p: s for p, s in files.items() if not p.startswith(path.rstrip("/") + "/")}
        commit_sha = hashlib.sha1(json.dumps([parent, message, sorted(files.items())]).encode()).hexdigest()
        repo["commits"][commit_sha] = {"parent": parent, "message": message, "files": files, "changed": changed}
        repo["branches"][revision] = commit_sha
        return commit_sha


def _handler(hub: HubServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet: the test reads hub.requests instead
            pass

        # -------------------------------------------------------------- plumbing

        def _send(self, status: int, body=b"", headers: dict | None = None, head_only: bool = False):
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            self.send_response(status)
            content_type = "application/json" if not isinstance(body, bytes) else "application/octet-stream"
            self.send_header("Content-Type", content_type)
            if status >= 400 and isinstance(body, dict) and "error" in body:
                self.send_header("X-Error-Message", body["error"])
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if not head_only:
                self.wfile.write(data)

        def _body(self) -> bytes:
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def _user(self):
            """(ok, user): ok is False for a token the Hub does not know (a missing token is anonymous)."""
            auth = self.headers.get("Authorization", "")
            if not auth:
                return True, None
            token = auth.removeprefix("Bearer ").strip()
            return token in hub.tokens, hub.tokens.get(token)

        def _unauthorized(self):
            self._send(401, {"error": "Invalid credentials in Authorization header"})

        def _repo(self, repo_id: str, user, write: bool):
            """The repository, or None after answering 401/404 as the Hub does."""
            repo = hub.repos.get(repo_id)
            if repo is None or (repo["private"] and user is None):
                self._send(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
                return None
            if write and hub.fail_writes.get(repo_id) == "down":  # as a server going down: no answer at all
                self.close_connection = True
                return None
            if write and (user is None or repo_id.split("/")[0] != user or hub.fail_writes.get(repo_id) == 401):
                self._unauthorized()
                return None
            return repo

        # -------------------------------------------------------------- routes

        def do_HEAD(self):
            self._route("HEAD")

        def do_GET(self):
            self._route("GET")

        def do_POST(self):
            self._route("POST")

        def _route(self, method: str):
            url = urllib.parse.urlsplit(self.path)
            parts = [urllib.parse.unquote(p) for p in url.path.strip("/").split("/")]
            body = self._body() if method == "POST" else b""
            hub.requests.append((method, url.path))
            ok, user = self._user()
            if not ok:
                return self._unauthorized()
            with hub.lock:
                if method == "POST" and parts[:3] == ["api", "repos", "create"]:
                    return self._create(json.loads(body), user)
                if method == "POST" and parts[:2] == ["api", "validate-yaml"]:
                    return self._validate_yaml(json.loads(body)["content"])
                if parts[:2] == ["api", "models"] and len(parts) >= 4:
                    repo_id, action, rest = "/".join(parts[2:4]), parts[4] if len(parts) > 4 else None, parts[5:]
                    repo = self._repo(repo_id, user, write=method == "POST")
                    if repo is None:
                        return None
                    if method == "GET" and action in (None, "revision"):
                        return self._info(repo_id, repo, rest[0] if rest else "main")
                    if method == "GET" and action == "tree":
                        return self._tree(repo_id, repo, rest[0], "/".join(rest[1:]))
                    if action == "branch":
                        repo["branches"].setdefault(rest[0], repo["branches"]["main"])
                        return self._send(200, {})
                    if action == "preupload":
                        return self._preupload(repo_id, rest[0], json.loads(body))
                    if action == "commit":
                        return self._commit(repo_id, repo, rest[0], body)
                if len(parts) >= 5 and parts[2] == "resolve":
                    repo_id, revision, path = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
                    if self._repo(repo_id, user, write=False) is not None:
                        return self._resolve(repo_id, revision, path, head_only=method == "HEAD")
                    return None
            return self._send(404, {"error": f"no route {method} {url.path}"})

        def _create(self, payload: dict, user):
            if user is None:
                return self._unauthorized()
            repo_id = f"{payload.get('organization') or user}/{payload['name']}"
            if repo_id in hub.repos:
                return self._send(409, {"error": "You already created this model repo", "url": f"{hub.url}/{repo_id}"})
            hub.repos[repo_id] = {"private": payload.get("visibility") == "private", "branches": {}, "commits": {}}
            hub._commit(repo_id, "main", "initial commit", [])
            return self._send(200, {"url": f"{hub.url}/{repo_id}"})

        def _validate_yaml(self, content: str):
            """A README.md's metadata block must be a YAML mapping (what the Hub checks first)."""
            head = content.split("---")[1] if content.startswith("---") else ""
            try:
                metadata = yaml.safe_load(head) if head.strip() else {}
            except yaml.YAMLError as err:
                return self._send(400, {"errors": [{"message": str(err)}], "error": "Invalid metadata"})
            if not isinstance(metadata, dict):
                return self._send(400, {"errors": [{"message": "metadata is not a mapping"}], "error": "Invalid"})
            return self._send(200, {"warnings": []})

        def _info(self, repo_id: str, repo: dict, revision: str):
            if revision not in repo["branches"] and revision not in repo["commits"]:
                return self._send(404, {"error": "Invalid rev id"}, {"X-Error-Code": "RevisionNotFound"})
            sha = repo["branches"].get(revision, revision)
            files = repo["commits"][sha]["files"]
            return self._send(200, {"id": repo_id, "sha": sha, "private": repo["private"],
                                    "siblings": [{"rfilename": path} for path in sorted(files)]})

        def _tree(self, repo_id: str, repo: dict, revision: str, under: str):
            sha = repo["branches"].get(revision, revision)
            entries = [
                {"type": "file", "path": path, "oid": blob,
                 "size": os.path.getsize(os.path.join(hub.root, "blobs", blob))}
                for path, blob in sorted(repo["commits"][sha]["files"].items())
                if not under or path.startswith(under.rstrip("/") + "/")
            ]
            return self._send(200, entries)

        def _preupload(self, repo_id: str, revision: str, payload: dict):
            existing = hub.files(repo_id, revision)
            return self._send(200, {"files": [
                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": existing.get(f["path"])}
                for f in payload["files"]
            ]})

        def _commit(self, repo_id: str, repo: dict, revision: str, body: bytes):
            if revision not in repo["branches"]:
                return self._send(404, {"error": f"Invalid rev id: {revision}"}, {"X-Error-Code": "RevisionNotFound"})
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
            header = next(line["value"] for line in lines if line["key"] == "header")
            changes = []
            for line in lines:
                if line["key"] == "lfsFile":
                    return self._send(400, {"error": "this test Hub takes regular (inline) files only"})
                if line["key"] != "header":
                    changes.append({"kind": line["key"], **line["value"]})
            sha = hub._commit(repo_id, revision, header["summary"], changes)
            return self._send(200, {"commitUrl": f"{hub.url}/{repo_id}/commit/{sha}", "commitOid": sha,
                                    "pullRequestUrl": None})

        def _resolve(self, repo_id: str, revision: str, path: str, head_only: bool):
            repo = hub.repos[repo_id]
            sha = repo["branches"].get(revision, revision)
            blob = repo["commits"].get(sha, {}).get("files", {}).get(path)
            if blob is None:
                return self._send(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound",
                                                                      "X-Repo-Commit": sha}, head_only)
            with open(os.path.join(hub.root, "blobs", blob), "rb") as f:
                content = f.read()
            return self._send(200, content, {"X-Repo-Commit": sha, "ETag": f'"{blob}"'}, head_only)

    return Handler
