"""The test-only no-op connection: a worker-side setting, never a pipeline's, and never a
deployment. An embedded ``vmfarm run`` (its worker in the CLI process) with
VMFARM_TEST_CONNECTION=noop "runs" a stage on leased lab addresses where no sshd listens; the
steps succeed and the Instance ledger stays empty."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

import pytest

from tests.alloc import AddressLease
from tests.conftest import base_env, run_vmfarm

PIPELINE = """\
apiVersion: v1
kind: Service
metadata: {name: app}
spec:
  serviceDefinition:
    type: SSH
    spec:
      artifacts: {primary: {type: Local, spec: {path: ./app, tag: "2.0"}}}
---
apiVersion: v1
kind: Environment
metadata: {name: dev}
spec: {type: PreProduction}
---
apiVersion: v1
kind: Infrastructure
metadata: {name: nowhere, identifier: nowhere}
spec:
  environmentRef: dev
  type: Pdc
  spec:
    connection: {type: SSH, user: deploy, connectTimeout: 1}
    hosts: [{hostname: HOST_A}, {hostname: HOST_B}]
---
apiVersion: v1
kind: Pipeline
metadata: {name: noop}
spec:
  stages:
    - stage:
        name: Deploy
        identifier: deploy
        type: Deployment
        spec:
          service: {serviceRef: app}
          environment: {environmentRef: dev, infrastructureDefinitions: [{identifier: nowhere}]}
          execution:
            steps:
              - step:
                  type: Command
                  name: Deploy
                  identifier: deploy
                  spec:
                    commandUnits:
                      - {identifier: copy, type: Copy, spec: {destinationPath: /opt/app}}
                      - identifier: start
                        type: Script
                        spec: {source: {type: Inline, spec: {script: exit 1}}}
"""


def instances(home: Path) -> list[tuple[str, str]]:
    with closing(sqlite3.connect(home / "vmfarm.db")) as conn:
        return conn.execute("SELECT host, version FROM instance").fetchall()


@pytest.mark.timeout(180)
def test_noop_hosts_run_nothing_and_record_no_deployment(
    tmp_path: Path, lease_addresses: Callable[[int], AddressLease]
) -> None:
    # Given a pipeline on hosts where nothing listens (leased: no other run binds them), and
    # workers told to use no-op connections
    a, b = lease_addresses(2).addresses
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "start.sh").write_text("echo start\n")
    (tmp_path / "p.yaml").write_text(PIPELINE.replace("HOST_A", a).replace("HOST_B", b))
    env = base_env(VMFARM_HOME=str(tmp_path / "home"), VMFARM_TEST_CONNECTION="noop")

    # When it runs
    res = run_vmfarm("run", str(tmp_path / "p.yaml"), "-o", "json", env=env)

    # Then every step "succeeds" (even `exit 1`: nothing ran) and no deployment is recorded
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    hosts = json.loads(res.stdout)["stages"][0]["hosts"]
    assert {h["host"]: h["status"] for h in hosts} == {a: "SUCCEEDED", b: "SUCCEEDED"}
    assert instances(tmp_path / "home") == []

    # And without the setting the same files are a real deployment: the hosts are unreachable
    real = run_vmfarm(
        "run",
        str(tmp_path / "p.yaml"),
        "-o",
        "json",
        env=base_env(VMFARM_HOME=str(tmp_path / "home")),
    )
    assert real.returncode == 1, real.stdout[-2000:] + real.stderr[-2000:]
    assert instances(tmp_path / "home") == []
