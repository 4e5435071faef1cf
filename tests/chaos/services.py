"""What the chaos tests share: private services, worker fleets, pipelines, the ledger's checks.

test_service_faults.py and test_worker_faults.py run their workers on a private redis-server
(no persistence: a restart loses every queue, result and chord counter, as a crashed cache
would) and a private PostgreSQL 15 cluster (initdb into a temporary directory owned by the
``postgres`` user, trust auth, its own port and socket directory), both on free ports of
127.0.0.1, so that no fault touches what other suites share (Redis on 127.0.0.1:6379,
PostgreSQL on 127.0.0.1:5432). Their fixtures are in conftest.py.

Every Script unit appends "<execution id> <unit>" to ``<folder>/units`` on its host; the lines
are counted against the attempts the ledger records.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, Cluster, run_vmfarm
from tests.waiting import wait_for as poll


def _pg_bin() -> Path:
    """The server binaries of the newest PostgreSQL installed the Debian way (the one that
    serves 127.0.0.1:5432 in CI: ``ls /etc/postgresql``)."""
    versions = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0,
    )
    return versions[-1].parent if versions else Path("/usr/lib/postgresql/15/bin")


PG_BIN = _pg_bin()
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
TERMINAL = {"SUCCEEDED", "FAILED", "ABORTED", "ROLLED_BACK", "ROLLBACK_FAILED"}
HOST_DONE = {
    "SUCCEEDED",
    "FAILED",
    "SKIPPED",
    "IGNORED",
    "ABORTED",
    "ROLLED_BACK",
    "ROLLBACK_FAILED",
}
# Fast liveness: heartbeats every 0.5 s, a step is lost after 6 s (a margin for a loaded
# machine: a live worker's step must never look lost), the reconciler runs every 1 s.
FAST = {
    "VMFARM_HEARTBEAT_INTERVAL": "0.5",
    "VMFARM_HEARTBEAT_TIMEOUT": "6",
    "VMFARM_RECONCILE_INTERVAL": "1",
}
TICKS = 10  # the long unit prints a line every 0.5 s, this many times (5 s)
UNITS = {"work": ["first", "second"], "after": ["after"]}  # the units of ticking_steps()


def require_services() -> None:
    """Skip on a developer machine without root, sshd, redis-server or PostgreSQL 15; in CI
    (CI=true) that is a failure."""
    missing = []
    if os.geteuid() != 0:
        missing.append("root")
    if not os.access("/usr/sbin/sshd", os.X_OK):
        missing.append("/usr/sbin/sshd (apt-get install -y openssh-server)")
    if not os.access(REDIS_SERVER, os.X_OK):
        missing.append("redis-server (apt-get install -y redis-server)")
    if not os.access(PG_BIN / "initdb", os.X_OK):
        missing.append(f"{PG_BIN}/initdb (apt-get install -y postgresql)")
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        missing.append("the postgres OS user (apt-get install -y postgresql)")
    if missing:
        message = "service chaos needs " + ", ".join(missing)
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


# --- private services -----------------------------------------------------------------------------


class PrivateRedis:
    """A redis-server of one test module: own port and directory, no persistence."""

    def __init__(self, root: Path, port: int) -> None:
        self.root = root
        self.port = port  # leased from the allocator (tests/alloc.py)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self) -> None:
        log = (self.root / "redis.log").open("ab")
        self.proc = subprocess.Popen(
            [
                REDIS_SERVER,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.root),
                "--daemonize",
                "no",
                "--protected-mode",
                "no",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        proc = self.proc

        def answers() -> bool:
            assert proc.poll() is None, (self.root / "redis.log").read_text()[-2000:]
            return self.ping()

        poll(answers, 20, f"the private redis-server on port {self.port} to answer")

    def ping(self) -> bool:
        import redis

        try:
            return bool(
                redis.Redis(
                    host="127.0.0.1", port=self.port, socket_connect_timeout=1, socket_timeout=1
                ).ping()
            )
        except redis.RedisError:
            return False

    def stop(self) -> None:
        """SIGTERM: Redis closes every client connection; with no persistence all is lost."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self, down: float) -> None:
        self.stop()
        time.sleep(down)  # the fault under test: the service stays down this long
        self.start()


