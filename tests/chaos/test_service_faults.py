"""Service faults while a pipeline runs on real workers: Redis (broker and result backend)
restarted mid-run, PostgreSQL (the ledger) restarted mid-run.

Neither fault may touch what other suites share (Redis on 127.0.0.1:6379, PostgreSQL on
127.0.0.1:5432): this module starts a private redis-server (no persistence: a restart loses
every queue, result and chord counter, as a crashed cache would) and a private PostgreSQL 15
cluster (initdb into a temporary directory owned by the ``postgres`` user, trust auth, its own
port and socket directory), both on free ports of 127.0.0.1, and restarts those. The lab is
four real sshd hosts on 127.0.1.93-96 in two regions; one region worker serves both regions
(threads pool) and a control worker runs the periodic reconciler (Celery beat) with short
heartbeat and reconcile intervals.

The pipeline rolls out in two phases of two hosts. The fault hits while the first phase runs a
Script unit that prints a line every half second for a few seconds (log flushes and heartbeats
are in flight); the second phase is sent after it. Each test ends in a definite state
within RUN_LIMIT seconds, with every host's outcome in the ledger, no attempt left open, and no
command unit run twice on any host: each unit appends "<execution id> <unit>" to a file on its
host and the lines are counted.
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.chaos.conftest import ChaosTable
from tests.conftest import REPO, _stop, _wait_for_workers, base_env, free_port, run_vmfarm

SERVICE_FIRST = 93  # lab hosts 127.0.1.93 .. 127.0.1.96 (other suites use 90-92, 101-254)
SERVICE_HOSTS = 4
PG_BIN = Path("/usr/lib/postgresql/15/bin")
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
TERMINAL = {"SUCCEEDED", "FAILED", "ABORTED", "ROLLED_BACK", "ROLLBACK_FAILED"}
HOST_DONE = {"SUCCEEDED", "FAILED", "SKIPPED", "IGNORED", "ABORTED", "ROLLED_BACK",
             "ROLLBACK_FAILED"}
RUN_LIMIT = 120.0  # seconds from the fault to a terminal state (generous: CI is shared)
# Fast liveness for the test: heartbeats every 0.5 s, lost after 6 s, reconciler every 1 s.
FAST = {"VMFARM_HEARTBEAT_INTERVAL": "0.5", "VMFARM_HEARTBEAT_TIMEOUT": "6",
        "VMFARM_RECONCILE_INTERVAL": "1"}
TICKS = 10  # the long unit prints a line every 0.5 s, this many times (5 s)
UNITS = {"work": ["first", "second"], "after": ["after"]}


def _require_services() -> None:
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
        missing.append(f"{PG_BIN}/initdb (apt-get install -y postgresql-15)")
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        missing.append("the postgres OS user (apt-get install -y postgresql-15)")
    if missing:
        message = "service chaos needs " + ", ".join(missing)
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


# --- private services -----------------------------------------------------------------------------


class PrivateRedis:
    """A redis-server of this module: own port and directory, no persistence."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self) -> None:
        log = (self.root / "redis.log").open("ab")
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.root), "--daemonize", "no",
             "--protected-mode", "no"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.ping():
                return
            assert self.proc.poll() is None, (self.root / "redis.log").read_text()[-2000:]
            time.sleep(0.05)
        raise AssertionError(f"private redis-server on port {self.port} did not answer")

    def ping(self) -> bool:
        import redis

        try:
            return bool(redis.Redis(host="127.0.0.1", port=self.port,
                                    socket_connect_timeout=1, socket_timeout=1).ping())
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
        time.sleep(down)
        self.start()


