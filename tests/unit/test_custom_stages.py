"""Custom stages (ShellScript, Http, Wait, HarnessApproval on the delegate) and HarnessApproval
steps inside Deployment stages: what loads, what the plan says, and what is refused where.

Runs on real workers are in tests/lab/test_custom_stages.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from app.definitions.httpassert import check, holds
from app.definitions.loader import choose_pipeline, load
from app.definitions.resolve import resolve
from app.errors import SpecError, SpecErrors

DATA = Path(__file__).resolve().parents[1] / "data"
CICD = DATA / "reference_refused" / "cicd_pipeline.yaml"
CUSTOM = DATA / "custom"

# Hosts that do not exist (nothing here contacts them) for the reference's two environments,
# and its service with a local artifact.
ENVIRONMENTS = """\
apiVersion: v1
kind: Service
metadata:
  name: web_app_vm
spec:
  serviceDefinition:
    type: Ssh
    spec:
      artifacts:
        primary:
          type: Local
          spec:
            path: {artifact}
            tag: "1.0"
---
apiVersion: v1
kind: Environment
metadata:
  name: dev_vm_env
spec:
  type: PreProduction
---
apiVersion: v1
kind: Environment
metadata:
  name: prod_vm_env
spec:
  type: Production
---
apiVersion: v1
kind: Infrastructure
metadata:
  name: dev_hosts
spec:
  environmentRef: dev_vm_env
  type: Pdc
  spec:
    hosts: [{{hostname: 127.0.1.241}}]
---
apiVersion: v1
kind: Infrastructure
metadata:
  name: prod_hosts
spec:
  environmentRef: prod_vm_env
  type: Pdc
  spec:
    hosts: [{{hostname: 127.0.1.242}}, {{hostname: 127.0.1.243}}]
"""


def errors_of(paths: list[Path], **inputs: str) -> list[SpecError]:
    with pytest.raises((SpecError, SpecErrors)) as exc:
        load(paths, inputs=inputs)
    return list(exc.value.errors if isinstance(exc.value, SpecErrors) else [exc.value])


def plan_of(paths: list[Path], **inputs: str) -> dict[str, Any]:
    bundle = load(paths, inputs=inputs, require_inputs=True)
    return resolve(bundle, choose_pipeline(bundle, None), execution_id="EX1").to_json()


def the_step(stage: dict[str, Any], ident: str) -> dict[str, Any]:
    (found,) = [s for s in stage["steps"] if s["identifier"] == ident]
    return dict(found)


def test_the_reference_cicd_pipeline_is_refused_only_for_its_ci_stage() -> None:
    """The CI/CD pipeline verbatim: its Custom stage with its Terraform steps and the approval
    step in its production stage load; what remains refused is the CI stage, by name."""
    errors = errors_of([CICD])
    said = sorted((e.line, e.message.split(":")[0]) for e in errors)
    text = CICD.read_text().split("\n")
    assert [text[line - 1].strip() for line, _ in said] == ["type: CI"]
    assert "vmfarm deploys and does not build" in errors[0].message


@pytest.fixture
def cicd_deployments(tmp_path: Path) -> list[Path]:
    """The reference's CI/CD pipeline with its CI and Terraform stages cut out (every other
    line as the reference writes it, plus the pipeline variable its traffic switch names),
    and the service and environments it names."""
    lines = CICD.read_text().split("\n")
    head = [
        *lines[: lines.index("  stages:")],
        "  variables:",
        "    - name: green_target_group",
        "      type: String",
        "      value: arn:aws:elasticloadbalancing:us-east-1:1:targetgroup/green/1",
        "  stages:",
    ]
    tail = lines[next(i for i, t in enumerate(lines) if "# Deployment Stages" in t) :]
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text("\n".join([*head, *tail]))
    artifact = tmp_path / "app"
    artifact.mkdir()
    (artifact / "app.jar").write_text("jar")
    envs = tmp_path / "environments.yaml"
    envs.write_text(ENVIRONMENTS.format(artifact=artifact))
    return [pipeline, envs]


def test_the_reference_approval_step_in_a_deployment_stage_loads_as_written(
    cicd_deployments: list[Path],
) -> None:
    plan = plan_of(cicd_deployments)
    dev, prod = plan["stages"]
    assert [s["type"] for s in dev["steps"]] == ["Command", "Command"]
    approval = prod["steps"][0]
    assert approval["type"] == "HarnessApproval"
    assert approval["identifier"] == "prod_approval"
    # The reference writes minimumCount and disallowPipelineExecutor next to approvers: they
    # mean what they say there.
    assert approval["spec"]["approvers"] == {
        "userGroups": ["production_approvers"],
        "minimumCount": 2,
        "disallowPipelineExecutor": True,
    }
    assert approval["spec"]["approvalMessage"] == "Please approve production deployment"
    assert [s["identifier"] for s in prod["steps"]] == [
        "prod_approval",
        "blue_green_deploy",
        "traffic_switch",
    ]


def test_plan_of_the_reference_deployments_shows_where_the_approval_stops_the_hosts(
    cicd_deployments: list[Path],
) -> None:
    from app.coordinator.dryrun import dry_run

    result = dry_run([str(p) for p in cicd_deployments])
    prod = result["stages"][1]
    assert prod["hosts_by_region"] == {"default": ["127.0.1.242", "127.0.1.243"]}
    shown = prod["steps"][0]
    assert shown["type"] == "HarnessApproval"
    assert shown["spec"]["approvers"]["minimumCount"] == 2


LAB = """\
apiVersion: v1
kind: Infrastructure
metadata:
  name: lab
