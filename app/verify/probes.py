"""Verification checks: health checks, load probes, Prometheus queries, and threshold evaluation.

Each function runs synchronously on the region worker next to the hosts and returns a small
JSON-able result (``to_dict()``); the gate compares the numbers with the pipeline's thresholds
through :func:`evaluate`. Nothing here imports Celery or touches SQL.

All HTTP goes through :mod:`http.client`, not urllib: urllib follows redirects and honours
``http_proxy`` variables, and a health check must talk to the host it names, nothing else.

Expected failures (a wrong status, a refused connection, a timeout) are data in the result, never
exceptions: the gate always gets a verdict. Exceptions are for bad arguments (:class:`ConfigError`)
and for a Prometheus query that cannot give one number (:class:`VerificationError`).
"""

from __future__ import annotations

import http.client
import json
import math
import re
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlencode, urlsplit

from app.errors import ConfigError, VerificationError

#: Bytes of a response body read for matching; a health endpoint answering more is misbehaving.
BODY_READ_LIMIT = 1024 * 1024
#: Characters of the body kept in a CheckResult (it is stored in SQL and shown in the CLI).
BODY_EXCERPT_CHARS = 512
#: Hard cap on the requests one probe sends, whatever its duration and concurrency.
PROBE_MAX_REQUESTS = 10_000
#: More threads than this would measure the worker, not the application.
PROBE_MAX_CONCURRENCY = 256
USER_AGENT = "vmfarm-verify/0.1"

_NO_JSON = object()


# --------------------------------------------------------------------------------------------
# Results


