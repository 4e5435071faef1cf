"""Worker faults while a pipeline runs: a region worker killed with SIGKILL mid-phase.

SIGKILL of the worker's whole process group (the Celery worker and its SSH connections): no
error callback runs, the step's row stays RUNNING and its heartbeat stops. The control worker's
reconciler (Celery beat, every second here) calls the step lost once its heartbeat is older than
the timeout (6 s here) and records it as DelegateRestart; the stage's failure strategy (Retry on
DelegateRestart, once, then Abort) sends a new attempt to the region queue if a live worker
consumes it, otherwise the execution ends by onRetryFailure.

Nothing shared is touched: like test_service_faults.py this module runs a private redis-server
and a private PostgreSQL 15 cluster (its classes are reused) on free ports of 127.0.0.1, and its
own three sshd lab hosts on 127.0.1.97-99 (other suites use 90-96, 101-148, 150-254), all in
region r1. The pipeline rolls out in phases of two hosts (97 and 98, then 99); its "work" step
runs a Script unit that prints a line every half second for a few seconds, and the worker is
killed while the first phase runs it. Every unit appends "<execution id> <unit>" to a file on
its host, and the lines are counted against the attempts recorded in the ledger.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.chaos.conftest import ChaosTable
from tests.chaos.test_service_faults import (
    PrivatePostgres,
    PrivateRedis,
    _require_services,
)
from tests.conftest import REPO, _stop, _wait_for_workers, base_env, run_vmfarm

WORKER_FIRST = 97  # lab hosts 127.0.1.97 .. 127.0.1.99
WORKER_HOSTS = 3
TERMINAL = {"SUCCEEDED", "FAILED", "ABORTED", "ROLLED_BACK", "ROLLBACK_FAILED"}
HOST_DONE = {"SUCCEEDED", "FAILED", "SKIPPED", "IGNORED", "ABORTED", "ROLLED_BACK",
             "ROLLBACK_FAILED"}
RUN_LIMIT = 60.0  # seconds from the kill to a terminal state (generous: CI is shared)
# Fast liveness: heartbeats every 0.5 s, a step is lost after 6 s (a margin for a loaded
# machine: a live worker's step must never look lost), the reconciler runs every 1 s.
FAST = {"VMFARM_HEARTBEAT_INTERVAL": "0.5", "VMFARM_HEARTBEAT_TIMEOUT": "6",
        "VMFARM_RECONCILE_INTERVAL": "1"}
TICKS = 10  # the long unit prints a line every 0.5 s, this many times (5 s)
UNITS = {"work": ["first", "second"], "after": ["after"]}


# --- private services and lab -------------------------------------------------------------------


@pytest.fixture(scope="module")
def worker_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateRedis]:
    _require_services()
    server = PrivateRedis(tmp_path_factory.mktemp("wredis"))
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def worker_pg() -> Iterator[PrivatePostgres]:
    _require_services()
    cluster = PrivatePostgres()
    try:
        cluster.init()
        cluster.start()
        yield cluster
    finally:
        cluster.cleanup()


@pytest.fixture(scope="module")
def worker_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Three real sshd hosts, 127.0.1.97-99, all in region r1."""
    _require_services()
    from app.lab import lab_down, lab_up

    root = tmp_path_factory.mktemp("wlab")
    state = lab_up(WORKER_HOSTS, root=root, regions=["r1"], sandbox=False, first=WORKER_FIRST)
    try:
        assert state.mode == "ssh" and state.running, f"lab did not start: {state.reason}"
        yield state
    finally:
        lab_down(root=root)


@dataclass
class Fleet:
    """One test's environment: region workers by short name, the control worker, logs."""

    env: dict[str, str]
    home: Path
    region: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)

    @property
    def db_url(self) -> str:
        return self.env["VMFARM_DATABASE_URL"]

    def start(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        log = self.home / f"{name}.log"
        self.logs.append(log)
        with log.open("wb") as fh:
            proc = subprocess.Popen(
                [sys.executable, "-m", "cli.main", "worker", "-n", f"{name}@chaos", "-l",
                 "INFO", *args], env=self.env, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT,
                start_new_session=True)
        self.procs.append(proc)
        return proc

    def worker_logs(self, chars: int = 5000) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-chars:]}"
                         for p in self.logs if p.exists())


