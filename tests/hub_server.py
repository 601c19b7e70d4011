"""A loopback stand-in for the Hugging Face Hub's file endpoints, so that the real ``huggingface_hub``
client downloads, caches and goes offline in tests without the internet (``HF_ENDPOINT``).

Served: ``HEAD``/``GET /{repo}/resolve/{revision}/{path}`` (``X-Repo-Commit``, ``ETag`` = the file's
SHA-256 as the Hub gives for LFS files, ``Content-Length``; ``Range`` honoured), ``GET
/api/models/{repo}/revision/{revision}`` (``sha``, ``siblings``) and ``GET
/api/models/{repo}/tree/{revision}`` (files with their ``lfs`` hashes); anything else is a 404 with
the Hub's ``X-Error-Code``. ``corrupt``: paths served with other bytes than their stated hash."""

from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    def __init__(self) -> None:
        self.repos: dict[str, dict[str, bytes]] = {}
        self.corrupt: set[tuple[str, str]] = set()
        self.requests: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def do_HEAD(self) -> None:
                hub.serve(self, body=False)

            def do_GET(self) -> None:
                hub.serve(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def add_file(self, repo: str, path: str, data: bytes) -> None:
        self.repos.setdefault(repo, {})[path] = data

    def add_folder(self, repo: str, folder: Path) -> None:
        for file in sorted(folder.rglob("*")):
            if file.is_file():
                self.add_file(repo, file.relative_to(folder).as_posix(), file.read_bytes())

    def __enter__(self) -> "FakeHub":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    # -- the endpoints ------------------------------------------------------------------------
    def serve(self, handler: BaseHTTPRequestHandler, body: bool) -> None:
        path = handler.path.split("?")[0]
        self.requests.append(f"{handler.command} {path}")
        resolve = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        info = re.fullmatch(r"/api/models/([^/]+/[^/]+)/revision/([^/]+)", path)
        tree = re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(/.*)?", path)
        if resolve:
            repo, _, name = resolve.groups()
            if repo not in self.repos:
                return self.error(handler, "RepoNotFound")
            if name not in self.repos[repo]:
                return self.error(handler, "EntryNotFound")
            data = self.repos[repo][name]
            sha = hashlib.sha256(data).hexdigest()
            if (repo, name) in self.corrupt:
                data = bytes(reversed(data))
            start = 0
            ranged = re.fullmatch(r"bytes=(\d+)-", handler.headers.get("Range", ""))
            if ranged:
                start = int(ranged.group(1))
            handler.send_response(206 if start else 200)
            handler.send_header("X-Repo-Commit", COMMIT)
            handler.send_header("ETag", f'"{sha}"')
            handler.send_header("Content-Length", str(len(data) - start))
            handler.end_headers()
            if body:
                handler.wfile.write(data[start:])
            return None
        if info:
            repo = info.group(1)
            if repo not in self.repos:
                return self.error(handler, "RepoNotFound")
            return self.json(handler, {"id": repo, "modelId": repo, "sha": COMMIT, "private": False,
                                       "siblings": [{"rfilename": f} for f in sorted(self.repos[repo])]}, body)
        if tree:
            repo = tree.group(1)
            if repo not in self.repos:
                return self.error(handler, "RepoNotFound")
            entries = [{"type": "file", "path": f, "size": len(d), "oid": hashlib.sha1(d).hexdigest(),
                        "lfs": {"oid": hashlib.sha256(d).hexdigest(), "size": len(d), "pointerSize": 130}}
                       for f, d in sorted(self.repos[repo].items())]
            return self.json(handler, entries, body)
        return self.error(handler, "RepoNotFound")

    @staticmethod
    def json(handler: BaseHTTPRequestHandler, payload, body: bool) -> None:
        data = json.dumps(payload).encode()
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        if body:
            handler.wfile.write(data)

    @staticmethod
    def error(handler: BaseHTTPRequestHandler, code: str) -> None:
        message = json.dumps({"error": code}).encode()
        handler.send_response(404)
        handler.send_header("X-Error-Code", code)
        handler.send_header("X-Error-Message", code)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(message)))
        handler.end_headers()
        if handler.command != "HEAD":
            handler.wfile.write(message)
