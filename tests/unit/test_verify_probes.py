"""evaluate(): the pipeline's success criteria judged against measured numbers (error rate,
latency percentiles, Prometheus values), and the criteria it refuses. The checks and probes
that measure them run against real servers in tests/service/test_verify_probes.py.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from app.errors import ConfigError
from app.verify import evaluate
from app.verify import probes as probes_module
from tests.alloc import Allocator

# --------------------------------------------------------------------------------------------
# The injected clock


class Clock:
    """The ``time`` module as app.verify.probes sees it: time moves only when the code under
    test sleeps or a test server takes time (:meth:`advance`); ``real_sleep`` also waits for
    real, for the one test whose server must see a real idle gap."""

    def __init__(self, *, real_sleep: bool = False) -> None:
        self.now = 1024.0  # binary fractions below (0.125 s) add up exactly
        self.sleeps: list[float] = []
        self.real_sleep = real_sleep
        self.lock = threading.Lock()

    def monotonic(self) -> float:
        with self.lock:
            return self.now

    perf_counter = monotonic

    def time(self) -> float:
        return time.time()

    def sleep(self, seconds: float) -> None:
        with self.lock:
            self.sleeps.append(seconds)
            self.now += seconds
        if self.real_sleep:
            time.sleep(seconds)  # the behaviour under test: a real idle gap (see its test)

    def advance(self, seconds: float) -> None:
        with self.lock:
            self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    """A :class:`Clock` installed as app.verify.probes' ``time`` for one test."""
    fake = Clock()
    monkeypatch.setattr(probes_module, "time", fake)
    return fake


# --------------------------------------------------------------------------------------------
# Local servers


@dataclass
class Reply:
    status: int = 200
    body: str = "ok"
    takes: float = 0.0  # seconds the answer takes on the injected clock
    hang: bool = False  # answer only when the server closes (or after 30 s): a dead app
    content_type: str = "text/plain"


Respond = Callable[[int, str], Reply]  # (1-based request number, path) -> reply