class PrivatePostgres:
    """A PostgreSQL 15 cluster of one test module, run by the ``postgres`` user from a
    temporary directory it owns: trust auth, 127.0.0.1 on a free port, its socket in that
    directory."""

    def __init__(self, port: int) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="vmfarm-chaos-pg-"))
        user = pwd.getpwnam("postgres")
        os.chown(self.root, user.pw_uid, user.pw_gid)
        self.data = self.root / "data"
        self.log = self.root / "postgres.log"
        self.port = port  # leased from the allocator (tests/alloc.py)
        self.running = False

    def _run(self, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        res = subprocess.run(
            ["runuser", "-u", "postgres", "--", str(PG_BIN / argv[0]), *argv[1:]],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.root,
            check=False,
        )
        assert res.returncode == 0, (
            f"{argv[0]} failed ({res.returncode}): {res.stderr}"
            f"{self.log.read_text()[-2000:] if self.log.exists() else ''}"
        )
        return res

    def init(self) -> None:
        self._run(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--no-sync",
            "--no-instructions",
        )

    def start(self) -> None:
        opts = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 "
            f"-c unix_socket_directories={self.root} -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
        )
        self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-l",
            str(self.log),
            "-o",
            opts,
            "-w",
            "-t",
            "60",
            "start",
        )
        self.running = True

    def stop(self, mode: str = "fast") -> None:
        """fast: every backend is told to terminate (FATAL 57P01) and its connection closes."""
        if self.running:
            self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")
            self.running = False

    def restart(self, down: float) -> None:
        self.stop()
        time.sleep(down)  # the fault under test: the service stays down this long
        self.start()

    def url(self, db: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{db}"

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(self.url(), autocommit=True, connect_timeout=10) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def cleanup(self) -> None:
        with contextlib.suppress(AssertionError, subprocess.SubprocessError, OSError):
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


@dataclass
class Fleet(Cluster):
    """One test's worker processes on the private services (``workers`` in the order they
    started, ``named`` by their name without "@chaos") and the environment that reaches them."""

    named: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def db_url(self) -> str:
        return self.env["VMFARM_DATABASE_URL"]

    def start(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        """Start the worker ``name@chaos`` with ``args``; its log is ``<home>/<name>.log``."""
        log = self.home / f"{name}.log"
        self.logs.append(log)
        with log.open("wb") as fh:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "cli.main",
                    "worker",
                    "-n",
                    f"{name}@chaos",
                    "-l",
                    "INFO",
                    *args,
                ],
                env=self.env,
                cwd=REPO,
                stdout=fh,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.workers.append(proc)
        self.named[name] = proc
        return proc


# --- pipelines ------------------------------------------------------------------------------------


def script_unit(folder: str, unit: str, extra: str = "") -> dict[str, Any]:
    """A Script unit that leaves "<execution id> <unit>" in ``<folder>/units``, then runs
    ``extra``."""
    script = f'mkdir -p {folder}\necho "<+pipeline.executionId> {unit}" >> {folder}/units\n{extra}'
    return {
        "identifier": unit,
        "type": "Script",
        "spec": {"source": {"type": "Inline", "spec": {"script": script}}},
    }


def ticking_steps(folder: str) -> list[dict[str, Any]]:
    """Step "work": a unit that prints a line every 0.5 s for TICKS lines, then a quick one;
    step "after": one quick unit (see UNITS)."""
    ticking = f'for i in $(seq 1 {TICKS}); do echo "tick $i"; sleep 0.5; done\n'
    return [
        {
            "type": "Command",
            "name": "Work",
            "identifier": "work",
            "timeout": "60s",
            "spec": {
                "commandUnits": [
                    script_unit(folder, "first", ticking),
                    script_unit(folder, "second"),
                ]
            },
        },
        {
            "type": "Command",
            "name": "After",
            "identifier": "after",
            "timeout": "60s",
            "spec": {"commandUnits": [script_unit(folder, "after")]},
        },
    ]


def pipeline_file(
    tmp: Path,
    steps: list[dict[str, Any]],
    *,
    service: str,
    pipeline: str,
    artifact: Path | None = None,
    strategy: dict[str, Any] | None = None,
    failure_strategies: list[dict[str, Any]] | None = None,
) -> Path:
    """Service, environment and pipeline (one Deployment stage of ``steps``) in one file; the
    lab's infrastructure is given on the command line."""
    definition: dict[str, Any] = {"type": "Ssh"}
    if artifact is not None:
        definition["spec"] = {
            "artifacts": {
                "primary": {"type": "Local", "spec": {"path": str(artifact), "tag": "1.0"}}
            }
        }
    stage: dict[str, Any] = {"name": "Deploy", "identifier": "deploy", "type": "Deployment"}
    if failure_strategies is not None:
        stage["failureStrategies"] = failure_strategies
    spec: dict[str, Any] = {
        "service": {"serviceRef": service},
        "environment": {
            "environmentRef": "lab",
            "infrastructureDefinitions": [{"identifier": "lab"}],
        },
    }
    if strategy is not None:
        spec["strategy"] = strategy
    stage["spec"] = {**spec, "execution": {"steps": [{"step": s} for s in steps]}}
    docs = [
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": service},
            "spec": {"serviceDefinition": definition},
        },
        {
            "apiVersion": "v1",
            "kind": "Environment",
            "metadata": {"name": "lab"},
            "spec": {"type": "PreProduction"},
        },
        {
            "apiVersion": "v1",
            "kind": "Pipeline",
            "metadata": {"name": pipeline},
            "spec": {"stages": [{"stage": stage}]},
        },
    ]
    path = tmp / "pipeline.yaml"
    path.write_text("---\n".join(json.dumps(d) + "\n" for d in docs))  # JSON is YAML
    return path


