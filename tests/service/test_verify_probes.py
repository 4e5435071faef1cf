"""Verification checks against real HTTP servers started here, and a real Prometheus.
(How the measured numbers are judged, ``evaluate``, is in tests/unit/test_verify_probes.py.)

Every server is a ``ThreadingHTTPServer`` in a thread, bound to a leased 127.0.1.x address (the
allocator's, tests/alloc.py) on a port the kernel picks, speaking HTTP/1.1 keep-alive as real
application servers do. Time is injected, never measured: the checks run on a :class:`Clock`
that stands in for the ``time`` module inside ``app.verify.probes``, so the waits between
attempts, a probe's deadline and the latencies it reports are exact numbers a test can assert
(a server "takes 125 ms" by moving that clock), and no assertion depends on how fast this
machine is. Prometheus is the Debian ``prometheus`` binary scraping a tiny exporter served here;
only when that binary is not installed (``apt-get install prometheus``) do the same tests run
against a stub that answers the documented ``/api/v1/query`` JSON shapes (copied from Prometheus
2.42's real answers). The test id says which one ran.
"""

from __future__ import annotations

import json
import pickle
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from app.errors import ConfigError, HostError, VerificationError
from app.verify import evaluate, http_check, probe, prometheus_query, tcp_check
from app.verify import probes as probes_module
from tests.alloc import AddressLease, Allocator
from tests.waiting import wait_for

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

    def __init__(
        self,
        respond: Respond,
        host: str,
        *,
        idle_timeout: float | None = None,
        clock: Clock | None = None,
    ) -> None:
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


@pytest.fixture
def serve(lease_addresses: Callable[[int], AddressLease]) -> Iterator[Callable[..., LocalServer]]:
    """Start servers, each on a leased 127.0.1.x address, for one test; all stop when it ends."""
    started: list[LocalServer] = []

    def start(
        respond: Respond, *, idle_timeout: float | None = None, clock: Clock | None = None
    ) -> LocalServer:
        server = LocalServer(
            respond, lease_addresses(1).addresses[0], idle_timeout=idle_timeout, clock=clock
        )
        started.append(server)
        return server

    yield start
    for server in started:
        server.close()


@pytest.fixture
def closed_port(lease_addresses: Callable[[int], AddressLease]) -> Iterator[tuple[str, int]]:
    """A port bound but not listening, on a leased address: connecting to it is refused, and
    nobody else takes it."""
    host = lease_addresses(1).addresses[0]
    sock = socket.socket()
    sock.bind((host, 0))
    yield host, sock.getsockname()[1]
    sock.close()


def always(reply: Reply) -> Respond:
    return lambda _n, _path: reply


# --------------------------------------------------------------------------------------------
# http_check


def test_healthy_endpoint_passes_on_first_attempt(
    serve: Callable[..., LocalServer], clock: Clock
) -> None:
    server = serve(always(Reply(body='{"status":"UP"}', content_type="application/json")))

    result = http_check(f"{server.url}/health", expect_body='"status":"UP"', interval=5)

    assert result.ok and result.error is None
    assert (result.attempts, result.status_code, server.hits) == (1, 200, 1)
    assert result.body_excerpt == '{"status":"UP"}'
    assert clock.sleeps == [] and result.elapsed_ms == 0  # no wait after a success
    assert json.loads(json.dumps(result.to_dict()))["target"] == f"{server.url}/health"


def test_wrong_status_fails_after_exactly_n_attempts_with_interval_between(
    serve: Callable[..., LocalServer], clock: Clock
) -> None:
    server = serve(always(Reply(status=503, body="warming up")))

    result = http_check(f"{server.url}/health", retries=3, interval=0.3)

    assert not result.ok
    assert result.attempts == 3 and server.hits == 3
    assert result.status_code == 503 and result.body_excerpt == "warming up"
    assert result.error == "HTTP 503, expected 200"
    # Two waits between three attempts, none after the last one; elapsed counts the waits.
    assert clock.sleeps == [0.3, 0.3]
    assert result.elapsed_ms == pytest.approx(600)


