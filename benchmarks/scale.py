#!/usr/bin/env python3
"""Coordinator scale: plan, submit and run a rolling stage on N no-op hosts (every process runs
with VMFARM_TEST_CONNECTION=noop: every command "runs" instantly, nothing is recorded in the
Instance ledger; a pipeline file cannot ask for it), on Redis + PostgreSQL with a control worker and
two region workers, and report the coordinator and broker overhead per host-step and the peak
memory of every process.

    benchmarks/scale.py --hosts 10000 [--steps 2] [--phases 10%] [--concurrency 32]
                        [--profile DIR] [--json FILE] [--timeout 3600]

Needs Redis on 127.0.0.1:6379 (uses databases 6 and 7) and PostgreSQL on 127.0.0.1:5432
(creates the database vmfarm_scale). Writes nothing outside a temporary directory but that
database. Run by hand; nothing here is a test.

What it reports (JSON on stdout):

- ``plan_s``: `vmfarm plan` (dry run: load, resolve, list the hosts, plan the phases);
  ``submit_s``: `vmfarm run --detach` until it returns (execution recorded, first phase
  published); ``run_s``: from the execution row's creation to its ``finished_at`` (the ledger's
  clock); ``total_s``: `vmfarm run` started -> the execution seen finished.
- ``ms_per_host_step``: ``run_s`` / (hosts x steps): the wall per host-step, everything
  included (with no-op hosts every millisecond of it is coordinator, broker, ledger and worker
  overhead). ``cpu_ms_per_host_step``: CPU of every process involved (the CLI, the control
  worker, the region workers, redis-server, the PostgreSQL backends) per host-step, with the
  split per process in ``cpu_s``.
- ``peak_rss_mb``: VmHWM of every process (a worker's pool children listed apart).
- ``phases``: per phase its hosts, the seconds from dispatch to gate, and the gate's lag
  after the phase's last host-step finished (a coordinator cost that grows with N shows here).
- ``sql``: PostgreSQL's counters for the database (transactions, rows read/written) and, per
  table, sequential scans; ``redis``: commands processed (the whole server: other users of it
  are counted too).
- ``loadavg`` before and after.

``--profile DIR`` records the control and region workers with py-spy (``--py-spy PATH``, or
``py-spy`` on PATH) into DIR as raw collapsed stacks.

``--coordinator-only`` measures the coordinator alone, in one process and without workers:
``submit()`` records the execution and publishes the first phase to Redis (nobody consumes
it), then, phase after phase, the ledger rows the workers would write are inserted in bulk
(untimed) and the phase's gate is called (timed: the verdict, ``advance()``, the next phase's
canvas published to Redis). It reports the coordinator's time per host-step and how the time
of one gate grows from the first phase to the last (``--cprofile FILE`` writes a cProfile of
the timed calls).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PY = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv").exists() else sys.executable
DB = "vmfarm_scale"
TICK = os.sysconf("SC_CLK_TCK")


def files(
    root: Path, hosts: int, steps: int, phases: str, lanes: int | None, regions: int = 2
) -> Path:
    lines = [
        f"      - {{hostname: h{i:06d}, region: {region_name(i, regions)}}}" for i in range(hosts)
    ]
    step = """\
              - step:
                  type: Command
                  name: Step {n}
                  identifier: step{n}
                  spec:
                    commandUnits:
                      - identifier: unit{n}
                        type: Script
                        spec: {{source: {{type: Inline, spec: {{script: "echo step {n}"}}}}}}
"""
    concurrency = f", maxConcurrency: {lanes}" if lanes else ""
    text = f"""\
apiVersion: v1
kind: Service
metadata: {{name: scale}}
spec: {{serviceDefinition: {{type: SSH}}}}
---
apiVersion: v1
kind: Environment
metadata: {{name: scale}}
spec: {{type: PreProduction}}
---
apiVersion: v1
kind: Infrastructure
metadata: {{name: noop, identifier: noop}}
spec:
  environmentRef: scale
  type: Pdc
  spec:
    connection: {{type: SSH}}
    hosts:
{chr(10).join(lines)}
---
apiVersion: v1
kind: Pipeline
metadata: {{name: scale}}
spec:
  stages:
    - stage:
        name: Deploy
        identifier: deploy
        type: Deployment
        spec:
          service: {{serviceRef: scale}}
          environment: {{environmentRef: scale, infrastructureDefinitions: [{{identifier: noop}}]}}
          strategy: {{type: Rolling, phases: ["{phases}"]{concurrency}}}
          execution:
            steps:
{"".join(step.format(n=n) for n in range(steps))}"""
    path = root / "scale.yaml"
    path.write_text(text)
    return path


def region_name(i: int, regions: int) -> str:
    """Host i's region: r1 .. rN in turn (with 2 regions odd hosts are r1, as before)."""
    return f"r{(i - 1) % regions + 1}"