spec:
  environmentRef: lab
  type: Pdc
  spec:
    hosts: [{hostname: 127.0.1.244}]
"""


@pytest.fixture
def lab_file(tmp_path: Path) -> Path:
    path = tmp_path / "lab.yaml"
    path.write_text(LAB)
    return path


def test_a_custom_stage_resolves_to_steps_on_the_delegate(lab_file: Path) -> None:
    plan = plan_of([CUSTOM, lab_file], check_url="http://127.0.0.1:8080/health")
    checks = plan["stages"][0]
    assert checks["type"] == "Custom"
    assert checks["infrastructures"] == [] and checks.get("artifact") is None
    prepare = the_step(checks, "prepare")
    # A ShellScript is a Command step on the delegate with one Script unit: the clean delegate
    # environment, output variables and masking of any onDelegate step.
    assert prepare["type"] == "Command" and prepare["writtenAs"] == "ShellScript"
    assert prepare["spec"]["onDelegate"] is True
    assert prepare["spec"]["outputVariables"] == [
        {"name": "build", "type": "String", "value": "BUILD"}
    ]
    (unit,) = prepare["spec"]["commandUnits"]
    assert unit["type"] == "Script"
    assert unit["spec"]["source"]["spec"]["script"].startswith('BUILD="build-$RUN_ID"')
    assert prepare["spec"]["environmentVariables"] == [
        {"name": "RUN_ID", "type": "String", "value": "EX1"}
    ]
    smoke = the_step(checks, "smoke")
    assert smoke["spec"]["url"] == (
        "http://127.0.0.1:8080/health?build=<+steps.prepare.output.outputVariables.build>"
    )
    # The response's expressions stand for the worker; the pipeline's are rendered.
    assert smoke["spec"]["assertion"] == (
        '<+httpResponseCode> == 200 && <+httpResponseBody>.contains("UP")'
    )
    assert the_step(checks, "soak")["spec"] == {"duration": "2s"}
    deploy = plan["stages"][1]
    assert [s["type"] for s in deploy["steps"]] == ["HarnessApproval", "Wait", "Command"]


CUSTOM_STAGE = """\
apiVersion: v1
kind: Pipeline
metadata:
  name: only_custom
spec:
  stages:
    - stage:
        name: Checks
        identifier: checks
        type: Custom
        spec:
          execution:
            steps:
              - step:
{step}
"""


def _custom_with(tmp_path: Path, step: str) -> Path:
    path = tmp_path / "pipeline.yaml"
    body = "\n".join("                  " + line for line in step.strip("\n").split("\n"))
    path.write_text(CUSTOM_STAGE.format(step=body))
    return path


@pytest.mark.parametrize(
    ("step", "field", "says"),
    [
        (
            """\
