"""Prometheus metrics computed from a real (temporary SQLite) ledger: the exposition text and
`vmfarm metrics show`. No broker, workers or hosts are needed; the HTTP endpoint is in
tests/service/test_metrics.py.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
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


def test_render_counts_the_ledger_in_the_window(ledger: datetime) -> None:
    from app.metrics import render

    _fill(ledger)
    text = render().decode()
    m = _samples(text)

    assert _get(m, "vmfarm_executions", pipeline="web", status="SUCCEEDED") == 1
    assert _get(m, "vmfarm_executions", pipeline="web", status="FAILED") == 1  # not exold
    assert _get(m, "vmfarm_executions", pipeline="api", status="RUNNING") == 1
    assert _get(m, "vmfarm_executions", pipeline="api", status="WAITING") == 1
    assert _get(m, "vmfarm_metrics_window_executions") == 4
    assert _get(m, "vmfarm_metrics_window_seconds") == 86400
    assert _get(m, "vmfarm_executions_active", status="RUNNING") == 1
    assert _get(m, "vmfarm_executions_active", status="WAITING") == 1
    assert _get(m, "vmfarm_executions_active", status="ROLLING_BACK") == 0

    assert _get(m, "vmfarm_host_steps", kind="deploy", status="SUCCEEDED", region="r1") == 1
    assert _get(m, "vmfarm_host_steps", kind="deploy", status="SUCCEEDED", region="r2") == 1
    assert _get(m, "vmfarm_host_steps", kind="deploy", status="FAILED", region="r1") == 1
    assert _get(m, "vmfarm_host_steps", kind="deploy", status="RUNNING", region="r1") == 1
    assert _get(m, "vmfarm_host_steps", kind="rollback", status="SUCCEEDED", region="r1") == 2

    # Durations 3 s and 45 s (deploy, succeeded), 200 s (failed), 7 s (rollback); the 5000 s
    # step of the old execution is out of the window.
    h = "vmfarm_host_step_duration_seconds_bucket"
    ok = {"kind": "deploy", "status": "SUCCEEDED"}
    assert _get(m, h, le="2.5", **ok) == 0
    assert _get(m, h, le="5.0", **ok) == 1
    assert _get(m, h, le="30.0", **ok) == 1
    assert _get(m, h, le="60.0", **ok) == 2
    assert _get(m, h, le="+Inf", **ok) == 2
    assert _get(m, "vmfarm_host_step_duration_seconds_gcount", **ok) == 2
    assert _get(m, "vmfarm_host_step_duration_seconds_gsum", **ok) == 48
    bad = {"kind": "deploy", "status": "FAILED"}
    assert _get(m, h, le="120.0", **bad) == 0
    assert _get(m, h, le="300.0", **bad) == 1
    assert _get(m, h, le="3600.0", **bad) == 1
    assert _get(m, h, le="5.0", kind="rollback", status="SUCCEEDED") == 0
    # A bucket's bound is inclusive (10 s falls in le="10.0").
    assert _get(m, h, le="10.0", kind="rollback", status="SUCCEEDED") == 2
    assert not any(n == h and dict(lab).get("status") == "RUNNING" for n, lab in m)

    assert _get(m, "vmfarm_rollbacks", outcome="ROLLED_BACK") == 1  # exold's is not counted
    assert _get(m, "vmfarm_rollbacks", outcome="ROLLBACK_FAILED") == 1
    assert _get(m, "vmfarm_rollbacks", outcome="ROLLING_BACK") == 0

    assert _get(m, "vmfarm_gate_verdicts", kind="deploy", passed="true") == 2
    assert _get(m, "vmfarm_gate_verdicts", kind="deploy", passed="false") == 0
    assert _get(m, "vmfarm_gate_verdicts", kind="verify", passed="true") == 1
    assert _get(m, "vmfarm_gate_verdicts", kind="verify", passed="false") == 1
    assert _get(m, "vmfarm_gate_verdicts", kind="approval", passed="false") == 1
    # A manual intervention's record is no gate.
    assert not any(n == "vmfarm_gate_verdicts" and dict(lab)["kind"].startswith("mi")
                   for n, lab in m)

    assert _get(m, "vmfarm_workers_live", region="r1") == 2
    assert _get(m, "vmfarm_worker_slots", region="r1") == 6
    assert _get(m, "vmfarm_worker_busy", region="r1") == 1
    assert _get(m, "vmfarm_workers_live", region="r2") == 0
    assert _get(m, "vmfarm_workers_silent", region="r2") == 1
    assert _get(m, "vmfarm_workers_live", region="none") == 1

    # Not a Redis broker: depths are unknown, so there are none and no broker source.
    assert not any(n == "vmfarm_queue_depth" for n, _ in m)
    assert _get(m, "vmfarm_metrics_source_up", source="ledger") == 1
    assert _get(m, "vmfarm_metrics_source_up", source="workers") == 1
    assert _get(m, "vmfarm_metrics_source_up", source="broker") is None
    assert "# TYPE vmfarm_host_step_duration_seconds histogram" in text


def test_the_window_and_the_execution_cap_bound_a_scrape(ledger: datetime) -> None:
    from app.metrics import render

    _fill(ledger)
    # Two newest executions only: exrun (5 min) and exok (2 h).
    m = _samples(render(max_executions=2).decode())
    assert _get(m, "vmfarm_metrics_window_executions") == 2
    assert _get(m, "vmfarm_executions", pipeline="web", status="FAILED") is None
    assert _get(m, "vmfarm_rollbacks", outcome="ROLLBACK_FAILED") == 0
    # A 150-day window takes the old execution in too.
    m = _samples(render(window=150 * 86400).decode())
    assert _get(m, "vmfarm_executions", pipeline="web", status="FAILED") == 2
    assert _get(m, "vmfarm_host_step_duration_seconds_bucket", kind="deploy", status="FAILED",
                le="+Inf") == 2
    # An unfinished execution is counted whatever the window.
    m = _samples(render(window=60).decode())
    assert _get(m, "vmfarm_executions", pipeline="api", status="WAITING") == 1
    assert _get(m, "vmfarm_executions", pipeline="web", status="SUCCEEDED") is None


def test_an_empty_ledger_still_exposes_its_families(ledger: datetime) -> None:
    from app.metrics import render

    m = _samples(render().decode())
    assert _get(m, "vmfarm_metrics_window_executions") == 0
    assert _get(m, "vmfarm_executions_active", status="RUNNING") == 0
    assert _get(m, "vmfarm_rollbacks", outcome="ROLLED_BACK") == 0
    assert _get(m, "vmfarm_gate_verdicts", kind="verify", passed="false") == 0
    assert _get(m, "vmfarm_metrics_source_up", source="ledger") == 1


def test_an_unreadable_ledger_is_reported_not_raised(ledger: datetime,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from app.metrics import render

    monkeypatch.setenv("VMFARM_DATABASE_URL", "sqlite:////nonexistent-dir/x/vmfarm.db")
    get_settings.cache_clear()
    m = _samples(render().decode())
    assert _get(m, "vmfarm_metrics_source_up", source="ledger") == 0
    assert _get(m, "vmfarm_metrics_source_up", source="workers") == 0


def _cli() -> click.Group:
    from cli.ops_cmd import register

    @click.group()
    def main() -> None:
        pass

    register(main)
    return main


def test_metrics_show_prints_the_exposition_and_json(ledger: datetime) -> None:
    _fill(ledger)
    runner = CliRunner()
    res = runner.invoke(_cli(), ["metrics", "show"])
    assert res.exit_code == 0, res.output
    assert _get(_samples(res.output), "vmfarm_executions", pipeline="api",
                status="RUNNING") == 1
    res = runner.invoke(_cli(), ["metrics", "show", "--window", "30m", "-o", "json"])
    assert res.exit_code == 0, res.output
    families = {f["name"]: f for f in json.loads(res.output)["metrics"]}
    assert families["vmfarm_metrics_window_seconds"]["samples"][0]["value"] == 1800
    running = families["vmfarm_executions"]["samples"]
    assert {(s["labels"]["pipeline"], s["labels"]["status"]) for s in running} == {
        ("api", "RUNNING"), ("api", "WAITING")}
    res = runner.invoke(_cli(), ["metrics", "show", "--window", "soon"])
    assert res.exit_code == 2
    assert "--window" in res.output
