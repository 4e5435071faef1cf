"""A secret used in a Script, end to end on Redis, PostgreSQL and real workers: it is resolved
only by the region's workers (which alone hold it), and none of its forms (raw, base64,
URL-encoded) reaches a LogChunk or HostStepRun row, a Redis command of the run (captured with
MONITOR while it runs), the CLI's output or `--output json`."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

import pytest

from tests.conftest import REPO, Cluster, _wait_for_workers

SECRET = "Pw:9/x+y=z&q?t s3cr3t"


def forms(value: str) -> list[str]:
    raw = value.encode()
    return [
        value,
        base64.b64encode(raw).decode(),
        base64.urlsafe_b64encode(raw).decode(),
        base64.b64encode(raw).decode().rstrip("="),
        quote(value, safe=""),
        quote_plus(value),
        json.dumps(value)[1:-1],
    ]


@pytest.fixture
def r8_worker(cluster: Cluster, tmp_path: Path) -> Iterator[str]:
    env = {**cluster.env, "VMFARM_SECRET_DB_PASSWORD": SECRET}
    with (tmp_path / "w-r8.log").open("wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cli.main",
                "worker",
                "--region",
                "r8",
                "-c",
                "4",
                "-n",
                "w-r8@test",
            ],
            env=env,
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    _wait_for_workers(cluster.env, ["w-r8@test"])
    yield str(tmp_path / "w-r8.log")
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def _files(tmp_path: Path, lab: Any) -> list[str]:
    import yaml

    infra = yaml.safe_load(Path(lab.infrastructure_file).read_text())
    infra["spec"]["spec"]["hosts"] = [
        {"hostname": h.address, "region": "r8"} for h in lab.hosts[:2]
    ]
    (tmp_path / "infra.yaml").write_text(yaml.safe_dump(infra))
    (tmp_path / "pipeline.yaml").write_text(
        textwrap.dedent("""\
        apiVersion: v1
        kind: Service
        metadata: {name: db-client}
        spec:
          serviceDefinition: {type: SSH}
        ---
        apiVersion: v1
        kind: Environment
        metadata: {name: lab}
        spec: {type: PreProduction}
        ---
        apiVersion: v1
        kind: Pipeline
        metadata: {name: uses a secret}
        spec:
          stages:
            - stage:
                name: Deploy
                identifier: deploy
                type: Deployment
                spec:
                  service: {serviceRef: db_client}
                  environment:
                    environmentRef: lab
                    infrastructureDefinitions: [{identifier: lab}]
                  execution:
                    steps:
                      - step:
                          type: Command
                          name: Configure
                          identifier: configure
                          spec:
                            outputVariables:
                              - {name: leaked, type: String, value: S}
                            commandUnits:
                              - identifier: configure
                                type: Script
                                spec:
                                  source:
                                    type: Inline
                                    spec:
                                      script: |
                                        S="<+secrets.getValue('db_password')>"
                                        echo "password=$S"
                                        printf '%s' "$S" | base64
                                        python3 -c 'import sys, urllib.parse as u
                                        print(u.quote(sys.argv[1], safe=""))
                                        print(u.quote_plus(sys.argv[1]))' "$S"
                                        echo "error: bad password $S" >&2
                                        mkdir -p /opt/sec && printf '%s' "$S" > /opt/sec/db
        """)
    )
    return [str(tmp_path / "pipeline.yaml"), str(tmp_path / "infra.yaml")]


def _ledger_text(cluster: Cluster, execution_id: str) -> str:
    from sqlmodel import Session, create_engine, select

    from app.db import normalise_url
    from app.models import HostStepRun, LogChunk

    eng = create_engine(normalise_url(cluster.env["VMFARM_DATABASE_URL"]))
    with Session(eng) as s:
        rows = s.exec(select(HostStepRun).where(HostStepRun.execution_id == execution_id)).all()
        ids = [r.id for r in rows]
        chunks = s.exec(select(LogChunk).where(LogChunk.host_step_run_id.in_(ids))).all()  # type: ignore[union-attr]
        text = "\n".join(json.dumps(r.model_dump(mode="json")) for r in rows)
        text += "\n".join(c.text for c in chunks)
    eng.dispose()
    return text


def test_a_secret_appears_nowhere_but_on_the_host(
    cluster: Cluster, lab: Any, tmp_path: Path, r8_worker: str
) -> None:
    import redis

    files = _files(tmp_path, lab)
    captured: list[str] = []
    stop = threading.Event()
    client = redis.Redis.from_url(cluster.env["VMFARM_BROKER_URL"])

    def monitor() -> None:
        with client.monitor() as m:
            for cmd in m.listen():
                captured.append(str(cmd.get("command", "")))
                if stop.is_set():
                    return

    t = threading.Thread(target=monitor, daemon=True)
    t.start()
    try:
        run = cluster.vmfarm("run", *files, "-o", "json", timeout=180)
    finally:
        stop.set()
        client.ping()  # one more command wakes the monitor up
        t.join(timeout=10)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr
    report = json.loads(run.stdout)
    status = cluster.vmfarm("status", report["id"], "-o", "json")
    logs = cluster.vmfarm("logs", report["id"])
    logs_json = cluster.vmfarm("logs", report["id"], "-o", "json")
    # The host got the real value (the step worked) ...
    for h in lab.hosts[:2]:
        assert (Path(h.host_dir) / "opt" / "sec" / "db").read_text() == SECRET
    # ... and masking happened where it was printed (so the searches below mean something)
    assert "password=***" in logs.stdout
    # each host printed the value raw, in base64 and URL-encoded twice: all masked
    assert logs.stdout.count("***") >= 2 * 5, logs.stdout
    assert (
        any(
            "bad password ***" in (h["steps"][0]["stderr_tail"] or "")
            for h in json.loads(status.stdout)["stages"][0]["hosts"]
        )
        or "bad password ***" in logs.stdout
    )
    assert len(captured) > 20, "the Redis monitor saw the run's traffic"
    places = {
        "ledger rows": _ledger_text(cluster, report["id"]),
        "redis commands": "\n".join(captured),
        "run output": run.stdout + run.stderr,
        "status -o json": status.stdout,
        "logs": logs.stdout + logs_json.stdout,
    }
    for where, text in places.items():
        for form in forms(SECRET):
            assert form not in text, f"a form of the secret ({form!r}) is in the {where}"


def test_the_ssh_key_can_be_a_secret(lab: Any, tmp_path: Path) -> None:
    """No key file in the files: the worker reads the key from the secrets store when it
    connects; the key appears in no row."""
    import yaml

    from tests.conftest import base_env, run_vmfarm

    assert lab.key_file is not None
    key_text = Path(lab.key_file).read_text()
    files = _files(tmp_path, lab)  # the pipeline (its infra.yaml is replaced below)
    infra = yaml.safe_load(Path(lab.infrastructure_file).read_text())
    conn = infra["spec"]["spec"]["connection"]
    conn.pop("privateKeyFile")
    conn["privateKeySecret"] = "lab_key"
    infra["spec"]["spec"]["hosts"] = [
        {"hostname": h.address, "region": h.region} for h in lab.hosts[:2]
    ]
    (tmp_path / "infra.yaml").write_text(yaml.safe_dump(infra))
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(
        Path(files[0]).read_text().replace("<+secrets.getValue('db_password')>", "not a secret")
    )
    env = base_env(VMFARM_HOME=str(tmp_path / "home"), VMFARM_SECRET_LAB_KEY=key_text)
    res = run_vmfarm("run", str(pipeline), str(tmp_path / "infra.yaml"), "-o", "json", env=env)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr
    for h in lab.hosts[:2]:
        assert (Path(h.host_dir) / "opt" / "sec" / "db").read_text() == "not a secret"
    # without the secret the hosts refuse the connection, named as Authentication
    res = run_vmfarm(
        "run",
        str(pipeline),
        str(tmp_path / "infra.yaml"),
        "-o",
        "json",
        env=base_env(VMFARM_HOME=str(tmp_path / "home")),
    )
    assert res.returncode == 1
    step = json.loads(res.stdout)["stages"][0]["hosts"][0]["steps"][0]
    assert "lab_key" in step["error"]
    import sqlite3

    with sqlite3.connect(tmp_path / "home" / "vmfarm.db") as db:
        dump = "\n".join(db.iterdump())
    body = "".join(key_text.strip().splitlines()[1:-1])
    assert body[:40] not in dump


def test_a_secret_output_variable_is_masked_and_not_stored(tmp_path: Path) -> None:
    from tests.conftest import base_env, run_vmfarm

    (tmp_path / "p.yaml").write_text(
        textwrap.dedent("""\
        apiVersion: v1
        kind: Service
        metadata: {name: app}
        spec: {serviceDefinition: {type: SSH}}
        ---
        apiVersion: v1
        kind: Environment
        metadata: {name: dev}
        spec: {type: PreProduction}
        ---
        apiVersion: v1
        kind: Infrastructure
        metadata: {name: here, identifier: here}
        spec:
          environmentRef: dev
          type: Pdc
          spec: {connection: {type: Local}, hosts: [{hostname: 10.50.0.1}]}
        ---
        apiVersion: v1
        kind: Pipeline
        metadata: {name: outputs}
        spec:
          stages:
            - stage:
                name: Deploy
                identifier: deploy
                type: Deployment
                spec:
                  service: {serviceRef: app}
                  environment:
                    environmentRef: dev
                    infrastructureDefinitions: [{identifier: here}]
                  execution:
                    steps:
                      - step:
                          type: Command
                          name: Mint
                          identifier: mint
                          spec:
                            outputVariables:
                              - {name: token, type: Secret, value: TOKEN}
                              - {name: region, type: String, value: REGION}
                            commandUnits:
                              - identifier: mint
                                type: Script
                                spec:
                                  source:
                                    type: Inline
                                    spec:
                                      script: |
                                        TOKEN=$(printf 'tk-%x' 2130706433)
                                        REGION=eu-west-1
                      - step:
                          type: Command
                          name: Use
                          identifier: use
                          spec:
                            commandUnits:
                              - identifier: use
                                type: Script
                                spec:
                                  source:
                                    type: Inline
                                    spec:
                                      script: |
                                        echo "region <+steps.mint.output.outputVariables.region>"
                                        echo "token $(printf 'tk-%x' 2130706433)"
        """)
    )
    env = base_env(VMFARM_HOME=str(tmp_path / "home"))
    res = run_vmfarm("run", str(tmp_path / "p.yaml"), "-o", "json", env=env)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr
    mint = json.loads(res.stdout)["stages"][0]["hosts"][0]["steps"][0]
    assert mint["outputs"] == {"token": "***", "region": "eu-west-1"}
    logs = run_vmfarm("logs", json.loads(res.stdout)["id"], env=env).stdout
    assert "region eu-west-1" in logs and "token ***" in logs
    import sqlite3

    with sqlite3.connect(tmp_path / "home" / "vmfarm.db") as db:
        assert "tk-7f000001" not in "\n".join(db.iterdump())
