"""Prometheus metrics computed from a real (temporary SQLite) ledger: counters by Prometheus's
conventions, histograms in seconds, what is open now, the running totals of settled
executions, and the HTTP endpoint. Embedded mode: no broker, workers or hosts."""

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


def _plan(*envs: str) -> dict[str, object]:
    return {
        "stages": [{"environment": {"identifier": e}} if e else {"type": "Approval"} for e in envs]
    }


def _step(
    ex: str,
    host: str,
    step: int,
    status: str,
    seconds: float | None,
    now: datetime,
    *,
    kind: str = "deploy",
    region: str = "r1",
    attempt: int = 1,
    error_class: str = "",
    error: str = "",
) -> HostStepRun:
    start = now - timedelta(hours=1)
    return HostStepRun(
        idem_key=f"{ex}/{host}/{step}/{kind}/{attempt}",
        execution_id=ex,
        stage_index=0,
        phase=0,
        step_index=step,
        step_id=f"s{step}",
        kind=kind,
        host=host,
        region=region,
        attempt=attempt,
        status=status,
        error_class=error_class or None,
        error=error or None,
        started_at=start,
        heartbeat_at=now,
        finished_at=start + timedelta(seconds=seconds) if seconds is not None else None,
    )


def _phase(
    ex: str,
    phase: int,
    kind: str,
    status: str,
    seconds: float | None,
    now: datetime,
    **extra: object,
) -> PhaseRun:
    start = now - timedelta(hours=2)
    return PhaseRun(
        execution_id=ex,
        stage_index=0,
        phase=phase,
        kind=kind,
        status=status,
        dispatched_at=start,
        gate_at=start + timedelta(seconds=seconds) if seconds is not None else None,
        **extra,
    )


def _fill(now: datetime) -> None:
    ago = now - timedelta(hours=3)
    with session_scope() as s:
        s.add(
            Execution(
                id="exok",
                pipeline="web",
                status=Status.SUCCEEDED,
                plan=_plan("prod"),
                created_at=ago,
                started_at=ago,
                finished_at=now - timedelta(hours=2),
            )
        )
        s.add(
            Execution(
                id="exfail",
                pipeline="web",
                status=Status.FAILED,
                plan=_plan("staging", "", "prod", "staging"),
                created_at=ago,
                started_at=ago,
                finished_at=now - timedelta(hours=2),
            )
        )
        s.add(
            Execution(
                id="exold",
                pipeline="web",
                status=Status.FAILED,
                plan=_plan("prod"),
                created_at=now - timedelta(days=30),
                finished_at=now - timedelta(days=30),
            )
        )
        s.add(
            Execution(
                id="exrun",
                pipeline="api",
                status=Status.RUNNING,
                plan=_plan("dev"),
                created_at=now - timedelta(minutes=50),
                started_at=now - timedelta(minutes=40),
            )
        )
        s.add(
            Execution(
                id="exwait",
                pipeline="api",
                status=Status.WAITING,
                plan=_plan("", "dev"),
                created_at=now - timedelta(days=2),
                started_at=now - timedelta(days=2),
            )
        )
        s.flush()
        s.add(
            StageRun(
                execution_id="exok", stage_index=0, identifier="deploy", status=Status.SUCCEEDED
            )
        )
        s.add(
            StageRun(
                execution_id="exfail", stage_index=0, identifier="deploy", status=Status.ROLLED_BACK
            )
        )
        s.add(
            StageRun(
                execution_id="exfail",
                stage_index=1,
                identifier="prod",
                status=Status.ROLLBACK_FAILED,
            )
        )
        s.add(
            StageRun(
                execution_id="exold", stage_index=0, identifier="deploy", status=Status.ROLLED_BACK
            )
        )
        s.add(_phase("exok", 0, "deploy", Status.SUCCEEDED, 40, now))
        s.add(_phase("exok", 0, "verify", Status.SUCCEEDED, 4, now))
        s.add(_phase("exfail", 0, "deploy", Status.SUCCEEDED, 400, now))
        s.add(_phase("exfail", 1, "verify", Status.FAILED, 20, now))
        s.add(_phase("exfail", 1, "mi-verify", Status.SUCCEEDED, 5, now))
        s.add(
            _phase(
                "exfail",
                2,
                "rollback",
                Status.SUCCEEDED,
                15,
                now,
                verdict={"judged_by": "the reconciler: every host had finished"},
            )
        )
        s.add(_phase("exrun", 0, "deploy", Status.RUNNING, None, now))  # no verdict yet
        s.add(
            PhaseRun(
                execution_id="exwait",
                stage_index=0,
                phase=0,
                kind="approval",
                status=Status.RUNNING,
                dispatched_at=now - timedelta(hours=5),
            )
        )
        s.add(_phase("exold", 0, "deploy", Status.FAILED, 70, now))
        s.add(_step("exok", "h1", 0, Status.SUCCEEDED, 3, now))
        s.add(_step("exok", "h2", 0, Status.SUCCEEDED, 45, now, region="r2"))
        s.add(
            _step(
                "exfail",
                "h1",
                0,
                Status.FAILED,
                200,
                now,
                error_class="DelegateRestart",
                error="worker lost: no heartbeat from w-r1@a since 10:00:00 UTC",
            )
        )
        s.add(
            _step(
                "exfail",
                "h2",
                0,
                Status.FAILED,
                3600,
                now,
                error_class="Timeout",
                error="no worker took the steps of h2 within 3600 s; nothing ran",
            )
        )
        s.add(_step("exfail", "h1", 0, Status.SUCCEEDED, 7, now, kind="rollback"))
        s.add(_step("exfail", "h3", 0, Status.SUCCEEDED, 10, now, kind="rollback"))
        s.add(_step("exrun", "h3", 0, Status.RUNNING, None, now))
        s.add(_step("exrun", "h4", 0, Status.SUCCEEDED, 1, now, region="r2"))
        s.add(_step("exold", "h1", 0, Status.FAILED, 5000, now))
        s.add(
            WorkerBeat(
                name="w-r1@a",
                regions=["r1"],
                queues=["vmfarm.r1"],
                concurrency=4,
                in_flight=1,
                beat_at=now,
            )
        )
        s.add(
            WorkerBeat(
                name="w-r1@b",
                regions=["r1"],
                queues=["vmfarm.r1"],
                concurrency=2,
                in_flight=0,
                beat_at=now,
            )
        )
        s.add(
            WorkerBeat(
                name="w-r2@dead",
                regions=["r2"],
                queues=["vmfarm.r2"],
                concurrency=8,
                beat_at=now - timedelta(hours=1),
            )
        )
        s.add(
            WorkerBeat(
                name="w-control@a",
                regions=[],
                queues=["vmfarm.control"],
                concurrency=2,
                beat_at=now,
            )
        )


