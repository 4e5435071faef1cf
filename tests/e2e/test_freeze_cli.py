"""Freeze windows through the `vmfarm` command: a run inside an active window is refused
(exit 2, naming the window and its end); --override-freeze without freeze:override is refused
(exit 3, naming the permission); with it the run proceeds; the operator's folder applies
whatever the caller passes; each refusal and the override are in the audit trail."""

from __future__ import annotations

import json
import textwrap
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

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
    metadata: {name: staging}
    spec: {type: PreProduction}
    ---
    apiVersion: v1
    kind: Infrastructure
    metadata: {name: staging-hosts, identifier: staging_hosts}
    spec:
      environmentRef: staging
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
            name: Deploy staging
            identifier: deploy_staging
            type: Deployment
            spec:
              service: {serviceRef: web}
              environment:
                environmentRef: staging
                infrastructureDefinitions: [{identifier: staging_hosts}]
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


def freeze_yaml(identifier: str, *, status: str = "Enabled") -> str:
    """A freeze of every PreProduction deployment that began an hour ago and lasts 3 hours,
    written in Tokyo time (UTC+9, no DST)."""
    tokyo = datetime.now(UTC) + timedelta(hours=9) - timedelta(hours=1)
    return textwrap.dedent(f"""\
        freeze:
          name: Release freeze {identifier}
          identifier: {identifier}
          status: {status}
          entityConfigs:
            - name: staging
              entities:
                - {{type: EnvType, filterType: Equals, entityRefs: [PreProduction]}}
                - {{type: Service, filterType: All}}
          windows:
            - timeZone: Asia/Tokyo
              startTime: {tokyo:%Y-%m-%d %I:%M %p}
              duration: 3h
        """)


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "pipeline.yaml").write_text(FILES)
    (tmp_path / "users.yaml").write_text("groups:\n  sre: [alice]\n  developers: [dan]\n")
    (tmp_path / "rbac.yaml").write_text(
        textwrap.dedent("""\
        roles:
          deployer: [pipeline:view, pipeline:execute, environment:deploy:non-production]
          freeze_breaker: [freeze:override]
        bindings:
          - {role: deployer, groups: [developers, sre]}
          - {role: freeze_breaker, groups: [sre]}
        """)
    )
    return base_env(
        VMFARM_HOME=str(tmp_path / "home"),
        VMFARM_USERS_FILE=str(tmp_path / "users.yaml"),
        VMFARM_RBAC_FILE=str(tmp_path / "rbac.yaml"),
    )


def _audit(env: dict[str, str]) -> list[dict[str, Any]]:
    out = json.loads(run_vmfarm("audit", "-o", "json", env=env).stdout)
    return list(out["events"] if isinstance(out, dict) else out)


def test_a_run_in_a_freeze_window_is_refused_unless_overridden_with_the_permission(
    env: dict[str, str], tmp_path: Path
) -> None:
    pipeline = str(tmp_path / "pipeline.yaml")
    frozen = tmp_path / "freeze.yaml"
    frozen.write_text(freeze_yaml("staging_freeze"))
    # dan runs inside the window: refused, exit 2, the window and its end named
    res = run_vmfarm("run", pipeline, "--freeze", str(frozen), env={**env, "VMFARM_USER": "dan"})
    assert res.returncode == 2, res.stdout + res.stderr
    assert "freeze window 'Release freeze staging_freeze' (staging_freeze" in res.stderr
    assert "is active until" in res.stderr and "Asia/Tokyo" in res.stderr
    assert "--override-freeze" in res.stderr
    # dan overrides without the permission: exit 3, freeze:override named
    res = run_vmfarm(
        "run",
        pipeline,
        "--freeze",
        str(frozen),
        "--override-freeze",
        env={**env, "VMFARM_USER": "dan"},
    )
    assert res.returncode == 3, res.stdout + res.stderr
    assert "freeze:override" in res.stderr and "dan" in res.stderr
    # nothing was recorded
    assert json.loads(run_vmfarm("executions", "-o", "json", env=env).stdout) == []
    # alice holds freeze:override: her run proceeds and succeeds
    res = run_vmfarm(
        "run",
        pipeline,
        "--freeze",
        str(frozen),
        "--override-freeze",
        "-o",
        "json",
        env={**env, "VMFARM_USER": "alice"},
    )
    assert res.returncode == 0, res.stdout + res.stderr
    run_id = json.loads(res.stdout)["id"]
    # and the trail has the refusal, the refused override and alice's override of the window
    rows = {(e["user"], e["action"], e["outcome"]): e for e in _audit(env)}
    assert ("dan", "run", "frozen") in rows
    assert ("dan", "override_freeze", "refused") in rows
    override = rows[("alice", "override_freeze", "overridden")]
    assert override["execution_id"] == run_id
    assert override["detail"]["windows"][0]["freeze"] == "staging_freeze"
    assert ("alice", "run", "submitted") in rows


def test_the_operator_freeze_folder_applies_and_no_file_of_the_caller_lifts_it(
    env: dict[str, str], tmp_path: Path
) -> None:
    folder = tmp_path / "freezes"
    folder.mkdir()
    (folder / "ops.yaml").write_text(freeze_yaml("ops_freeze"))
    env = {**env, "VMFARM_FREEZE_DIR": str(folder), "VMFARM_USER": "dan"}
    pipeline = str(tmp_path / "pipeline.yaml")
    # the caller's own Disabled freeze of the same identifier does not lift it
    lift = tmp_path / "lift.yaml"
    lift.write_text(freeze_yaml("ops_freeze", status="Disabled"))
    res = run_vmfarm("run", pipeline, "--freeze", str(lift), env=env)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "ops_freeze" in res.stderr and "ops.yaml" in res.stderr
    # and a freeze among the pipeline files is refused where it stands
    res = run_vmfarm("run", pipeline, str(lift), env=env)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "lift.yaml:1:1" in res.stderr and "does not go with the pipeline files" in res.stderr