class LocalServer:
    """An HTTP/1.1 server in a thread that counts requests and client connections."""

    def __init__(self, respond: Respond, host: str, *, idle_timeout: float | None = None,
                 clock: Clock | None = None) -> None:
        server = self
        self.hits = 0
        self.peers: set[tuple[str, int]] = set()
        self.lock = threading.Lock()
        self.closing = threading.Event()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, like a real app server
            timeout = idle_timeout  # closes idle keep-alive connections, like nginx/gunicorn

            def do_GET(self) -> None:
                with server.lock:
                    server.hits += 1
                    number = server.hits
                    server.peers.add(self.client_address)
                reply = respond(number, self.path)
                if reply.hang:
                    server.closing.wait(30)
                if reply.takes:
                    assert clock is not None, "Reply(takes=...) needs the server's clock"
                    clock.advance(reply.takes)
                body = reply.body.encode()
                self.send_response(reply.status)
                self.send_header("Content-Type", reply.content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer((host, 0), Handler)
        self.host: str = host
        self.port: int = self.httpd.server_address[1]
        self.url = f"http://{self.host}:{self.port}"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def close(self) -> None:
        self.closing.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


def always(reply: Reply) -> Respond:
    return lambda _n, _path: reply


# --------------------------------------------------------------------------------------------
# http_check


# --------------------------------------------------------------------------------------------
# probe


# --------------------------------------------------------------------------------------------
# prometheus_query

EXPORTER_METRICS = """\
# TYPE vmfarm_demo_up gauge
vmfarm_demo_up 1
# TYPE vmfarm_demo_requests_total counter
vmfarm_demo_requests_total{code="200"} 990
vmfarm_demo_requests_total{code="500"} 10
"""


@pytest.fixture(scope="module")
def exporter(alloc: Allocator) -> Iterator[str]:
    """A tiny Prometheus exporter: the application metrics a real Prometheus scrapes."""
    with alloc.addresses(1) as address:
        server = LocalServer(
            always(Reply(body=EXPORTER_METRICS, content_type="text/plain; version=0.0.4")),
            address.addresses[0],
        )
        yield f"{server.host}:{server.port}"
        server.close()


# --------------------------------------------------------------------------------------------
# evaluate

MEASURED = {
    "error_rate": 0.002,
    "p50_ms": 40.2,
    "p95_ms": 812.0,
    "p99_ms": 1200.0,
    "max_ms": 1500.0,
    "mean_ms": 90.0,
}


@pytest.mark.parametrize(
    ("criteria", "measured", "passed", "reasons"),
    [
        ({"errorRateBelow": "1%"}, {"error_rate": 0.125}, False, ["error rate 12.5% >= 1%"]),
        ({"errorRateBelow": 0.01}, MEASURED, True, ["error rate 0.2% < 1%"]),
        ({"error_rate_below": "0.5%"}, {"error_rate": 0.005}, False, ["error rate 0.5% >= 0.5%"]),
        (
            {"errorRateBelow": "1%"},
            {"error_rate": None},
            False,
            ["error rate not measured (no requests), threshold 1%"],
        ),
        ({"responseTimeBelow": 500}, MEASURED, False, ["p95 812 ms >= 500 ms"]),
        ({"response_time_below": "900ms"}, MEASURED, True, ["p95 812 ms < 900 ms"]),
        ({"responseTimeBelow": "1.5s"}, MEASURED, True, ["p95 812 ms < 1500 ms"]),
        ({"responseTimeBelow": {"p99": 500}}, MEASURED, False, ["p99 1200 ms >= 500 ms"]),
        (
            {"responseTimeBelow": {"p50": 50, "max": 1000}},
            MEASURED,
            False,
            ["max 1500 ms >= 1000 ms"],
        ),
        (
            {"responseTimeBelow": 500},
            {"p95_ms": None},
            False,
            ["p95 not measured (no successful request), threshold 500 ms"],
        ),
        (
            {"prometheus": {"query": "err", "below": 0.05}},
            {"prometheus": 0.07},
            False,
            ["err = 0.07 >= 0.05"],
        ),
        (
            {"prometheus": {"query": "up", "above": 0.9, "below": 1.5}},
            {"prometheus": 1.0},
            True,
            ["up = 1 > 0.9 and < 1.5"],
        ),
        (
            {"prometheus": [{"query": "a", "below": 1}, {"query": "b", "above": 5}]},
            {"prometheus": {"a": 0.5, "b": 2}},
            False,
            ["b = 2 <= 5"],
        ),
        (
            {"prometheus": {"query": "err", "below": 0.05}},
            {"prometheus": None},
            False,
            ["err: no data"],
        ),
        (
            {"prometheus": {"query": "err", "below": 0.05}},
            {"prometheus": float("nan")},
            False,
            ["err: no data"],
        ),
        (
            {"errorRateBelow": "1%", "responseTimeBelow": 500},
            MEASURED,
            False,
            ["p95 812 ms >= 500 ms"],
        ),
        (
            {"errorRateBelow": "1%", "responseTimeBelow": 900},
            MEASURED,
            True,
            ["error rate 0.2% < 1%", "p95 812 ms < 900 ms"],
        ),
        ({}, MEASURED, True, []),
    ],
)
def test_evaluate(
    criteria: dict[str, Any], measured: dict[str, Any], passed: bool, reasons: list[str]
) -> None:
    assert evaluate(criteria, measured) == (passed, reasons)


@pytest.mark.parametrize(
    ("criteria", "message"),
    [
        ({"errorRateBelo": "1%"}, "unknown success criterion 'errorRateBelo'"),
        ({"errorRateBelow": 5}, "not in 0..1; write a percentage as a string"),
        ({"errorRateBelow": "lots"}, "not a fraction"),
        ({"responseTimeBelow": {"p90": 100}}, "unknown statistic 'p90'"),
        ({"responseTimeBelow": "fast"}, "not a time"),
        ({"prometheus": {"query": "up"}}, "needs below and/or above"),
    ],
)
def test_evaluate_rejects_criteria_it_cannot_check(criteria: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        evaluate(criteria, MEASURED)