def _samples(text: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }


def _get(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def _render(**options: object) -> Samples:
    from app.metrics import render

    return _samples(render(**options).decode())


def test_executions_are_counted_by_pipeline_environment_and_status(ledger: datetime) -> None:
    _fill(ledger)
    m = _render()
    started = "vmfarm_executions_started_total"
    assert _get(m, started, pipeline="web", environment="prod") == 2  # exok and the old one
    # The environments a run deploys to, in stage order, each once.
    assert _get(m, started, pipeline="web", environment="staging,prod") == 1
    assert _get(m, started, pipeline="api", environment="dev") == 2
    finished = "vmfarm_executions_finished_total"
    assert _get(m, finished, pipeline="web", environment="prod", status="SUCCEEDED") == 1
    assert _get(m, finished, pipeline="web", environment="prod", status="FAILED") == 1
    assert _get(m, finished, pipeline="web", environment="staging,prod", status="FAILED") == 1
    # Outcomes that have not happened yet are there as 0 (an increase() needs the series).
    assert _get(m, finished, pipeline="api", environment="dev", status="FAILED") == 0
    assert _get(m, finished, pipeline="web", environment="prod", status="ROLLBACK_FAILED") == 0
    assert _get(m, "vmfarm_executions_active", pipeline="api", status="RUNNING") == 1
    assert _get(m, "vmfarm_executions_active", pipeline="api", status="WAITING") == 1
    assert _get(m, "vmfarm_executions_active", pipeline="web", status="RUNNING") == 0
    # The oldest running execution of api started 40 minutes ago (WAITING is not running).
    age = _get(m, "vmfarm_executions_running_oldest_age_seconds", pipeline="api")
    assert age is not None and 2400 <= age < 2400 + 120
    assert _get(m, "vmfarm_executions_running_oldest_age_seconds", pipeline="web") is None


def test_host_steps_and_their_durations_are_a_counter_and_a_histogram(ledger: datetime) -> None:
    _fill(ledger)
    m = _render()
    steps = "vmfarm_host_steps_total"
    assert _get(m, steps, region="r1", kind="deploy", step="s0", status="SUCCEEDED") == 1
    assert _get(m, steps, region="r2", kind="deploy", step="s0", status="SUCCEEDED") == 2
    assert _get(m, steps, region="r1", kind="deploy", step="s0", status="FAILED") == 3
    assert _get(m, steps, region="r1", kind="rollback", step="s0", status="SUCCEEDED") == 2
    # A running step is not an ended attempt: it is in flight.
    assert not any(n == steps and dict(lab)["status"] == "RUNNING" for n, lab in m)
    assert _get(m, "vmfarm_host_steps_running", region="r1") == 1

    h = "vmfarm_host_step_duration_seconds"
    ok = {"kind": "deploy", "step": "s0", "status": "SUCCEEDED"}  # 3 s, 45 s, 1 s
    assert _get(m, f"{h}_bucket", le="0.5", **ok) == 0
    assert _get(m, f"{h}_bucket", le="1.0", **ok) == 1  # a bound is inclusive
    assert _get(m, f"{h}_bucket", le="5.0", **ok) == 2
    assert _get(m, f"{h}_bucket", le="30.0", **ok) == 2
    assert _get(m, f"{h}_bucket", le="60.0", **ok) == 3
    assert _get(m, f"{h}_bucket", le="+Inf", **ok) == 3
    assert _get(m, f"{h}_count", **ok) == 3
    assert _get(m, f"{h}_sum", **ok) == 49
    bad = {"kind": "deploy", "step": "s0", "status": "FAILED"}  # 200, 3600, 5000 s
    assert _get(m, f"{h}_bucket", le="120.0", **bad) == 0
    assert _get(m, f"{h}_bucket", le="300.0", **bad) == 1
    assert _get(m, f"{h}_bucket", le="3600.0", **bad) == 2
    assert _get(m, f"{h}_bucket", le="+Inf", **bad) == 3
    assert _get(m, f"{h}_sum", **bad) == 8800

    p = "vmfarm_phase_duration_seconds"
    assert _get(m, f"{p}_count", pipeline="web", kind="deploy", status="SUCCEEDED") == 2
    assert _get(m, f"{p}_sum", pipeline="web", kind="deploy", status="SUCCEEDED") == 440
    assert _get(m, f"{p}_bucket", pipeline="web", kind="deploy", status="SUCCEEDED", le="60.0") == 1
    assert _get(m, f"{p}_count", pipeline="web", kind="verify", status="FAILED") == 1
    # A manual intervention's record and a phase still running are no phase durations.
    assert not any(n.startswith(p) and dict(lab).get("kind", "").startswith("mi") for n, lab in m)
    assert not any(n.startswith(p) and dict(lab).get("status") == "RUNNING" for n, lab in m)


def test_gates_rollbacks_reconciler_and_approvals(ledger: datetime) -> None:
    _fill(ledger)
    m = _render()
    g = "vmfarm_gate_verdicts_total"
    assert _get(m, g, kind="deploy", verdict="pass") == 2
    assert _get(m, g, kind="deploy", verdict="fail") == 1
    assert _get(m, g, kind="verify", verdict="pass") == 1
    assert _get(m, g, kind="verify", verdict="fail") == 1
    assert _get(m, g, kind="rollback", verdict="pass") == 1
    assert not any(n == g and dict(lab)["kind"].startswith("mi") for n, lab in m)

    r = "vmfarm_rollbacks_total"
    assert _get(m, r, pipeline="web", status="ROLLED_BACK") == 2
    assert _get(m, r, pipeline="web", status="ROLLBACK_FAILED") == 1
    assert _get(m, r, pipeline="api", status="ROLLED_BACK") == 0

    a = "vmfarm_reconciler_actions_total"
    assert _get(m, a, action="lost_step") == 1
    assert _get(m, a, action="unclaimed_step") == 1
    assert _get(m, a, action="lost_gate") == 1
    assert _get(m, a, action="approval_timeout") == 0

    assert _get(m, "vmfarm_approvals_waiting", pipeline="api") == 1
    assert _get(m, "vmfarm_approvals_waiting", pipeline="web") == 0
    waited = _get(m, "vmfarm_approvals_oldest_waiting_seconds", pipeline="api")
    assert waited is not None and 5 * 3600 <= waited < 5 * 3600 + 120


def test_workers_per_region_and_control_workers_carry_no_placeholder(ledger: datetime) -> None:
    _fill(ledger)
    m = _render()
    assert _get(m, "vmfarm_workers", region="r1", state="live") == 2
    assert _get(m, "vmfarm_workers", region="r1", state="stale") == 0
    assert _get(m, "vmfarm_workers", region="r2", state="live") == 0
    assert _get(m, "vmfarm_workers", region="r2", state="stale") == 1
    assert _get(m, "vmfarm_control_workers", state="live") == 1
    assert _get(m, "vmfarm_worker_slots", region="r1") == 6
    assert _get(m, "vmfarm_worker_tasks_in_flight", region="r1") == 1
    assert not any(v in ("none", "None", "unknown") for _, lab in m for _k, v in lab)
    # Embedded: the consumers are known, the depths are not (no Redis), and no broker source.
    assert _get(m, "vmfarm_queue_consumers", queue="vmfarm.r1") == 2
    assert _get(m, "vmfarm_queue_consumers", queue="vmfarm.r2") == 0
    assert _get(m, "vmfarm_queue_consumers", queue="vmfarm.control") == 1
    assert not any(n == "vmfarm_queue_depth" for n, _ in m)
    assert _get(m, "vmfarm_metrics_source_up", source="ledger") == 1
    assert _get(m, "vmfarm_metrics_source_up", source="broker") is None


def test_configured_regions_and_regions_of_unfinished_runs_name_their_queues(
    ledger: datetime,
) -> None:
    _fill(ledger)
    with session_scope() as s:
        s.add(
            StageRun(
                execution_id="exrun",
                stage_index=0,
                identifier="deploy",
                status=Status.RUNNING,
                hosts=[{"name": "h9", "region": "ap-south-1"}],
            )
        )
    m = _render(regions=["sa-east-1"])
    for queue in ("vmfarm.sa-east-1", "vmfarm.ap-south-1"):
        assert _get(m, "vmfarm_queue_consumers", queue=queue) == 0, queue


def test_counters_only_go_up_as_executions_settle_and_match_a_fresh_exporter(
    ledger: datetime, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.metrics import build_registry
    from app.metrics import render as render_with

    monkeypatch.setenv("VMFARM_METRICS_SETTLE", "0")
    _fill(ledger)
    with session_scope() as s:  # an aborted run whose step is still running on its host
        s.add(
            Execution(
                id="exab",
                pipeline="api",
                status=Status.ABORTED,
                plan=_plan("dev"),
                created_at=ledger - timedelta(minutes=20),
                finished_at=ledger - timedelta(minutes=10),
            )
        )
        s.flush()
        s.add(_step("exab", "h5", 0, Status.RUNNING, None, ledger))
    registry = build_registry()  # one exporter that keeps its running totals
    first = _samples(render_with(registry).decode())
    # Then the running execution ends, the aborted one's step ends, a new one starts.
    with session_scope() as s:
        ex = s.get(Execution, "exrun")
        assert ex is not None
        ex.status, ex.finished_at = Status.SUCCEEDED, utcnow()
        s.add(ex)
        for row in s.exec(HostStepRun.__table__.select()).all():  # type: ignore[attr-defined]
            if row.status == Status.RUNNING:
                step = s.get(HostStepRun, row.id)
                assert step is not None
                step.status, step.finished_at = Status.FAILED, utcnow()
                s.add(step)
        s.add(Execution(id="exnew", pipeline="api", status=Status.QUEUED, plan=_plan("dev")))
    second = _samples(render_with(registry).decode())
    fresh = _samples(render_with(build_registry()).decode())
    counters = {k for k in second if k[0].endswith(("_total", "_bucket", "_count", "_sum"))}
    assert counters, "no counter sampled"
    for key in counters:
        # The fold adds up to the whole ledger (sums of seconds: up to float rounding).
        assert second[key] == pytest.approx(fresh[key], rel=1e-9), key
        assert second[key] >= first.get(key, 0), key  # and never goes back
    assert (
        _get(
            second,
            "vmfarm_host_steps_total",
            region="r1",
            kind="deploy",
            step="s0",
            status="FAILED",
        )
        == 5
    )
    assert (
        _get(
            second,
            "vmfarm_executions_finished_total",
            pipeline="api",
            environment="dev",
            status="ABORTED",
        )
        == 1
    )
    assert _get(second, "vmfarm_executions_started_total", pipeline="api", environment="dev") == 4


def test_a_step_the_reconciler_fails_as_lost_is_counted(
    ledger: datetime, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.coordinator import reconcile

    monkeypatch.setenv("VMFARM_HEARTBEAT_TIMEOUT", "60")
    get_settings.cache_clear()
    now = ledger
    with session_scope() as s:  # an aborted run whose worker died mid-step
        s.add(
            Execution(
                id="exlost",
                pipeline="web",
                status=Status.ABORTED,
                plan=_plan("prod"),
                created_at=now - timedelta(hours=1),
                finished_at=now,
            )
        )
        s.flush()
        row = _step("exlost", "h1", 0, Status.RUNNING, None, now)
        row.heartbeat_at = now - timedelta(minutes=10)
        s.add(row)
    before = _render()
    assert _get(before, "vmfarm_reconciler_actions_total", action="lost_step") == 0
    actions = reconcile()
    assert any("worker lost" in a for a in actions), actions
    after = _render()
    assert _get(after, "vmfarm_reconciler_actions_total", action="lost_step") == 1
    assert (
        _get(
            after, "vmfarm_host_steps_total", region="r1", kind="deploy", step="s0", status="FAILED"
        )
        == 1
    )


def test_refused_messages_are_counted_from_the_first_scrape(ledger: datetime) -> None:
    from app.metrics import count_refused_message

    m = _render()
    assert _get(m, "vmfarm_refused_messages_total", reason="unsigned") == 0
    count_refused_message("unsigned")
    count_refused_message("untrusted-signer")
    m = _render()
    assert _get(m, "vmfarm_refused_messages_total", reason="unsigned") == 1
    assert _get(m, "vmfarm_refused_messages_total", reason="untrusted-signer") == 1


def test_an_empty_ledger_still_exposes_the_series_alerts_need(ledger: datetime) -> None:
    m = _render()
    assert _get(m, "vmfarm_gate_verdicts_total", kind="verify", verdict="fail") == 0
    assert _get(m, "vmfarm_control_workers", state="live") == 0
    for action in (
        "lost_step",
        "unclaimed_step",
        "approval_timeout",
        "discovery_timeout",
        "lost_gate",
    ):
        assert _get(m, "vmfarm_reconciler_actions_total", action=action) == 0
    assert _get(m, "vmfarm_metrics_source_up", source="ledger") == 1


def test_an_unreadable_ledger_is_reported_not_raised(
    ledger: datetime, monkeypatch: pytest.MonkeyPatch
) -> None:
    # under a file: no folder can be made there, so the ledger cannot be opened
    monkeypatch.setenv("VMFARM_DATABASE_URL", "sqlite:////dev/null/x/vmfarm.db")
    get_settings.cache_clear()
    m = _render()
    assert _get(m, "vmfarm_metrics_source_up", source="ledger") == 0
    assert _get(m, "vmfarm_metrics_source_up", source="workers") == 0


def test_the_http_endpoint_serves_the_same_metrics(ledger: datetime) -> None:
    from app.metrics import serve

    _fill(ledger)
    server = serve(0, "127.0.0.1")
    try:
        _host, port = server.address
        assert server.url == f"http://127.0.0.1:{port}/metrics"
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(server.url, timeout=30) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/plain")
            body = resp.read().decode()
    finally:
        server.close()
    m = _samples(body)
    assert (
        _get(
            m,
            "vmfarm_executions_finished_total",
            pipeline="web",
            environment="prod",
            status="SUCCEEDED",
        )
        == 1
    )
    assert "# TYPE vmfarm_host_step_duration_seconds histogram" in body
    assert "# TYPE vmfarm_executions_started_total counter" in body


def test_forgetting_workers_removes_stale_ones_only(ledger: datetime) -> None:
    from app.delegates import all_workers, forget_workers

    _fill(ledger)
    with pytest.raises(LookupError, match="is live"):
        forget_workers(["w-r1@a"])
    with pytest.raises(LookupError, match="no registered worker w-nope"):
        forget_workers(["w-nope"])
    assert forget_workers(stale=True) == ["w-r2@dead"]
    assert sorted(w["name"] for w in all_workers()) == ["w-control@a", "w-r1@a", "w-r1@b"]
    assert _get(_render(), "vmfarm_workers", region="r2", state="stale") is None