def worker_regions(regions: int) -> tuple[list[str], list[str]]:
    """The two region workers' queues: r1 .. r(N/2) and the rest (one each with 2 regions)."""
    names = [f"r{k}" for k in range(1, regions + 1)]
    half = (regions + 1) // 2
    return names[:half], names[half:]


def ledger_size() -> dict[str, dict[str, int]]:
    """Per table of the scale database: its rows and its bytes on disk (indexes and TOAST)."""
    out = {}
    for line in psql(
        "SELECT relname, pg_total_relation_size(relid) FROM pg_stat_user_tables"
    ).splitlines():
        name, size = line.split("|")
        rows = int(psql(f'SELECT count(*) FROM "{name}"'))
        if rows:
            out[name] = {"rows": rows, "bytes": int(size)}
    return out


# --- /proc ---------------------------------------------------------------------------------------


def children(pid: int) -> list[int]:
    out: list[int] = []
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                out += [
                    int(p) for p in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()
                ]
    return out


def tree(pid: int) -> list[int]:
    pids, i = [pid], 0
    while i < len(pids):
        pids += children(pids[i])
        i += 1
    return pids


def cpu_s(pid: int, *, reaped: bool = False) -> float:
    """utime + stime of a process (with ``reaped``, plus its waited-for children's)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    ticks = int(fields[11]) + int(fields[12])
    if reaped:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / TICK


def hwm_mb(pid: int, field: str = "VmHWM") -> float:
    """Peak resident memory of a process (``field="VmRSS"``: the current one), MB."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def pids_named(name: str) -> list[int]:
    out = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            with contextlib.suppress(OSError):
                if Path(f"/proc/{p}/comm").read_text().strip() == name:
                    out.append(int(p))
    return out


def server_cpu(name: str) -> float:
    """CPU of every process called ``name`` plus what their parents reaped (PostgreSQL's
    backends come and go; the postmaster collects their time when they exit)."""
    return sum(cpu_s(p, reaped=True) for p in pids_named(name))


def worker_cpu(pid: int) -> float:
    return sum(cpu_s(p, reaped=(p == pid)) for p in tree(pid))


# --- PostgreSQL and Redis counters ---------------------------------------------------------------


