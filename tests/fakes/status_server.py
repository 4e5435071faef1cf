"""A status endpoint on 127.0.0.1 for Http steps: every GET answers ``status`` with ``body``,
and the request lines it saw are kept in ``seen`` (path with its query string), their headers
in ``headers``; with ``echo`` the body ends with the value of that request header::

    with StatusServer(port) as server:
        server.url                   # http://127.0.0.1:PORT/health
        server.seen                  # ["/health?build=42"]
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self


class StatusServer:
    def __init__(
        self, port: int, *, status: int = 200, body: str = "status: UP\n", echo: str | None = None
    ) -> None:
        self.status, self.body, self.seen = status, body.encode(), list[str]()
        self.headers: list[dict[str, str]] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.seen.append(self.path)
                owner.headers.append(dict(self.headers.items()))
                body = owner.body + (f"{self.headers.get(echo, '')}\n".encode() if echo else b"")
                self.send_response(owner.status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{port}/health"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