@dataclass
class CheckResult:
    """The outcome of one health check (all attempts).

    ``elapsed_ms`` is the wall time of the whole check, waits between attempts included;
    ``status_code``, ``body_excerpt`` and ``error`` describe the last attempt.
    """

    ok: bool
    kind: str
    target: str
    attempts: int
    status_code: int | None = None
    elapsed_ms: float = 0.0
    body_excerpt: str = ""
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The result as a JSON-able dict."""
        return asdict(self)


@dataclass
class ProbeStats:
    """What a load probe measured. Latencies are over successful requests only, in ms.

    ``error_rate`` and the latencies are None when there is nothing to compute them from
    (no request sent, no request succeeded): "no data" is not "0 errors".
    """

    target: str
    duration_s: float
    concurrency: int
    requests: int
    errors: int
    error_rate: float | None
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    max_ms: float | None
    mean_ms: float | None
    error_kinds: dict[str, int] = field(default_factory=dict)
    connections: int = 0
    capped: bool = False

    def to_dict(self) -> dict[str, Any]:
        """The stats as a JSON-able dict; its keys are the ones :func:`evaluate` reads."""
        return asdict(self)


# --------------------------------------------------------------------------------------------
# Plumbing shared by the checks


@dataclass(frozen=True)
class _Target:
    scheme: str
    host: str
    port: int
    path: str

    def connection(self, timeout: float) -> http.client.HTTPConnection:
        if self.scheme == "https":
            return http.client.HTTPSConnection(self.host, self.port, timeout=timeout)
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout)


def _parse_url(url: str) -> _Target:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(
            f"not an http(s) URL: {url!r} (expected e.g. http://10.0.0.5:8080/health)"
        )
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise ConfigError(f"bad port in URL {url!r}: {exc}") from None
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return _Target(parts.scheme, parts.hostname, port, path)


def _statuses(expect_status: int | Iterable[int]) -> frozenset[int]:
    codes = frozenset([expect_status] if isinstance(expect_status, int) else expect_status)
    if not codes:
        raise ConfigError("expect_status is empty: name at least one HTTP status")
    return codes


def _check_counts(retries: int, interval: float, timeout: float) -> None:
    if retries < 1:
        raise ConfigError(f"retries must be at least 1 (it counts attempts), got {retries}")
    if interval < 0 or timeout <= 0:
        raise ConfigError(f"interval must be >= 0 and timeout > 0, got {interval} and {timeout}")


def _classify(exc: BaseException, timeout: float) -> tuple[str, str]:
    """Map a transport exception to (kind, message); kinds are the keys of error_kinds."""
    # Order matters: TimeoutError and the ssl/connection errors are all OSError subclasses,
    # and RemoteDisconnected is both a ConnectionResetError and an HTTPException.
    if isinstance(exc, TimeoutError):
        return "timeout", f"timed out after {timeout:g} s"
    if isinstance(exc, ConnectionRefusedError):
        return "connection_refused", "connection refused (is the application listening?)"
    if isinstance(exc, ConnectionResetError | BrokenPipeError):
        return "connection_reset", f"connection closed by the server ({exc})"
    if isinstance(exc, socket.gaierror):
        return "dns", f"cannot resolve host ({exc})"
    if isinstance(exc, ssl.SSLError):
        return "tls", f"TLS error ({exc})"
    if isinstance(exc, http.client.HTTPException):
        return "protocol", f"bad HTTP response ({type(exc).__name__}: {exc})"
    if isinstance(exc, OSError):
        return "network", f"network error ({exc})"
    return "other", f"{type(exc).__name__}: {exc}"


def _read_bounded(resp: http.client.HTTPResponse, limit: int, deadline: float) -> bytes:
    # The socket timeout applies per read; the deadline stops a server that drips bytes forever.
    chunks: list[bytes] = []
    size = 0
    while size < limit:
        if time.monotonic() > deadline:
            raise TimeoutError("body not received in time")
        chunk = resp.read(min(65536, limit - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


# --------------------------------------------------------------------------------------------
# Body matching


def _parse_expectation(expect_body: str) -> dict[str, Any] | None:
    """The expectation as a JSON object, or None. A bare ``"k": v`` is read as ``{"k": v}``."""
    for candidate in (expect_body, "{" + expect_body + "}"):
        try:
            parsed = json.loads(candidate)
        except ValueError:
            continue
        return parsed if isinstance(parsed, dict) else None
    return None


def _json_contains(actual: Any, expected: Any) -> bool:
    """Objects match when every expected key matches (extra keys ignored); others must be equal."""
    if isinstance(expected, dict):
        return isinstance(actual, dict) and all(
            key in actual and _json_contains(actual[key], value) for key, value in expected.items()
        )
    if isinstance(expected, list):
        return (
            isinstance(actual, list)
            and len(actual) == len(expected)
            and all(_json_contains(a, e) for a, e in zip(actual, expected, strict=True))
        )
    # JSON true is not 1: Python's True == 1 would make {"ok": 1} match {"ok": true}.
    if isinstance(expected, bool) or isinstance(actual, bool):
        return type(actual) is type(expected) and actual == expected
    return bool(actual == expected)


def body_matches(body: str, expect_body: str) -> bool:
    """True if the body contains ``expect_body``: as a JSON subset for JSON, else as text.

    The rule: when the expectation is a JSON object, or a bare ``"key": value`` fragment (read
    as ``{"key": value}``), and the body is a JSON document, the expectation matches when every
    key it names is present at the top level of the body with an equal value, at any spacing
    and key order, extra keys ignored; nested objects are compared the same way, arrays and
    scalars by equality. So ``"status":"UP"`` matches ``{"status": "UP", "version": "1"}``, and,
    unlike ``grep``, a component's nested ``"status": "UP"`` does not make a top-level
    ``"status": "DOWN"`` pass. In every other case it is a plain substring test.
    """
    expected = _parse_expectation(expect_body)
    if expected is not None:
        try:
            actual = json.loads(body)
        except ValueError:
            actual = _NO_JSON
        if actual is not _NO_JSON:
            return _json_contains(actual, expected)
    return expect_body in body


# --------------------------------------------------------------------------------------------
# Health checks


def http_check(
    url: str,
    *,
    method: str = "GET",
    expect_status: int | Iterable[int] = (200,),
    expect_body: str | None = None,
    body_regex: str | None = None,
    retries: int = 3,
    interval: float = 1.0,
    timeout: float = 5.0,
    headers: Mapping[str, str] | None = None,
) -> CheckResult:
    """Request ``url`` until it answers as expected or ``retries`` attempts have failed.

    ``retries`` is the total number of attempts (the reference script's MAX_RETRIES), with
    ``interval`` seconds between them; ``timeout`` bounds each attempt. Redirects are not
    followed: a 301 is a status like any other. ``expect_body`` follows :func:`body_matches`;
    ``body_regex`` is searched (``re.search``) in the decoded body. Each attempt opens a new
    connection, as a load balancer's health check does.
    """
    target = _parse_url(url)
    codes = _statuses(expect_status)
    _check_counts(retries, interval, timeout)
    try:
        pattern = re.compile(body_regex) if body_regex is not None else None
    except re.error as exc:
        raise ConfigError(
            f"body_regex {body_regex!r} is not a valid regular expression: {exc}"
        ) from None
    send_headers = {"User-Agent": USER_AGENT, "Accept": "*/*", **(headers or {})}

    started = time.monotonic()
    status: int | None = None
    excerpt = ""
    error: str | None = None
    attempt = 0
    for attempt in range(1, retries + 1):
        status, excerpt, error = None, "", None
        conn = target.connection(timeout)
        try:
            conn.request(method, target.path, headers=send_headers)
            resp = conn.getresponse()
            status = resp.status
            raw = _read_bounded(resp, BODY_READ_LIMIT, time.monotonic() + timeout)
            text = raw.decode(resp.headers.get_content_charset() or "utf-8", errors="replace")
            excerpt = text[:BODY_EXCERPT_CHARS]
            if status not in codes:
                error = f"HTTP {status}, expected {' or '.join(map(str, sorted(codes)))}"
            elif expect_body is not None and not body_matches(text, expect_body):
                error = f"body does not contain {expect_body!r}"
            elif pattern is not None and not pattern.search(text):
                error = f"body does not match /{pattern.pattern}/"
        except (OSError, http.client.HTTPException) as exc:
            error = _classify(exc, timeout)[1]
        except LookupError:  # an unknown charset name in Content-Type
            error = "response declares an unknown charset"
        finally:
            conn.close()
        if error is None:
            break
        if attempt < retries:
            time.sleep(interval)
    return CheckResult(
        ok=error is None,
        kind="http",
        target=url,
        attempts=attempt,
        status_code=status,
        elapsed_ms=round((time.monotonic() - started) * 1000, 3),
        body_excerpt=excerpt,
        error=error,
    )


def tcp_check(
    host: str, port: int, *, retries: int = 3, interval: float = 1.0, timeout: float = 5.0
) -> CheckResult:
    """Open a TCP connection to ``host:port`` until it succeeds or ``retries`` attempts fail."""
    _check_counts(retries, interval, timeout)
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    started = time.monotonic()
    error: str | None = None
    attempt = 0
    for attempt in range(1, retries + 1):
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            error = None
            break
        except OSError as exc:
            error = _classify(exc, timeout)[1]
        if attempt < retries:
            time.sleep(interval)
    return CheckResult(
        ok=error is None,
        kind="tcp",
        target=target,
        attempts=attempt,
        elapsed_ms=round((time.monotonic() - started) * 1000, 3),
        error=error,
    )


# --------------------------------------------------------------------------------------------
# Load probe


@dataclass
class _WorkerTally:
    latencies: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    connections: int = 0


class _Budget:
    """Hands out request slots until the deadline passes or the cap is reached (thread-safe)."""

    def __init__(self, deadline: float, cap: int) -> None:
        self.deadline = deadline
        self.cap = cap
        self.issued = 0
        self._lock = threading.Lock()

    def take(self) -> bool:
        with self._lock:
            if self.issued >= self.cap or time.monotonic() >= self.deadline:
                return False
            self.issued += 1
            return True


def _probe_worker(
    target: _Target,
    budget: _Budget,
    tally: _WorkerTally,
    *,
    codes: frozenset[int],
    interval: float,
    timeout: float,
) -> None:
    headers = {"User-Agent": USER_AGENT, "Accept": "*/*"}
    conn = target.connection(timeout)
    try:
        while budget.take():
            started = time.perf_counter()
            try:
                status = _request_reusing(conn, target.path, headers, tally)
            except (OSError, http.client.HTTPException) as exc:
                # The connection's state is unknown after a failure: start the next one afresh.
                conn.close()
                tally.errors[_classify(exc, timeout)[0]] += 1
            else:
                if status in codes:
                    tally.latencies.append((time.perf_counter() - started) * 1000)
                else:
                    tally.errors[f"http_{status}"] += 1
            if interval > 0:
                time.sleep(max(0.0, min(interval, budget.deadline - time.monotonic())))
    finally:
        conn.close()


def _request_reusing(
    conn: http.client.HTTPConnection, path: str, headers: dict[str, str], tally: _WorkerTally
) -> int:
    """Send one GET on the kept-alive connection and return the status, body fully read.

    A server may close an idle keep-alive connection at any moment; when a *reused* connection
    fails before any response, the request is sent once more on a new one (as urllib3 does), so
    the server's keep-alive timeout does not show up as application errors.
    """
    for fresh_retry in (False, True):
        reused = conn.sock is not None
        if not reused:
            tally.connections += 1
        try:
            conn.request("GET", path, headers=headers)
            resp = conn.getresponse()
            resp.read()  # drain it, or the connection cannot carry the next request
            return resp.status
        except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
            if not reused or fresh_retry:
                raise
            conn.close()
    raise AssertionError("unreachable")  # pragma: no cover


def _percentile(ordered: list[float], pct: float) -> float:
    # Nearest-rank: the smallest measured value with at least pct% of values at or below it,
    # so every reported percentile is a latency that some request really had.
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


def probe(
    url: str,
    *,
    duration: float,
    concurrency: int = 1,
    interval: float = 0.0,
    timeout: float = 2.0,
    expect_status: int | Iterable[int] = (200,),
    max_requests: int = PROBE_MAX_REQUESTS,
) -> ProbeStats:
    """Send GET requests to ``url`` for ``duration`` seconds and report errors and latencies.

    ``concurrency`` threads each keep one persistent HTTP/1.1 connection (http.client) and send
    requests back to back, pausing ``interval`` seconds between their own requests, so the
    numbers measure the application, not TCP setup (``connections`` in the result says how many
    were opened). It stops at the deadline or after ``max_requests`` requests (hard cap
    ``PROBE_MAX_REQUESTS``), whichever comes first; a request in flight at the deadline is
    finished, so the probe can run up to ``timeout`` longer. An error is a status not in
    ``expect_status``, a connection failure or a timeout; ``error_kinds`` counts them by kind
    (``http_503``, ``timeout``, ``connection_refused``, ...). Percentiles are nearest-rank.
    """
    target = _parse_url(url)
    codes = _statuses(expect_status)
    if duration <= 0 or timeout <= 0 or interval < 0:
        raise ConfigError("probe needs duration > 0, timeout > 0 and interval >= 0")
    if not 1 <= concurrency <= PROBE_MAX_CONCURRENCY:
        raise ConfigError(f"concurrency must be 1..{PROBE_MAX_CONCURRENCY}, got {concurrency}")
    cap = min(max(1, max_requests), PROBE_MAX_REQUESTS)

    started = time.monotonic()
    budget = _Budget(started + duration, cap)
    tallies = [_WorkerTally() for _ in range(concurrency)]
    threads = [
        threading.Thread(
            target=_probe_worker,
            args=(target, budget, tally),
            kwargs={"codes": codes, "interval": interval, "timeout": timeout},
            name=f"vmfarm-probe-{i}",
            daemon=True,
        )
        for i, tally in enumerate(tallies)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.monotonic() - started

    latencies = sorted(lat for t in tallies for lat in t.latencies)
    kinds: Counter[str] = Counter()
    for t in tallies:
        kinds.update(t.errors)
    errors = sum(kinds.values())
    requests = len(latencies) + errors

    def ms(value: float | None) -> float | None:
        return None if value is None else round(value, 3)

    return ProbeStats(
        target=url,
        duration_s=round(wall, 3),
        concurrency=concurrency,
        requests=requests,
        errors=errors,
        error_rate=round(errors / requests, 6) if requests else None,
        p50_ms=ms(_percentile(latencies, 50)) if latencies else None,
        p95_ms=ms(_percentile(latencies, 95)) if latencies else None,
        p99_ms=ms(_percentile(latencies, 99)) if latencies else None,
        max_ms=ms(latencies[-1]) if latencies else None,
        mean_ms=ms(sum(latencies) / len(latencies)) if latencies else None,
        error_kinds=dict(sorted(kinds.items())),
        connections=sum(t.connections for t in tallies),
        capped=budget.issued >= cap,
    )


# --------------------------------------------------------------------------------------------
# Prometheus


def prometheus_query(
    base_url: str, query: str, *, timeout: float = 5.0, at: float | None = None
) -> float | None:
    """Run an instant PromQL query and return its one number, or None if it returned no series.

    Uses the HTTP API ``GET <base_url>/api/v1/query`` (``at`` is a Unix time, default now). A
    scalar or a vector of exactly one series gives its value (``NaN`` and ``±Inf`` come back as
    floats); an empty vector gives None. Several series, a range vector, a string, an API error
    or an unreachable server raise :class:`VerificationError` naming the query.
    """
    target = _parse_url(base_url.rstrip("/") + "/api/v1/query")
    params: dict[str, str] = {"query": query}
    if at is not None:
        params["time"] = f"{at:.3f}"
    path = target.path.split("?", 1)[0] + "?" + urlencode(params)

    conn = target.connection(timeout)
    try:
        conn.request("GET", path, headers={"User-Agent": USER_AGENT, "Accept": "application/json"})
        resp = conn.getresponse()
        raw = _read_bounded(resp, 8 * BODY_READ_LIMIT, time.monotonic() + timeout)
        status = resp.status
    except (OSError, http.client.HTTPException) as exc:
        reason = _classify(exc, timeout)[1]
        raise VerificationError(
            f"cannot reach Prometheus at {base_url} for query {query!r}: {reason}"
        ) from None
    finally:
        conn.close()

    try:
        doc = json.loads(raw)
    except ValueError:
        raise VerificationError(
            f"Prometheus at {base_url} answered HTTP {status} with a non-JSON body for query "
            f"{query!r}: {raw[:200].decode('utf-8', 'replace')!r} (is base_url the Prometheus "
            f"server, without /api/v1?)"
        ) from None
    if not isinstance(doc, dict) or doc.get("status") != "success":
        detail = doc if not isinstance(doc, dict) else f"{doc.get('errorType')}: {doc.get('error')}"
        raise VerificationError(f"Prometheus query {query!r} failed (HTTP {status}): {detail}")

    data = doc.get("data")
    kind = data.get("resultType") if isinstance(data, dict) else None
    result: Any = data.get("result") if isinstance(data, dict) else None
    try:
        if kind == "scalar":
            return float(result[1])
        if kind == "vector":
            if not result:
                return None
            if len(result) > 1:
                labels = ", ".join(_labels(s.get("metric", {})) for s in result[:3])
                more = ", ..." if len(result) > 3 else ""
                raise VerificationError(
                    f"Prometheus query {query!r} returned {len(result)} series ({labels}{more}); "
                    f"a gate needs one number: aggregate it, e.g. sum(...) or max(...)"
                )
            return float(result[0]["value"][1])
    except (LookupError, TypeError, ValueError):
        raise VerificationError(
            f"Prometheus query {query!r}: unexpected {kind} result shape: {str(result)[:200]}"
        ) from None
    raise VerificationError(
        f"Prometheus query {query!r} returned a {kind}; a gate needs an instant vector or a "
        f"scalar (drop the [range] selector or wrap it, e.g. rate(...[5m]))"
    )


def _labels(metric: Mapping[str, str]) -> str:
    name = metric.get("__name__", "")
    rest = ",".join(f'{k}="{v}"' for k, v in sorted(metric.items()) if k != "__name__")
    return f"{name}{{{rest}}}"


# --------------------------------------------------------------------------------------------
# Thresholds

_PERCENTILE_KEYS = ("p50", "p95", "p99", "max", "mean")
_ALIASES = {
    # The reference's success_criteria are written in snake_case; pipeline files use camelCase.
    "error_rate_below": "errorRateBelow",
    "response_time_below": "responseTimeBelow",
}


def _fraction(value: Any, key: str) -> float:
    """``0.01``, ``"0.01"`` or ``"1%"`` -> 0.01."""
    text = str(value).strip()
    try:
        number = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise ConfigError(
            f"{key}: {value!r} is not a fraction (0.01) or a percentage ('1%')"
        ) from None
    if not 0 <= number <= 1:
        raise ConfigError(f"{key}: {value!r} is not in 0..1; write a percentage as a string: '5%'")
    return number


def _millis(value: Any, key: str) -> float:
    """``500``, ``"500ms"``, ``"0.5s"`` -> 500.0."""
    text = str(value).strip().lower()
    scale = 1.0
    if text.endswith("ms"):
        text = text[:-2]
    elif text.endswith("s"):
        text, scale = text[:-1], 1000.0
    try:
        number = float(text) * scale
    except ValueError:
        raise ConfigError(f"{key}: {value!r} is not a time (500, '500ms' or '0.5s')") from None
    if number <= 0:
        raise ConfigError(f"{key}: {value!r} must be positive")
    return number


def _number(value: Any, key: str) -> float:
    if isinstance(value, bool):
        raise ConfigError(f"{key}: {value!r} is not a number")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: {value!r} is not a number") from None


def _pct(value: float) -> str:
    return f"{value * 100:.3g}%"


def _ms(value: float) -> str:
    return f"{value:.0f} ms" if value >= 10 else f"{value:.3g} ms"


def _as_number(value: Any) -> float | None:
    """A measurement as a float; None, NaN and non-numbers are "no data"."""
    if value is None or isinstance(value, bool):
        return None
    number = float(value)
    return None if math.isnan(number) else number


def evaluate(criteria: Mapping[str, Any], measured: Mapping[str, Any]) -> tuple[bool, list[str]]:
    """Compare measured numbers with success criteria; return (passed, reasons for the verdict).

    ``criteria`` keys (snake_case aliases from the reference accepted)::

        errorRateBelow: "1%"            # or 0.01; passes when error_rate < threshold
        responseTimeBelow: 500          # ms on p95; or "500ms", "0.5s", or {p99: 800, max: 2000}
        prometheus: {query: "...", below: 0.05}    # and/or above:; or a list of these

    ``measured`` is a :meth:`ProbeStats.to_dict` (``error_rate``, ``p95_ms``, ...), plus
    ``prometheus``: the value of the one query, or a mapping query -> value.

    The reasons justify the verdict: on failure, one line per failed check ("error rate 12.5%
    >= 1%", "p95 812 ms >= 500 ms"); on a pass, one line per check, so the audit trail says
    why it passed ("error rate 0.2% < 1%"). Each names the number and the threshold, in
    criteria order. An empty ``criteria`` passes with no reasons. A missing, None or NaN
    measurement fails its check: no data is not a pass. Unknown criteria keys raise
    :class:`ConfigError` (a typo must not turn a gate off).
    """
    checks: list[tuple[bool, str]] = []
    for raw_key, spec in criteria.items():
        key = _ALIASES.get(raw_key, raw_key)
        if key == "errorRateBelow":
            checks.append(_check_error_rate(_fraction(spec, raw_key), measured))
        elif key == "responseTimeBelow":
            checks.extend(_check_latency(spec, raw_key, measured))
        elif key == "prometheus":
            specs = spec if isinstance(spec, list) else [spec]
            checks.extend(_check_prometheus(s, measured) for s in specs)
        else:
            known = "errorRateBelow, responseTimeBelow, prometheus"
            raise ConfigError(f"unknown success criterion {raw_key!r} (known: {known})")
    failed = [reason for ok, reason in checks if not ok]
    return (False, failed) if failed else (True, [reason for _, reason in checks])


def _check_error_rate(threshold: float, measured: Mapping[str, Any]) -> tuple[bool, str]:
    rate = _as_number(measured.get("error_rate"))
    if rate is None:
        return False, f"error rate not measured (no requests), threshold {_pct(threshold)}"
    if rate < threshold:
        return True, f"error rate {_pct(rate)} < {_pct(threshold)}"
    return False, f"error rate {_pct(rate)} >= {_pct(threshold)}"


def _check_latency(spec: Any, key: str, measured: Mapping[str, Any]) -> list[tuple[bool, str]]:
    limits = dict(spec) if isinstance(spec, Mapping) else {"p95": spec}
    if not limits:
        raise ConfigError(f"{key}: name at least one of {', '.join(_PERCENTILE_KEYS)}")
    out: list[tuple[bool, str]] = []
    for stat, limit in limits.items():
        if stat not in _PERCENTILE_KEYS:
            known = ", ".join(_PERCENTILE_KEYS)
            raise ConfigError(f"{key}: unknown statistic {stat!r} (use {known})")
        threshold = _millis(limit, f"{key}.{stat}")
        value = _as_number(measured.get(f"{stat}_ms"))
        if value is None:
            out.append(
                (False, f"{stat} not measured (no successful request), threshold {_ms(threshold)}")
            )
        elif value < threshold:
            out.append((True, f"{stat} {_ms(value)} < {_ms(threshold)}"))
        else:
            out.append((False, f"{stat} {_ms(value)} >= {_ms(threshold)}"))
    return out


def _check_prometheus(spec: Any, measured: Mapping[str, Any]) -> tuple[bool, str]:
    if not isinstance(spec, Mapping) or not spec.get("query"):
        raise ConfigError("prometheus criterion needs a query and below and/or above")
    query = str(spec["query"])
    below = _number(spec["below"], "prometheus.below") if "below" in spec else None
    above = _number(spec["above"], "prometheus.above") if "above" in spec else None
    if below is None and above is None:
        raise ConfigError(f"prometheus criterion {query!r} needs below and/or above")
    values = measured.get("prometheus")
    value = _as_number(values.get(query) if isinstance(values, Mapping) else values)
    if value is None:
        return False, f"{query}: no data"
    failed = []
    if below is not None and not value < below:
        failed.append(f"{query} = {value:g} >= {below:g}")
    if above is not None and not value > above:
        failed.append(f"{query} = {value:g} <= {above:g}")
    if failed:
        return False, "; ".join(failed)
    bounds = " and ".join(
        part
        for part in (
            f"> {above:g}" if above is not None else "",
            f"< {below:g}" if below is not None else "",
        )
        if part
    )
    return True, f"{query} = {value:g} {bounds}"
