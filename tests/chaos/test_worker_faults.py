"""Worker faults while a pipeline runs: a region worker killed with SIGKILL mid-phase.

SIGKILL of the worker's whole process group (the Celery worker and its SSH connections): no
error callback runs, the step's row stays RUNNING and its heartbeat stops. The control worker's
reconciler (Celery beat, every second here) calls the step lost once its heartbeat is older than
the timeout (6 s here) and records it as DelegateRestart; the stage's failure strategy (Retry on
DelegateRestart, once, then Abort) sends a new attempt to the region queue if a live worker
consumes it, otherwise the execution ends by onRetryFailure.

Nothing shared is touched: like test_service_faults.py this module runs a private redis-server
and a private PostgreSQL 15 cluster (services.py, fixtures in conftest.py) on ports of
127.0.0.1 leased from the allocator, and its own three sshd lab hosts on leased addresses, all in
region r1. The pipeline rolls out in phases of two hosts (the first two, then the third); its
"work" step
runs a Script unit that prints a line every half second for a few seconds, and the worker is
killed while the first phase runs it. Every unit appends "<execution id> <unit>" to a file on
its host, and the lines are counted against the attempts recorded in the ledger.
"""

from __future__ import annotations

import os
import signal
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.chaos.conftest import ChaosTable
from tests.chaos.services import (
    Fleet,
    Run,
    assert_run_definite,
    attempts,
    fault_mid_phase,
    first_phase_started,
    outcome,
    pipeline_file,
    sql,
    ticking_steps,
    units_ran,
)

RUN_LIMIT = 60.0  # seconds from the kill to a terminal state (generous: CI is shared)
FOLDER = "/opt/wrk"  # where the units leave their lines
REGION_R1 = ["--region", "r1", "-c", "4"]  # a region worker of r1 (threads, -c 4)
CONTROL = ["--control", "--beat", "-c", "2"]  # the control worker with the reconciler beat
# A lost worker's step is retried once (0.1 s later), then the stage aborts.
RETRY = {
    "onFailure": {
        "errors": ["DelegateRestart"],
        "action": {
            "type": "Retry",
            "spec": {
                "retryCount": 1,
                "retryIntervals": ["0.1s"],
                "onRetryFailure": {"action": {"type": "Abort"}},
            },
        },
    }
}


@dataclass
class Kill(Run):
    victim: str = ""  # the killed worker's name
    lost: list[str] = field(default_factory=list)  # the hosts whose step it was running


def _kill_mid_phase(fleet: Fleet, lab: Any, tmp_path: Path, pick: str) -> Kill:
    """Submit the pipeline (rolling in phases of two hosts, RETRY); once both first-phase
    hosts run their long unit, SIGKILL the process group of the region worker ``pick`` (or,
    for "busiest", the one running most of them); wait for the execution to end."""
    pipeline = pipeline_file(
        tmp_path,
        ticking_steps(FOLDER),
        service="wrk",
        pipeline="worker-faults",
        failure_strategies=[RETRY],
        strategy={"type": "Rolling", "phases": [2]},
    )
    first_phase = [h.address for h in lab.hosts[:2]]
    killed = Kill("", None, "", None)

    def running(ex_id: str) -> dict[str, str] | None:
        """{host: worker} of the first phase's running steps, once both run the long unit."""
        if not first_phase_started(lab, FOLDER, ex_id):
            return None
        rows = sql(
            fleet.db_url,
            "select host, worker from hoststeprun where execution_id = %s "
            "and step_index = 0 and status = 'RUNNING'",
            ex_id,
        )
        on = {str(h): str(w) for h, w in rows}
        return on if set(on) == set(first_phase) else None

    def kill(on: dict[str, str]) -> None:
        name = Counter(on.values()).most_common(1)[0][0] if pick == "busiest" else pick
        killed.victim = name if "@" in name else f"{name}@chaos"
        proc = fleet.named[killed.victim.split("@")[0]]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        killed.lost = sorted(h for h, w in on.items() if w == killed.victim)
        assert killed.lost, (killed.victim, on)

    run = fault_mid_phase(fleet, lab, pipeline, FOLDER, running, kill, "kill", RUN_LIMIT)
    return Kill(run.ex_id, run.seconds, run.status, run.error, killed.victim, killed.lost)


def _work_attempts(fleet: Fleet, kill: Kill) -> str:
    """The lost hosts' attempts of the step "work", for the chaos table."""
    tries = []
    for host in kill.lost:
        work = [a for a in attempts(fleet.db_url, kill.ex_id, host) if a[0] == "work"]
        tries.append(
            f"{host} "
            + ", ".join(
                f"{a}:{st}"
                + (f"/{ec}" if ec else "")
                + (" on the other worker" if w and w != kill.victim else "")
                for _, a, st, ec, _, w in work
            )
        )
    return "; work attempts: " + "; ".join(tries)