def submit(fleet: Fleet, pipeline: Path, lab: Any) -> str:
    """``vmfarm run --detach`` on the lab; the execution id."""
    sub = run_vmfarm(
        "run", str(pipeline), str(lab.infrastructure_file), "--detach", env=fleet.env, timeout=60
    )
    assert sub.returncode == 0, f"{sub.stdout}\n{sub.stderr}"
    return sub.stdout.strip().splitlines()[-1]


# --- what the hosts ran ---------------------------------------------------------------------------


def units_ran(host: Any, folder: str, ex_id: str) -> Counter[str]:
    """How many times each Script unit of this execution ran on ``host``."""
    path = Path(host.host_dir) / folder.lstrip("/") / "units"
    lines = path.read_text().splitlines() if path.exists() else []
    return Counter(line.split(" ", 1)[1] for line in lines if line.startswith(ex_id + " "))


def first_phase_started(lab: Any, folder: str, ex_id: str) -> bool:
    """Both hosts of the first phase (of two) have started their long unit."""
    return all(units_ran(h, folder, ex_id)["first"] == 1 for h in lab.hosts[:2])


def assert_mid_unit(lab: Any, folder: str, ex_id: str, fault: str) -> None:
    """The ``fault`` is over and the first phase's hosts are still in their long unit; the
    second phase has not started."""
    ran = {h.address: dict(units_ran(h, folder, ex_id)) for h in lab.hosts}
    first = {h.address for h in lab.hosts[:2]}
    assert all(ran[a] == ({"first": 1} if a in first else {}) for a in ran), (
        f"the {fault} did not hit while the first phase ran its long unit: {ran}"
    )


# --- the ledger -----------------------------------------------------------------------------------


def sql(db_url: str, query: str, *args: Any) -> list[tuple[Any, ...]]:
    """Read the ledger on a connection of its own (raises while the server is down)."""
    import psycopg

    with psycopg.connect(db_url, autocommit=True, connect_timeout=3) as conn:
        return list(conn.execute(query, args).fetchall())


def attempts(
    db_url: str, ex_id: str, host: str
) -> list[tuple[str, int, str, str | None, str | None, str | None]]:
    """(step, attempt, status, error class, error, worker) of ``host``'s deploy steps."""
    return [
        (str(r[0]), int(r[1]), str(r[2]), r[3], r[4], r[5])
        for r in sql(
            db_url,
            "select step_id, attempt, status, error_class, error, worker from hoststeprun "
            "where execution_id = %s and host = %s and kind = 'deploy' "
            "order by step_index, attempt",
            ex_id,
            host,
        )
    ]


def report(env: dict[str, str], ex_id: str) -> dict[str, Any]:
    """``vmfarm status -o json`` of the execution."""
    res = run_vmfarm("status", ex_id, "-o", "json", env=env, timeout=60)
    assert res.returncode == 0, res.stderr
    return dict(json.loads(res.stdout))


def wait_for(check: Callable[[], Any], seconds: float, what: str, fleet: Fleet) -> Any:
    """``check()``'s first true answer, polled every 0.1 s for ``seconds``."""
    return poll(check, seconds, what, interval=0.1, explain=fleet.worker_logs)


