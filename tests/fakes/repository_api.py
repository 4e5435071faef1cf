"""A stand-in for Artifactory's and Nexus 3's listing APIs on 127.0.0.1 (a ThreadingHTTPServer
on port 0), answering with their real responses' shapes, for artifact triggers' polls::

    with RepositoryApi() as repo:
        repo.add("releases/web/web-1.0.tar.gz")            # files of a repository
        repo.add_maven("maven-releases", "com.acme", "web", "1.0", "tar.gz")
        repo.status = 401                                  # every request answers 401

    GET /api/storage/<repo>/<folder>?list&deep=0&listFolders=0     Artifactory File List API:
        {"uri": ..., "created": ..., "files": [{"uri": "/web-1.0.tar.gz", "size": 3,
         "lastModified": "...", "folder": false, "sha1": ..., "sha2": ...}]}
    GET /service/rest/v1/search?repository=R&maven.groupId=G&maven.artifactId=A
        (or &group=/web for raw)                                   Nexus 3 search API, paged
        {"items": [{"id", "repository", "format", "group", "name", "version",
                    "assets": [{"downloadUrl", "path", "id", "repository", "format",
                                "checksum", "lastModified"}]}],
         "continuationToken": "..." | null}

``page_size`` makes the Nexus answer come in pages (continuationToken). Every request is
counted in ``requests``.
"""

from __future__ import annotations

import hashlib
import json
import threading
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit


class _Quiet(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        pass


class RepositoryApi:
    def __init__(self, *, page_size: int = 2) -> None:
        self.files: dict[str, str] = {}  # "repo/path" -> lastModified
        self.maven: list[dict[str, str]] = []
        self.status = 200
        self.page_size = page_size
        self.requests = 0
        self._clock = datetime(2026, 1, 1, tzinfo=UTC)
        self._server: ThreadingHTTPServer | None = None

    def _tick(self) -> str:
        self._clock += timedelta(minutes=1)
        return self._clock.isoformat(timespec="milliseconds").replace("+00:00", "Z")

    def add(self, *paths: str) -> None:
        """Files of repositories ("repo/folder/name"), all at once (one listing sees all or
        none of them), the later ones newer."""
        files = dict(self.files)
        for path in paths:
            files[path.strip("/")] = self._tick()
        self.files = files

    def add_maven(self, repo: str, group: str, artifact: str, version: str, ext: str) -> None:
        self.maven.append(
            {
                "repository": repo,
                "group": group,
                "name": artifact,
                "version": version,
                "ext": ext,
                "modified": self._tick(),
            }
        )

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> RepositoryApi:
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                api.requests += 1
                code, body = api._answer(self.path)
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if code == 401:
                    self.send_header("WWW-Authenticate", 'Basic realm="Artifactory Realm"')
                self.end_headers()
                self.wfile.write(data)

        self._server = _Quiet(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def __enter__(self) -> RepositoryApi:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _answer(self, raw: str) -> tuple[int, Any]:
        if self.status != 200:
            errors = [{"status": self.status, "message": "Bad credentials"}]
            return self.status, {"errors": errors}
        parts = urlsplit(raw)
        query = parse_qs(parts.query, keep_blank_values=True)
        if parts.path.startswith("/api/storage/"):
            return self._file_list(parts.path[len("/api/storage/") :].strip("/"))
        if parts.path == "/service/rest/v1/search":
            return self._search({k: v[0] for k, v in query.items()})
        return 404, {"errors": [{"status": 404, "message": "Not Found"}]}

    def _file_list(self, folder: str) -> tuple[int, Any]:
        files = [
            {
                "uri": "/" + path[len(folder) + 1 :],
                "size": 3,
                "lastModified": modified,
                "folder": False,
                "sha1": hashlib.sha1(path.encode()).hexdigest(),
                "sha2": hashlib.sha256(path.encode()).hexdigest(),
            }
            for path, modified in self.files.items()
            if path.startswith(folder + "/") and "/" not in path[len(folder) + 1 :]
        ]
        if not files and not any(p.startswith(folder + "/") for p in self.files):
            return 404, {"errors": [{"status": 404, "message": "Unable to find item"}]}
        return 200, {"uri": f"{self.url}/api/storage/{folder}", "created": "", "files": files}

    def _search(self, q: dict[str, str]) -> tuple[int, Any]:
        repo = q.get("repository")
        items: list[dict[str, Any]] = []
        if "maven.groupId" in q:
            for m in self.maven:
                if (m["repository"], m["group"], m["name"]) != (
                    repo,
                    q["maven.groupId"],
                    q.get("maven.artifactId"),
                ) or q.get("maven.extension", m["ext"]) != m["ext"]:
                    continue
                path = (
                    f"{m['group'].replace('.', '/')}/{m['name']}/{m['version']}/"
                    f"{m['name']}-{m['version']}.{m['ext']}"
                )
                items.append(self._item(repo or "", "maven2", m["group"], m["name"], m, path))
        elif "group" in q:
            group = q["group"].strip("/")
            for path, modified in self.files.items():
                r, _, rest = path.partition("/")
                if r == repo and rest.startswith(group + "/"):
                    item = {"version": None, "modified": modified}
                    items.append(self._item(r, "raw", "/" + group, rest, item, rest))
        start = int(q.get("continuationToken") or 0)
        page = items[start : start + self.page_size]
        more = start + self.page_size < len(items)
        return 200, {
            "items": page,
            "continuationToken": str(start + self.page_size) if more else None,
        }

    def _item(
        self, repo: str, fmt: str, group: str, name: str, m: dict[str, Any], path: str
    ) -> dict[str, Any]:
        ident = hashlib.sha1(f"{repo}{path}".encode()).hexdigest()
        return {
            "id": ident,
            "repository": repo,
            "format": fmt,
            "group": group,
            "name": name,
            "version": m.get("version"),
            "assets": [
                {
                    "downloadUrl": f"{self.url}/repository/{repo}/{path}",
                    "path": path,
                    "id": ident,
                    "repository": repo,
                    "format": fmt,
                    "checksum": {"sha1": ident},
                    "lastModified": m["modified"],
                }
            ],
        }