def _kill_and_record(
    fleet: Fleet, lab: Any, tmp_path: Path, pick: str, chaos_table: ChaosTable, fault: str
) -> tuple[Kill, dict[str, Any]]:
    """_kill_mid_phase, its row in the chaos table; the execution must have ended, in a
    definite state (_assert_definite). The kill and the execution's report."""
    with chaos_table.row(fault) as row:
        kill = _kill_mid_phase(fleet, lab, tmp_path, pick)
        row.seconds = kill.seconds
        row.outcome = outcome(fleet, kill, RUN_LIMIT, lambda: _work_attempts(fleet, kill))
    assert kill.seconds is not None, f"{row.outcome}\n{fleet.worker_logs()}"
    return kill, _assert_definite(fleet, kill, lab)


def _assert_definite(fleet: Fleet, kill: Kill, lab: Any) -> dict[str, Any]:
    """A terminal execution (a failure with its reason), every lab host with a terminal
    outcome, no attempt left open, no unit run more often than its step was attempted (once in
    a last attempt that succeeded), the killed worker's steps recorded as DelegateRestart, and
    nothing run on it after the kill."""
    got = assert_run_definite(fleet, kill.ex_id, lab, FOLDER)
    for host in kill.lost:
        first = attempts(fleet.db_url, kill.ex_id, host)[0]
        assert first[:4] == ("work", 1, "FAILED", "DelegateRestart"), first
        assert first[5] == kill.victim and "worker lost" in (first[4] or ""), first
    for host in lab.hosts:
        tries = attempts(fleet.db_url, kill.ex_id, host.address)
        assert all(a[5] != kill.victim for a in tries if a[3] != "DelegateRestart" or a[1] > 1), (
            host.address,
            tries,
        )
    return got


# --- the faults -----------------------------------------------------------------------------------


def test_a_region_worker_killed_mid_phase_has_its_steps_retried_on_the_other_worker(
    fleet_of: Callable[[dict[str, list[str]]], Fleet],
    worker_lab: Any,
    chaos_table: ChaosTable,
    tmp_path: Path,
) -> None:
    # Given two region workers of r1 and a control worker with the reconciler
    fleet = fleet_of({"w-ra": REGION_R1, "w-rb": REGION_R1, "w-control": CONTROL})
    # When the worker running (most of) the first phase's long units is SIGKILLed
    kill, got = _kill_and_record(
        fleet,
        worker_lab,
        tmp_path,
        "busiest",
        chaos_table,
        "SIGKILL of a region worker (its process group) mid-phase, while the first of two "
        "phases runs a step; a second worker of the region; Retry on DelegateRestart",
    )
    # Then the reconciler calls its steps lost (DelegateRestart), retries them on the other
    # worker, the second phase follows, and no unit ran more than once per attempt
    assert got["status"] == "SUCCEEDED", f"{got['status']}\n{fleet.worker_logs()}"
    assert {h["status"] for h in got["stages"][0]["hosts"]} == {"SUCCEEDED"}
    for host in worker_lab.hosts:
        work = [a for a in attempts(fleet.db_url, kill.ex_id, host.address) if a[0] == "work"]
        if host.address in (kill.lost):
            assert [(a, st) for _, a, st, *_ in work] == [(1, "FAILED"), (2, "SUCCEEDED")]
            assert work[1][5] not in (None, kill.victim), work  # the other worker took it
            assert units_ran(host, FOLDER, kill.ex_id) == {"first": 2, "second": 1, "after": 1}
        else:
            assert [(a, st) for _, a, st, *_ in work] == [(1, "SUCCEEDED")]
            assert units_ran(host, FOLDER, kill.ex_id) == {"first": 1, "second": 1, "after": 1}


def test_the_only_region_worker_killed_mid_phase_ends_the_execution_by_on_retry_failure(
    fleet_of: Callable[[dict[str, list[str]]], Fleet],
    worker_lab: Any,
    chaos_table: ChaosTable,
    tmp_path: Path,
) -> None:
    # Given a single region worker of r1 and a control worker with the reconciler
    fleet = fleet_of({"w-rc": REGION_R1, "w-control": CONTROL})
    # When it is SIGKILLed while the first phase runs its long units
    kill, got = _kill_and_record(
        fleet,
        worker_lab,
        tmp_path,
        "w-rc",
        chaos_table,
        "SIGKILL of the only region worker (its process group) mid-phase, while the first of "
        "two phases runs a step; Retry on DelegateRestart, onRetryFailure Abort",
    )
    # Then its steps are DelegateRestart, not retried (no live worker consumes vmfarm.r1),
    # the execution ends as onRetryFailure says, the second phase never ran
    assert kill.lost == [h.address for h in worker_lab.hosts[:2]]
    assert got["status"] == "ABORTED", f"{got['status']}\n{fleet.worker_logs()}"
    for host in worker_lab.hosts[:2]:
        work = attempts(fleet.db_url, kill.ex_id, host.address)
        assert [(s, a, st) for s, a, st, *_ in work] == [("work", 1, "FAILED")], work
        assert "not retried: no live worker consumes vmfarm.r1" in (work[0][4] or ""), work
        assert units_ran(host, FOLDER, kill.ex_id) == {"first": 1}
    last = worker_lab.hosts[2]
    assert attempts(fleet.db_url, kill.ex_id, last.address) == []
    assert units_ran(last, FOLDER, kill.ex_id) == {}