class PrivatePostgres:
    """A PostgreSQL 15 cluster of this module, run by the ``postgres`` user from a temporary
    directory it owns: trust auth, 127.0.0.1 on a free port, its socket in that directory."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="vmfarm-chaos-pg-"))
        user = pwd.getpwnam("postgres")
        os.chown(self.root, user.pw_uid, user.pw_gid)
        self.data = self.root / "data"
        self.log = self.root / "postgres.log"
        self.port = free_port()
        self.running = False

    def _run(self, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        res = subprocess.run(["runuser", "-u", "postgres", "--", str(PG_BIN / argv[0]),
                              *argv[1:]], capture_output=True, text=True, timeout=timeout,
                             cwd=self.root, check=False)
        assert res.returncode == 0, (f"{argv[0]} failed ({res.returncode}): {res.stderr}"
                                     f"{self.log.read_text()[-2000:] if self.log.exists() else ''}")
        return res

    def init(self) -> None:
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8",
                  "--no-sync", "--no-instructions")

    def start(self) -> None:
        opts = (f"-p {self.port} -c listen_addresses=127.0.0.1 "
                f"-c unix_socket_directories={self.root} -c fsync=off "
                "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", opts, "-w",
                  "-t", "60", "start")
        self.running = True

    def stop(self, mode: str = "fast") -> None:
        """fast: every backend is told to terminate (FATAL 57P01) and its connection closes."""
        if self.running:
            self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")
            self.running = False

    def restart(self, down: float) -> None:
        self.stop()
        time.sleep(down)
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


@pytest.fixture(scope="module")
def private_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateRedis]:
    _require_services()
    server = PrivateRedis(tmp_path_factory.mktemp("redis"))
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def private_pg() -> Iterator[PrivatePostgres]:
    _require_services()
    cluster = PrivatePostgres()
    try:
        cluster.init()
        cluster.start()
        yield cluster
    finally:
        cluster.cleanup()


@pytest.fixture(scope="module")
def service_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Four real sshd hosts, 127.0.1.93-96, alternating regions r1 and r2."""
    _require_services()
    from app.lab import lab_down, lab_up

    root = tmp_path_factory.mktemp("svclab")
    state = lab_up(SERVICE_HOSTS, root=root, regions=["r1", "r2"], sandbox=False,
                   first=SERVICE_FIRST)
    try:
        assert state.mode == "ssh" and state.running, f"lab did not start: {state.reason}"
        yield state
    finally:
        lab_down(root=root)


@dataclass
class Fleet:
    """The environment of one test's run and its worker processes."""

    env: dict[str, str]
    home: Path
    workers: list[subprocess.Popen[bytes]]
    logs: list[Path]

    def worker_logs(self, chars: int = 6000) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-chars:]}"
                         for p in self.logs if p.exists())


def _fleet(request: pytest.FixtureRequest, tmp_path: Path, redis_url: str,
           db_url: str) -> Iterator[Fleet]:
    """A region worker for r1 and r2 and a control worker with the reconciler (beat)."""
    home = tmp_path / "home"
    home.mkdir()
    env = base_env(VMFARM_BROKER_URL=f"{redis_url}/0", VMFARM_RESULT_BACKEND=f"{redis_url}/1",
                   VMFARM_DATABASE_URL=db_url, VMFARM_HOME=str(home), NO_COLOR="1", **FAST)
    tag = request.node.name[-20:].replace("[", "-").replace("]", "")
    specs = [(f"w-svc-region-{tag}@chaos", ["--region", "r1", "--region", "r2", "-c", "8"]),
             (f"w-svc-control-{tag}@chaos", ["--control", "--beat", "-c", "2"])]
    workers, logs = [], []
    for name, args in specs:
        log = home / f"{name.split('@')[0]}.log"
        logs.append(log)
        with log.open("wb") as fh:
            workers.append(subprocess.Popen(
                [sys.executable, "-m", "cli.main", "worker", "-n", name, "-l", "INFO", *args],
                env=env, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT,
                start_new_session=True))
    fleet = Fleet(env=env, home=home, workers=workers, logs=logs)
    try:
        try:
            _wait_for_workers(env, [n for n, _ in specs])
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{fleet.worker_logs()}") from None
        yield fleet
    finally:
        _stop(workers)


# --- the pipeline and the ledger ------------------------------------------------------------------


def _script(case: str, unit: str, extra: str = "") -> dict[str, Any]:
    script = (f"mkdir -p /opt/svc/{case}\n"
              f"echo \"<+pipeline.executionId> {unit}\" >> /opt/svc/{case}/units\n{extra}")
    return {"identifier": unit, "type": "Script",
            "spec": {"source": {"type": "Inline", "spec": {"script": script}}}}