@pytest.fixture
def fleet_of(request: pytest.FixtureRequest, tmp_path: Path, worker_redis: PrivateRedis,
             worker_pg: PrivatePostgres) -> Iterator[Callable[[list[str]], Fleet]]:
    """fleet_of(names): those region workers of r1 (threads, -c 4) and a control worker with
    the reconciler beat, on an empty private Redis and a database of the test's own."""
    import redis

    for db in (0, 1):
        redis.Redis.from_url(f"{worker_redis.url}/{db}").flushdb()
    db_url = worker_pg.create_database(f"wrk_{request.node.name[5:40]}")
    home = tmp_path / "home"
    home.mkdir()
    env = base_env(VMFARM_BROKER_URL=f"{worker_redis.url}/0",
                   VMFARM_RESULT_BACKEND=f"{worker_redis.url}/1", VMFARM_DATABASE_URL=db_url,
                   VMFARM_HOME=str(home), NO_COLOR="1", **FAST)
    fleet = Fleet(env=env, home=home)

    def make(names: list[str]) -> Fleet:
        for name in names:
            fleet.region[name] = fleet.start(name, ["--region", "r1", "-c", "4"])
        fleet.start("w-control", ["--control", "--beat", "-c", "2"])
        try:
            _wait_for_workers(env, [f"{n}@chaos" for n in [*names, "w-control"]])
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{fleet.worker_logs()}") from None
        return fleet

    try:
        yield make
    finally:
        _stop(fleet.procs)


# --- the pipeline and the ledger ------------------------------------------------------------------


def _script(unit: str, extra: str = "") -> dict[str, Any]:
    script = ("mkdir -p /opt/wrk\n"
              f"echo \"<+pipeline.executionId> {unit}\" >> /opt/wrk/units\n{extra}")
    return {"identifier": unit, "type": "Script",
            "spec": {"source": {"type": "Inline", "spec": {"script": script}}}}


def _pipeline(tmp: Path) -> Path:
    """Rolling in phases of two hosts; a lost worker's step is retried once (0.1 s later),
    then the stage aborts. Step "work": a unit printing TICKS lines 0.5 s apart, then a quick
    one; step "after": one quick unit."""
    ticking = f"for i in $(seq 1 {TICKS}); do echo \"tick $i\"; sleep 0.5; done\n"
    steps = [
        {"type": "Command", "name": "Work", "identifier": "work", "timeout": "60s",
         "spec": {"commandUnits": [_script("first", ticking), _script("second")]}},
        {"type": "Command", "name": "After", "identifier": "after", "timeout": "60s",
         "spec": {"commandUnits": [_script("after")]}},
    ]
    retry = {"onFailure": {"errors": ["DelegateRestart"], "action": {
        "type": "Retry", "spec": {"retryCount": 1, "retryIntervals": ["0.1s"],
                                  "onRetryFailure": {"action": {"type": "Abort"}}}}}}
    docs = [
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "wrk"},
         "spec": {"serviceDefinition": {"type": "Ssh"}}},
        {"apiVersion": "v1", "kind": "Environment", "metadata": {"name": "lab"},
         "spec": {"type": "PreProduction"}},
        {"apiVersion": "v1", "kind": "Pipeline", "metadata": {"name": "worker-faults"}, "spec": {
            "stages": [{"stage": {
                "name": "Deploy", "identifier": "deploy", "type": "Deployment",
                "failureStrategies": [retry], "spec": {
                    "service": {"serviceRef": "wrk"},
                    "environment": {"environmentRef": "lab",
                                    "infrastructureDefinitions": [{"identifier": "lab"}]},
                    "strategy": {"type": "Rolling", "phases": [2]},
                    "execution": {"steps": [{"step": s} for s in steps]}}}}]}},
    ]
    path = tmp / "pipeline.yaml"
    path.write_text("---\n".join(json.dumps(d) + "\n" for d in docs))  # JSON is YAML
    return path


