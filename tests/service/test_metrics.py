"""The Prometheus metrics endpoint over HTTP, on a real (temporary SQLite) ledger. The exposition
itself and `vmfarm metrics show` are in tests/unit/test_metrics.py.
"""

from __future__ import annotations

import os
import urllib.request
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.db import reset_engines, session_scope
from app.models import (
    Execution,
    HostStepRun,
    PhaseRun,
    StageRun,
    Status,
    WorkerBeat,
    utcnow,
)
from app.settings import get_settings

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture
def ledger(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[datetime]:
    """An empty SQLite ledger under tmp_path (embedded mode: no broker URL)."""
    for key in list(os.environ):
        if key.startswith("VMFARM_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("VMFARM_HOME", str(tmp_path))
    get_settings.cache_clear()
    reset_engines()
    yield utcnow()
    reset_engines()
    get_settings.cache_clear()


def _step(ex: str, host: str, step: int, status: str, seconds: float | None, now: datetime, *,
          kind: str = "deploy", region: str = "r1", attempt: int = 1) -> HostStepRun:
    start = now - timedelta(hours=1)
    return HostStepRun(idem_key=f"{ex}/{host}/{step}/{kind}/{attempt}", execution_id=ex,
                       stage_index=0, phase=0, step_index=step, step_id=f"s{step}", kind=kind,
                       host=host, region=region, attempt=attempt, status=status,
                       started_at=start,
                       finished_at=start + timedelta(seconds=seconds) if seconds is not None
                       else None)


def _fill(now: datetime) -> None:
    with session_scope() as s:
        s.add(Execution(id="exok", pipeline="web", status=Status.SUCCEEDED, plan={},
                        created_at=now - timedelta(hours=2)))
        s.add(Execution(id="exfail", pipeline="web", status=Status.FAILED, plan={},
                        created_at=now - timedelta(hours=3)))
        s.add(Execution(id="exrun", pipeline="api", status=Status.RUNNING, plan={},
                        created_at=now - timedelta(minutes=5)))
        # Out of the window: finished three days ago...
        s.add(Execution(id="exold", pipeline="web", status=Status.FAILED, plan={},
                        created_at=now - timedelta(days=3)))
        # ...but an old execution still waiting is counted.
        s.add(Execution(id="exwait", pipeline="api", status=Status.WAITING, plan={},
                        created_at=now - timedelta(days=2)))
        s.flush()
        s.add(StageRun(execution_id="exok", stage_index=0, identifier="deploy",
                       status=Status.SUCCEEDED))
        s.add(StageRun(execution_id="exfail", stage_index=0, identifier="deploy",
                       status=Status.ROLLED_BACK))
        s.add(StageRun(execution_id="exfail", stage_index=1, identifier="prod",
                       status=Status.ROLLBACK_FAILED))
        s.add(StageRun(execution_id="exold", stage_index=0, identifier="deploy",
                       status=Status.ROLLED_BACK))
        s.add(PhaseRun(execution_id="exok", stage_index=0, phase=0, kind="deploy",
                       status=Status.SUCCEEDED))
        s.add(PhaseRun(execution_id="exok", stage_index=0, phase=0, kind="verify",
                       status=Status.SUCCEEDED))
        s.add(PhaseRun(execution_id="exfail", stage_index=0, phase=0, kind="deploy",
                       status=Status.SUCCEEDED))
        s.add(PhaseRun(execution_id="exfail", stage_index=0, phase=1, kind="verify",
                       status=Status.FAILED))
        s.add(PhaseRun(execution_id="exfail", stage_index=0, phase=1, kind="mi-verify",
                       status=Status.SUCCEEDED))
        s.add(PhaseRun(execution_id="exrun", stage_index=0, phase=0, kind="deploy",
                       status=Status.RUNNING))  # not decided: no verdict yet
        s.add(PhaseRun(execution_id="exwait", stage_index=0, phase=0, kind="approval",
                       status=Status.FAILED))
        s.add(PhaseRun(execution_id="exold", stage_index=0, phase=0, kind="deploy",
                       status=Status.FAILED))
        s.add(_step("exok", "h1", 0, Status.SUCCEEDED, 3, now))
        s.add(_step("exok", "h2", 0, Status.SUCCEEDED, 45, now, region="r2"))
        s.add(_step("exfail", "h1", 0, Status.FAILED, 200, now))
        s.add(_step("exfail", "h1", 0, Status.SUCCEEDED, 7, now, kind="rollback"))
        s.add(_step("exfail", "h2", 0, Status.SUCCEEDED, 10, now, kind="rollback"))
        s.add(_step("exrun", "h3", 0, Status.RUNNING, None, now))
        s.add(_step("exold", "h1", 0, Status.FAILED, 5000, now))
        s.add(WorkerBeat(name="w-r1@a", regions=["r1"], queues=["vmfarm.r1"], concurrency=4,
                         in_flight=1, beat_at=now))
        s.add(WorkerBeat(name="w-r1@b", regions=["r1"], queues=["vmfarm.r1"], concurrency=2,
                         in_flight=0, beat_at=now))
        s.add(WorkerBeat(name="w-r2@dead", regions=["r2"], queues=["vmfarm.r2"],
                         concurrency=8, beat_at=now - timedelta(hours=1)))
        s.add(WorkerBeat(name="w-control@a", regions=[], queues=["vmfarm.control"],
                         concurrency=2, beat_at=now))


def _samples(text: str) -> Samples:
    return {(s.name, frozenset(s.labels.items())): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def _get(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def test_the_http_endpoint_serves_the_same_metrics(ledger: datetime) -> None:
    from app.metrics import serve

    _fill(ledger)
    server = serve(0, "127.0.0.1")
    try:
        host, port = server.address
        assert host == "127.0.0.1" and port > 0
        assert server.url == f"http://127.0.0.1:{port}/metrics"
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(server.url, timeout=30) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/plain")
            body = resp.read().decode()
    finally:
        server.close()
    m = _samples(body)
    assert _get(m, "vmfarm_executions", pipeline="web", status="SUCCEEDED") == 1
    assert _get(m, "vmfarm_host_step_duration_seconds_bucket", kind="deploy",
                status="SUCCEEDED", le="60.0") == 2