def _pipeline(tmp: Path, case: str) -> Path:
    """Rolling, two phases of two hosts (the second is sent after the fault, through the
    restarted service). Step "work": a unit that prints a line every 0.5 s for TICKS lines,
    then a quick one; step "after": one quick unit."""
    ticking = f"for i in $(seq 1 {TICKS}); do echo \"tick $i\"; sleep 0.5; done\n"
    steps = [
        {"type": "Command", "name": "Work", "identifier": "work", "timeout": "60s",
         "spec": {"commandUnits": [_script(case, "first", ticking), _script(case, "second")]}},
        {"type": "Command", "name": "After", "identifier": "after", "timeout": "60s",
         "spec": {"commandUnits": [_script(case, "after")]}},
    ]
    docs = [
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "svc"},
         "spec": {"serviceDefinition": {"type": "Ssh"}}},
        {"apiVersion": "v1", "kind": "Environment", "metadata": {"name": "lab"},
         "spec": {"type": "PreProduction"}},
        {"apiVersion": "v1", "kind": "Pipeline", "metadata": {"name": f"svc-{case}"}, "spec": {
            "stages": [{"stage": {
                "name": "Deploy", "identifier": "deploy", "type": "Deployment", "spec": {
                    "service": {"serviceRef": "svc"},
                    "environment": {"environmentRef": "lab",
                                    "infrastructureDefinitions": [{"identifier": "lab"}]},
                    "strategy": {"type": "Rolling", "phases": [2]},
                    "execution": {"steps": [{"step": s} for s in steps]}}}}]}},
    ]
    path = tmp / "pipeline.yaml"
    path.write_text("---\n".join(json.dumps(d) + "\n" for d in docs))  # JSON is YAML
    return path


def _submit(fleet: Fleet, pipeline: Path, lab: Any) -> str:
    sub = run_vmfarm("run", str(pipeline), str(lab.infrastructure_file), "--detach",
                     env=fleet.env, timeout=60)
    assert sub.returncode == 0, f"{sub.stdout}\n{sub.stderr}"
    return sub.stdout.strip().splitlines()[-1]


def _sql(db_url: str, query: str, *args: Any) -> list[tuple[Any, ...]]:
    """Read the ledger on a connection of its own (raises while the server is down)."""
    import psycopg

    with psycopg.connect(db_url, autocommit=True, connect_timeout=3) as conn:
        return list(conn.execute(query, args).fetchall())


def _status(db_url: str, ex_id: str) -> tuple[str, str | None] | None:
    """The execution's status and error; None while the ledger cannot be read."""
    import psycopg

    try:
        rows = _sql(db_url, "select status, error from execution where id = %s", ex_id)
    except psycopg.Error:
        return None
    return (str(rows[0][0]), rows[0][1]) if rows else None


def _units(host: Any, case: str, ex_id: str) -> Counter[str]:
    """How many times each unit of this execution ran on ``host``."""
    path = Path(host.host_dir) / "opt" / "svc" / case / "units"
    lines = path.read_text().splitlines() if path.exists() else []
    return Counter(line.split(" ", 1)[1] for line in lines if line.startswith(ex_id + " "))


def _wait_for(check: Callable[[], Any], seconds: float, what: str, fleet: Fleet,
              every: float = 0.1) -> Any:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(every)
    raise AssertionError(f"timed out after {seconds:.0f} s waiting for {what}\n"
                         f"{fleet.worker_logs()}")


def _wait_terminal(db_url: str, ex_id: str) -> tuple[str, str | None, bool]:
    """(status, error, ended): the terminal state, or the last state seen after RUN_LIMIT."""
    deadline = time.monotonic() + RUN_LIMIT
    last: tuple[str, str | None] = ("unknown", None)
    while time.monotonic() < deadline:
        last = _status(db_url, ex_id) or last
        if last[0] in TERMINAL:
            return last[0], last[1], True
        time.sleep(0.2)
    return last[0], last[1], False


def _run_through(fault: Callable[[], None], fleet: Fleet, lab: Any, case: str,
                 tmp_path: Path) -> tuple[str, float | None, str, str | None, bool]:
    """Submit the pipeline, inject ``fault`` once every host runs its long unit, wait for the
    end. (execution id, seconds from the fault to the end, status, error, ended)."""
    db_url = fleet.env["VMFARM_DATABASE_URL"]
    ex_id = _submit(fleet, _pipeline(tmp_path, case), lab)
    _wait_for(lambda: _all_started(lab, case, ex_id), 60, "the first phase's long units",
              fleet)
    fault_at = time.monotonic()
    fault()
    _assert_mid_step(lab, case, ex_id)
    status, error, ended = _wait_terminal(db_url, ex_id)
    return ex_id, time.monotonic() - fault_at if ended else None, status, error, ended


