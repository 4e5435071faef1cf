"""Messages the broker lost are sent again (app.coordinator.resend).

One region worker of concurrency 1 serves three real sshd hosts of one phase: the first host's
step waits for a file, so the other hosts' messages wait in Redis (the test sees them in the
region's queue). Redis restarts without persistence and forgets them. The reconciler (Celery
beat, every second) finds those hosts without a row in the ledger and their messages in no
queue, and sends them again under the same idempotency keys: the run ends SUCCEEDED long
before the dispatch expiry (an hour), each host's step ran once (each run appends a line to a
file on its host; the lines are counted), and the reconciler's actions say what it re-sent.

A host later in a ``maxConcurrency`` lane has no message yet while the host before it runs: it
is never taken for lost, however long it waits.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.chaos.conftest import ChaosTable
from tests.chaos.services import (
    Fleet,
    PrivateRedis,
    assert_definite,
    outcome,
    pipeline_file,
    report,
    script_unit,
    sql,
    submit,
    units_ran,
    wait_for,
    wait_terminal,
)
from tests.conftest import run_vmfarm

RUN_LIMIT = 120.0  # seconds from the fault to a terminal state (the dispatch expiry is 3600)
RECONCILE = 1.0  # VMFARM_RECONCILE_INTERVAL of the fleet (services.FAST)


@pytest.fixture
def fleet(
    request: pytest.FixtureRequest,
    fleet_of: Callable[[dict[str, list[str]]], Fleet],
    worker_lab: Any,
) -> Fleet:
    """One region worker for r1 that runs one task at a time, and a control worker with the
    reconciler (beat)."""
    tag = request.node.name[-16:].replace("[", "-").replace("]", "")
    return fleet_of(
        {
            f"w-lost-region-{tag}": ["--region", "r1", "-c", "1"],
            f"w-lost-control-{tag}": ["--control", "--beat", "-c", "2"],
        }
    )


def _gated_steps(folder: str) -> list[dict[str, Any]]:
    """Step "work": leaves "<execution id> work" in ``<folder>/units``, then waits until
    ``<folder>/go`` exists."""
    wait = f"while [ ! -e {folder}/go ]; do sleep 0.2; done\n"
    return [
        {
            "type": "Command",
            "name": "Work",
            "identifier": "work",
            "timeout": "120s",
            "spec": {"commandUnits": [script_unit(folder, "work", wait)]},
        }
    ]


def _started(lab: Any, folder: str, ex_id: str) -> list[str]:
    """The hosts whose step has started (its line is in their units file)."""
    return [h.address for h in lab.hosts if units_ran(h, folder, ex_id)["work"]]


def _release(lab: Any, folder: str) -> None:
    for h in lab.hosts:
        gate = Path(h.host_dir) / folder.lstrip("/") / "go"
        gate.parent.mkdir(parents=True, exist_ok=True)
        gate.touch()


def _resent(fleet: Fleet, ex_id: str) -> dict[str, list[str]]:
    """The deploy phase's record of re-sent hosts (host -> when, each time)."""
    rows = sql(
        fleet.db_url,
        "select verdict from phaserun where execution_id = %s and kind = 'deploy'",
        ex_id,
    )
    return dict(((rows[0][0] or {}).get("resent") or {}) if rows else {})


def _queued(redis: PrivateRedis, queue: str) -> int:
    import redis as redis_py

    return int(redis_py.Redis.from_url(f"{redis.url}/0").llen(queue))


def _quiet_since(since: datetime, seconds: float) -> Callable[[], bool]:
    return lambda: datetime.utcnow() - since > timedelta(seconds=seconds)


