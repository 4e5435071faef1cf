#!/usr/bin/env python3
"""Coordinator scale: plan, submit and run a rolling stage on N no-op hosts (`connection:
{type: Noop}`: every command "runs" instantly), on Redis + PostgreSQL with a control worker and
two region workers, and report the coordinator and broker overhead per host-step and the peak
memory of every process.

    benchmarks/scale.py --hosts 10000 [--steps 2] [--phases 10%] [--concurrency 32]

Needs Redis on 127.0.0.1:6379 (uses databases 6 and 7) and PostgreSQL on 127.0.0.1:5432
(creates the database vmfarm_scale). Writes nothing outside a temporary directory but that
database. Run by hand; nothing here is a test.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PY = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv").exists() else sys.executable


def files(root: Path, hosts: int, steps: int, phases: str) -> Path:
    lines = [f"      - {{hostname: h{i:05d}, region: {'r1' if i % 2 else 'r2'}}}"
             for i in range(hosts)]
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
    connection: {{type: Noop}}
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
          strategy: {{type: Rolling, phases: ["{phases}"]}}
          execution:
            steps:
{"".join(step.format(n=n) for n in range(steps))}"""
    path = root / "scale.yaml"
    path.write_text(text)
    return path


def peak_rss_mb(pid: int) -> float:
    """VmHWM of a process and its children (MB)."""
    total = 0.0
    pids = [pid]
    with contextlib.suppress(OSError):
        pids += [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1]) / 1024
        except OSError:
            pass
    return round(total, 1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hosts", type=int, default=10000)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--phases", default="10%")
    ap.add_argument("--concurrency", type=int, default=32)
    args = ap.parse_args()

    root = Path(tempfile.mkdtemp(prefix="vmfarm-scale-"))
    subprocess.run(["psql", "-h", "127.0.0.1", "-U", "postgres", "-d", "test", "-qc",
                    "DROP DATABASE IF EXISTS vmfarm_scale"], check=False, capture_output=True)
    subprocess.run(["psql", "-h", "127.0.0.1", "-U", "postgres", "-d", "test", "-qc",
                    "CREATE DATABASE vmfarm_scale"], check=True, capture_output=True)
    subprocess.run(["redis-cli", "-n", "6", "flushdb"], check=True, capture_output=True)
    subprocess.run(["redis-cli", "-n", "7", "flushdb"], check=True, capture_output=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("VMFARM_")}
    env.update(VMFARM_HOME=str(root / "home"), PYTHONPATH=str(REPO),
               VMFARM_BROKER_URL="redis://127.0.0.1:6379/6",
               VMFARM_RESULT_BACKEND="redis://127.0.0.1:6379/7",
               VMFARM_DATABASE_URL="postgresql://postgres@127.0.0.1:5432/vmfarm_scale")
    spec = files(root, args.hosts, args.steps, args.phases)
    workers = []
    for name, extra in (("control", ["--control"]),
                        ("r1", ["--region", "r1", "-c", str(args.concurrency)]),
                        ("r2", ["--region", "r2", "-c", str(args.concurrency)])):
        log = (root / f"{name}.log").open("wb")
        workers.append((name, subprocess.Popen(
            [PY, "-m", "cli.main", "worker", *extra, "-n", f"scale-{name}@bench",
             "-l", "WARNING"], env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)))
    try:
        time.sleep(8)  # workers up
        t0 = time.monotonic()
        sub = subprocess.run([PY, "-m", "cli.main", "run", str(spec), "--detach", "-o", "json"],
                             env=env, cwd=REPO, capture_output=True, text=True)
        submitted = time.monotonic() - t0
        if sub.returncode != 0:
            print(sub.stdout, sub.stderr)
            return 1
        ex_id = json.loads(sub.stdout)["id"]
        status = "RUNNING"
        while status not in ("SUCCEEDED", "FAILED", "ABORTED"):
            time.sleep(2)
            out = subprocess.run([PY, "-c", (
                "from app.db import session_scope\nfrom app.models import Execution\n"
                f"with session_scope() as s: print(s.get(Execution, '{ex_id}').status)")],
                env=env, cwd=REPO, capture_output=True, text=True)
            status = out.stdout.strip() or status
        total = time.monotonic() - t0
        host_steps = args.hosts * args.steps
        peaks = {name: peak_rss_mb(p.pid) for name, p in workers}
        result = {
            "hosts": args.hosts, "steps": args.steps, "phases": args.phases,
            "status": status, "submit_s": round(submitted, 2), "total_s": round(total, 2),
            "ms_per_host_step": round(1000 * total / host_steps, 3),
            "peak_rss_mb": peaks,
        }
        print(json.dumps(result, indent=2))
        return 0 if status == "SUCCEEDED" else 1
    finally:
        for _, p in workers:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        for _, p in workers:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)


if __name__ == "__main__":
    sys.exit(main())
