"""Prometheus metrics read from the ledger (and the worker registry and broker) at scrape time.

Nothing is counted in process: every scrape runs a few bounded SQL aggregations, so any number
of coordinators and workers can run and one ``vmfarm metrics serve`` sees them all. A scrape
looks at a window: the executions created in the last ``window`` seconds (24h by default) or
still running, at most ``max_executions`` of them (the newest). Per-execution tables are read
through their ``execution_id`` indexes; rows are summed in SQL, never fetched one by one.

Because the numbers cover a sliding window they are gauges (they go down as executions leave
the window): use them as they are, without ``rate()``. The duration histogram is a gauge
histogram for the same reason (``histogram_quantile`` works on its buckets directly).

Metrics::

    vmfarm_executions{pipeline,status}            executions in the window
    vmfarm_executions_active{status}              unfinished executions, whatever their age
    vmfarm_host_steps{kind,status,region}         host step attempts in the window
    vmfarm_host_step_duration_seconds{kind,status} finished host step attempts (gauge histogram)
    vmfarm_rollbacks{outcome}                     stages rolling back, rolled back, failed to
    vmfarm_gate_verdicts{kind,passed}             decided gates (deploy, verify, approval,
                                                  switch, rollback, rollback-switch)
    vmfarm_queue_depth{queue}                     messages waiting (Redis broker only)
    vmfarm_workers_live{region}                   live workers ("none": control-only workers)
    vmfarm_workers_silent{region}                 registered workers not heard from
    vmfarm_worker_slots{region}, vmfarm_worker_busy{region}   live concurrency and in flight
    vmfarm_metrics_window_seconds, vmfarm_metrics_window_executions
    vmfarm_metrics_source_up{source}              1 when ledger / workers / broker could be read

One metric is counted in process, by the worker that sees the event (Prometheus's default
registry of that process, not the ledger collector's)::

    vmfarm_refused_messages_total{queue,task,reason}  task messages a worker refused to run:
                                                      unsigned or bad-signature (app.signing)
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, generate_latest, start_http_server
from prometheus_client.core import GaugeHistogramMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy import ColumnElement, Select, case, func, or_
from sqlmodel import col, select

from app.models import Execution, HostStepRun, PhaseRun, StageRun, Status, utcnow

log = logging.getLogger("vmfarm.metrics")

# Seconds: deployment steps take from a second to an hour.
DEFAULT_BUCKETS: tuple[float, ...] = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
ACTIVE = (Status.QUEUED, Status.RUNNING, Status.WAITING, Status.ROLLING_BACK)
ROLLBACK_OUTCOMES = (Status.ROLLING_BACK, Status.ROLLED_BACK, Status.ROLLBACK_FAILED)
# A gate's verdict: the status of a PhaseRun once decided (an overridden failure, Ignore or
# MarkAsSuccess, counts as passed: the execution went on).
VERDICTS = {Status.SUCCEEDED: "true", Status.FAILED: "false"}
# The PhaseRun kinds that are gates (not discovery or manual-intervention records).
GATE_KINDS = ("deploy", "verify", "approval", "switch", "rollback", "rollback-switch")
# Kinds always present (as 0) so that an alert on them never sees "no data".
ALWAYS_KINDS = ("deploy", "verify")
# Counted by the worker that refused them (app.signing.note_refusal).
REFUSED_MESSAGES = Counter("vmfarm_refused_messages",
                           "Task messages this process refused to run (unsigned, or a signature "
                           "that does not verify)", ["queue", "task", "reason"])


class MetricsSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="VMFARM_METRICS_", extra="ignore")

    window: float = 86400.0  # seconds
    max_executions: int = 500


def _duration(dialect: str) -> ColumnElement[Any] | None:
    """Seconds between a host step's start and finish, in SQL (None: not for this dialect)."""
    started, finished = col(HostStepRun.started_at), col(HostStepRun.finished_at)
    if dialect == "sqlite":  # julianday is a double: round its ~10 µs noise off
        return func.round((func.julianday(finished) - func.julianday(started)) * 86400.0, 3)
    if dialect == "postgresql":
        return func.extract("epoch", finished - started)
    return None