@pytest.mark.parametrize(
    ("body", "passes"),
    [
        ('{"status":"UP"}', True),
        ('{"status": "UP", "version": "1"}', True),
        ('{\n  "version": "1",\n  "status" : "UP"\n}', True),
        ('{"status": "DOWN", "components": {"db": {"status": "UP"}}}', False),
        ('{"status": "up"}', False),
        ("status: UP", False),
    ],
    ids=[
        "exact",
        "spaces-extra-keys",
        "pretty-printed",
        "nested-up-top-down",
        "lowercase",
        "not-json",
    ],
)
def test_expect_body_matches_json_regardless_of_spacing(
    serve: Callable[..., LocalServer], body: str, passes: bool
) -> None:
    server = serve(always(Reply(body=body, content_type="application/json")))

    fragment = http_check(server.url, expect_body='"status":"UP"', retries=1)
    whole = http_check(server.url, expect_body='{"status": "UP"}', retries=1)

    assert fragment.ok is passes and whole.ok is passes
    if not passes:
        assert fragment.error == 'body does not contain \'"status":"UP"\''


def test_body_regex_and_expected_statuses(serve: Callable[..., LocalServer]) -> None:
    server = serve(always(Reply(status=201, body='{"version": "1.4.2"}')))

    assert http_check(server.url, expect_status=(200, 201), body_regex=r'"1\.4\.\d+"').ok
    wrong = http_check(server.url, expect_status=201, body_regex=r'"1\.5\.', retries=1)
    assert wrong.error == 'body does not match /"1\\.5\\./'
    with pytest.raises(ConfigError, match="not a valid regular expression"):
        http_check(server.url, body_regex="(")


def test_server_that_becomes_healthy_on_third_try_passes(
    serve: Callable[..., LocalServer], clock: Clock
) -> None:
    server = serve(lambda n, _path: Reply(status=200 if n >= 3 else 503))

    result = http_check(server.url, retries=5, interval=0.1)

    assert result.ok and result.attempts == 3 and server.hits == 3
    assert clock.sleeps == [0.1, 0.1]


def test_unreachable_and_slow_endpoints_are_results_not_exceptions(
    serve: Callable[..., LocalServer], closed_port: tuple[str, int], clock: Clock
) -> None:
    host, port = closed_port
    refused = http_check(f"http://{host}:{port}/health", retries=2, interval=0.05)
    assert not refused.ok and refused.attempts == 2 and refused.status_code is None
    assert refused.error is not None and refused.error.startswith("connection refused")

    # A server that never answers (until it closes): the attempt's own timeout ends the check,
    # which would otherwise pass once the server answered at the end of the test.
    hung = serve(always(Reply(hang=True)))
    timed_out = http_check(hung.url, retries=1, timeout=0.2)
    assert not timed_out.ok and timed_out.status_code is None
    assert timed_out.error == "timed out after 0.2 s"

    with pytest.raises(ConfigError, match="not an http"):
        http_check(f"ftp://{host}/health")


def test_tcp_check_open_and_closed_ports(
    serve: Callable[..., LocalServer], closed_port: tuple[str, int], clock: Clock
) -> None:
    server = serve(always(Reply()))

    opened = tcp_check(server.host, server.port, retries=3, interval=0.5)
    assert opened.ok and opened.attempts == 1 and opened.kind == "tcp"
    assert opened.target == f"{server.host}:{server.port}"
    assert clock.sleeps == []

    host, port = closed_port
    closed = tcp_check(host, port, retries=3, interval=0.1)
    assert not closed.ok and closed.attempts == 3
    assert closed.error is not None and "connection refused" in closed.error
    assert clock.sleeps == [0.1, 0.1] and closed.elapsed_ms == pytest.approx(200)


# --------------------------------------------------------------------------------------------
# probe