type: ShellScript
name: Remote
identifier: remote
spec:
  onDelegate: false
  source: {type: Inline, spec: {script: hostname}}
  executionTarget: {host: 10.0.0.5, connectorRef: ssh_key}""",
            "spec.stages[0].stage.spec.execution.steps[0].step.spec",
            "running it on a host (executionTarget) is not supported",
        ),
        (
            """\
type: Http
name: Check
identifier: check
spec:
  url: http://127.0.0.1:8080/health
  method: GET
  assertion: <+httpResponseCode> is fine""",
            "spec.stages[0].stage.spec.execution.steps[0].step.spec.assertion",
            "is not supported: write <+httpResponseCode> == 200",
        ),
        (
            """\
type: Http
name: Check
identifier: check
spec:
  url: http://127.0.0.1:8080/health
  method: GET
  outputVariables: [{name: code, type: String, value: <+httpResponseCode>}]""",
            "spec.stages[0].stage.spec.execution.steps[0].step.spec.outputVariables",
            "unknown field 'outputVariables'",
        ),
        (
            """\
type: Wait
name: Soak
identifier: soak
spec: {duration: soon}""",
            "spec.stages[0].stage.spec.execution.steps[0].step.spec.duration",
            "is not a duration",
        ),
        (
            """\
type: Command
name: Work
identifier: work
spec: {commandUnits: [{identifier: a, type: Script, spec: {source: {spec: {script: x}}}}]}""",
            "spec.stages[0].stage.spec.execution.steps[0].step.type",
            "in a Custom stage write a ShellScript",
        ),
    ],
)
def test_what_a_custom_stage_cannot_do_is_refused_where_it_is_written(
    tmp_path: Path, step: str, field: str, says: str
) -> None:
    (err,) = errors_of([_custom_with(tmp_path, step)])
    assert says in err.message, err.message
    assert err.field == field


def test_an_approval_step_in_rollback_steps_is_refused(tmp_path: Path, lab_file: Path) -> None:
    text = (CUSTOM / "pipeline.yaml").read_text()
    text = text.replace(
        "          execution:\n            steps:\n              - step:\n"
        "                  type: HarnessApproval",
        "          execution:\n            steps:\n              - step:\n"
        "                  type: Command\n"
        "                  name: Noop\n                  identifier: noop\n"
        "                  spec:\n                    commandUnits:\n"
        "                      - {identifier: n, type: Script, spec: {source: "
        "{spec: {script: 'true'}}}}\n"
        "            rollbackSteps:\n              - step:\n"
        "                  type: HarnessApproval",
    )
    assert "rollbackSteps" in text
    path = tmp_path / "pipeline.yaml"
    path.write_text(text)
    (err,) = errors_of([path, CUSTOM / "service.yaml", lab_file], check_url="http://x")
    assert "in rollbackSteps is not supported" in err.message
    assert err.field is not None and err.field.endswith("execution.rollbackSteps")


def test_approvers_given_twice_with_different_values_are_refused(
    tmp_path: Path, lab_file: Path
) -> None:
    text = (
        (CUSTOM / "pipeline.yaml")
        .read_text()
        .replace(
            "                    minimumCount: 1\n",
            "                      minimumCount: 3\n                    minimumCount: 1\n",
        )
    )
    path = tmp_path / "pipeline.yaml"
    path.write_text(text)
    (err,) = errors_of([path, CUSTOM / "service.yaml", lab_file], check_url="http://x")
    assert "minimum_count is given twice" in err.message


@pytest.mark.parametrize(
    ("assertion", "code", "body", "holds_"),
    [
        ("<+httpResponseCode> == 200", 200, "", True),
        ("<+httpResponseCode> == 200", 503, "", False),
        ("<+httpResponseCode> < 300 && <+httpResponseCode> >= 200", 204, "", True),
        ('<+httpResponseBody>.contains("UP")', 200, '{"status":"UP"}', True),
        ('<+httpResponseBody>.contains("UP")', 200, '{"status":"DOWN"}', False),
        ('<+httpResponseCode> == 200 && <+httpResponseBody>.contains("UP")', 500, "UP", False),
        ('<+httpResponseCode> == 503 || <+httpResponseBody> == "ok"', 200, "ok", True),
        ('<+httpResponseBody> != "ok"', 200, "ok", False),
    ],
)
def test_http_assertions(assertion: str, code: int, body: str, holds_: bool) -> None:
    assert holds(assertion, code, body) is holds_


@pytest.mark.parametrize(
    "assertion",
    [
        "",
        "<+httpResponseCode> = 200",
        "true",
        "<+httpResponseCode> == 200 and true",
        "<+httpResponseHeaders>.contains('x')",
    ],
)
def test_an_http_assertion_vmfarm_cannot_read_is_refused(assertion: str) -> None:
    with pytest.raises(ValueError):
        check(assertion)


def test_a_custom_stage_runs_on_the_control_worker_or_a_live_worker_with_its_tags(
    monkeypatch: pytest.MonkeyPatch, lab_file: Path
) -> None:
    """Where the delegate is: control without delegateSelectors; with them, the region of a
    live worker that has every tag; none live: the tags stay (submitting is then refused,
    naming the live workers)."""
    from types import SimpleNamespace

    import app.coordinator.discovery as discovery
    import app.delegates
    from app.definitions.plan import Plan

    plan = Plan.of(plan_of([CUSTOM, lab_file], check_url="http://127.0.0.1:8080/health"))
    stage = plan.stages[0]
    assert stage.type == "Custom"
    monkeypatch.setattr(discovery, "get_settings", lambda: SimpleNamespace(embedded=False))
    workers = [
        {"name": "w-eu@x", "regions": ["eu-west-1"], "tags": ["gpu"]},
        {"name": "w-us@x", "regions": ["us-east-1"], "tags": ["gpu", "terraform"]},
    ]
    monkeypatch.setattr(app.delegates, "live_workers", lambda: workers)
    host = discovery.discover_stage(stage)
    assert [(h.name, h.region, h.connection) for h in host] == [("delegate", "control", "Local")]
    tagged = stage.model_copy(update={"delegate_selectors": ["terraform"]})
    assert discovery.delegate_host(tagged).region == "us-east-1"
    nobody = stage.model_copy(update={"delegate_selectors": ["arm"]})
    assert discovery.delegate_host(nobody).region == "control"


def test_an_approval_step_first_in_a_production_stage_satisfies_an_approval_policy() -> None:
    """The reference's CI/CD pipeline asks for approval inside its production stage: that is
    an approval before it deploys; one after its first deploying step is not."""
    from app.policy import Rule, evaluate

    rules = [
        Rule.model_validate(
            {
                "name": "prod approval",
                "requireApprovalBefore": {
                    "environmentType": "Production",
                    "approverGroups": ["production_approvers"],
                },
            }
        )
    ]

    def prod(*steps: dict[str, Any]) -> dict[str, Any]:
        return {
            "identifier": "prod",
            "name": "prod",
            "type": "Deployment",
            "service": {"identifier": "web", "name": "web"},
            "environment": {"identifier": "prod_env", "name": "prod", "type": "Production"},
            "steps": list(steps),
            "infrastructures": [
                {
                    "identifier": "h",
                    "provider": "static",
                    "spec": {"hosts": [{"hostname": "127.0.1.250"}]},
                }
            ],
            "strategy": {"type": "Basic"},
        }

    approval = {
        "identifier": "ok",
        "type": "HarnessApproval",
        "spec": {"approvers": {"userGroups": ["production_approvers"]}},
    }
    deploy = {"identifier": "deploy", "type": "Command", "spec": {}}
    plan = {"identifier": "p", "name": "p"}
    assert evaluate({**plan, "stages": [prod(approval, deploy)]}, rules=rules) == []
    (finding,) = evaluate({**plan, "stages": [prod(deploy, approval)]}, rules=rules)
    assert finding.stage == "prod"


def test_a_wait_step_with_a_timeout_is_refused_not_ignored() -> None:
    """A Wait step waits its duration; a timeout on it would be accepted and mean nothing."""
    from pydantic import ValidationError

    from app.definitions.models.steps import WaitStep

    with pytest.raises(ValidationError, match="a Wait step has no timeout"):
        WaitStep.model_validate(
            {
                "type": "Wait",
                "name": "w",
                "identifier": "w",
                "timeout": "5m",
                "spec": {"duration": "1m"},
            }
        )