class LedgerCollector(Collector):
    """A custom collector: reads the ledger, the worker registry and the broker per scrape."""

    def __init__(self, *, window: float | None = None, max_executions: int | None = None,
                 buckets: Sequence[float] = DEFAULT_BUCKETS, workers: bool = True,
                 queues: bool = True) -> None:
        cfg = MetricsSettings()
        self.window = float(window if window is not None else cfg.window)
        self.max_executions = int(max_executions if max_executions is not None
                                  else cfg.max_executions)
        if self.window <= 0 or self.max_executions <= 0:
            raise ValueError("the metrics window and max_executions must be positive")
        self.buckets = tuple(sorted(float(b) for b in buckets))
        self.workers = workers
        self.queues = queues

    def describe(self) -> Iterable[Any]:
        return []  # registering must not read the ledger

    # --- the ledger -------------------------------------------------------------------------------

    def _recent(self) -> Select[Any]:
        since = utcnow() - timedelta(seconds=self.window)
        return (select(Execution.id)
                .where(or_(col(Execution.created_at) >= since, col(Execution.status).in_(ACTIVE)))
                .order_by(col(Execution.created_at).desc())
                .limit(self.max_executions))

    def _ledger(self) -> list[Any]:
        from app.db import session_scope

        executions = GaugeMetricFamily(
            "vmfarm_executions", "Executions created in the metrics window (or unfinished), by "
            "pipeline and status", labels=["pipeline", "status"])
        active = GaugeMetricFamily(
            "vmfarm_executions_active", "Unfinished executions, whatever their age, by status",
            labels=["status"])
        steps = GaugeMetricFamily(
            "vmfarm_host_steps", "Host step attempts of the executions in the metrics window",
            labels=["kind", "status", "region"])
        durations = GaugeHistogramMetricFamily(
            "vmfarm_host_step_duration_seconds", "Duration of the finished host step attempts "
            "of the executions in the metrics window (a window, not a counter: no rate())",
            labels=["kind", "status"])
        rollbacks = GaugeMetricFamily(
            "vmfarm_rollbacks", "Stages of the executions in the metrics window that roll back, "
            "rolled back or failed to, by outcome", labels=["outcome"])
        gates = GaugeMetricFamily(
            "vmfarm_gate_verdicts", "Decided phase gates of the executions in the metrics "
            "window, by kind and whether they passed", labels=["kind", "passed"])
        window = GaugeMetricFamily("vmfarm_metrics_window_seconds",
                                   "How far back the ledger metrics look", value=self.window)
        covered = GaugeMetricFamily(
            "vmfarm_metrics_window_executions",
            f"Executions the ledger metrics cover (at most {self.max_executions}: the newest)")

        with session_scope() as s:
            dialect = s.get_bind().dialect.name
            recent = self._recent()
            rows = s.exec(select(Execution.pipeline, Execution.status, func.count())
                          .where(col(Execution.id).in_(recent))
                          .group_by(Execution.pipeline, Execution.status)).all()
            n = 0
            for pipeline, status, count in sorted(rows):
                executions.add_metric([pipeline, status], count)
                n += count
            covered.add_metric([], n)

            act = dict(s.exec(select(Execution.status, func.count())
                              .where(col(Execution.status).in_(ACTIVE))
                              .group_by(Execution.status)).all())
            for status in ACTIVE:
                active.add_metric([status], act.get(status, 0))

            in_window = col(HostStepRun.execution_id).in_(recent)
            for kind, status, region, count in sorted(s.exec(
                    select(HostStepRun.kind, HostStepRun.status, HostStepRun.region,
                           func.count()).where(in_window)
                    .group_by(HostStepRun.kind, HostStepRun.status, HostStepRun.region)).all()):
                steps.add_metric([kind, status, region or ""], count)

            for labels, buckets, total in self._durations(s, dialect, recent):
                durations.add_metric(labels, buckets, total)

            rb = dict(s.exec(select(StageRun.status, func.count())
                             .where(col(StageRun.execution_id).in_(recent),
                                    col(StageRun.status).in_(ROLLBACK_OUTCOMES))
                             .group_by(StageRun.status)).all())
            for outcome in ROLLBACK_OUTCOMES:
                rollbacks.add_metric([outcome], rb.get(outcome, 0))

            verdicts: dict[tuple[str, str], int] = {(k, p): 0 for k in ALWAYS_KINDS
                                                    for p in VERDICTS.values()}
            for kind, status, count in s.exec(
                    select(PhaseRun.kind, PhaseRun.status, func.count())
                    .where(col(PhaseRun.execution_id).in_(recent),
                           col(PhaseRun.kind).in_(GATE_KINDS),
                           col(PhaseRun.status).in_(list(VERDICTS)))
                    .group_by(PhaseRun.kind, PhaseRun.status)).all():
                verdicts[(kind, VERDICTS[status])] = count
            for (kind, passed), count in sorted(verdicts.items()):
                gates.add_metric([kind, passed], count)
        return [executions, active, steps, durations, rollbacks, gates, window, covered]

    def _durations(self, s: Any, dialect: str, recent: Select[Any]
                   ) -> Iterator[tuple[list[str], list[tuple[str, float]], float]]:
        """(labels, cumulative buckets ending with +Inf, sum) per (kind, status)."""
        finished = [col(HostStepRun.execution_id).in_(recent),
                    col(HostStepRun.finished_at).is_not(None)]
        dur = _duration(dialect)
        les = [_le(b) for b in self.buckets] + ["+Inf"]
        if dur is not None:
            cols = [func.sum(case((dur <= b, 1), else_=0)) for b in self.buckets]
            rows = s.exec(select(HostStepRun.kind, HostStepRun.status, func.count(),
                                 func.coalesce(func.sum(dur), 0.0), *cols)
                          .where(*finished)
                          .group_by(HostStepRun.kind, HostStepRun.status)).all()
            for kind, status, count, total, *cum in sorted(rows, key=lambda r: (r[0], r[1])):
                values = [float(c or 0) for c in cum] + [float(count)]
                yield [kind, status], list(zip(les, values, strict=True)), float(total or 0)
            return
        # Another database: fetch at most 50000 finished rows and sum them here.
        per: dict[tuple[str, str], list[float]] = {}
        for kind, status, started, ended in s.exec(
                select(HostStepRun.kind, HostStepRun.status, HostStepRun.started_at,
                       HostStepRun.finished_at).where(*finished).limit(50_000)).all():
            per.setdefault((kind, status), []).append((ended - started).total_seconds())
        for (kind, status), ds in sorted(per.items()):
            values = [float(sum(1 for d in ds if d <= b)) for b in self.buckets] + [len(ds)]
            yield [kind, status], list(zip(les, values, strict=True)), float(sum(ds))

    # --- workers and queues -----------------------------------------------------------------------

    def _fleet(self) -> tuple[list[Any], list[str]]:
        from app.delegates import all_workers

        live = GaugeMetricFamily("vmfarm_workers_live", "Live workers (delegates) per region",
                                 labels=["region"])
        silent = GaugeMetricFamily(
            "vmfarm_workers_silent", "Registered workers whose heartbeat is older than "
            "heartbeat_timeout, per region", labels=["region"])
        slots = GaugeMetricFamily("vmfarm_worker_slots",
                                  "Concurrency of the live workers, per region",
                                  labels=["region"])
        busy = GaugeMetricFamily("vmfarm_worker_busy",
                                 "Tasks in flight on the live workers, per region",
                                 labels=["region"])
        counts: dict[str, list[int]] = {}
        queues: set[str] = set()
        for w in all_workers():
            for region in w.get("regions") or ["none"]:
                c = counts.setdefault(region, [0, 0, 0, 0])
                if w.get("live"):
                    c[0] += 1
                    c[2] += int(w.get("concurrency") or 0)
                    c[3] += int(w.get("in_flight") or 0)
                else:
                    c[1] += 1
            if w.get("live"):
                queues.update(w.get("queues") or [])
        for region, (n_live, n_silent, n_slots, n_busy) in sorted(counts.items()):
            live.add_metric([region], n_live)
            silent.add_metric([region], n_silent)
            slots.add_metric([region], n_slots)
            busy.add_metric([region], n_busy)
        return [live, silent, slots, busy], sorted(queues)

    def _queues(self, names: Iterable[str]) -> tuple[list[Any], bool]:
        from app.delegates import queue_depths

        depth = GaugeMetricFamily("vmfarm_queue_depth",
                                  "Messages waiting in each vmfarm queue (Redis broker only)",
                                  labels=["queue"])
        known = False
        for queue, n in sorted(queue_depths(names).items()):
            if n is not None:
                depth.add_metric([queue], n)
                known = True
        return [depth], known

    def collect(self) -> Iterable[Any]:
        up = GaugeMetricFamily("vmfarm_metrics_source_up",
                               "1 when the source could be read in this scrape",
                               labels=["source"])
        out: list[Any] = []
        try:
            out += self._ledger()
            up.add_metric(["ledger"], 1)
        except Exception:
            log.exception("cannot read metrics from the ledger")
            up.add_metric(["ledger"], 0)
        names: list[str] = []
        if self.workers:
            try:
                fleet, names = self._fleet()
                out += fleet
                up.add_metric(["workers"], 1)
            except Exception:
                log.exception("cannot read the worker registry")
                up.add_metric(["workers"], 0)
        if self.queues:
            from app.settings import get_settings

            redis = get_settings().celery_broker.startswith(("redis://", "rediss://"))
            try:
                depth, known = self._queues(names)
                out += depth
                if redis:  # another broker cannot tell depths: no source to be up or down
                    up.add_metric(["broker"], 1 if known else 0)
            except Exception:
                log.exception("cannot read queue depths")
                if redis:
                    up.add_metric(["broker"], 0)
        out.append(up)
        return out