def test_probe_measures_error_rate_over_kept_alive_connections(
    serve: Callable[..., LocalServer], clock: Clock
) -> None:
    # Every 4th request fails: 25% errors whatever the interleaving of the two client threads.
    # The clock stands still (no request takes time), so the cap of 40 requests ends the probe.
    server = serve(lambda n, _path: Reply(status=500 if n % 4 == 0 else 200))

    stats = probe(server.url, duration=1.0, concurrency=2, max_requests=40)

    assert stats.requests == server.hits == 40 and stats.capped
    assert stats.errors == 10 and stats.error_rate == 0.25
    assert stats.error_kinds == {"http_500": 10}
    # One persistent connection per thread: the probe measures the app, not TCP handshakes.
    assert stats.connections == 2 and len(server.peers) == 2

    ok, reasons = evaluate({"errorRateBelow": "1%"}, stats.to_dict())
    assert not ok and reasons[0].startswith("error rate 2") and reasons[0].endswith(">= 1%")


def test_probe_reports_latency_percentiles_of_a_slow_endpoint(
    serve: Callable[..., LocalServer], clock: Clock
) -> None:
    # Each answer takes 125 ms of the injected clock; with one client thread every request
    # measures exactly that, and the 1 s deadline passes after exactly 8 of them.
    server = serve(always(Reply(takes=0.125)), clock=clock)

    stats = probe(server.url, duration=1.0, concurrency=1)

    assert stats.errors == 0 and stats.error_rate == 0.0
    assert stats.requests == server.hits == 8 and not stats.capped
    for value in (stats.p50_ms, stats.p95_ms, stats.p99_ms, stats.max_ms, stats.mean_ms):
        assert value == 125
    # A response-time threshold is judged on the latency the probe reports: 125 ms against it.
    assert evaluate({"responseTimeBelow": 150}, stats.to_dict()) == (True, ["p95 125 ms < 150 ms"])
    assert evaluate({"responseTimeBelow": "100ms"}, stats.to_dict()) == (
        False,
        ["p95 125 ms >= 100 ms"],
    )


def test_probe_percentiles_rank_slow_and_fast_answers(
    serve: Callable[..., LocalServer], clock: Clock
) -> None:
    # Every 10th answer takes 900 ms, the others 10 ms: p50 is fast, p95 and max are the slow.
    server = serve(lambda n, _path: Reply(takes=0.9 if n % 10 == 0 else 0.01), clock=clock)

    stats = probe(server.url, duration=60, concurrency=1, max_requests=20)

    assert stats.requests == 20 and stats.capped
    assert stats.p50_ms == pytest.approx(10) and stats.p95_ms == pytest.approx(900)
    assert stats.max_ms == pytest.approx(900) and stats.mean_ms == pytest.approx(99)
    assert evaluate({"responseTimeBelow": {"p50": 100}}, stats.to_dict())[0]
    assert not evaluate({"responseTimeBelow": 500}, stats.to_dict())[0]


def test_probe_respects_duration_and_request_cap(
    serve: Callable[..., LocalServer], clock: Clock
) -> None:
    server = serve(always(Reply()))

    # One request every 0.5 s for 2 s: requests at 0, 0.5, 1 and 1.5 s, none at the deadline.
    timed = probe(server.url, duration=2.0, concurrency=1, interval=0.5)
    assert timed.requests == 4 and timed.duration_s == 2.0 and not timed.capped
    assert clock.sleeps == [0.5, 0.5, 0.5, 0.5]

    # The cap ends a probe long before its duration (the clock never moves here).
    capped = probe(server.url, duration=30, concurrency=3, max_requests=50)
    assert capped.requests == 50 and capped.capped and capped.duration_s == 0
    assert server.hits == timed.requests + 50