def _sql(db_url: str, query: str, *args: Any) -> list[tuple[Any, ...]]:
    import psycopg

    with psycopg.connect(db_url, autocommit=True, connect_timeout=3) as conn:
        return list(conn.execute(query, args).fetchall())


def _units(host: Any, ex_id: str) -> Counter[str]:
    """How many times each unit of this execution ran on ``host``."""
    path = Path(host.host_dir) / "opt" / "wrk" / "units"
    lines = path.read_text().splitlines() if path.exists() else []
    return Counter(line.split(" ", 1)[1] for line in lines if line.startswith(ex_id + " "))


def _attempts(db_url: str, ex_id: str, host: str) -> list[tuple[str, int, str, str | None,
                                                                  str | None, str | None]]:
    """(step, attempt, status, error class, error, worker) of ``host``'s deploy steps."""
    return [(str(r[0]), int(r[1]), str(r[2]), r[3], r[4], r[5]) for r in _sql(
        db_url, "select step_id, attempt, status, error_class, error, worker from hoststeprun "
                "where execution_id = %s and host = %s and kind = 'deploy' "
                "order by step_index, attempt", ex_id, host)]


def _wait_for(check: Callable[[], Any], seconds: float, what: str, fleet: Fleet) -> Any:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError(f"timed out after {seconds:.0f} s waiting for {what}\n"
                         f"{fleet.worker_logs()}")


def _status(fleet: Fleet, ex_id: str) -> tuple[str, str | None]:
    rows = _sql(fleet.db_url, "select status, error from execution where id = %s", ex_id)
    return (str(rows[0][0]), rows[0][1]) if rows else ("unknown", None)


def _report(fleet: Fleet, ex_id: str) -> dict[str, Any]:
    res = run_vmfarm("status", ex_id, "-o", "json", env=fleet.env, timeout=60)
    assert res.returncode == 0, res.stderr
    return dict(json.loads(res.stdout))


@dataclass
class Kill:
    ex_id: str
    victim: str  # the killed worker's name
    lost: list[str]  # the hosts whose step it was running
    seconds: float | None  # from the kill to the terminal state
    status: str
    error: str | None


def _kill_mid_phase(fleet: Fleet, lab: Any, tmp_path: Path, pick: str) -> Kill:
    """Submit the pipeline; once both first-phase hosts run their long unit, SIGKILL the
    process group of the region worker ``pick`` (or, for "busiest", the one running most of
    them); wait for the execution to end."""
    sub = run_vmfarm("run", str(_pipeline(tmp_path)), str(lab.infrastructure_file), "--detach",
                     env=fleet.env, timeout=60)
    assert sub.returncode == 0, f"{sub.stdout}\n{sub.stderr}"
    ex_id = sub.stdout.strip().splitlines()[-1]
    first_phase = [h.address for h in lab.hosts[:2]]

    def running() -> dict[str, str] | None:
        if not all(_units(h, ex_id)["first"] == 1 for h in lab.hosts[:2]):
            return None
        rows = _sql(fleet.db_url, "select host, worker from hoststeprun where execution_id = %s "
                                  "and step_index = 0 and status = 'RUNNING'", ex_id)
        on = {str(h): str(w) for h, w in rows}
        return on if set(on) == set(first_phase) else None

    on = _wait_for(running, 60, "the first phase's long units", fleet)
    if pick == "busiest":
        pick = Counter(on.values()).most_common(1)[0][0]
    victim = pick if "@" in pick else f"{pick}@chaos"
    proc = fleet.region[victim.split("@")[0]]
    kill_at = time.monotonic()
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    lost = sorted(h for h, w in on.items() if w == victim)
    assert lost, (victim, on)
    # The kill hit mid-unit: the first phase is in its long unit, the second has not started.
    ran = {h.address: dict(_units(h, ex_id)) for h in lab.hosts}
    assert all(ran[a] == ({"first": 1} if a in first_phase else {}) for a in ran), \
        f"the kill did not hit while the first phase ran its long unit: {ran}"
    deadline = kill_at + RUN_LIMIT
    status, error = "unknown", None
    while time.monotonic() < deadline:
        status, error = _status(fleet, ex_id)
        if status in TERMINAL:
            return Kill(ex_id, victim, lost, time.monotonic() - kill_at, status, error)
        time.sleep(0.1)
    return Kill(ex_id, victim, lost, None, status, error)


