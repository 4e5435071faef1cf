"""Service faults while a pipeline runs on real workers: Redis (broker and result backend)
restarted mid-run, PostgreSQL (the ledger) restarted mid-run.

Neither fault may touch what other suites share (Redis on 127.0.0.1:6379, PostgreSQL on
127.0.0.1:5432): this module starts a private redis-server (no persistence: a restart loses
every queue, result and chord counter, as a crashed cache would) and a private PostgreSQL 15
cluster (initdb into a temporary directory owned by the ``postgres`` user, trust auth, its own
port and socket directory), both on ports of 127.0.0.1 leased from the allocator, and restarts
those. The lab is four real sshd hosts on leased addresses in two regions; one region worker
serves both regions (threads pool) and a control worker runs the periodic reconciler (Celery
beat) with short heartbeat and reconcile intervals.

The pipeline rolls out in two phases of two hosts. The fault hits while the first phase runs a
Script unit that prints a line every half second for a few seconds (log flushes and heartbeats
are in flight); the second phase is sent after it. Each test ends in a definite state
within RUN_LIMIT seconds, with every host's outcome in the ledger, no attempt left open, and no
command unit run twice on any host: each unit appends "<execution id> <unit>" to a file on its
host and the lines are counted.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.chaos.conftest import ChaosTable
from tests.chaos.services import (
    TICKS,
    Fleet,
    PrivatePostgres,
    PrivateRedis,
    Run,
    assert_run_definite,
    fault_mid_phase,
    first_phase_started,
    outcome,
    pipeline_file,
    sql,
    ticking_steps,
    units_ran,
)

RUN_LIMIT = 120.0  # seconds from the fault to a terminal state (generous: CI is shared)


@pytest.fixture
def fleet(
    request: pytest.FixtureRequest,
    fleet_of: Callable[[dict[str, list[str]]], Fleet],
    service_lab: Any,
) -> Fleet:
    """A region worker for r1 and r2 and a control worker with the reconciler (beat)."""
    tag = request.node.name[-20:].replace("[", "-").replace("]", "")
    return fleet_of(
        {
            f"w-svc-region-{tag}": ["--region", "r1", "--region", "r2", "-c", "8"],
            f"w-svc-control-{tag}": ["--control", "--beat", "-c", "2"],
        }
    )


def _folder(case: str) -> str:
    return f"/opt/svc/{case}"


def _run_through(
    fault: Callable[[], None], fleet: Fleet, lab: Any, case: str, tmp_path: Path
) -> Run:
    """Submit the pipeline (rolling, two phases of two hosts: the second is sent after the
    fault, through the restarted service), inject ``fault`` once the first phase's hosts run
    their long unit, wait for the end."""
    folder = _folder(case)
    pipeline = pipeline_file(
        tmp_path,
        ticking_steps(folder),
        service="svc",
        pipeline=f"svc-{case}",
        strategy={"type": "Rolling", "phases": [2]},
    )
    return fault_mid_phase(
        fleet,
        lab,
        pipeline,
        folder,
        lambda ex_id: first_phase_started(lab, folder, ex_id),
        lambda _: fault(),
        "fault",
        RUN_LIMIT,
    )


def _gates(fleet: Fleet, ex_id: str) -> str:
    """Which phases the reconciler judged (their gate was lost), for the chaos table."""
    judged = [
        str(p + 1)
        for p, v in sql(
            fleet.db_url,
            "select phase, verdict from phaserun where execution_id = %s order by phase",
            ex_id,
        )
        if (v or {}).get("judged_by")
    ]
    return (
        f"; gate of phase {', '.join(judged)} lost, phase judged by the reconciler"
        if judged
        else "; every gate ran"
    )


def _assert_logs_whole(db_url: str, ex_id: str, lab: Any) -> None:
    """Every tick the long unit printed is in the ledger's log chunks, once."""
    for host in lab.hosts:
        text = "".join(
            r[0]
            for r in sql(
                db_url,
                "select c.text from logchunk c join hoststeprun r on "
                "r.id = c.host_step_run_id where r.execution_id = %s and r.host = %s and "
                "r.step_id = 'work' order by c.seq",
                ex_id,
                host.address,
            )
        )
        ticks = [line for line in text.splitlines() if line.startswith("tick ")]
        assert ticks == [f"tick {i}" for i in range(1, TICKS + 1)], (host.address, text)