def _outcome(fleet: Fleet, ex_id: str, status: str, error: str | None, ended: bool) -> str:
    if not ended:
        return f"did not end within {RUN_LIMIT:.0f} s (still {status})"
    report = _report(fleet, ex_id)
    hosts = Counter(h["status"] for h in report["stages"][0]["hosts"])
    judged = [str(p + 1) for p, v in _sql(fleet.env["VMFARM_DATABASE_URL"],
                                      "select phase, verdict from phaserun where "
                                      "execution_id = %s order by phase", ex_id)
              if (v or {}).get("judged_by")]
    return (status + (f" ({error})" if error else "") + "; hosts "
            + ", ".join(f"{n} {s}" for s, n in sorted(hosts.items()))
            + (f"; gate of phase {', '.join(judged)} lost, phase judged by the reconciler"
               if judged else "; every gate ran"))


def _report(fleet: Fleet, ex_id: str) -> dict[str, Any]:
    res = run_vmfarm("status", ex_id, "-o", "json", env=fleet.env, timeout=60)
    assert res.returncode == 0, res.stderr
    return dict(json.loads(res.stdout))


def _assert_definite(fleet: Fleet, db_url: str, report: dict[str, Any], lab: Any,
                     case: str) -> None:
    """A terminal execution (a failure with its reason), every lab host with a terminal
    outcome, no attempt left open, and no unit run more often than its step was attempted
    (exactly once in a step's last attempt that succeeded)."""
    ex_id = report["id"]
    assert report["status"] in TERMINAL, report["status"]
    if report["status"] != "SUCCEEDED":
        assert report.get("error"), f"{report['status']} without a reason: {report}"
    hosts = {h["host"]: h for h in report["stages"][0]["hosts"]}
    assert set(hosts) == {h.address for h in lab.hosts}, sorted(hosts)
    for name, h in hosts.items():
        assert h["status"] in HOST_DONE, (name, h["status"])
    open_rows = _sql(db_url, "select host, step_id, attempt, status from hoststeprun where "
                             "execution_id = %s and (status = 'RUNNING' or finished_at is null)",
                     ex_id)
    assert open_rows == [], f"attempts left open in the ledger: {open_rows}"
    for host in lab.hosts:
        ran = _units(host, case, ex_id)
        attempts = _sql(db_url, "select step_id, attempt, status from hoststeprun where "
                                "execution_id = %s and host = %s and kind = 'deploy' "
                                "order by step_index, attempt", ex_id, host.address)
        for step, units in UNITS.items():
            tries = [a for a in attempts if a[0] == step]
            for unit in units:
                assert ran[unit] <= len(tries), (host.address, unit, ran[unit], tries)
            if tries and tries[-1][2] == "SUCCEEDED":
                assert ran[units[-1]] == 1, (host.address, units[-1], ran, tries)


def _first_phase(lab: Any) -> list[Any]:
    return list(lab.hosts[:2])


def _all_started(lab: Any, case: str, ex_id: str) -> bool:
    return all(_units(h, case, ex_id)["first"] == 1 for h in _first_phase(lab))


def _assert_mid_step(lab: Any, case: str, ex_id: str) -> None:
    """The fault is over and the first phase's hosts are still in their long unit; the
    second phase has not started."""
    ran = {h.address: dict(_units(h, case, ex_id)) for h in lab.hosts}
    first = {h.address for h in _first_phase(lab)}
    assert all(ran[a] == ({"first": 1} if a in first else {}) for a in ran), \
        f"the fault did not hit while the first phase ran its long unit: {ran}"


def _assert_logs_whole(db_url: str, ex_id: str, lab: Any) -> None:
    """Every tick the long unit printed is in the ledger's log chunks, once."""
    for host in lab.hosts:
        text = "".join(r[0] for r in _sql(
            db_url, "select c.text from logchunk c join hoststeprun r on "
                    "r.id = c.host_step_run_id where r.execution_id = %s and r.host = %s and "
                    "r.step_id = 'work' order by c.seq", ex_id, host.address))
        ticks = [line for line in text.splitlines() if line.startswith("tick ")]
        assert ticks == [f"tick {i}" for i in range(1, TICKS + 1)], (host.address, text)


# --- the faults -----------------------------------------------------------------------------------


