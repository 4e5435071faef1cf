"""A status endpoint on 127.0.0.1 for Http steps: every GET answers ``status`` with ``body``,
and the request lines it saw are kept in ``seen`` (path with its query string)::

    with StatusServer(port) as server:
        server.url                   # http://127.0.0.1:PORT/health
        server.seen                  # ["/health?build=42"]
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self


class StatusServer:
    def __init__(self, port: int, *, status: int = 200, body: str = "status: UP\n") -> None:
        self.status, self.body, self.seen = status, body.encode(), list[str]()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.seen.append(self.path)
                self.send_response(owner.status)
                self.send_header("Content-Length", str(len(owner.body)))
                self.end_headers()
                self.wfile.write(owner.body)

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