# --- the faults -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "fault"),
    [
        # Redis restarts (down 1 s, all in it lost: queues, results, the phase's chord counters);
        # the workers reconnect, the first phase's hosts finish their steps, the reconciler judges
        # that phase (its gate was lost with the chord's counters), the second phase goes through
        # the new Redis
        pytest.param(
            "redis",
            "Redis (broker and result backend, no persistence) restarted, down "
            "1 s, while the first of two phases runs a step",
            id="redis",
        ),
        # PostgreSQL restarts (fast shutdown: every connection is terminated; down 1 s) while
        # heartbeats and log flushes are in flight; the workers' SQL survives the outage (no
        # output lost), every host's steps are recorded, the second phase runs on the pooled
        # connections that outlived the restart
        pytest.param(
            "pg",
            "PostgreSQL (the ledger) restarted, fast shutdown, down 1 s, while "
            "the first of two phases runs a step",
            id="pg",
        ),
    ],
)
def test_a_service_restarted_mid_run_ends_the_execution_with_each_unit_run_once(
    case: str,
    fault: str,
    fleet: Fleet,
    private_redis: PrivateRedis,
    private_pg: PrivatePostgres,
    service_lab: Any,
    chaos_table: ChaosTable,
    tmp_path: Path,
) -> None:
    lab = service_lab
    server = private_redis if case == "redis" else private_pg
    # When the first phase's hosts run their long unit, the service restarts (down 1 s)
    with chaos_table.row(fault) as row:
        run = _run_through(lambda: server.restart(down=1.0), fleet, lab, case, tmp_path)
        row.seconds = run.seconds
        row.outcome = outcome(fleet, run, RUN_LIMIT, lambda: _gates(fleet, run.ex_id))
    # Then the execution succeeds, every unit ran once and no tick of the output was lost
    assert run.seconds is not None, f"{row.outcome}\n{fleet.worker_logs()}"
    assert_run_definite(fleet, run.ex_id, lab, _folder(case))
    assert run.status == "SUCCEEDED", f"{run.status}: {run.error}\n{fleet.worker_logs()}"
    for host in lab.hosts:
        assert units_ran(host, _folder(case), run.ex_id) == {"first": 1, "second": 1, "after": 1}
    _assert_logs_whole(fleet.db_url, run.ex_id, lab)


# --- what the PostgreSQL restart found (fixed; these keep it fixed) ------------------------------


@pytest.fixture
def ledger(private_pg: PrivatePostgres, request: pytest.FixtureRequest) -> Iterator[str]:
    """This process's ledger (app.db) on a fresh database of the private cluster."""
    from app.db import reset_engines
    from app.settings import get_settings

    if not private_pg.running:
        private_pg.start()
    url = private_pg.create_database(f"unit_{request.node.name[5:40]}")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VMFARM_DATABASE_URL", url)
        get_settings.cache_clear()
        reset_engines()
        try:
            yield url
        finally:
            reset_engines()
            get_settings.cache_clear()
    get_settings.cache_clear()


def _statements(engine: Any) -> list[str]:
    """Every statement ``engine`` sends from now on (pings included: SQLAlchemy's pre-ping
    goes through the dialect's do_ping, counted here too)."""
    from sqlalchemy import event

    seen: list[str] = []
    event.listen(
        engine, "before_cursor_execute", lambda _c, _cur, statement, *_: seen.append(statement)
    )
    ping = engine.dialect.do_ping

    def counted(conn: Any) -> bool:
        seen.append("<ping>")
        return bool(ping(conn))

    engine.dialect.do_ping = counted
    return seen


def test_pooled_connections_outlive_a_restart_without_a_ping_per_transaction(
    ledger: str, private_pg: PrivatePostgres
) -> None:
    from sqlalchemy import text

    from app.db import get_engine, session_scope

    engine = get_engine()
    seen = _statements(engine)
    for _ in range(3):
        with session_scope() as s:
            assert s.execute(text("select 1")).scalar() == 1
    assert seen == ["select 1"] * 3, seen  # one round trip per transaction, no ping
    # When the server restarts under the idle pooled connections
    private_pg.restart(down=0.2)
    seen.clear()
    # Then the next transactions run on new connections, without an error or a ping
    for _ in range(3):
        with session_scope() as s:
            assert s.execute(text("select 1")).scalar() == 1
    assert seen == ["select 1"] * 3, seen