def test_probe_counts_connection_errors_and_timeouts_by_kind(
    serve: Callable[..., LocalServer], closed_port: tuple[str, int], clock: Clock
) -> None:
    host, port = closed_port
    refused = probe(f"http://{host}:{port}/", duration=0.375, interval=0.125)
    assert refused.requests == 3 and refused.error_rate == 1.0
    assert refused.error_kinds == {"connection_refused": 3}
    assert refused.p50_ms is None and refused.mean_ms is None

    # A server that never answers: each request ends by its own timeout, counted as such.
    hung = serve(always(Reply(hang=True)))
    timed_out = probe(hung.url, duration=30, timeout=0.1, max_requests=3)
    assert timed_out.requests == 3 and timed_out.error_kinds == {"timeout": 3}
    assert timed_out.p50_ms is None


def test_probe_survives_server_closing_idle_keepalive_connections(
    serve: Callable[..., LocalServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The server drops connections idle for 0.1 s; the probe pauses 0.25 s between requests
    # (really: the server's idle timeout runs on real time), so every reused connection is
    # stale. That is the server's policy, not an app error.
    monkeypatch.setattr(probes_module, "time", Clock(real_sleep=True))
    server = serve(always(Reply()), idle_timeout=0.1)

    stats = probe(server.url, duration=1.0, interval=0.25)

    assert stats.requests == 4 and stats.errors == 0, stats.error_kinds
    assert stats.connections == 4 and server.hits == 4


# --------------------------------------------------------------------------------------------
# prometheus_query

EXPORTER_METRICS = """\
# TYPE vmfarm_demo_up gauge
vmfarm_demo_up 1
# TYPE vmfarm_demo_requests_total counter
vmfarm_demo_requests_total{code="200"} 990
vmfarm_demo_requests_total{code="500"} 10
"""
ERROR_RATIO = 'sum(vmfarm_demo_requests_total{code="500"}) / sum(vmfarm_demo_requests_total)'


def _stub_prometheus_answer(query: str, at: float | None) -> tuple[int, dict[str, Any]]:
    """The documented /api/v1/query answers, for the queries the tests below send."""
    now = time.time()
    series: dict[str, list[tuple[dict[str, str], str]]] = {
        "vmfarm_demo_up": [({"__name__": "vmfarm_demo_up", "job": "demo"}, "1")],
        ERROR_RATIO: [({}, "0.01")],
        "vmfarm_demo_requests_total": [
            ({"__name__": "vmfarm_demo_requests_total", "code": code}, value)
            for code, value in (("200", "990"), ("500", "10"))
        ],
        "vmfarm_missing_metric": [],
    }
    if query == "scalar(vmfarm_demo_up)":
        return 200, {"status": "success", "data": {"resultType": "scalar", "result": [now, "1"]}}
    if query == "vmfarm_demo_up[1m]":
        result = [{"metric": {"__name__": "vmfarm_demo_up"}, "values": [[now, "1"]]}]
        return 200, {"status": "success", "data": {"resultType": "matrix", "result": result}}
    if query in series:
        found = series[query] if at is None or at > now - 300 else []
        vector = [{"metric": m, "value": [at or now, v]} for m, v in found]
        return 200, {"status": "success", "data": {"resultType": "vector", "result": vector}}
    return 400, {
        "status": "error",
        "errorType": "bad_data",
        "error": f'invalid parameter "query": 1:5: parse error in {query!r}',
    }


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


@pytest.fixture(scope="module")
def real_prometheus(
    exporter: str, tmp_path_factory: pytest.TempPathFactory, alloc: Allocator
) -> Iterator[str]:
    """The Debian prometheus binary on 127.0.0.1, scraping the exporter every 200 ms."""
    work: Path = tmp_path_factory.mktemp("prometheus")
    config = work / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 200ms, scrape_timeout: 150ms}\n"
        f"scrape_configs:\n  - job_name: demo\n    static_configs: [{{targets: ['{exporter}']}}]\n"
    )
    lease = alloc.port()
    port = lease.port
    log = (work / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={config}",
            f"--storage.tsdb.path={work / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        # Ready means "has scraped once"; Prometheus 2.42 waits ~5 s before its first scrape.
        def scraped() -> bool:
            assert proc.poll() is None, f"prometheus exited with {proc.returncode}"
            try:
                return prometheus_query(url, "vmfarm_demo_up", timeout=1) == 1.0
            except VerificationError:
                return False

        def tail() -> str:
            log.flush()
            return (work / "prometheus.log").read_text()[-2000:]

        wait_for(scraped, 30, "prometheus to scrape the exporter", interval=0.2, explain=tail)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        lease.release()


@pytest.fixture(scope="module")
def stub_prometheus(alloc: Allocator) -> Iterator[str]:
    """Stands in for Prometheus only where the binary is not installed (see module docstring)."""
    server = None

    def respond(_n: int, path: str) -> Reply:
        params = parse_qs(urlsplit(path).query)
        at = float(params["time"][0]) if "time" in params else None
        status, doc = _stub_prometheus_answer(params["query"][0], at)
        return Reply(status=status, body=json.dumps(doc), content_type="application/json")

    with alloc.addresses(1) as address:
        server = LocalServer(respond, address.addresses[0])
        yield server.url
        server.close()


PROMETHEUS_BACKEND = "real-prometheus" if shutil.which("prometheus") else "stub-prometheus"


@pytest.fixture(scope="module", params=[PROMETHEUS_BACKEND])
def prometheus_url(request: pytest.FixtureRequest) -> str:
    """A real Prometheus when installed, else the stub; the test id names the one used."""
    fixture = "real_prometheus" if request.param == "real-prometheus" else "stub_prometheus"
    url: str = request.getfixturevalue(fixture)
    return url


def test_prometheus_single_series_scalar_and_expression(prometheus_url: str) -> None:
    assert prometheus_query(prometheus_url, "vmfarm_demo_up") == 1.0
    assert prometheus_query(prometheus_url, "scalar(vmfarm_demo_up)") == 1.0
    assert prometheus_query(prometheus_url, ERROR_RATIO) == pytest.approx(0.01)
    # A trailing slash on the base URL is fine.
    assert prometheus_query(prometheus_url + "/", "vmfarm_demo_up", at=time.time()) == 1.0


def test_prometheus_empty_result_is_none(prometheus_url: str) -> None:
    assert prometheus_query(prometheus_url, "vmfarm_missing_metric") is None
    # An hour ago there was no data yet: `at` is sent as the evaluation time.
    assert prometheus_query(prometheus_url, "vmfarm_demo_up", at=time.time() - 3600) is None


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("vmfarm_demo_requests_total", "returned 2 series .* aggregate it"),
        ("vmfarm_demo_up[1m]", "returned a matrix"),
        ("sum(", r"failed \(HTTP 400\): bad_data: .*parse error"),
    ],
    ids=["several-series", "range-vector", "syntax-error"],
)
def test_prometheus_ambiguous_or_bad_query_raises_naming_it(
    prometheus_url: str, query: str, message: str
) -> None:
    with pytest.raises(VerificationError, match=message) as caught:
        prometheus_query(prometheus_url, query)
    assert repr(query) in str(caught.value)
    assert caught.value.error_class == "Verification" and isinstance(caught.value, HostError)
    assert str(pickle.loads(pickle.dumps(caught.value))) == str(caught.value)


def test_prometheus_unreachable_or_not_prometheus(
    serve: Callable[..., LocalServer], closed_port: tuple[str, int]
) -> None:
    host, port = closed_port
    with pytest.raises(VerificationError, match=r"cannot reach Prometheus .* connection refused"):
        prometheus_query(f"http://{host}:{port}", "up", timeout=1)

    # A proxy's HTML error page, which no running Prometheus can be made to send: served here.
    proxy = serve(always(Reply(status=502, body="<html>Bad Gateway</html>")))
    with pytest.raises(VerificationError, match="HTTP 502 with a non-JSON body"):
        prometheus_query(proxy.url, "up")


# --------------------------------------------------------------------------------------------
# evaluate
