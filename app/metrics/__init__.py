"""Prometheus metrics of vmfarm, by Prometheus's conventions, computed at scrape time.

Nothing is counted inside a worker process: every number comes from what all processes share,
the ledger (SQL) and the broker (Redis), read when Prometheus scrapes. Region workers run on
other machines and the control worker is a prefork pool, so in-process counters (or
prometheus-client's multiprocess mode, which shares files on one machine) would each see a
part; here any exporter (``vmfarm metrics serve``, the server's ``/metrics``) gives the same
numbers, and they survive restarts. Counters come from rows that only accumulate (see
``app.metrics.ledger`` for how a scrape reads only the unfinished executions).

Metrics (counters end in ``_total``; durations are histograms in seconds)::

    vmfarm_executions_started_total{pipeline,environment}
    vmfarm_executions_finished_total{pipeline,environment,status}
    vmfarm_executions_active{pipeline,status}          QUEUED, RUNNING, WAITING, ROLLING_BACK
    vmfarm_executions_running_oldest_age_seconds{pipeline}
    vmfarm_host_steps_total{region,kind,step,status}   host step attempts that ended
    vmfarm_host_steps_running{region}
    vmfarm_host_step_duration_seconds{kind,step,status}          histogram
    vmfarm_phase_duration_seconds{pipeline,kind,status}          histogram
    vmfarm_gate_verdicts_total{kind,verdict}           verdict: pass | fail
    vmfarm_rollbacks_total{pipeline,status}            ROLLED_BACK | ROLLBACK_FAILED (stages)
    vmfarm_rollbacks_running{pipeline}
    vmfarm_reconciler_actions_total{action}            lost_step, unclaimed_step,
                                                       approval_timeout, discovery_timeout,
                                                       lost_gate
    vmfarm_approvals_waiting{pipeline}, vmfarm_approvals_oldest_waiting_seconds{pipeline}
    vmfarm_interventions_waiting{pipeline}
    vmfarm_workers{region,state}                       state: live | stale
    vmfarm_control_workers{state}
    vmfarm_worker_slots{region}, vmfarm_worker_tasks_in_flight{region}
    vmfarm_queue_depth{queue}, vmfarm_queue_consumers{queue}   every known queue
    vmfarm_refused_messages_total{reason}
    vmfarm_metrics_source_up{source}                   ledger, workers, broker

``environment`` is the environments an execution deploys to (comma-joined identifiers, in
stage order); it is absent for a pipeline with no deployment stage.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.metrics.ledger import LedgerFold, families, open_work
from app.metrics.refused import count_refused_message, refused_counts

log = logging.getLogger("vmfarm.metrics")


class MetricsSettings(BaseSettings):
    """``VMFARM_METRICS_*``: which queues are reported besides those the fleet names."""

    model_config = SettingsConfigDict(env_prefix="VMFARM_METRICS_", extra="ignore")

    # Regions whose queues are always reported (comma-separated), e.g. every region your
    # infrastructures use: a queue nobody has declared yet then shows as 0 messages, 0
    # consumers rather than not at all.
    regions: str = ""
    # The hosts of executions created this long ago (seconds) name queues too (at most
    # max_executions of the newest), besides every unfinished execution's.
    window: float = 86400.0
    max_executions: int = 500
    # Seconds after an execution ends before its rows are folded into the running totals.
    settle: float = 60.0


class VmfarmCollector(Collector):
    """Reads the ledger, the worker registry and the broker at every scrape."""

    def __init__(
        self,
        *,
        window: float | None = None,
        max_executions: int | None = None,
        regions: Iterable[str] | None = None,
        workers: bool = True,
        queues: bool = True,
    ) -> None:
        cfg = MetricsSettings()
        self.window = float(window if window is not None else cfg.window)
        self.max_executions = int(
            max_executions if max_executions is not None else cfg.max_executions
        )
        if self.window <= 0 or self.max_executions <= 0:
            raise ValueError("the metrics window and max_executions must be positive")
        self.regions = sorted(
            {
                r.strip()
                for r in (regions if regions is not None else cfg.regions.split(","))
                if r.strip()
            }
        )
        self.workers = workers
        self.queues = queues
        self.fold = LedgerFold(grace=cfg.settle)
        self._lock = threading.Lock()  # the HTTP server scrapes from several threads

    def describe(self) -> Iterable[Any]:
        return []  # registering must not read the ledger

    def _ledger(self) -> tuple[list[Metric], set[str]]:
        from datetime import timedelta

        from app.db import session_scope
        from app.metrics.fleet import regions_of_executions
        from app.models import utcnow

        with session_scope() as s:
            dialect = s.get_bind().dialect.name
            if dialect == "postgresql":  # one snapshot: totals and open rows agree
                s.connection(execution_options={"isolation_level": "REPEATABLE READ"})
            now = utcnow()
            self.fold.advance(s, dialect, now)
            totals = self.fold.totals.merged(self.fold.open_totals(s, dialect))
            work = open_work(s, now)
            regions = regions_of_executions(
                s, since=now - timedelta(seconds=self.window), limit=self.max_executions
            )
        return list(families(totals, work)), regions

    def collect(self) -> Iterable[Metric]:
        from app.delegates import all_workers, queue_depths
        from app.metrics.fleet import Fleet, fleet_families, fleet_of, queue_families, queue_names
        from app.settings import get_settings

        up = GaugeMetricFamily(
            "vmfarm_metrics_source_up",
            "1 when the source could be read in this scrape",
            labels=["source"],
        )
        out: list[Metric] = []
        regions: set[str] = set(self.regions)
        with self._lock:
            try:
                ledger, seen = self._ledger()
                out += ledger
                regions |= seen
                up.add_metric(["ledger"], 1)
            except Exception:
                log.exception("cannot read metrics from the ledger")
                up.add_metric(["ledger"], 0)
        fleet = Fleet()
        if self.workers:
            try:
                fleet = fleet_of(all_workers())
                out += fleet_families(fleet)
                up.add_metric(["workers"], 1)
            except Exception:
                log.exception("cannot read the worker registry")
                up.add_metric(["workers"], 0)
        redis = get_settings().celery_broker.startswith(("redis://", "rediss://"))
        if self.queues:
            names = queue_names(fleet, regions)
            depths: dict[str, int | None] = {}
            try:
                depths = queue_depths(names, strict=True)
                if redis:  # another broker cannot tell depths: no source to be up or down
                    up.add_metric(["broker"], 1)
            except Exception as exc:
                log.warning("cannot read queue depths: %s", exc)
                if redis:
                    up.add_metric(["broker"], 0)
            out += queue_families(names, depths, fleet.consumers)
        refused = CounterMetricFamily(
            "vmfarm_refused_messages",
            "Messages workers refused (unsigned, or signed by no one they trust), by reason",
            labels=["reason"],
        )
        try:
            for reason, n in sorted(refused_counts().items()):
                refused.add_metric([reason], n)
            out.append(refused)
        except Exception as exc:
            log.warning("cannot read the refused-message counts: %s", exc)
        out.append(up)
        return out


# The name earlier versions exported.
LedgerCollector = VmfarmCollector


def build_registry(**options: Any) -> CollectorRegistry:
    """A registry holding one VmfarmCollector (``options``: its keyword arguments)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(VmfarmCollector(**options))
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


def serve(
    port: int = 9464,
    addr: str = "127.0.0.1",
    *,
    registry: CollectorRegistry | None = None,
    block: bool = False,
    **options: Any,
) -> MetricsServer:
    """Serve the metrics over HTTP on ``addr:port`` (port 0: any free port) in a daemon
    thread; with ``block`` wait until interrupted. Returns the server (``.url``, ``.close()``)."""
    server, thread = start_http_server(
        port, addr=addr, registry=registry or build_registry(**options)
    )
    running = MetricsServer(server, thread)
    log.info("serving metrics on %s", running.url)
    if block:
        running.wait()
    return running


__all__ = [
    "LedgerCollector",
    "MetricsServer",
    "MetricsSettings",
    "VmfarmCollector",
    "build_registry",
    "count_refused_message",
    "render",
    "serve",
]