def test_a_host_still_queued_when_redis_restarts_is_sent_again_and_runs_once(
    fleet: Fleet,
    private_redis: PrivateRedis,
    worker_lab: Any,
    chaos_table: ChaosTable,
    tmp_path: Path,
) -> None:
    lab, folder = worker_lab, "/opt/lost/restart"
    pipeline = pipeline_file(
        tmp_path, _gated_steps(folder), service="lost", pipeline="lost-restart"
    )
    fault = (
        "Redis (no persistence) restarted, down 1 s, while 2 of 3 hosts' messages wait "
        "in their region's queue (one worker slot, busy)"
    )
    with chaos_table.row(fault) as row:
        # Given one host running its step (its worker's only slot) and two hosts' messages
        # waiting in vmfarm.r1
        ex_id = submit(fleet, pipeline, lab)
        first = wait_for(lambda: _started(lab, folder, ex_id), 60, "the first host's step", fleet)
        assert len(first) == 1, first
        wait_for(
            lambda: _queued(private_redis, "vmfarm.r1") == 2,
            30,
            "two messages waiting in vmfarm.r1",
            fleet,
        )
        queued = {h.address for h in lab.hosts} - set(first)
        # When Redis restarts without persistence (the queued messages are gone)
        private_redis.restart(down=1.0)
        began = time.monotonic()
        assert _queued(private_redis, "vmfarm.r1") == 0
        # Then the reconciler sends both again: they wait in the queue behind the running host
        wait_for(
            lambda: (
                set(_resent(fleet, ex_id)) == queued and _queued(private_redis, "vmfarm.r1") == 2
            ),
            60,
            "the reconciler to re-send the lost messages",
            fleet,
        )
        # and, while they wait there for several reconcile intervals, it does not send them
        # again (it finds them in the queue)
        resent = _resent(fleet, ex_id)
        shown = run_vmfarm("status", ex_id, env=fleet.env, timeout=60)
        assert shown.returncode == 0 and "FAILED" not in shown.stdout, shown.stdout
        wait_for(
            _quiet_since(
                max(datetime.fromisoformat(t[-1]) for t in resent.values()), 4 * RECONCILE
            ),
            10,
            "four reconcile intervals",
            fleet,
        )
        assert _resent(fleet, ex_id) == resent
        assert _queued(private_redis, "vmfarm.r1") == 2
        _release(lab, folder)
        run = wait_terminal(fleet, ex_id, began, RUN_LIMIT)
        row.seconds = run.seconds
        row.outcome = outcome(
            fleet,
            run,
            RUN_LIMIT,
            lambda: f"; re-sent by the reconciler: {len(_resent(fleet, ex_id))} host(s)",
        )
    assert run.seconds is not None, f"{row.outcome}\n{fleet.worker_logs()}"
    # The run succeeds, each host's step ran exactly once, every host in the ledger once
    got = report(fleet.env, ex_id)
    assert run.status == "SUCCEEDED", f"{run.status}: {run.error}\n{fleet.worker_logs()}"
    assert_definite(
        got,
        lab,
        sql(
            fleet.db_url,
            "select host from hoststeprun where execution_id = %s and finished_at is null",
            ex_id,
        ),
    )
    for h in lab.hosts:
        assert units_ran(h, folder, ex_id) == {"work": 1}, h.address
        assert [
            (s["status"], s["attempt"])
            for s in next(x for x in got["stages"][0]["hosts"] if x["host"] == h.address)["steps"]
        ] == [("SUCCEEDED", 1)]
    # and status shows which hosts were sent again; the reconciler's actions said so
    deploy = next(p for p in got["stages"][0]["phases"] if p["kind"] == "deploy")
    assert set(deploy["resent"]) == queued and "resent" not in deploy["verdict"]
    said = (fleet.home / f"{next(n for n in fleet.named if 'control' in n)}.log").read_text()
    for host in queued:
        assert re.search(
            rf"{ex_id}: {re.escape(host)}: its message was lost from vmfarm\.r1 "
            r"\(the broker restarted\?\); re-sent under the same idempotency key",
            said,
        ), said[-3000:]


def test_a_host_behind_a_running_one_in_its_lane_is_not_taken_for_lost(
    fleet: Fleet, private_redis: PrivateRedis, worker_lab: Any, tmp_path: Path
) -> None:
    lab, folder = worker_lab, "/opt/lost/lane"
    pipeline = pipeline_file(
        tmp_path,
        _gated_steps(folder),
        service="lane",
        pipeline="lost-lane",
        strategy={"type": "Basic", "maxConcurrency": 1},
    )
    # Given one lane (maxConcurrency 1): its first host runs, the others have no message yet
    ex_id = submit(fleet, pipeline, lab)
    first = wait_for(lambda: _started(lab, folder, ex_id), 60, "the first host's step", fleet)
    assert len(first) == 1, first
    assert _queued(private_redis, "vmfarm.r1") == 0
    dispatched = sql(
        fleet.db_url,
        "select dispatched_at from phaserun where execution_id = %s and kind = 'deploy'",
        ex_id,
    )[0][0]
    # When the reconciler has run for several intervals (beat, and once more by hand)
    wait_for(_quiet_since(dispatched, 4 * RECONCILE), 10, "four reconcile intervals", fleet)
    rec = run_vmfarm("reconcile", "-o", "json", env=fleet.env, timeout=60)
    assert rec.returncode == 0, rec.stderr
    # Then nothing was sent again: the hosts behind the running one are not lost
    assert not [a for a in json.loads(rec.stdout)["actions"] if "re-sent" in a]
    assert _resent(fleet, ex_id) == {}
    assert _started(lab, folder, ex_id) == first
    # and once the first host finishes, the lane goes on: each host's step once, SUCCEEDED
    _release(lab, folder)
    run = wait_terminal(fleet, ex_id, time.monotonic(), RUN_LIMIT)
    assert run.status == "SUCCEEDED", f"{run.status}: {run.error}\n{fleet.worker_logs()}"
    for h in lab.hosts:
        assert units_ran(h, folder, ex_id) == {"work": 1}, h.address
    assert _resent(fleet, ex_id) == {}