def _outcome(fleet: Fleet, kill: Kill) -> str:
    if kill.seconds is None:
        return f"did not end within {RUN_LIMIT:.0f} s (still {kill.status})"
    report = _report(fleet, kill.ex_id)
    hosts = Counter(h["status"] for h in report["stages"][0]["hosts"])
    tries = []
    for host in kill.lost:
        work = [a for a in _attempts(fleet.db_url, kill.ex_id, host) if a[0] == "work"]
        tries.append(f"{host} " + ", ".join(
            f"{a}:{st}" + (f"/{ec}" if ec else "")
            + (" on the other worker" if w and w != kill.victim else "")
            for _, a, st, ec, _, w in work))
    return (kill.status + (f" ({kill.error})" if kill.error else "") + "; hosts "
            + ", ".join(f"{n} {s}" for s, n in sorted(hosts.items()))
            + "; work attempts: " + "; ".join(tries))


def _assert_definite(fleet: Fleet, kill: Kill, lab: Any) -> dict[str, Any]:
    """A terminal execution (a failure with its reason), every lab host with a terminal
    outcome, no attempt left open, the killed worker's steps recorded as DelegateRestart, and
    no unit run more often than its step was attempted (once in a last attempt that
    succeeded)."""
    report = _report(fleet, kill.ex_id)
    assert report["status"] in TERMINAL, report["status"]
    if report["status"] != "SUCCEEDED":
        assert report.get("error"), f"{report['status']} without a reason: {report}"
    hosts = {h["host"]: h for h in report["stages"][0]["hosts"]}
    assert set(hosts) == {h.address for h in lab.hosts}, sorted(hosts)
    for name, h in hosts.items():
        assert h["status"] in HOST_DONE, (name, h["status"], report)
    open_rows = _sql(fleet.db_url, "select host, step_id, attempt, status from hoststeprun "
                                   "where execution_id = %s and (status = 'RUNNING' or "
                                   "finished_at is null)", kill.ex_id)
    assert open_rows == [], f"attempts left open in the ledger: {open_rows}"
    for host in kill.lost:
        first = _attempts(fleet.db_url, kill.ex_id, host)[0]
        assert first[:4] == ("work", 1, "FAILED", "DelegateRestart"), first
        assert first[5] == kill.victim and "worker lost" in (first[4] or ""), first
    for host in lab.hosts:
        ran = _units(host, kill.ex_id)
        attempts = _attempts(fleet.db_url, kill.ex_id, host.address)
        for step, units in UNITS.items():
            tries = [a for a in attempts if a[0] == step]
            for unit in units:
                assert ran[unit] <= len(tries), (host.address, unit, ran, tries)
            if tries and tries[-1][2] == "SUCCEEDED":
                assert ran[units[-1]] == 1, (host.address, units[-1], ran, tries)
        # nothing ran on the killed worker after the kill
        assert all(a[5] != kill.victim for a in attempts if a[3] != "DelegateRestart"
                   or a[1] > 1), (host.address, attempts)
    return report


# --- the faults -----------------------------------------------------------------------------------