def psql(sql: str, db: str = DB) -> str:
    return subprocess.run(
        ["psql", "-h", "127.0.0.1", "-U", "postgres", "-d", db, "-XAtc", sql],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


def pg_counters() -> dict[str, Any]:
    row = psql(
        "SELECT xact_commit, xact_rollback, tup_returned, tup_fetched, tup_inserted, "
        f"tup_updated, tup_deleted FROM pg_stat_database WHERE datname = '{DB}'"
    )
    names = [
        "commits",
        "rollbacks",
        "rows_returned",
        "rows_fetched",
        "rows_inserted",
        "rows_updated",
        "rows_deleted",
    ]
    out: dict[str, Any] = dict(zip(names, (int(x) for x in row.split("|")), strict=True))
    tables = {}
    for line in psql(
        "SELECT relname, seq_scan, seq_tup_read, coalesce(idx_scan, 0), n_tup_ins, "
        "n_tup_upd FROM pg_stat_user_tables"
    ).splitlines():
        name, *nums = line.split("|")
        tables[name] = dict(
            zip(
                ["seq_scan", "seq_rows_read", "idx_scan", "inserted", "updated"],
                (int(x) for x in nums),
                strict=True,
            )
        )
    out["tables"] = tables
    return out


def pg_delta(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {k: b[k] - a.get(k, 0) for k in b if k != "tables"}
    out["tables"] = {
        t: {k: v - a["tables"].get(t, {}).get(k, 0) for k, v in c.items()}
        for t, c in b["tables"].items()
        if any(v - a["tables"].get(t, {}).get(k, 0) for k, v in c.items())
    }
    return out


def redis_commands() -> int:
    out = subprocess.run(["redis-cli", "info", "stats"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        if line.startswith("total_commands_processed:"):
            return int(line.split(":")[1])
    return 0


def execution_row(ex_id: str) -> tuple[str, float, float | None]:
    """(status, created, finished) as Unix times from the ledger."""
    row = psql(
        "SELECT status, extract(epoch from created_at), "
        f"extract(epoch from finished_at) FROM execution WHERE id = '{ex_id}'"
    )
    status, created, finished = [*row.split("|"), "", "", ""][:3]
    return status, float(created or 0), float(finished) if finished else None


def phase_timings(ex_id: str) -> list[dict[str, Any]]:
    rows = psql(
        "SELECT p.phase, p.kind, p.status, json_array_length(p.hosts::json), "
        "extract(epoch from p.gate_at - p.dispatched_at), "
        "extract(epoch from p.gate_at - (SELECT max(finished_at) FROM hoststeprun r WHERE "
        "r.execution_id = p.execution_id AND r.stage_index = p.stage_index AND "
        "r.phase = p.phase)), "
        "extract(epoch from (SELECT min(started_at) FROM hoststeprun r WHERE "
        "r.execution_id = p.execution_id AND r.stage_index = p.stage_index AND "
        "r.phase = p.phase) - p.dispatched_at) "
        f"FROM phaserun p WHERE p.execution_id = '{ex_id}' ORDER BY p.stage_index, p.phase"
    )
    out = []
    for line in rows.splitlines():
        phase, kind, status, hosts, span, lag, start = line.split("|")
        out.append(
            {
                "phase": int(phase),
                "kind": kind,
                "status": status,
                "hosts": int(hosts),
                "dispatch_to_gate_s": round(float(span or 0), 2),
                "first_step_after_s": round(float(start or 0), 3),
                "gate_lag_s": round(float(lag or 0), 3),
            }
        )
    return out


def timed(cmd: list[str], *, env: dict[str, str], out: Path) -> tuple[int, float, float, float]:
    """Run ``cmd``; (exit code, wall s, CPU s, peak RSS MB) of that process."""
    t0 = time.monotonic()
    with out.open("wb") as f:
        p = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
        _, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    return (
        p.returncode,
        time.monotonic() - t0,
        ru.ru_utime + ru.ru_stime,
        round(ru.ru_maxrss / 1024, 1),
    )


def wait_workers(names: list[str], timeout: float) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with contextlib.suppress(subprocess.CalledProcessError):
            have = set(psql("SELECT name FROM workerbeat").split())
            if set(names) <= have:
                return
        time.sleep(0.5)
    raise SystemExit(f"workers {names} did not start within {timeout:g} s")


def inproc(args: argparse.Namespace, spec: Path) -> int:
    """The ``--coordinator-only`` measurement (runs with the VMFARM_* environment set)."""
    import cProfile

    from sqlalchemy import insert
    from sqlmodel import select

    from app.coordinator import gate, prepare, submit
    from app.db import get_engine, session_scope
    from app.models import HostStepRun, PhaseRun, StageRun, Status, utcnow

    get_engine()  # migrate outside the timings
    prof = cProfile.Profile() if args.cprofile else None
    t0, c0 = time.perf_counter(), time.process_time()
    prepare([str(spec)], pipeline=None, inputs=None, execution_id="plan")
    plan_s, plan_cpu = time.perf_counter() - t0, time.process_time() - c0
    srv = [0.0, 0.0]

    def servers() -> tuple[float, float]:
        return server_cpu("redis-server"), server_cpu("postgres")

    before = servers()
    if prof:
        prof.enable()
    t0, c0 = time.perf_counter(), time.process_time()
    ex_id = submit([str(spec)])
    submit_s, submit_cpu = time.perf_counter() - t0, time.process_time() - c0
    if prof:
        prof.disable()
    after = servers()
    srv = [srv[i] + after[i] - before[i] for i in (0, 1)]
    gates: list[tuple[int, int, float, float]] = []
    while True:
        with session_scope() as s:
            pr = s.exec(
                select(PhaseRun).where(
                    PhaseRun.execution_id == ex_id, PhaseRun.status == Status.RUNNING
                )
            ).first()
            if pr is None:
                break
            run = s.exec(
                select(StageRun).where(
                    StageRun.execution_id == ex_id, StageRun.stage_index == pr.stage_index
                )
            ).one()
            region = {h["name"]: h["region"] for h in run.hosts}
            stage_index, phase, hosts = pr.stage_index, pr.phase, list(pr.hosts)
        now = utcnow()
        rows = [
            dict(
                idem_key=f"{ex_id}:{stage_index}:{phase}:{h}:{i}:1",
                execution_id=ex_id,
                stage_index=stage_index,
                phase=phase,
                step_index=i,
                step_id=f"step{i}",
                kind="deploy",
                host=h,
                region=region[h],
                attempt=1,
                status=Status.SUCCEEDED,
                exit_code=0,
                outputs={},
                started_at=now,
                finished_at=now,
                heartbeat_at=now,
            )
            for h in hosts
            for i in range(args.steps)
        ]
        with session_scope() as s:
            s.execute(insert(HostStepRun), rows)
        time.sleep(0.05)  # let PostgreSQL finish the insert's work before sampling its CPU
        before = servers()
        if prof:
            prof.enable()
        t0, c0 = time.perf_counter(), time.process_time()
        gate(ex_id, stage_index, phase)
        gates.append((phase, len(hosts), time.perf_counter() - t0, time.process_time() - c0))
        if prof:
            prof.disable()
        after = servers()
        srv = [srv[i] + after[i] - before[i] for i in (0, 1)]
    with session_scope() as s:
        from app.models import Execution

        ex = s.get(Execution, ex_id)
        status = ex.status if ex else "missing"
    if prof:
        prof.dump_stats(args.cprofile)
    host_steps = args.hosts * args.steps
    wall = submit_s + sum(g[2] for g in gates)
    cpu = submit_cpu + sum(g[3] for g in gates)
    first, last = gates[: max(1, len(gates) // 10)], gates[-max(1, len(gates) // 10) :]
    result = {
        "mode": "coordinator-only",
        "hosts": args.hosts,
        "steps": args.steps,
        "host_steps": host_steps,
        "phases": args.phases,
        "phase_count": len(gates),
        "execution": ex_id,
        "status": status,
        "plan_s": round(plan_s, 3),
        "plan_cpu_s": round(plan_cpu, 3),
        "submit_s": round(submit_s, 3),
        "submit_cpu_s": round(submit_cpu, 3),
        "gates_s": round(sum(g[2] for g in gates), 3),
        "coordinator_s": round(wall, 3),
        "coordinator_cpu_s": round(cpu, 3),
        "ms_per_host_step": round(1000 * wall / host_steps, 4),
        "cpu_ms_per_host_step": round(1000 * cpu / host_steps, 4),
        "redis_cpu_s": round(srv[0], 2),
        "postgres_cpu_s": round(srv[1], 2),
        "broker_and_sql_ms_per_host_step": round(1000 * sum(srv) / host_steps, 4),
        "gate_ms_per_host": {
            "first_tenth": round(1000 * sum(g[2] for g in first) / sum(g[1] for g in first), 4),
            "last_tenth": round(1000 * sum(g[2] for g in last) / sum(g[1] for g in last), 4),
        },
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }
    text = json.dumps(result, indent=2)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)
    return 0 if status == "SUCCEEDED" else 1


def _terminate(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)  # run the finally: the workers are stopped


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hosts", type=int, default=10000)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--phases", default="10%")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument(
        "--regions",
        type=int,
        default=2,
        help="hosts spread over r1 .. rN in turn; the two region workers consume half each",
    )
    ap.add_argument("--lanes", type=int, default=None, help="maxConcurrency of the stage")
    ap.add_argument("--timeout", type=float, default=3600, help="give up after this many s")
    ap.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="record the workers with py-spy into this directory",
    )
    ap.add_argument("--py-spy", default=shutil.which("py-spy") or "py-spy")
    ap.add_argument(
        "--sql-log",
        action="store_true",
        help="log_statement=all on the scale database (PostgreSQL's log)",
    )
    ap.add_argument("--json", type=Path, default=None, help="also write the result here")
    ap.add_argument(
        "--worker-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment of the workers (e.g. MALLOC_ARENA_MAX=2)",
    )
    ap.add_argument(
        "--coordinator-only",
        action="store_true",
        help="the coordinator alone, in process, no workers (see above)",
    )
    ap.add_argument(
        "--cprofile",
        type=Path,
        default=None,
        help="with --coordinator-only: cProfile of the timed calls",
    )
    ap.add_argument("--inproc-spec", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, _terminate)
    if args.inproc_spec:
        return inproc(args, args.inproc_spec)

    root = Path(tempfile.mkdtemp(prefix="vmfarm-scale-"))
    psql(f"DROP DATABASE IF EXISTS {DB}", db="postgres")
    psql(f"CREATE DATABASE {DB}", db="postgres")
    if args.sql_log:
        psql(f"ALTER DATABASE {DB} SET log_statement = 'all'", db="postgres")
    subprocess.run(["redis-cli", "-n", "6", "flushdb"], check=True, capture_output=True)
    subprocess.run(["redis-cli", "-n", "7", "flushdb"], check=True, capture_output=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("VMFARM_")}
    env.update(
        VMFARM_HOME=str(root / "home"),
        PYTHONPATH=str(REPO),
        VMFARM_BROKER_URL="redis://127.0.0.1:6379/6",
        VMFARM_RESULT_BACKEND="redis://127.0.0.1:6379/7",
        VMFARM_DATABASE_URL=f"postgresql://postgres@127.0.0.1:5432/{DB}",
        # No host is contacted (the hosts h00000... do not exist): every process's
        # connections are no-ops, and the coordinator records no deployment.
        VMFARM_TEST_CONNECTION="noop",
    )
    spec = files(root, args.hosts, args.steps, args.phases, args.lanes, args.regions)
    queues = worker_regions(max(args.regions, 2))
    if args.coordinator_only:
        try:
            return subprocess.run(
                [PY, __file__, *sys.argv[1:], "--inproc-spec", str(spec)], env=env, cwd=REPO
            ).returncode
        finally:
            for db in ("6", "7"):  # the published phases nobody consumed
                subprocess.run(["redis-cli", "-n", db, "flushdb"], capture_output=True)
    worker_env = {**env, **dict(kv.split("=", 1) for kv in args.worker_env)}
    workers: list[tuple[str, subprocess.Popen[bytes]]] = []
    spies: list[subprocess.Popen[bytes]] = []
    for name, extra in (
        ("control", ["--control"]),
        ("r1", [*(x for q in queues[0] for x in ("--region", q)), "-c", str(args.concurrency)]),
        ("r2", [*(x for q in queues[1] for x in ("--region", q)), "-c", str(args.concurrency)]),
    ):
        log = (root / f"{name}.log").open("wb")
        workers.append(
            (
                name,
                subprocess.Popen(
                    [
                        PY,
                        "-m",
                        "cli.main",
                        "worker",
                        *extra,
                        "-n",
                        f"scale-{name}@bench",
                        "-l",
                        "WARNING",
                    ],
                    env=worker_env,
                    cwd=REPO,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                ),
            )
        )
    try:
        wait_workers([f"scale-{n}@bench" for n, _ in workers], 120)
        time.sleep(1)
        load0 = os.getloadavg()
        code, plan_s, plan_cpu, plan_rss = timed(
            [PY, "-m", "cli.main", "plan", str(spec), "-o", "json"], env=env, out=root / "plan.json"
        )
        if code != 0:
            print((root / "plan.json").read_text()[-3000:])
            return 1
        if args.profile:
            args.profile.mkdir(parents=True, exist_ok=True)
            for name, p in workers:
                for pid in tree(p.pid):
                    spies.append(
                        subprocess.Popen(
                            [
                                args.py_spy,
                                "record",
                                "--nonblocking",
                                "--rate",
                                "200",
                                "--pid",
                                str(pid),
                                "--format",
                                "raw",
                                "-o",
                                str(args.profile / f"{name}-{pid}.txt"),
                            ],
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL,
                        )
                    )
            time.sleep(1)
        cpu0 = {name: worker_cpu(p.pid) for name, p in workers}
        cpu0["redis"], cpu0["postgres"] = server_cpu("redis-server"), server_cpu("postgres")
        pg0, redis0 = pg_counters(), redis_commands()
        t0 = time.monotonic()
        code, submit_s, submit_cpu, submit_rss = timed(
            [PY, "-m", "cli.main", "run", str(spec), "--detach", "-o", "json"],
            env=env,
            out=root / "submit.json",
        )
        if code != 0:
            print((root / "submit.json").read_text()[-3000:])
            return 1
        ex_id = json.loads((root / "submit.json").read_text())["id"]
        status, created, finished = "RUNNING", 0.0, None
        while finished is None:
            if time.monotonic() - t0 > args.timeout:
                print(f"timed out after {args.timeout:g} s", file=sys.stderr)
                break
            time.sleep(0.25)
            status, created, finished = execution_row(ex_id)
        total = time.monotonic() - t0
        cpu = {name: round(worker_cpu(p.pid) - cpu0[name], 2) for name, p in workers}
        cpu["redis"] = round(server_cpu("redis-server") - cpu0["redis"], 2)
        cpu["postgres"] = round(server_cpu("postgres") - cpu0["postgres"], 2)
        cpu["cli_submit"] = round(submit_cpu, 2)
        redis = redis_commands() - redis0
        load1 = os.getloadavg()
        time.sleep(11)  # idle backends report their counters within 10 s (PostgreSQL 15)
        pg = pg_delta(pg0, pg_counters())
        host_steps = args.hosts * args.steps
        ledger = ledger_size()
        run_s = (finished - created) if finished else total
        peaks: dict[str, Any] = {"cli_plan": plan_rss, "cli_submit": submit_rss}
        rss_end: dict[str, Any] = {}
        for name, p in workers:
            pids = tree(p.pid)
            peaks[name] = hwm_mb(p.pid)
            rss_end[name] = hwm_mb(p.pid, "VmRSS")
            if len(pids) > 1:
                peaks[f"{name}_pool"] = [hwm_mb(c) for c in pids[1:]]
                rss_end[f"{name}_pool"] = [hwm_mb(c, "VmRSS") for c in pids[1:]]
        result = {
            "hosts": args.hosts,
            "steps": args.steps,
            "host_steps": host_steps,
            "phases": args.phases,
            "lanes": args.lanes,
            "concurrency": args.concurrency,
            "execution": ex_id,
            "status": status,
            "plan_s": round(plan_s, 2),
            "plan_cpu_s": round(plan_cpu, 2),
            "submit_s": round(submit_s, 2),
            "run_s": round(run_s, 2),
            "total_s": round(total, 2),
            "ms_per_host_step": round(1000 * run_s / host_steps, 3),
            "cpu_s": cpu,
            "cpu_s_total": round(sum(cpu.values()), 2),
            "cpu_ms_per_host_step": round(1000 * sum(cpu.values()) / host_steps, 3),
            "peak_rss_mb": peaks,
            "rss_at_end_mb": rss_end,
            "worker_env": args.worker_env,
            "loadavg": {
                "before": [round(x, 2) for x in load0],
                "after": [round(x, 2) for x in load1],
            },
            "sql": pg,
            "redis_commands": redis,
            "redis_commands_per_host_step": round(redis / host_steps, 1),
            "sql_commits_per_host_step": round(pg["commits"] / host_steps, 2),
            "phase_timings": phase_timings(ex_id),
            "regions": args.regions,
            "ledger": ledger,
            "ledger_rows_per_host_step": round(
                sum(t["rows"] for t in ledger.values()) / host_steps, 2
            ),
            "ledger_bytes_per_host_step": round(
                sum(t["bytes"] for t in ledger.values()) / host_steps
            ),
        }
        text = json.dumps(result, indent=2)
        if args.json:
            args.json.write_text(text + "\n")
        print(text)
        return 0 if status == "SUCCEEDED" else 1
    finally:
        for spy in spies:
            with contextlib.suppress(ProcessLookupError):
                spy.send_signal(signal.SIGINT)
        for spy in spies:
            try:
                spy.wait(timeout=60)
            except subprocess.TimeoutExpired:
                spy.kill()
        for _, p in workers:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        for _, p in workers:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        if args.sql_log:
            with contextlib.suppress(subprocess.CalledProcessError):
                psql(f"ALTER DATABASE {DB} RESET log_statement", db="postgres")


if __name__ == "__main__":
    sys.exit(main())
