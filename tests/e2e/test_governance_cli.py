"""Governance through the `vmfarm` command a user types: RBAC refuses a user without
pipeline:execute (exit 3, naming the permission), a policy refuses a Production run with no
approval before it (exit 2, naming the rule), nothing is recorded, and the audit trail shows
both refusals and who ran what."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from tests.conftest import base_env, run_vmfarm

FILES = textwrap.dedent("""\
    apiVersion: v1
    kind: Service
    metadata: {name: web}
    spec:
      serviceDefinition: {type: SSH}
    ---
    apiVersion: v1
    kind: Environment
    metadata: {name: prod}
    spec: {type: Production}
    ---
    apiVersion: v1
    kind: Infrastructure
    metadata: {name: prod-hosts, identifier: prod_hosts}
    spec:
      environmentRef: prod
      type: Pdc
      spec:
        connection: {type: Local}
        hosts: [{hostname: 10.30.0.1}]
    ---
    apiVersion: v1
    kind: Pipeline
    metadata: {name: web release, identifier: web_release}
    spec:
      stages:
        - stage:
            name: Deploy prod
            identifier: deploy_prod
            type: Deployment
            spec:
              service: {serviceRef: web}
              environment:
                environmentRef: prod
                infrastructureDefinitions: [{identifier: prod_hosts}]
              execution:
                steps:
                  - step:
                      type: Command
                      name: Touch
                      identifier: touch
                      spec:
                        onDelegate: true
                        commandUnits:
                          - identifier: touch
                            type: Script
                            spec: {source: {type: Inline, spec: {script: "true"}}}
    """)


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "pipeline.yaml").write_text(FILES)
    (tmp_path / "users.yaml").write_text(
        "groups:\n  release_managers: [alice]\n  developers: [dan]\n"
    )
    (tmp_path / "rbac.yaml").write_text(
        textwrap.dedent("""\
        roles:
          deployer: [pipeline:view, pipeline:execute, environment:deploy:non-production]
          release_manager: [pipeline:*, environment:*]
        bindings:
          - {role: release_manager, groups: [release_managers]}
          - {role: deployer, groups: [developers]}
        """)
    )
    (tmp_path / "policies.yaml").write_text(
        textwrap.dedent("""\
        policies:
          - name: Require Approval for Production
            requireApprovalBefore: {environmentType: Production}
        """)
    )
    return base_env(
        VMFARM_HOME=str(tmp_path / "home"),
        VMFARM_USERS_FILE=str(tmp_path / "users.yaml"),
        VMFARM_RBAC_FILE=str(tmp_path / "rbac.yaml"),
        VMFARM_POLICY_FILE=str(tmp_path / "policies.yaml"),
    )


def test_rbac_and_policy_refusals_from_the_cli(env: dict[str, str], tmp_path: Path) -> None:
    pipeline = str(tmp_path / "pipeline.yaml")
    # dan may deploy outside production only: refused, exit 3, the permission named
    res = run_vmfarm("run", pipeline, env={**env, "VMFARM_USER": "dan"})
    assert res.returncode == 3, res.stdout + res.stderr
    assert "environment:deploy:production" in res.stderr and "dan" in res.stderr
    # alice may, but the policy wants an approval before production: exit 2, the rule named
    res = run_vmfarm("run", pipeline, env={**env, "VMFARM_USER": "alice"})
    assert res.returncode == 2, res.stdout + res.stderr
    assert "Require Approval for Production" in res.stderr
    # nothing ran or was recorded; both refusals are in the audit trail
    listed = run_vmfarm("executions", "-o", "json", env=env)
    assert json.loads(listed.stdout) == []
    audit = json.loads(run_vmfarm("audit", "-o", "json", env=env).stdout)
    rows = audit["events"] if isinstance(audit, dict) else audit
    assert {(e["user"], e["outcome"]) for e in rows} >= {("dan", "refused"), ("alice", "denied")}
    # without the policy, alice's run goes through and is audited as hers
    res = run_vmfarm(
        "run", pipeline, "-o", "json", env={**env, "VMFARM_USER": "alice", "VMFARM_POLICY_FILE": ""}
    )
    assert res.returncode == 0, res.stdout + res.stderr
    run_id = json.loads(res.stdout)["id"]
    audit = json.loads(run_vmfarm("audit", "--execution", run_id, "-o", "json", env=env).stdout)
    rows = audit["events"] if isinstance(audit, dict) else audit
    assert [(e["user"], e["action"], e["outcome"]) for e in rows] == [("alice", "run", "submitted")]