def _le(b: float) -> str:
    return str(int(b)) + ".0" if float(b).is_integer() else repr(float(b))


def build_registry(**options: Any) -> CollectorRegistry:
    """A registry holding one LedgerCollector (``options``: its keyword arguments)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(LedgerCollector(**options))
    return registry


def render(registry: CollectorRegistry | None = None, **options: Any) -> bytes:
    """The exposition text (Prometheus format 0.0.4) of one scrape."""
    return generate_latest(registry or build_registry(**options))


@dataclass
class MetricsServer:
    """A running HTTP endpoint (every path serves the metrics; ``/metrics`` by convention)."""

    server: WSGIServer
    thread: threading.Thread

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.server.server_address[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://{f'[{host}]' if ':' in host else host}:{port}/metrics"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)

    def wait(self) -> None:
        """Block until the server stops (Ctrl-C stops it)."""
        try:
            while self.thread.is_alive():
                self.thread.join(timeout=1.0)
        except KeyboardInterrupt:
            self.close()


def serve(port: int = 9464, addr: str = "127.0.0.1", *,
          registry: CollectorRegistry | None = None, block: bool = False,
          **options: Any) -> MetricsServer:
    """Serve the metrics over HTTP on ``addr:port`` (port 0: any free port) in a daemon
    thread; with ``block`` wait until interrupted. Returns the server (``.url``, ``.close()``)."""
    server, thread = start_http_server(port, addr=addr,
                                       registry=registry or build_registry(**options))
    running = MetricsServer(server, thread)
    log.info("serving metrics on %s", running.url)
    if block:
        running.wait()
    return running


__all__ = ["DEFAULT_BUCKETS", "REFUSED_MESSAGES", "LedgerCollector", "MetricsServer",
           "MetricsSettings", "build_registry", "render", "serve"]
