"""A small artifact repository on 127.0.0.1 (a ThreadingHTTPServer on port 0).

It serves the files put in it with ``GET`` and ``HEAD``, answering like Artifactory or a
plain web server, with switches for the cases a fetcher must handle::

    with ArtifactServer(username="deploy", password="s3cret") as repo:
        repo.add("/libs/app/1.0/app-1.0.tar.gz", data)
        repo.url                     # http://127.0.0.1:PORT (https:// with tls_dir)
        repo.checksum_header = True  # send X-Checksum-Sha256 (Artifactory)
        repo.siblings = True         # serve <path>.sha256 ("<hex>  <name>")
        repo.corrupt = True          # send altered bytes (the checksums stay right)
        repo.fail_next("/libs/app/1.0/app-1.0.tar.gz", status=503)   # then 200
        repo.count("GET", "/libs/app/1.0/app-1.0.tar.gz")            # requests seen

With ``tls_dir`` it speaks https with a self-signed certificate made there (``ca_file``: trust
it with ``VMFARM_ARTIFACT_CA_BUNDLE`` on the worker, ``CURL_CA_BUNDLE`` for curl on a host).
Authentication, when ``username`` or ``token`` is set: HTTP basic or a bearer token; a request
without valid credentials gets 401 with ``WWW-Authenticate``. ``delay`` holds each GET body
that many seconds (so that concurrent clients overlap). ``redirects`` maps a path to a URL to
answer 302 with. Every request is recorded in ``log`` as (method, path, auth scheme or "").
"""

from __future__ import annotations

import base64
import hashlib
import ssl
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that drops the connection (or refuses the certificate) is not news."""


class ArtifactServer:
    def __init__(
        self,
        *,
        username: str | None = None,
        password: str | None = None,
        token: str | None = None,
        checksum_header: bool = False,
        siblings: bool = False,
        delay: float = 0.0,
        tls_dir: Path | None = None,
    ) -> None:
        self.username = username
        self.tls_dir = tls_dir
        self.ca_file: Path | None = None
        self.password = password
        self.token = token
        self.checksum_header = checksum_header
        self.siblings = siblings
        self.corrupt = False
        self.delay = delay
        self.files: dict[str, bytes] = {}
        self.redirects: dict[str, str] = {}
        self.log: list[tuple[str, str, str]] = []
        self._counts: Counter[tuple[str, str]] = Counter()
        self._failures: dict[tuple[str, str], list[int]] = {}
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- setup --------------------------------------------------------------------------------

    def add(self, path: str, data: bytes) -> str:
        """Serve ``data`` at ``path``; its full URL."""
        self.files[path] = data
        return self.url + path

    def fail_next(
        self, path: str, *, status: int = 503, times: int = 1, method: str = "GET"
    ) -> None:
        """Answer the next ``times`` ``method`` requests for ``path`` with ``status``."""
        with self._lock:
            self._failures.setdefault((method, path), []).extend([status] * times)

    def count(self, method: str, path: str) -> int:
        with self._lock:
            return self._counts[(method, path)]

    def reset_counts(self) -> None:
        with self._lock:
            self._counts.clear()
            self.log.clear()

    @property
    def url(self) -> str:
        assert self._server is not None, "start the server first"
        host, port = self._server.server_address[:2]
        return f"{'https' if self.tls_dir else 'http'}://{host!s}:{port}"

    def start(self) -> ArtifactServer:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                fake._handle(self, "GET")

            def do_HEAD(self) -> None:
                fake._handle(self, "HEAD")

        self._server = _QuietServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        if self.tls_dir is not None:
            from tests.fakes.azure_arm import make_self_signed_cert

            cert, key = make_self_signed_cert(self.tls_dir)
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(cert, key)
            self.ca_file = cert
            # The handshake happens in the request's thread, not in the accepting loop.
            self._server.socket = ctx.wrap_socket(
                self._server.socket, server_side=True, do_handshake_on_connect=False
            )
        self._thread = threading.Thread(
            target=self._server.serve_forever, daemon=True, name="fake-artifact-server"
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> ArtifactServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- answering ----------------------------------------------------------------------------

    def _authorized(self, header: str | None) -> bool:
        if self.username is None and self.token is None:
            return True
        if not header:
            return False
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and self.token is not None:
            return value == self.token
        if scheme.lower() == "basic" and self.username is not None:
            try:
                user, _, pw = base64.b64decode(value).decode().partition(":")
            except ValueError:
                return False
            return user == self.username and pw == (self.password or "")
        return False

    def _handle(self, req: BaseHTTPRequestHandler, method: str) -> None:
        path = unquote(urlsplit(req.path).path)
        auth = req.headers.get("Authorization")
        with self._lock:
            self._counts[(method, path)] += 1
            self.log.append((method, path, auth.split(" ", 1)[0] if auth else ""))
            queued = self._failures.get((method, path))
            failure = queued.pop(0) if queued else None
        if failure is not None:
            self._send(req, failure, b"temporarily unavailable\n", {}, method=method)
            return
        if path in self.redirects:
            self._send(req, 302, b"", {"Location": self.redirects[path]}, method=method)
            return
        if not self._authorized(auth):
            self._send(
                req,
                401,
                b"unauthorized\n",
                {"WWW-Authenticate": 'Basic realm="artifacts"'},
                method=method,
            )
            return
        data = self.files.get(path)
        headers: dict[str, str] = {"Content-Type": "application/octet-stream"}
        if (
            data is None
            and self.siblings
            and path.endswith(".sha256")
            and path.removesuffix(".sha256") in self.files
        ):
            base = path.removesuffix(".sha256")
            digest = hashlib.sha256(self.files[base]).hexdigest()
            data = f"{digest}  {base.rsplit('/', 1)[-1]}\n".encode()
            headers["Content-Type"] = "text/plain"
        elif data is not None:
            if self.checksum_header:
                headers["X-Checksum-Sha256"] = hashlib.sha256(data).hexdigest()
            if self.corrupt:
                data = bytes([data[0] ^ 0xFF]) + data[1:] if data else b"corrupt"
        if data is None:
            self._send(req, 404, b"not found\n", {}, method=method)
            return
        if method == "GET" and self.delay:
            # The behaviour under test: a slow download, so that the other hosts' fetches
            # arrive while it runs (nothing to poll: the server cannot see them wait).
            time.sleep(self.delay)
        self._send(req, 200, data, headers, method=method)

    @staticmethod
    def _send(
        req: BaseHTTPRequestHandler,
        status: int,
        body: bytes,
        headers: dict[str, str],
        *,
        method: str = "GET",
    ) -> None:
        req.send_response(status)
        for k, v in headers.items():
            req.send_header(k, v)
        req.send_header("Content-Length", str(len(body)))
        req.end_headers()
        if method != "HEAD":
            req.wfile.write(body)
