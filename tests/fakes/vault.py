"""A fake HashiCorp Vault (KV secrets engine version 2) on 127.0.0.1, for the vault backend.

It answers the KV v2 data paths with the shapes of Vault's HTTP API documentation::

    GET    /v1/<mount>/data/<path>[?version=N]   read: 200 {"data": {"data": {...},
                                                 "metadata": {"created_time", "custom_metadata",
                                                 "deletion_time", "destroyed", "version"}}, ...}
    POST   /v1/<mount>/data/<path>               write {"data": {...}}: 200 {"data": metadata}
    PUT    (same as POST)
    DELETE /v1/<mount>/data/<path>               soft-delete the latest version: 204

Authentication is ``X-Vault-Token``. A token maps to the path prefixes it may read
(``"<mount>/data/<prefix>"``, ``"*"`` for everything), standing in for a policy. A missing or
unknown token, or a path outside the token's prefixes, is ``403 {"errors": ["permission
denied"]}``. A secret that never existed is ``404 {"errors": []}``; a deleted latest version is
a 404 whose body still holds ``"data": null`` and the version's metadata, as Vault answers. A
path under a mount that does not exist is a 404 "no handler for route". ``fail(status, ...)``
injects answers (503 "Vault is sealed", ...). Every request is recorded in ``requests``.

Usage::

    with FakeVault(tokens={"s.root": ["*"]}) as vault:
        vault.put("secret", "app/db", {"password": "pw"})
        os.environ["VAULT_ADDR"] = vault.url       # http://127.0.0.1:PORT
"""

from __future__ import annotations

import json
import threading
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]


@dataclass
class Version:
    data: dict[str, Any] | None
    created: str
    deleted: str = ""
    destroyed: bool = False


@dataclass
class Fault:
    status: int
    errors: list[str]
    times: int | None = 1  # None: forever
    match: str = ""


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class FakeVault:
    tokens: dict[str, list[str]] = field(default_factory=lambda: {"root": ["*"]})
    mounts: set[str] = field(default_factory=lambda: {"secret"})
    requests: list[Recorded] = field(default_factory=list)
    store: dict[tuple[str, str], list[Version]] = field(default_factory=dict)
    faults: list[Fault] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- control ----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        assert self._server is not None, "not started"
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> FakeVault:
        fake = self

        class Handler(_Handler):
            vault = fake

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, daemon=True, name="fake-vault"
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeVault:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def put(self, mount: str, path: str, data: dict[str, Any]) -> int:
        """Write a new version; its number."""
        with self._lock:
            self.mounts.add(mount)
            versions = self.store.setdefault((mount, path.strip("/")), [])
            versions.append(Version(dict(data), _now()))
            return len(versions)

    def delete(self, mount: str, path: str) -> None:
        """Soft-delete the latest version (as ``vault kv delete``)."""
        with self._lock:
            self.store[(mount, path.strip("/"))][-1].deleted = _now()

    def fail(
        self,
        status: int,
        errors: list[str] | None = None,
        *,
        times: int | None = 1,
        match: str = "",
    ) -> None:
        """The next ``times`` requests whose path contains ``match`` get ``status``."""
        with self._lock:
            self.faults.append(Fault(status, errors or [], times, match))

    # -- answers ----------------------------------------------------------------------------

    def _fault(self, path: str) -> Fault | None:
        with self._lock:
            for f in self.faults:
                if f.match in path and (f.times is None or f.times > 0):
                    if f.times is not None:
                        f.times -= 1
                    return f
        return None

    def _allowed(self, token: str | None, mount: str, path: str) -> bool:
        prefixes = self.tokens.get(token or "")
        if prefixes is None:
            return False
        full = f"{mount}/data/{path}"
        return any(p == "*" or full.startswith(p) for p in prefixes)

    def answer(
        self, method: str, raw_path: str, query: dict[str, str], token: str | None, body: bytes
    ) -> tuple[int, dict[str, Any] | None]:
        fault = self._fault(raw_path)
        if fault is not None:
            return fault.status, {"errors": fault.errors}
        parts = raw_path.split("/")
        # "", "v1", mount..., "data", path...
        if len(parts) < 3 or parts[1] != "v1":
            return 404, {"errors": []}
        rest = parts[2:]
        if "data" not in rest:
            return 404, {
                "errors": [f'no handler for route "{"/".join(rest)}". route entry not found.']
            }
        i = rest.index("data")
        mount, path = "/".join(rest[:i]), "/".join(unquote(p) for p in rest[i + 1 :])
        if token not in self.tokens:
            return 403, {"errors": ["permission denied"]}
        if mount not in self.mounts:
            return 404, {
                "errors": [f'no handler for route "{mount}/data/{path}". route entry not found.']
            }
        if not self._allowed(token, mount, path):
            return 403, {"errors": ["1 error occurred:\n\t* permission denied\n\n"]}
        if method == "GET":
            return self._read(mount, path, query)
        if method in ("POST", "PUT"):
            try:
                data = json.loads(body or b"{}")["data"]
            except (ValueError, KeyError):
                return 400, {"errors": ["no data provided"]}
            version = self.put(mount, path, data)
            return 200, self._envelope(self._metadata(self.store[(mount, path)][-1], version))
        if method == "DELETE":
            if (mount, path) in self.store:
                self.delete(mount, path)
            return 204, None
        return 405, {"errors": ["unsupported operation"]}

    def _read(self, mount: str, path: str, query: dict[str, str]) -> tuple[int, dict[str, Any]]:
        with self._lock:
            versions = list(self.store.get((mount, path), []))
        if not versions:
            return 404, {"errors": []}
        n = int(query.get("version") or 0) or len(versions)
        if not 1 <= n <= len(versions):
            return 404, {"errors": []}
        v = versions[n - 1]
        meta = self._metadata(v, n)
        if v.deleted or v.destroyed:
            return 404, self._envelope({"data": None, "metadata": meta})
        return 200, self._envelope({"data": v.data, "metadata": meta})

    @staticmethod
    def _metadata(v: Version, n: int) -> dict[str, Any]:
        return {
            "created_time": v.created,
            "custom_metadata": None,
            "deletion_time": v.deleted,
            "destroyed": v.destroyed,
            "version": n,
        }

    @staticmethod
    def _envelope(data: dict[str, Any]) -> dict[str, Any]:
        return {
            "request_id": str(uuid.uuid4()),
            "lease_id": "",
            "renewable": False,
            "lease_duration": 0,
            "data": data,
            "wrap_info": None,
            "warnings": None,
            "auth": None,
            "mount_type": "kv",
        }


class _Handler(BaseHTTPRequestHandler):
    vault: FakeVault
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _handle(self) -> None:
        split = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        self.vault.requests.append(
            Recorded(
                self.command, split.path, query, {k.lower(): v for k, v in self.headers.items()}
            )
        )
        status, doc = self.vault.answer(
            self.command, split.path, query, self.headers.get("X-Vault-Token"), body
        )
        payload = b"" if doc is None else json.dumps(doc).encode()
        self.send_response(status)
        if payload:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_DELETE = _handle
