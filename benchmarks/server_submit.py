"""`vmfarm run` in server mode: from the CLI's start to the execution recorded by the server,
and the CLI's own CPU. Not a test (timing never decides one): run it by hand on a quiet
machine and copy the figures into benchmarks/README.md ("Server mode: submitting a run").

    .venv/bin/python benchmarks/server_submit.py --repeat 10

What it does: creates the PostgreSQL database ``vmfarm_bench_server`` (dropped at the end),
starts ``vmfarm server`` on 127.0.0.1 with API tokens only (no OIDC issuer) and a broker on
Redis database 10, makes one API token, then runs, ``--repeat`` times, what a CI job runs::

    VMFARM_SERVER=http://127.0.0.1:PORT VMFARM_TOKEN=vmf_... vmfarm run gate.yaml --detach

(a pipeline of one Approval stage: the server records the execution, plans it and answers
201 with its id; the CLI prints the id and exits). Per run: wall time from the process's
start to its exit (the answer arrives, then the process ends) and its user + system CPU
(``os.wait4``'s rusage of that child alone). Then the same for ``vmfarm --version`` (the
interpreter and the CLI's imports, no request) as the floor. Every run's execution is checked
in the ledger afterwards (recorded, by the token's subject).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VMFARM = REPO / ".venv" / "bin" / "vmfarm"
GATE = """\
apiVersion: v1
kind: Pipeline
metadata:
  name: bench-submit
spec:
  stages:
    - stage:
        name: Approve
        identifier: approve
        type: Approval
        spec:
          execution:
            steps:
              - step:
                  type: HarnessApproval
                  name: Approve
                  identifier: approve
                  timeout: 1d
                  spec:
                    approvalMessage: ok?
                    approvers:
                      userGroups: [ci]
                      minimumCount: 1
"""
RBAC = """\
roles:
  deployer: ["pipeline:*", "environment:*"]
bindings:
  - role: deployer
    users: ["token:bench"]
"""


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """(wall seconds, CPU seconds of this child alone, stdout)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    out = proc.stdout.read().decode() if proc.stdout else ""
    err = proc.stderr.read().decode() if proc.stderr else ""
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode}: {err}")
    return wall, usage.ru_utime + usage.ru_stime, out


def summary(name: str, values: list[float]) -> str:
    ms = sorted(v * 1000 for v in values)
    return (
        f"{name}: median {statistics.median(ms):.0f} ms, min {ms[0]:.0f}, max {ms[-1]:.0f} "
        f"(n={len(ms)})"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432")
    ap.add_argument("--database", default="vmfarm_bench_server")
    ap.add_argument("--broker", default="redis://127.0.0.1:6379/10")
    args = ap.parse_args()

    import psycopg

    with psycopg.connect(args.pg + "/postgres", autocommit=True) as c:
        c.execute(f'DROP DATABASE IF EXISTS "{args.database}" WITH (FORCE)')
        c.execute(f'CREATE DATABASE "{args.database}"')
    work = Path(tempfile.mkdtemp(prefix="vmfarm-bench-submit-"))
    (work / "rbac.yaml").write_text(RBAC)
    (work / "gate.yaml").write_text(GATE)
    base = {k: v for k, v in os.environ.items() if not k.startswith("VMFARM_")}
    ledger = {
        **base,
        "PYTHONPATH": str(REPO),
        "VMFARM_DATABASE_URL": f"{args.pg}/{args.database}",
        "VMFARM_BROKER_URL": args.broker,
        "VMFARM_HOME": str(work / "home"),
    }
    port = free_port()
    server = subprocess.Popen(
        [str(VMFARM), "server", "--port", str(port), "--log-level", "warning"],
        env={**ledger, "VMFARM_SERVER_RBAC_FILE": str(work / "rbac.yaml")},
        cwd=work,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        import httpx

        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/api/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise SystemExit("the server did not start")
            time.sleep(0.2)
        made = subprocess.run(
            [
                sys.executable,
                "-c",
                "from datetime import timedelta; from app.auth.tokens import create_token; "
                "print(create_token(name='bench', roles=['deployer'], created_by='bench', "
                "lifetime=timedelta(hours=1))[0])",
            ],
            env=ledger,
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        )
        client = {
            **base,
            "XDG_CONFIG_HOME": str(work / "config"),
            "VMFARM_SERVER": url,
            "VMFARM_TOKEN": made.stdout.strip(),
        }
        run = [str(VMFARM), "run", str(work / "gate.yaml"), "--detach"]
        timed(run, client)  # warm: the server's first request loads what it loads lazily
        walls, cpus, ids = [], [], []
        for _ in range(args.repeat):
            wall, cpu, out = timed(run, client)
            walls.append(wall)
            cpus.append(cpu)
            ids.append(out.strip().splitlines()[-1])
        # The server's share: the same submission from a client that is already running.
        served = []
        with httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {client['VMFARM_TOKEN']}"}
        ) as http:
            for _ in range(args.repeat):
                start = time.perf_counter()
                resp = http.post(
                    "/api/v1/executions", json={"files": {"gate.yaml": GATE}, "set": {}}
                )
                served.append(time.perf_counter() - start)
                assert resp.status_code == 201, resp.text
        floor_wall, floor_cpu = [], []
        for _ in range(args.repeat):
            wall, cpu, _ = timed([str(VMFARM), "--version"], client)
            floor_wall.append(wall)
            floor_cpu.append(cpu)
        recorded = httpx.get(
            f"{url}/api/v1/executions",
            params={"limit": 3 * args.repeat + 1},
            headers={"Authorization": f"Bearer {client['VMFARM_TOKEN']}"},
        ).json()
        by_id = {e["id"]: e for e in recorded}
        assert all(by_id[i]["created_by"] == "token:bench" for i in ids), recorded
        print(summary("vmfarm run (server mode): start to execution recorded", walls))
        print(summary("vmfarm run (server mode): CLI CPU (user+sys)", cpus))
        print(summary("the server alone: POST /api/v1/executions from a warm client", served))
        print(summary("vmfarm --version: wall (interpreter + imports)", floor_wall))
        print(summary("vmfarm --version: CPU", floor_cpu))
        print(json.dumps({"wall": walls, "cpu": cpus}))
    finally:
        server.terminate()
        server.wait(timeout=30)
        with psycopg.connect(args.pg + "/postgres", autocommit=True) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{args.database}" WITH (FORCE)')


if __name__ == "__main__":
    main()