@pytest.fixture
def fleet(request: pytest.FixtureRequest, tmp_path: Path, private_redis: PrivateRedis,
          private_pg: PrivatePostgres, service_lab: Any) -> Iterator[Fleet]:
    """Workers on the private services, an empty Redis and a database of the test's own."""
    import redis

    if not private_redis.ping():  # an earlier test's restart failed half-way
        private_redis.start()
    if not private_pg.running:
        private_pg.start()
    for db in (0, 1):
        redis.Redis.from_url(f"{private_redis.url}/{db}").flushdb()
    db_url = private_pg.create_database(f"svc_{request.node.name[5:30]}")
    yield from _fleet(request, tmp_path, private_redis.url, db_url)


def test_redis_restarted_mid_run_ends_the_execution_with_each_unit_run_once(
        fleet: Fleet, private_redis: PrivateRedis, service_lab: Any,
        chaos_table: ChaosTable, tmp_path: Path) -> None:
    lab, case = service_lab, "redis"
    outcome, seconds = "no fault injected", None
    try:
        # When the first phase's hosts run their long unit, Redis restarts (down 1 s, all
        # in it lost: queues, results, the phase's chord counters)
        ex_id, seconds, status, error, ended = _run_through(
            lambda: private_redis.restart(down=1.0), fleet, lab, case, tmp_path)
        outcome = _outcome(fleet, ex_id, status, error, ended)
    finally:
        chaos_table.add("Redis (broker and result backend, no persistence) restarted, down "
                        "1 s, while the first of two phases runs a step", outcome, seconds)
    # Then the workers reconnect, the first phase's hosts finish their steps, the reconciler
    # judges that phase (its gate was lost with the chord's counters), the second phase goes
    # through the new Redis, and no unit ran twice
    assert ended, f"{outcome}\n{fleet.worker_logs()}"
    _assert_definite(fleet, fleet.env["VMFARM_DATABASE_URL"], _report(fleet, ex_id), lab, case)
    assert status == "SUCCEEDED", f"{status}: {error}\n{fleet.worker_logs()}"
    for host in lab.hosts:
        assert _units(host, case, ex_id) == {"first": 1, "second": 1, "after": 1}
    _assert_logs_whole(fleet.env["VMFARM_DATABASE_URL"], ex_id, lab)




def test_postgresql_restarted_mid_run_ends_the_execution_with_each_unit_run_once(
        fleet: Fleet, private_pg: PrivatePostgres, service_lab: Any,
        chaos_table: ChaosTable, tmp_path: Path) -> None:
    lab, case = service_lab, "pg"
    outcome, seconds = "no fault injected", None
    try:
        # When the first phase's hosts run their long unit, PostgreSQL restarts (fast
        # shutdown: every connection is terminated; down 1 s) while heartbeats and log
        # flushes are in flight
        ex_id, seconds, status, error, ended = _run_through(
            lambda: private_pg.restart(down=1.0), fleet, lab, case, tmp_path)
        outcome = _outcome(fleet, ex_id, status, error, ended)
    finally:
        chaos_table.add("PostgreSQL (the ledger) restarted, fast shutdown, down 1 s, while "
                        "the first of two phases runs a step", outcome, seconds)
    # Then the workers' SQL survives the outage (no output lost), every host's steps are
    # recorded, the second phase runs on the pooled connections that outlived the restart,
    # and no unit ran twice
    assert ended, f"{outcome}\n{fleet.worker_logs()}"
    _assert_definite(fleet, fleet.env["VMFARM_DATABASE_URL"], _report(fleet, ex_id), lab, case)
    assert status == "SUCCEEDED", f"{status}: {error}\n{fleet.worker_logs()}"
    for host in lab.hosts:
        assert _units(host, case, ex_id) == {"first": 1, "second": 1, "after": 1}
    _assert_logs_whole(fleet.env["VMFARM_DATABASE_URL"], ex_id, lab)


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
    event.listen(engine, "before_cursor_execute",
                 lambda _c, _cur, statement, *_: seen.append(statement))
    ping = engine.dialect.do_ping

    def counted(conn: Any) -> bool:
        seen.append("<ping>")
        return bool(ping(conn))

    engine.dialect.do_ping = counted
    return seen


def test_pooled_connections_outlive_a_restart_without_a_ping_per_transaction(
        ledger: str, private_pg: PrivatePostgres) -> None:
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


def test_a_transaction_waits_for_a_restarting_server_and_a_cut_one_is_tried_again(
        ledger: str, private_pg: PrivatePostgres) -> None:
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
    from app.models import Execution, HostStepRun, Status, utcnow
    from tasks.hoststep import _finish, claim

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
