"""A tiny in-memory Hugging Face Hub for tests: just the endpoints huggingface_hub's client uses to push and load.

    with HubServer() as hub:             # http://127.0.0.1:<port>, one thread, stops on exit
        env = {"HF_ENDPOINT": hub.url}   # huggingface_hub reads HF_ENDPOINT when it is imported
        ...                              # push / from_pretrained in a subprocess with that environment
        hub.files("user/tiny")           # {path: bytes} at the head of main
        hub.fail_next_commit = True      # the next commit reads half its body, then drops the connection
                                         # (POST /_test/fail-next-commit does the same from a client process)

Endpoints (model repos only): POST /api/repos/create, POST /api/validate-yaml, POST
/api/models/{repo}/preupload/{rev} (every file "regular", so no LFS / Xet transfer), POST
/api/models/{repo}/commit/{rev} (NDJSON, base64 files; applied atomically once the whole body has been read),
GET /api/models/{repo}[/revision/{rev}], GET /api/models/{repo}/tree/{rev}[/{path}], HEAD/GET
/{repo}/resolve/{rev}/{path} with the headers the client reads (X-Repo-Commit, ETag, Content-Length, and
X-Error-Code on 404). Revisions are "main" or a full commit id. No authentication.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def git_blob_sha(data: bytes) -> str:
    """The git object id of a file's content (what the Hub reports as a regular file's oid / ETag)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class _Repo:
    def __init__(self, repo_id: str, private: bool) -> None:
        self.repo_id = repo_id
        self.private = private
        initial = hashlib.sha1(f"init {repo_id}".encode()).hexdigest()
        self.commits: list[tuple[str, dict[str, bytes], str]] = [(initial, {}, "initial commit")]

    @property
    def head(self) -> tuple[str, dict[str, bytes], str]:
        return self.commits[-1]

    def at(self, revision: str) -> tuple[str, dict[str, bytes], str] | None:
        if revision in ("main", "refs/heads/main"):
            return self.head
        return next((c for c in self.commits if c[0] == revision), None)


class HubServer:
    """Start with `with HubServer() as hub:` (or start()/stop()); see the module docstring."""

    def __init__(self) -> None:
        self.repos: dict[str, _Repo] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request, for assertions
        self.fail_next_commit = False
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ control
    @property
    def url(self) -> str:
        assert self._httpd is not None, "server not started"
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> HubServer:
        hub = self

        class Handler(_Handler):
            server_hub = hub

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="hub-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join(timeout=10)
            self._httpd = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ inspection
    def head(self, repo_id: str) -> str:
        return self.repos[repo_id].head[0]

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        return dict(self.repos[repo_id].at(revision)[1])

    def commit_messages(self, repo_id: str) -> list[str]:
        return [c[2] for c in self.repos[repo_id].commits]


