"""`vmfarm status` of a 500-host run fits one screen and names the failed hosts grouped by
error. The hosts are `connection: {type: Local}` targets: the step runs as a local bash on the
worker (no SSH; a fake fleet of 500 names), through the real coordinator and Celery worker."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

from tests.conftest import base_env, run_vmfarm

HOSTS = 500


def test_status_of_a_500_host_run_fits_one_screen(tmp_path: Path) -> None:
    hosts = "\n".join(f"      - hostname: 10.20.{i // 250}.{i % 250 + 1}" for i in range(HOSTS))
    (tmp_path / "fleet.yaml").write_text(
        textwrap.dedent("""\
        apiVersion: v1
        kind: Service
        metadata: {name: fleet-app}
        spec:
          serviceDefinition: {type: SSH}
        ---
        apiVersion: v1
        kind: Environment
        metadata: {name: fleet}
        spec: {type: PreProduction}
        ---
        apiVersion: v1
        kind: Infrastructure
        metadata: {name: fleet, identifier: fleet}
        spec:
          environmentRef: fleet
          type: Pdc
          spec:
            region: local
            connection: {type: Local}
            hosts:
        HOSTS
        ---
        apiVersion: v1
        kind: Pipeline
        metadata: {name: fleet}
        spec:
          stages:
            - stage:
                name: Deploy
                identifier: deploy
                type: Deployment
                failureStrategies:
                  - onFailure: {errors: [AllErrors], action: {type: MarkAsFailure}}
                spec:
                  service: {serviceRef: fleet_app}
                  environment:
                    environmentRef: fleet
                    infrastructureDefinitions: [{identifier: fleet}]
                  strategy: {type: Basic, maxConcurrency: 50}
                  execution:
                    steps:
                      - step:
                          type: Command
                          name: Work
                          identifier: work
                          spec:
                            commandUnits:
                              - identifier: work
                                type: Script
                                spec:
                                  source:
                                    type: Inline
                                    spec:
                                      script: |
                                        case <+instance.hostName> in
                                          *.7|*.77)
                                            echo "disk full on <+instance.hostName>" >&2
                                            exit 3;;
                                          *.13) echo "permission denied" >&2; exit 4;;
                                        esac
                                        echo ok
        """).replace("HOSTS", hosts)
    )
    env = base_env(VMFARM_HOME=str(tmp_path / "home"))
    run = run_vmfarm("run", str(tmp_path / "fleet.yaml"), "-o", "json", env=env, timeout=600)
    assert run.returncode == 1, run.stderr[-2000:]
    report = json.loads(run.stdout)
    failed = {h["host"] for h in report["stages"][0]["hosts"] if h["status"] == "FAILED"}
    assert len(failed) == 6  # .7, .77 and .13 in each of the two /24s used

    shown = run_vmfarm("status", report["id"], env={**env, "COLUMNS": "120"})
    lines = shown.stdout.splitlines()
    assert len(lines) <= 40, shown.stdout  # one screen, not 500 rows
    text = shown.stdout
    assert "500 hosts" in text and "494 succeeded" in text and "6 failed" in text
    disk = next(line for line in lines if "disk full on <host>" in line)
    assert disk.strip().startswith("4 host(s): step work, unit work, exit 3")
    assert "10.20.0.7" in disk and "10.20.1.77" in disk
    perm = next(line for line in lines if "permission denied" in line)
    assert perm.strip().startswith("2 host(s)") and "10.20.0.13" in perm
    # every host is still one command away
    full = run_vmfarm("status", report["id"], "--all-hosts", env=env)
    assert all(h in full.stdout for h in failed)
