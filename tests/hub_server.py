"""A tiny in-memory Hugging Face Hub for tests: just the endpoints huggingface_hub's client uses to push and load.

    with HubServer() as hub:             # http://127.0.0.1:<port>, one thread, stops on exit
        env = {"HF_ENDPOINT": hub.url}   # huggingface_hub reads HF_ENDPOINT when it is imported
        ...                              # push / from_pretrained in a subprocess with that environment
        hub.files("user/tiny")           # {path: bytes} at the head of main
        hub.fail_next_commit = True      # the next commit reads half its body, then drops the connection
                                         # (POST /_test/fail-next-commit does the same from a client process)
        hub.add_dataset("user/corpus", {"README.md": b"...", "cfg/train-00000-of-00001.parquet": data})
        hub.add_dataset("user/corpus", files, branch="refs/convert/parquet")   # the Hub's parquet-export branch

Endpoints, for model repos and (read-only, filled by `add_dataset`) dataset repos, `{type}` = models / datasets:
POST /api/repos/create, POST /api/validate-yaml, POST /api/models/{repo}/preupload/{rev} (every file "regular", so
no LFS / Xet transfer), POST /api/models/{repo}/commit/{rev} (NDJSON, base64 files; applied atomically once the
whole body has been read), GET /api/{type}/{repo}[/revision/{rev}], GET /api/{type}/{repo}/tree/{rev}[/{path}]
(`recursive`, directories listed as the Hub does), POST /api/{type}/{repo}/paths-info/{rev}, HEAD/GET
[/datasets]/{repo}/resolve/{rev}/{path} with the headers the client reads (X-Repo-Commit, ETag, Content-Length,
X-Error-Code on 404) and byte ranges (206). Revisions are a branch ("main", "refs/convert/parquet", URL-quoted as
the client sends them) or a full commit id. No authentication.
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
        self.commits: list[tuple[str, dict[str, bytes], str]] = [(initial, {}, "initial commit")]  # main's history
        self.branches: dict[str, tuple[str, dict[str, bytes], str]] = {}  # heads of branches other than main

    @property
    def head(self) -> tuple[str, dict[str, bytes], str]:
        return self.commits[-1]

    def at(self, revision: str) -> tuple[str, dict[str, bytes], str] | None:
        if revision in ("main", "refs/heads/main"):
            return self.head
        if revision in self.branches:
            return self.branches[revision]
        return next((c for c in [*self.commits, *self.branches.values()] if c[0] == revision), None)

    def commit(self, files: dict[str, bytes], message: str, branch: str = "main") -> str:
        parent = self.at(branch)
        oid = hashlib.sha1(json.dumps([parent[0] if parent else branch, message,
                                       sorted((p, git_blob_sha(d)) for p, d in files.items())]).encode()).hexdigest()
        if branch == "main":
            self.commits.append((oid, files, message))
        else:
            self.branches[branch] = (oid, files, message)
        return oid


class HubServer:
    """Start with `with HubServer() as hub:` (or start()/stop()); see the module docstring."""

    def __init__(self) -> None:
        self.repos: dict[str, _Repo] = {}  # model repos
        self.datasets: dict[str, _Repo] = {}  # dataset repos
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

    # ------------------------------------------------------------------ datasets
    def add_dataset(self, repo_id: str, files: dict[str, bytes], branch: str = "main") -> str:
        """Commit `files` as the whole content of `branch` of the dataset repo `repo_id`; returns the commit id."""
        with self._lock:
            repo = self.datasets.setdefault(repo_id, _Repo(repo_id, private=False))
            return repo.commit(dict(files), f"add {len(files)} files", branch)


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

    def _record(self) -> tuple[list[str], dict[str, list[str]]]:
        """The path's segments, each unquoted on its own (a revision such as refs%2Fconvert%2Fparquet stays one
        segment), and the query."""
        parsed = urllib.parse.urlsplit(self.path)
        segments = [urllib.parse.unquote(s) for s in parsed.path.strip("/").split("/")]
        self.server_hub.requests.append((self.command, urllib.parse.unquote(parsed.path)))
        return segments, urllib.parse.parse_qs(parsed.query)

    def _repo(self, kind: str, repo_id: str, head: bool = False) -> _Repo | None:
        repos = self.server_hub.datasets if kind == "datasets" else self.server_hub.repos
        repo = repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", f"Repository {repo_id} not found", head)
        return repo

    def _commit_at(self, repo: _Repo, revision: str, head: bool = False):
        commit = repo.at(revision)
        if commit is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", head)
        return commit

    def _files_at(self, kind: str, repo_id: str, revision: str, head: bool = False):
        """(commit id, {path: bytes}) or None after answering 404."""
        with self.server_hub._lock:
            repo = self._repo(kind, repo_id, head)
            commit = repo and self._commit_at(repo, revision, head)
            return (commit[0], dict(commit[1])) if commit else None

    # ------------------------------------------------------------------ verbs
    def do_HEAD(self) -> None:
        self._get(head=True)

    def do_GET(self) -> None:
        self._get(head=False)

    def _resolve(self, kind: str, repo_id: str, revision: str, filename: str, head: bool) -> None:
        found = self._files_at(kind, repo_id, revision, head)
        if not found:
            return
        sha, files = found
        data = files.get(filename)
        if data is None:
            return self._error(404, "EntryNotFound", f"{filename} does not exist at {revision}", head)
        headers = {"X-Repo-Commit": sha, "ETag": f'"{git_blob_sha(data)}"', "Content-Type": "application/octet-stream",
                   "Accept-Ranges": "bytes"}  # fmt: skip
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range") or "")
        if m:  # HfFileSystem reads files by byte ranges
            start, end = int(m.group(1)), int(m.group(2)) if m.group(2) else len(data) - 1
            end = min(end, len(data) - 1)
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            return self._send(206, data[start : end + 1], headers, head)
        return self._send(200, data, headers, head)

    @staticmethod
    def _entries(files: dict[str, bytes], sub: str, recursive: bool) -> list[dict]:
        """The Hub's tree listing of folder `sub` ("" = root): files and folders, all levels or the first."""
        prefix = f"{sub}/" if sub else ""
        entries, folders = [], set()
        for path, data in sorted(files.items()):
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix):].split("/")
            for depth in range(1, len(parts)):
                if recursive or depth == 1:
                    folders.add(prefix + "/".join(parts[:depth]))
            if recursive or len(parts) == 1:
                entries.append({"type": "file", "path": path, "size": len(data), "oid": git_blob_sha(data)})
        entries += [{"type": "directory", "path": f, "size": 0, "oid": hashlib.sha1(f.encode()).hexdigest()}
                    for f in sorted(folders)]  # fmt: skip
        return entries

    def _get(self, head: bool) -> None:
        segments, query = self._record()
        kind = "models"
        if segments[0] == "datasets" and len(segments) > 4 and segments[3] == "resolve":
            kind, segments = "datasets", segments[1:]
        if len(segments) > 3 and segments[0] != "api" and segments[2] == "resolve":
            return self._resolve(kind, "/".join(segments[:2]), segments[3], "/".join(segments[4:]), head)
        if segments[0] == "api" and len(segments) >= 4 and segments[1] in ("models", "datasets"):
            kind, repo_id, rest = segments[1], "/".join(segments[2:4]), segments[4:]
            if not rest or (len(rest) == 2 and rest[0] == "revision"):
                revision = rest[1] if rest else "main"
                found = self._files_at(kind, repo_id, revision, head)
                if not found:
                    return
                sha, files = found
                return self._json(200, {"id": repo_id, "modelId": repo_id, "sha": sha, "private": False,
                                        "siblings": [{"rfilename": f} for f in sorted(files)], "tags": [],
                                        "downloads": 0, "likes": 0}, head=head)  # fmt: skip
            if len(rest) >= 2 and rest[0] == "tree":
                sub = "/".join(rest[2:]).strip("/")
                found = self._files_at(kind, repo_id, rest[1], head)
                if not found:
                    return
                entries = self._entries(found[1], sub, query.get("recursive", ["false"])[0].lower() == "true")
                if sub and not entries:
                    return self._error(404, "EntryNotFound", f"{sub} does not exist at {rest[1]}", head)
                return self._json(200, entries, head=head)
        self._error(404, None, f"no such endpoint: {self.command} {self.path}", head)

    def do_POST(self) -> None:
        segments, query = self._record()
        path = "/" + "/".join(segments)
        hub = self.server_hub
        if segments[0] == "api" and len(segments) == 6 and segments[4] == "paths-info":
            fields = urllib.parse.parse_qs(self._body().decode())
            found = self._files_at(segments[1], "/".join(segments[2:4]), segments[5])
            if not found:
                return
            entries = self._entries(found[1], "", recursive=True)
            return self._json(200, [e for e in entries if e["path"] in fields.get("paths", [])])
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
                repo = self._repo("models", repo_id)
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
            repo = self._repo("models", repo_id)
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