def test_a_region_worker_killed_mid_phase_has_its_steps_retried_on_the_other_worker(
        fleet_of: Callable[[list[str]], Fleet], worker_lab: Any, chaos_table: ChaosTable,
        tmp_path: Path) -> None:
    # Given two region workers of r1 and a control worker with the reconciler
    fleet = fleet_of(["w-ra", "w-rb"])
    outcome, seconds = "no fault injected", None
    try:
        # When the worker running (most of) the first phase's long units is SIGKILLed
        kill = _kill_mid_phase(fleet, worker_lab, tmp_path, "busiest")
        seconds = kill.seconds
        outcome = _outcome(fleet, kill)
    finally:
        chaos_table.add("SIGKILL of a region worker (its process group) mid-phase, while the "
                        "first of two phases runs a step; a second worker of the region; "
                        "Retry on DelegateRestart", outcome, seconds)
    # Then the reconciler calls its steps lost (DelegateRestart), retries them on the other
    # worker, the second phase follows, and no unit ran more than once per attempt
    assert kill.seconds is not None, f"{outcome}\n{fleet.worker_logs()}"
    report = _assert_definite(fleet, kill, worker_lab)
    assert report["status"] == "SUCCEEDED", f"{outcome}\n{fleet.worker_logs()}"
    assert {h["status"] for h in report["stages"][0]["hosts"]} == {"SUCCEEDED"}
    for host in worker_lab.hosts:
        work = [a for a in _attempts(fleet.db_url, kill.ex_id, host.address) if a[0] == "work"]
        if host.address in kill.lost:
            assert [(a, st) for _, a, st, *_ in work] == [(1, "FAILED"), (2, "SUCCEEDED")]
            assert work[1][5] not in (None, kill.victim), work  # the other worker took it
            assert _units(host, kill.ex_id) == {"first": 2, "second": 1, "after": 1}
        else:
            assert [(a, st) for _, a, st, *_ in work] == [(1, "SUCCEEDED")]
            assert _units(host, kill.ex_id) == {"first": 1, "second": 1, "after": 1}


def test_the_only_region_worker_killed_mid_phase_ends_the_execution_by_on_retry_failure(
        fleet_of: Callable[[list[str]], Fleet], worker_lab: Any, chaos_table: ChaosTable,
        tmp_path: Path) -> None:
    # Given a single region worker of r1 and a control worker with the reconciler
    fleet = fleet_of(["w-rc"])
    outcome, seconds = "no fault injected", None
    try:
        # When it is SIGKILLed while the first phase runs its long units
        kill = _kill_mid_phase(fleet, worker_lab, tmp_path, "w-rc")
        seconds = kill.seconds
        outcome = _outcome(fleet, kill)
    finally:
        chaos_table.add("SIGKILL of the only region worker (its process group) mid-phase, "
                        "while the first of two phases runs a step; Retry on DelegateRestart, "
                        "onRetryFailure Abort", outcome, seconds)
    # Then its steps are DelegateRestart, not retried (no live worker consumes vmfarm.r1),
    # the execution ends as onRetryFailure says, the second phase never ran
    assert kill.seconds is not None, f"{outcome}\n{fleet.worker_logs()}"
    assert sorted(kill.lost) == [h.address for h in worker_lab.hosts[:2]]
    report = _assert_definite(fleet, kill, worker_lab)
    assert report["status"] == "ABORTED", f"{outcome}\n{fleet.worker_logs()}"
    for host in worker_lab.hosts[:2]:
        work = _attempts(fleet.db_url, kill.ex_id, host.address)
        assert [(s, a, st) for s, a, st, *_ in work] == [("work", 1, "FAILED")], work
        assert "not retried: no live worker consumes vmfarm.r1" in (work[0][4] or ""), work
        assert _units(host, kill.ex_id) == {"first": 1}
    last = worker_lab.hosts[2]
    assert _attempts(fleet.db_url, kill.ex_id, last.address) == []
    assert _units(last, kill.ex_id) == {}
