"""A local HTTP server that answers the Hugging Face Hub's endpoints that `huggingface_hub.snapshot_download` calls
(repository info, file tree, file resolve), for a few in-memory repositories. Tests point huggingface_hub at it, so
the cache it fills is laid out by huggingface_hub itself, and no test ever reaches the internet."""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


@dataclass
class Repo:
    files: dict[str, bytes]
    revisions: dict[str, str] = field(default_factory=dict)  # branch or tag -> commit
    token: str | None = None  # a private repository: only this bearer token may read it

    @classmethod
    def of_folder(cls, folder: Path, *, commit: str, token: str | None = None) -> Repo:
        files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
        return cls(files, {"main": commit}, token)


class HubServer:
    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.requests: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_HEAD(self) -> None:
                server._answer(self, body=False)

            def do_GET(self) -> None:
                server._answer(self, body=True)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def __enter__(self) -> HubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def _answer(self, handler: BaseHTTPRequestHandler, *, body: bool) -> None:
        path = unquote(urlsplit(handler.path).path)
        self.requests.append(f"{handler.command} {path}")
        routes = [
            (r"/api/models/(?P<repo>[^/]+/[^/]+)/revision/(?P<rev>.+)", self._info),
            (r"/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)/?", self._tree),
            (r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[0-9a-f]{40})/(?P<file>.+)", self._resolve),
        ]
        for pattern, route in routes:
            match = re.fullmatch(pattern, path)
            if match is None:
                continue
            repo = self.repos.get(match["repo"])
            auth = handler.headers.get("authorization")
            if repo is None or (repo.token is not None and auth != f"Bearer {repo.token}"):
                return self._send(handler, 401 if auth is None else 404, b'{"error": "Repository not found"}',
                                  {"X-Error-Code": "RepoNotFound"}, body)
            status, data, headers = route(repo, match)
            return self._send(handler, status, data, headers, body)
        self._send(handler, 404, b"{}", {}, body)

    @staticmethod
    def _commit(repo: Repo, rev: str) -> str | None:
        return rev if rev in repo.revisions.values() else repo.revisions.get(rev)

    def _info(self, repo: Repo, match) -> tuple[int, bytes, dict]:
        commit = self._commit(repo, match["rev"])
        if commit is None:
            return 404, b'{"error": "Invalid rev id"}', {"X-Error-Code": "RevisionNotFound"}
        info = {"id": match["repo"], "sha": commit, "siblings": [{"rfilename": f} for f in repo.files]}
        return 200, json.dumps(info).encode(), {"Content-Type": "application/json"}

    def _tree(self, repo: Repo, match) -> tuple[int, bytes, dict]:
        entries = [{"type": "file", "path": name, "size": len(data), "oid": _git_oid(data)}
                   for name, data in repo.files.items()]
        return 200, json.dumps(entries).encode(), {"Content-Type": "application/json"}

    def _resolve(self, repo: Repo, match) -> tuple[int, bytes, dict]:
        data = repo.files.get(match["file"])
        if data is None or self._commit(repo, match["rev"]) is None:
            return 404, b"{}", {"X-Error-Code": "EntryNotFound"}
        return 200, data, {"X-Repo-Commit": match["rev"], "ETag": f'"{_git_oid(data)}"'}

    @staticmethod
    def _send(handler, status: int, data: bytes, headers: dict, body: bool) -> None:
        handler.send_response(status)
        for key, value in {**headers, "Content-Length": str(len(data))}.items():
            handler.send_header(key, value)
        handler.end_headers()
        if body:
            handler.wfile.write(data)


def _git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
