"""A Harness-shaped rolling pipeline (its SSH rolling template: a Phase over
``<+stage.output.hosts>`` in parts of 50%, a Phase Group over ``<+repeat.partition>``) deploys
to real sshd lab hosts in the phases ``vmfarm plan`` shows, logging in with the lab's key given
as a secret through ``credentialsRef``."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, base_env, run_vmfarm

PIPELINE = """\
pipeline:
  name: web rolling
  identifier: web_rolling
  projectIdentifier: lab
  orgIdentifier: default
  stages:
    - stage:
        name: deploy
        identifier: deploy
        type: Deployment
        tags: {}
        spec:
          deploymentType: Ssh
          service:
            serviceRef: web
            serviceInputs:
              serviceDefinition:
                type: Ssh
                spec:
                  artifacts:
                    primary:
                      primaryArtifactRef: <+input>
                      sources: <+input>
          environment:
            environmentRef: lab
            deployToAll: false
            infrastructureDefinitions:
              - identifier: lab_hosts
          execution:
            steps:
              - stepGroup:
                  name: Phase
                  identifier: Phase
                  strategy:
                    repeat:
                      items: <+stage.output.hosts>
                      maxConcurrency: 1
                      partitionSize: 50
                      unit: Percentage
                  steps:
                    - stepGroup:
                        name: Phase Group
                        identifier: phase_group
                        strategy:
                          repeat:
                            items: <+repeat.partition>
                        steps:
                          - step:
                              name: Deploy
                              identifier: Deploy
                              type: Command
                              timeout: 10m
                              spec:
                                onDelegate: false
                                environmentVariables: []
                                outputVariables: []
                                commandUnits:
                                  - identifier: Setup_Runtime_Paths
                                    name: Setup Runtime Paths
                                    type: Script
                                    spec:
                                      shell: Bash
                                      source:
                                        type: Inline
                                        spec:
                                          script: mkdir -p $HOME/<+service.name>/<+env.name>
                                  - identifier: Copy_Artifact
                                    name: Copy Artifact
                                    type: Copy
                                    spec:
                                      sourceType: Artifact
                                      destinationPath: $HOME/<+service.name>/<+env.name>
                                  - identifier: Copy_Config
                                    name: Copy Config
                                    type: Copy
                                    spec:
                                      sourceType: Config
                                      destinationPath: $HOME/<+service.name>/<+env.name>
                                  - identifier: Check
                                    name: Check
                                    type: Script
                                    spec:
                                      shell: Bash
                                      source:
                                        type: Inline
                                        spec:
                                          script: |-
                                            f="$HOME/<+service.name>/<+env.name>/<+artifact.fileName>"
                                            test -s "$f" && test "$HOME" != / && echo "landed $f"
        failureStrategies:
          - onFailure:
              errors:
                - AllErrors
              action:
                type: StageRollback
"""

SERVICE = """\
service:
  name: web
  identifier: web
  serviceDefinition:
    type: Ssh
    spec:
      artifacts:
        primary:
          primaryArtifactRef: <+input>
          sources:
            - identifier: app
              type: Local
              spec:
                path: {app}
                tag: "2.0.0"
---
environment:
  name: lab
  identifier: lab
  type: PreProduction
---
secret:
  type: SSHKey
  name: lab ssh
  identifier: lab_ssh
  spec:
    auth:
      type: SSH
      spec:
        credentialType: KeyReference
        spec:
          userName: root
          key: lab_key
    port: 22
"""

INFRA = """\
connector:
  name: lab hosts
  identifier: lab_pdc
  type: Pdc
  spec:
    hosts:
{hosts}
---
infrastructureDefinition:
  name: lab hosts
  identifier: lab_hosts
  environmentRef: lab
  deploymentType: Ssh
  type: Pdc
  spec:
    connectorRef: lab_pdc
    credentialsRef: lab_ssh
    connection:
      knownHostsFile: {known_hosts}
    hostFilter:
      type: All
      spec: {{}}
  allowSimultaneousDeployments: false
"""


@pytest.fixture
def files(lab: Any, tmp_path: Path) -> Path:
    folder = tmp_path / "harness"
    folder.mkdir()
    (folder / "pipeline.yaml").write_text(PIPELINE)
    (folder / "service.yaml").write_text(SERVICE.format(app=REPO / "configs" / "demo" / "app"))
    hosts = "\n".join(f"      - hostname: {h.address}" for h in lab.hosts)
    (folder / "infrastructure.yaml").write_text(
        INFRA.format(hosts=hosts, known_hosts=lab.known_hosts_file)
    )
    return folder


def _env(tmp_path: Path, key: str) -> dict[str, str]:
    return base_env(
        VMFARM_HOME=str(tmp_path / "home"), VMFARM_SECRETS="env", VMFARM_SECRET_LAB_KEY=key
    )


def test_harness_rolling_deploys_in_the_phases_the_plan_shows(
    lab: Any, files: Path, tmp_path: Path
) -> None:
    # Given the lab's private key only as the secret lab_key, named by credentialsRef through
    # a Harness SSHKey secret (no key file anywhere in the files)
    env = _env(tmp_path, lab.key_file.read_text())
    assert "privateKeyFile" not in "".join(f.read_text() for f in files.iterdir())
    # When the plan is asked for, then the pipeline is run
    shown = run_vmfarm("plan", str(files), "-o", "json", env=env)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    planned = [p["hosts"] for p in json.loads(shown.stdout)["stages"][0]["phases"]]
    res = run_vmfarm("run", str(files), "-o", "json", env=env, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr
    # Then the plan had two phases of half the hosts each, in the connector's order
    order = [h.address for h in lab.hosts]
    half = len(order) // 2
    assert planned == [order[:half], order[half:]]
    # and the run deployed exactly those phases, one after the other, each with its gate
    with sqlite3.connect(Path(env["VMFARM_HOME"]) / "vmfarm.db") as db:
        db.row_factory = sqlite3.Row
        phases = db.execute(
            "select phase, status, hosts, gate_at from phaserun where kind='deploy' order by phase"
        ).fetchall()
        rows = db.execute("select host, phase, started_at from hoststeprun").fetchall()
    assert [json.loads(p["hosts"]) for p in phases] == planned
    assert all(p["status"] == "SUCCEEDED" and p["gate_at"] for p in phases)
    second = [r["started_at"] for r in rows if r["phase"] == 1]
    assert min(second) > phases[0]["gate_at"]
    # and the artifact landed in each host's $HOME, expanded there
    report = json.loads(res.stdout)
    hosts = report["stages"][0]["hosts"]
    assert {h["version"] for h in hosts} == {"2.0.0"} and len(hosts) == len(order)


def test_credentials_ref_is_the_only_key_used(lab: Any, files: Path, tmp_path: Path) -> None:
    # Given another key than the lab's as the secret credentialsRef names
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    other = (
        Ed25519PrivateKey.generate()
        .private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
        .decode()
    )
    res = run_vmfarm("run", str(files), env=_env(tmp_path, other), timeout=300)
    # Then no host lets it in: the run fails on authentication, nothing deployed
    assert res.returncode == 1, res.stdout + res.stderr
    assert "Authentication" in res.stdout + res.stderr