class _Handler(BaseHTTPRequestHandler):
    server_hub: HubServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args) -> None:  # keep test output clean
        pass

    # ------------------------------------------------------------------ plumbing
    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None, head: bool = False) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _json(self, status: int, obj, headers: dict[str, str] | None = None, head: bool = False) -> None:
        self._send(status, json.dumps(obj).encode(), {"Content-Type": "application/json", **(headers or {})}, head)

    def _error(self, status: int, code: str | None, message: str, head: bool = False) -> None:
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._json(status, {"error": message}, headers, head)

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _record(self) -> tuple[str, dict[str, list[str]]]:
        parsed = urllib.parse.urlsplit(self.path)
        path = urllib.parse.unquote(parsed.path)
        self.server_hub.requests.append((self.command, path))
        return path, urllib.parse.parse_qs(parsed.query)

    def _repo(self, repo_id: str, head: bool = False) -> _Repo | None:
        repo = self.server_hub.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", f"Repository {repo_id} not found", head)
        return repo

    def _commit_at(self, repo: _Repo, revision: str, head: bool = False):
        commit = repo.at(revision)
        if commit is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", head)
        return commit

    # ------------------------------------------------------------------ verbs
    def do_HEAD(self) -> None:
        self._get(head=True)

    def do_GET(self) -> None:
        self._get(head=False)

    def _get(self, head: bool) -> None:
        path, _ = self._record()
        hub = self.server_hub
        m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if m:
            repo_id, revision, filename = m.groups()
            with hub._lock:
                repo = self._repo(repo_id, head)
                commit = repo and self._commit_at(repo, revision, head)
                if not commit:
                    return
                data = commit[1].get(filename)
            if data is None:
                return self._error(404, "EntryNotFound", f"{filename} does not exist at {revision}", head)
            etag = f'"{git_blob_sha(data)}"'
            return self._send(200, data, {"X-Repo-Commit": commit[0], "ETag": etag,
                                          "Content-Type": "application/octet-stream"}, head)  # fmt: skip
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path)
        if m:
            repo_id, revision = m.group(1), m.group(2) or "main"
            with hub._lock:
                repo = self._repo(repo_id, head)
                commit = repo and self._commit_at(repo, revision, head)
                if not commit:
                    return
                files = sorted(commit[1])
            return self._json(200, {"id": repo_id, "modelId": repo_id, "sha": commit[0], "private": repo.private,
                                    "siblings": [{"rfilename": f} for f in files], "tags": [],
                                    "downloads": 0, "likes": 0}, head=head)  # fmt: skip
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?", path)
        if m:
            repo_id, revision, sub = m.group(1), m.group(2), (m.group(3) or "").strip("/")
            with hub._lock:
                repo = self._repo(repo_id, head)
                commit = repo and self._commit_at(repo, revision, head)
                if not commit:
                    return
                files = commit[1]
            prefix = f"{sub}/" if sub else ""
            entries = [{"type": "file", "path": p, "size": len(d), "oid": git_blob_sha(d)}
                       for p, d in sorted(files.items()) if p.startswith(prefix)]  # fmt: skip
            if sub and not entries:
                return self._error(404, "EntryNotFound", f"{sub} does not exist at {revision}", head)
            return self._json(200, entries, head=head)
        self._error(404, None, f"no such endpoint: {self.command} {path}", head)

    def do_POST(self) -> None:
        path, query = self._record()
        hub = self.server_hub
        if path == "/api/repos/create":
            payload = json.loads(self._body() or b"{}")
            if payload.get("type", "model") not in (None, "model"):
                return self._error(400, None, "this test hub only holds model repos")
            repo_id = f"{payload.get('organization') or 'user'}/{payload['name']}"
            url = f"http://{self.headers['Host']}/{repo_id}"
            with hub._lock:
                if repo_id in hub.repos:
                    return self._json(409, {"error": "You already created this model repo", "url": url})
                hub.repos[repo_id] = _Repo(repo_id, payload.get("visibility") == "private")
            return self._json(200, {"url": url, "name": repo_id, "id": hashlib.sha1(repo_id.encode()).hexdigest()})
        if path == "/_test/fail-next-commit":  # lets a client process arm the failure (not a Hub endpoint)
            self._body()
            hub.fail_next_commit = True
            return self._json(200, {})
        if path == "/api/validate-yaml":
            self._body()
            return self._json(200, {"errors": [], "warnings": []})
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/preupload/([^/]+)", path)
        if m:
            repo_id, revision = m.groups()
            payload = json.loads(self._body() or b"{}")
            with hub._lock:
                repo = self._repo(repo_id)
                commit = repo and self._commit_at(repo, revision)
                if not commit:
                    return
                existing = commit[1]
            files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                      "oid": git_blob_sha(existing[f["path"]]) if f["path"] in existing else None}
                     for f in payload.get("files", [])]  # fmt: skip
            return self._json(200, {"files": files, "commitOid": commit[0]})
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/commit/([^/]+)", path)
        if m:
            return self._commit(*m.groups(), query)
        self._error(404, None, f"no such endpoint: POST {path}")

    def _commit(self, repo_id: str, revision: str, query: dict[str, list[str]]) -> None:
        hub = self.server_hub
        length = int(self.headers.get("Content-Length") or 0)
        if hub.fail_next_commit:
            # An interrupted upload: half the body arrives, then the connection drops without an answer.
            hub.fail_next_commit = False
            self.rfile.read(length // 2)
            self.close_connection = True
            self.connection.shutdown(2)  # socket.SHUT_RDWR
            return
        body = self.rfile.read(length)
        if query.get("create_pr"):
            return self._error(400, None, "this test hub does not support pull requests")
        header, adds, deletes = None, {}, []
        try:
            for line in body.splitlines():
                if not line.strip():
                    continue
                item = json.loads(line)
                key, value = item["key"], item["value"]
                if key == "header":
                    header = value
                elif key == "file":
                    if value.get("encoding", "base64") != "base64":
                        raise ValueError(f"unsupported encoding {value.get('encoding')}")
                    adds[value["path"]] = base64.b64decode(value["content"])
                elif key in ("deletedFile", "deletedFolder"):
                    deletes.append((key, value["path"]))
                else:
                    raise ValueError(f"unsupported commit operation {key!r} (LFS / copies are not implemented)")
        except (ValueError, KeyError) as err:
            return self._error(400, None, f"bad commit payload: {err}")
        if header is None:
            return self._error(400, None, "bad commit payload: no header line")
        with hub._lock:
            repo = self._repo(repo_id)
            if repo is None:
                return
            if revision not in ("main", "refs/heads/main"):
                return self._error(400, "RevisionNotFound", f"can only commit to main, not {revision}")
            parent, files, _ = repo.head
            if header.get("parentCommit") and header["parentCommit"] != parent:
                return self._error(412, None, "A commit has happened since. Please refresh and try again.")
            new_files = dict(files)
            for key, p in deletes:
                if key == "deletedFile":
                    new_files.pop(p, None)
                else:
                    for f in [f for f in new_files if f.startswith(p.rstrip("/") + "/")]:
                        new_files.pop(f)
            new_files.update(adds)
            message = header.get("summary", "")
            oid = hashlib.sha1(json.dumps([parent, message, sorted((p, git_blob_sha(d)) for p, d in new_files.items())])
                               .encode()).hexdigest()  # fmt: skip
            repo.commits.append((oid, new_files, message))
        url = f"http://{self.headers['Host']}/{repo_id}/commit/{oid}"
        self._json(200, {"commitUrl": url, "commitOid": oid, "pullRequestUrl": None})