def fault_mid_phase(
    fleet: Fleet,
    lab: Any,
    pipeline: Path,
    folder: str,
    ready: Callable[[str], Any],
    fault: Callable[[Any], None],
    what: str,
    limit: float,
) -> Run:
    """Submit ``pipeline``; once ``ready(execution id)`` answers (within 60 s), call
    ``fault(answer)``; check that it hit while the first phase ran its long unit
    (assert_mid_unit); wait up to ``limit`` seconds for the end."""
    ex_id = submit(fleet, pipeline, lab)
    answer = wait_for(lambda: ready(ex_id), 60, "the first phase's long units", fleet)
    fault_at = time.monotonic()
    fault(answer)
    assert_mid_unit(lab, folder, ex_id, what)
    return wait_terminal(fleet, ex_id, fault_at, limit)


@dataclass
class Run:
    """How an execution ended after a fault."""

    ex_id: str
    seconds: float | None  # from the fault to the terminal state; None: not within the limit
    status: str  # the terminal status, or the last one seen
    error: str | None


def wait_terminal(fleet: Fleet, ex_id: str, fault_at: float, limit: float) -> Run:
    """Wait up to ``limit`` seconds from now for a terminal state (reading the ledger is tried
    again while it cannot be read)."""
    import psycopg

    last: list[Any] = ["unknown", None]

    def ended() -> bool:
        with contextlib.suppress(psycopg.Error):
            rows = sql(fleet.db_url, "select status, error from execution where id = %s", ex_id)
            if rows:
                last[:] = [str(rows[0][0]), rows[0][1]]
        return last[0] in TERMINAL

    try:
        poll(ended, limit, "a terminal state", interval=0.1)
    except AssertionError:  # not within the limit: the table says so
        return Run(ex_id, None, last[0], last[1])
    return Run(ex_id, time.monotonic() - fault_at, last[0], last[1])


def outcome(fleet: Fleet, run: Run, limit: float, details: Callable[[], str]) -> str:
    """The chaos table's outcome: "STATUS (error); hosts N STATUS, ..." and ``details()``."""
    if run.seconds is None:
        return f"did not end within {limit:.0f} s (still {run.status})"
    hosts = Counter(h["status"] for h in report(fleet.env, run.ex_id)["stages"][0]["hosts"])
    return (
        run.status
        + (f" ({run.error})" if run.error else "")
        + "; hosts "
        + ", ".join(f"{n} {s}" for s, n in sorted(hosts.items()))
        + details()
    )


def assert_definite(
    report: dict[str, Any], lab: Any, open_rows: list[tuple[Any, ...]], *, reason: bool = True
) -> None:
    """A terminal execution (with ``reason``: a failure says why), every lab host with a
    terminal outcome, no attempt left open (``open_rows``)."""
    assert report["status"] in TERMINAL, report["status"]
    if reason and report["status"] != "SUCCEEDED":
        assert report.get("error"), f"{report['status']} without a reason: {report}"
    hosts = {h["host"]: h for h in report["stages"][0]["hosts"]}
    assert set(hosts) == {h.address for h in lab.hosts}, sorted(hosts)
    for name, h in hosts.items():
        assert h["status"] in HOST_DONE, (name, h["status"])
    assert open_rows == [], f"attempts left open in the ledger: {open_rows}"


def assert_units_match_attempts(
    host: str, ran: Counter[str], tries_of: Iterable[Any], step_units: dict[str, list[str]]
) -> None:
    """No unit ran on ``host`` more often than its step was attempted (``tries_of``: the
    host's attempts, (step, attempt, status, ...)); where a step succeeded in its last attempt,
    its last unit ran exactly once."""
    rows = list(tries_of)
    for step, units in step_units.items():
        tries = [a for a in rows if a[0] == step]
        for unit in units:
            assert ran[unit] <= len(tries), (host, unit, ran[unit], tries)
        if tries and tries[-1][2] == "SUCCEEDED":
            assert ran[units[-1]] == 1, (host, units[-1], ran, tries)


def assert_run_definite(fleet: Fleet, ex_id: str, lab: Any, folder: str) -> dict[str, Any]:
    """assert_definite (a failure with its reason) and, on every lab host, no unit of
    ticking_steps() run more often than its step was attempted (exactly once in a step's last
    attempt that succeeded). The execution's report."""
    got = report(fleet.env, ex_id)
    assert_definite(
        got,
        lab,
        sql(
            fleet.db_url,
            "select host, step_id, attempt, status from "
            "hoststeprun where execution_id = %s and "
            "(status = 'RUNNING' or finished_at is null)",
            ex_id,
        ),
    )
    for host in lab.hosts:
        assert_units_match_attempts(
            host.address,
            units_ran(host, folder, ex_id),
            attempts(fleet.db_url, ex_id, host.address),
            UNITS,
        )
    return got