def test_a_claim_is_one_commit_and_only_its_own_delivery_owns_the_step(
    ledger: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A host step's claim (take a PENDING row over, or insert it) is one transaction; the
    unique idempotency key still gives the step to one delivery only."""
    from sqlalchemy import event
    from sqlmodel import select

    from app.canvas import HostStepKey
    from app.db import get_engine, session_scope
    from app.execution import ledger as steps
    from app.models import Execution, HostStepRun, Status

    with session_scope() as s:
        s.add(Execution(id="svcclaim", pipeline="p", status=Status.RUNNING))
    fresh = HostStepKey("svcclaim", 0, 0, "h1", 0, 1, "r1")
    retried = HostStepKey("svcclaim", 0, 0, "h2", 0, 2, "r1")
    with session_scope() as s:  # the retry engine records attempt 2 PENDING before sending it
        pending = HostStepRun(
            idem_key=retried.idem,
            execution_id="svcclaim",
            stage_index=0,
            phase=0,
            step_index=0,
            step_id="",
            host="h2",
            region="r1",
            attempt=2,
            status=Status.PENDING,
            outputs={},
        )
        s.add(pending)
    commits: list[int] = []
    event.listen(get_engine(), "commit", lambda _conn: commits.append(1))

    # a first delivery inserts the row and owns it: one commit
    _, existing = steps.claim(fresh, task_id="t1", worker="w1", queue="vmfarm.r1")
    assert existing is None and len(commits) == 1
    # the first delivery of a retried attempt takes its PENDING row over: one commit
    taken, existing = steps.claim(retried, task_id="t2", worker="w1", queue="vmfarm.r1")
    assert existing is None and taken == pending.id and len(commits) == 2
    # a second delivery of either finds the row and does not own it (nothing runs twice)
    for key in (fresh, retried):
        again = steps.claim(key, task_id="t3", worker="w2", queue="vmfarm.r1")
        assert again[1] is not None and again[1].worker == "w1"
    with session_scope() as s:
        rows = s.exec(select(HostStepRun).where(HostStepRun.execution_id == "svcclaim")).all()
    assert sorted((r.host, r.status, r.task_id) for r in rows) == [
        ("h1", Status.RUNNING, "t1"),
        ("h2", Status.RUNNING, "t2"),
    ]
    # a claim tried again after its commit's answer was lost (same owner, same start to the
    # microsecond) recognises the row as its own
    mine = HostStepKey("svcclaim", 0, 0, "h3", 0, 1, "r1")
    monkeypatch.setattr(steps, "utcnow", lambda: rows[0].started_at)
    first = steps.claim(mine, task_id="t4", worker="w1", queue="vmfarm.r1")
    assert steps.claim(mine, task_id="t4", worker="w1", queue="vmfarm.r1") == (first[0], None)


def test_a_transaction_waits_for_a_restarting_server_and_a_cut_one_is_tried_again(
    ledger: str, private_pg: PrivatePostgres
) -> None:
    import threading

    from sqlalchemy import text

    from app.db import get_engine, retrying, session_scope

    get_engine()  # a running process: its engine and pool exist
    # A transaction started while the server is down waits for it (up to RECONNECT_SECONDS)
    private_pg.stop()
    timer = threading.Timer(1.5, private_pg.start)
    timer.start()
    try:
        began = time.monotonic()
        with session_scope() as s:
            assert s.execute(text("select 1")).scalar() == 1
        assert time.monotonic() - began >= 1.0
    finally:
        timer.join()
    # A transaction whose connection the server cuts in the middle is tried again whole
    calls = 0

    def work() -> int:
        nonlocal calls
        calls += 1
        with session_scope() as s:
            if calls == 1:
                s.execute(text("select pg_terminate_backend(pg_backend_pid())"))
            return int(s.execute(text("select 2")).scalar() or 0)

    assert retrying(work, what="test") == 2 and calls == 2
    # and an error that is not a lost connection is not
    calls = 0

    def broken() -> None:
        nonlocal calls
        calls += 1
        with session_scope() as s:
            s.execute(text("select no_such_column from execution"))

    with pytest.raises(Exception, match="no_such_column"):
        retrying(broken, what="test")
    assert calls == 1


def test_an_outcome_never_overwrites_the_reconciler_s_verdict(ledger: str) -> None:
    """A step that finishes after the reconciler called it lost (its heartbeat went stale
    while the ledger was away) keeps the reconciler's verdict: a Retry strategy may already
    have sent a new attempt."""
    from sqlmodel import select

    from app.canvas import HostStepKey
    from app.db import session_scope
    from app.execution.ledger import claim
    from app.execution.ledger import finish_step as _finish
    from app.models import Execution, HostStepRun, Status, utcnow

    with session_scope() as s:
        s.add(Execution(id="svcfinish", pipeline="p", status=Status.RUNNING))
    key = HostStepKey("svcfinish", 0, 0, "h1", 0, 1, "r1")
    run_id, existing = claim(key, task_id="t1", worker="w1", queue="vmfarm.r1")
    assert existing is None
    # the same claim again (a duplicate delivery) finds the row and does not own it
    assert claim(key, task_id="t2", worker="w2", queue="vmfarm.r1")[1] is not None
    with session_scope() as s:
        row = s.exec(select(HostStepRun).where(HostStepRun.id == run_id)).one()
        row.status, row.error_class, row.finished_at = Status.FAILED, "DelegateRestart", utcnow()
        s.add(row)
    out = _finish(run_id, key, {"status": Status.SUCCEEDED, "exit_code": 0})
    assert (out["status"], out["error_class"]) == (Status.FAILED, "DelegateRestart")
    with session_scope() as s:
        row = s.exec(select(HostStepRun).where(HostStepRun.id == run_id)).one()
        assert (row.status, row.error_class) == (Status.FAILED, "DelegateRestart")
