"""Every YAML block of the Harness reference, as a user copying it would load it.

tests/data/harness-vm-deployments.md is a byte-identical copy of
shared/reference/harness-vm-deployments.md; the blocks are cut from it here, never retyped.
Each block is one of:

- a document (Service, Environment, Infrastructure, Pipeline, Template): loaded as written;
- a part of a document (a strategy block, the health check step, the secret usage): put where
  Harness puts it, in the reference's own pipeline, with its text unchanged;
- something vmfarm does not read (monitoring, RBAC, Ansible, cost, disaster-recovery notes...):
  refused with exit 2 naming the block's first key and, where vmfarm has one, its counterpart.

What a block leads to is in EXPECTED below; README's "The reference's examples" says the same.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path
from typing import Any

import pytest

from app.definitions.loader import choose_pipeline, load
from app.definitions.resolve import resolve
from app.errors import SpecError, SpecErrors

DATA = Path(__file__).resolve().parents[1] / "data"
REFERENCE = DATA / "harness-vm-deployments.md"
BLOCKS = re.findall(r"```ya?ml\n(.*?)```", REFERENCE.read_text(), re.S)

# Index of each block, by the comment it starts with (so a moved block is noticed).
SERVICE, ENVIRONMENT, INFRA_AWS, PIPELINE = 0, 1, 2, 3
ROLLING, BLUE_GREEN, CANARY = 4, 5, 6
TERRAFORM_PIPELINE, ANSIBLE_PLAYBOOK, CONFIG_PIPELINE = 7, 8, 9
HEALTH_CHECK, SECRETS = 11, 12
INFRA_AZURE, INFRA_GCP, CICD_PIPELINE = 19, 20, 25
PIPELINE_TEMPLATE, ENVIRONMENT_TEMPLATE, SERVICE_TEMPLATE = 29, 30, 31
HEADINGS = {
    SERVICE: "# Example VM Service Definition",
    ENVIRONMENT: "# Example Environment Configuration",
    INFRA_AWS: "# AWS EC2 Infrastructure",
    PIPELINE: "# VM Deployment Pipeline",
    ROLLING: "# Rolling Deployment Strategy",
    BLUE_GREEN: "# Blue-Green Deployment with Load Balancer Switch",
    CANARY: "# Canary Deployment Strategy",
    TERRAFORM_PIPELINE: "# Terraform Provisioning Pipeline",
    ANSIBLE_PLAYBOOK: "# ansible/playbook.yml",
    CONFIG_PIPELINE: "# Configuration Management Pipeline",
    HEALTH_CHECK: "# Health Check Step",
    SECRETS: "# Secret Configuration",
    INFRA_AZURE: "# Azure Infrastructure Definition",
    INFRA_GCP: "# GCP Infrastructure Definition",
    CICD_PIPELINE: "# Full CI/CD Pipeline with VM Deployment",
    PIPELINE_TEMPLATE: "# Reusable Pipeline Template",
    ENVIRONMENT_TEMPLATE: "# Environment Template",
    SERVICE_TEMPLATE: "# Service Template",
}
# Blocks that are not pipeline files: their first key, and what the refusal points to.
NOT_DOCUMENTS = {
    10: ("monitoring", "configs/prometheus"),
    13: ("rbac", "VMFARM_RBAC_FILE"),
    14: ("bestPractices", ""),
    15: ("performance", ""),
    16: ("disaster_recovery", ""),
    17: ("troubleshooting", ""),
    18: ("monitoring_alerts", "alerts.yaml"),
    21: ("costOptimization", ""),
    22: ("costMonitoring", ""),
    23: ("predictiveScaling", "vmfarm autoscale"),
    24: ("autoScaling", "vmfarm autoscale"),
    26: ("gitOps", ""),
    27: ("migrationStrategy", ""),
    28: ("databaseMigration", ""),
    32: ("testingStrategy", ""),
    33: ("environmentTesting", ""),
    34: ("rollbackStrategy", "in a Deployment stage"),
    35: ("delegateManagement", ""),
    36: ("delegateMonitoring", ""),
    37: ("delegateStrategy", ""),
}


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def errors(exc: pytest.ExceptionInfo[Any]) -> list[SpecError]:
    return exc.value.errors if isinstance(exc.value, SpecErrors) else [exc.value]


# The connectors the reference's documents name and never define (its Service's
# `connectorRef: artifactory_connector`, its infrastructures' aws/azure/gcp connectors), in
# Harness's `connector:` shape and in the document shape, credentials by secret reference.
CONNECTORS = """\
connector:
  name: artifactory_connector
  identifier: artifactory_connector
  orgIdentifier: default
  projectIdentifier: web
  type: Artifactory
  spec:
    artifactoryServerUrl: https://artifactory.example.com/artifactory
    auth:
      type: UsernamePassword
      spec:
        username: deployer
        passwordRef: account.artifactory_password
---
connector:
  name: aws_connector
  identifier: aws_connector
  type: Aws
  spec:
    credential:
      type: InheritFromDelegate
---
apiVersion: v1
kind: Connector
metadata:
  name: azure_connector
spec:
  type: Azure
  spec:
    credential:
      type: ManualConfig
      spec:
        applicationId: 00000000-0000-0000-0000-000000000001
        tenantId: 00000000-0000-0000-0000-000000000002
        auth:
          type: Secret
          spec:
            secretRef: azure_client_secret
---
apiVersion: v1
kind: Connector
metadata:
  name: gcp_connector
spec:
  type: Gcp
  spec:
    credential:
      type: ManualConfig
      spec:
        secretKeyRef: gcp_service_account_key
"""


def documents(tmp_path: Path, *, connectors: bool = True) -> list[Path]:
    """The reference's Service, Environment and AWS Infrastructure, as written, and the
    connectors they name (written here: the reference has none)."""
    out = [write(tmp_path, f"b{i}.yaml", BLOCKS[i]) for i in (SERVICE, ENVIRONMENT, INFRA_AWS)]
    return [*out, write(tmp_path, "connectors.yaml", CONNECTORS)] if connectors else out


def pipeline_with(tmp_path: Path, part: str, *, at: str, indent: int) -> Path:
    """The reference's pipeline with ``part`` (text unchanged, indented) put before the line
    ``at``."""
    text = BLOCKS[PIPELINE]
    assert text.count(at) == 1
    return write(
        tmp_path, "pipeline.yaml", text.replace(at, textwrap.indent(part, " " * indent) + at)
    )


def body(block: str) -> str:
    """A block without its heading comment."""
    return "\n".join(line for line in block.split("\n") if not line.startswith("# ")) + "\n"


def test_the_copy_is_the_reference_and_every_block_is_accounted_for() -> None:
    shared = Path(__file__).resolve().parents[3] / "shared" / "reference" / REFERENCE.name
    if shared.exists():  # beside the checkout (where the project is developed)
        assert shared.read_bytes() == REFERENCE.read_bytes()
    assert len(BLOCKS) == 38
    for i, heading in HEADINGS.items():
        assert BLOCKS[i].startswith(heading), (i, BLOCKS[i][:60])
    covered = {*HEADINGS, *NOT_DOCUMENTS}
    assert covered == set(range(38)), sorted(set(range(38)) - covered)


def test_service_environment_infrastructures_and_pipeline_load_as_written(tmp_path: Path) -> None:
    files = [
        *documents(tmp_path),
        write(tmp_path, "pipeline.yaml", BLOCKS[PIPELINE]),
        write(tmp_path, "azure.yaml", BLOCKS[INFRA_AZURE]),
        write(tmp_path, "gcp.yaml", BLOCKS[INFRA_GCP]),
    ]
    bundle = load(files)
    assert sorted(bundle.services) == ["web_app_vm"]
    assert sorted(bundle.environments) == ["prod_vm_env"]
    assert sorted(bundle.infrastructures) == [
        "aws_ec2_infrastructure",
        "aws_prod_infra",
        "azure_vm_infrastructure",
        "gcp_compute_infrastructure",
    ]
    assert sorted(bundle.pipelines) == ["vm_deployment_pipeline"]


def test_the_pipeline_plans_only_once_its_artifact_connector_can_be_resolved(
    tmp_path: Path,
) -> None:
    """The reference's service names `connectorRef: artifactory_connector` and no URL. Without
    the connector, validate refuses it where it is written; with an Artifactory connector
    document, the service and pipeline plan as written: the connector gives the server and the
    credentials' secret id, the artifact's artifactPath and tag the file."""
    pipeline = write(tmp_path, "pipeline.yaml", BLOCKS[PIPELINE])
    alone = [*documents(tmp_path, connectors=False), pipeline]
    with pytest.raises((SpecError, SpecErrors)) as exc:
        load(alone)
    hit = [e for e in errors(exc) if e.file == str(alone[0])]
    assert len(hit) == 1, [str(e) for e in errors(exc)]
    assert "Connector 'artifactory_connector' is not defined" in hit[0].message
    assert hit[0].field.endswith("artifacts.primary.spec.connectorRef")
    assert (
        hit[0].line
        == BLOCKS[SERVICE].split("\n").index("            connectorRef: artifactory_connector") + 1
    )

    bundle = load([*documents(tmp_path), pipeline], inputs={"tag": "1.0"}, require_inputs=True)
    plan = resolve(bundle, choose_pipeline(bundle, None), execution_id="EX1").to_json()
    artifact = plan["stages"][0]["artifact"]
    assert artifact["spec"]["baseUrl"] == "https://artifactory.example.com/artifactory"
    assert artifact["spec"]["username"] == "deployer"
    assert artifact["spec"]["passwordRef"] == "account.artifactory_password"
    from app.artifacts.sources import resolve as source_of

    assert (
        source_of(artifact, require_secrets=False).url
        == "https://artifactory.example.com/artifactory/apps/web-app/1.0"
    )


def test_the_rolling_block_in_the_reference_pipeline_plans_three_phases(tmp_path: Path) -> None:
    pipe = pipeline_with(tmp_path, body(BLOCKS[ROLLING]), at="          execution:\n", indent=10)
    bundle = load([*documents(tmp_path), pipe])
    stage = bundle.pipelines["vm_deployment_pipeline"].model.spec.stages[0].stage
    assert stage.spec.rollout_deployment is not None
    assert [p.phase.instance_count for p in stage.spec.rollout_deployment.phases] == [
        "25%",
        "50%",
        "100%",
    ]


def test_the_canary_block_in_the_reference_pipeline_plans_a_canary_analysis(tmp_path: Path) -> None:
    """A 10 % canary, then ten minutes of canary analysis against the current version
    (tests/unit/test_canary_analysis.py has the rest)."""
    pipe = pipeline_with(tmp_path, body(BLOCKS[CANARY]), at="          execution:\n", indent=10)
    bundle = load([*documents(tmp_path), pipe])
    stage = bundle.pipelines["vm_deployment_pipeline"].model.spec.stages[0].stage
    assert stage.spec.canary_deployment is not None
    (check,) = stage.spec.canary_deployment.phases[0].phase.steps
    verification = check.verification()
    assert verification is not None and verification.canary_analysis is not None
    assert verification.canary_analysis.window_seconds() == 600


def test_the_blue_green_block_is_refused_only_for_its_auto_scaling_group_settings(
    tmp_path: Path,
) -> None:
    """vmfarm carries out the block's slots, switch step, target groups and classic load
    balancer (tests/unit/test_bluegreen_reference.py); Harness's Auto Scaling group settings
    have nothing to act on (vmfarm deploys to running instances) and are refused by name."""
    pipe = pipeline_with(tmp_path, body(BLOCKS[BLUE_GREEN]), at="          execution:\n", indent=10)
    with pytest.raises((SpecError, SpecErrors)) as exc:
        load([*documents(tmp_path), pipe])
    refused = {(e.field or "").rsplit(".", 1)[-1] for e in errors(exc)}
    assert refused == {"useAppAutoScaling", "autoScalingGroupName"}, errors(exc)
    assert all("is not supported" in e.message and e.file == str(pipe) for e in errors(exc))


def test_the_health_check_step_runs_as_a_step_of_the_pipeline(tmp_path: Path) -> None:
    """The block's body under `- step:` among the pipeline's steps."""
    step = "- step:\n" + textwrap.indent(body(BLOCKS[HEALTH_CHECK]).split("\n", 1)[1], "  ")
    pipe = pipeline_with(
        tmp_path,
        step,
        at="              - step:\n                  type: Command\n                  name: Stop",
        indent=14,
    )
    bundle = load([*documents(tmp_path), pipe])
    steps = (
        bundle.pipelines["vm_deployment_pipeline"].model.spec.stages[0].stage.spec.execution.steps
    )
    assert steps[0].step.identifier == "health_check"


def test_the_secret_usage_reads_secrets_by_reference(tmp_path: Path) -> None:
    """The block's "Usage in Pipeline" part as a step's environmentVariables; its `secrets:`
    list is not a pipeline document (secrets live in a backend)."""
    usage = BLOCKS[SECRETS].split("# Usage in Pipeline\n", 1)[1]
    text = BLOCKS[PIPELINE].replace(
        "                    environmentVariables: []\n", textwrap.indent(usage, " " * 20), 1
    )
    pipe = write(tmp_path, "pipeline.yaml", text)
    bundle = load([*documents(tmp_path), pipe])
    step = (
        bundle.pipelines["vm_deployment_pipeline"]
        .model.spec.stages[0]
        .stage.spec.execution.steps[0]
        .step
    )
    assert [v.name for v in step.spec.environment_variables] == ["DB_PASSWORD", "API_KEY"]
    secrets_part = write(
        tmp_path, "secrets.yaml", BLOCKS[SECRETS].split("# Usage in Pipeline\n", 1)[0]
    )
    with pytest.raises(SpecError) as exc:
        load([secrets_part])
    assert "'secrets' at the top of a document" in exc.value.message
    assert "vmfarm secrets set" in exc.value.message


def test_the_configuration_pipeline_names_a_variable_it_never_defines(tmp_path: Path) -> None:
    """It deploys to the environment's only infrastructure (no infrastructureDefinitions), and
    is refused for `<+pipeline.variables.ansible_repo>`, which the reference never defines."""
    files = [
        write(tmp_path, "service.yaml", BLOCKS[SERVICE]),
        write(tmp_path, "environment.yaml", BLOCKS[ENVIRONMENT]),
        write(tmp_path, "pipeline.yaml", BLOCKS[CONFIG_PIPELINE]),
        write(tmp_path, "connectors.yaml", CONNECTORS),
    ]
    with pytest.raises((SpecError, SpecErrors)) as exc:
        load(files)
    (err,) = errors(exc)
    assert "unknown expression <+pipeline.variables.ansible_repo>" in err.message
    assert err.file == str(files[2])


@pytest.mark.parametrize("block", [PIPELINE_TEMPLATE, ENVIRONMENT_TEMPLATE, SERVICE_TEMPLATE])
def test_templates_load_as_written(tmp_path: Path, block: int) -> None:
    bundle = load([write(tmp_path, "template.yaml", BLOCKS[block])])
    assert len(bundle.templates) == 1


@pytest.mark.parametrize(
    ("block", "says"),
    [
        (CICD_PIPELINE, "vmfarm deploys and does not build"),
    ],
)
def test_pipelines_vmfarm_cannot_run_are_refused_with_the_reason(
    tmp_path: Path, block: int, says: str
) -> None:
    with pytest.raises((SpecError, SpecErrors)) as exc:
        load([*documents(tmp_path), write(tmp_path, "pipeline.yaml", BLOCKS[block])])
    assert any(says in e.message for e in errors(exc))


# The Git connector the reference's Terraform store implies (`repoName: infrastructure-repo`,
# no connectorRef: the files' one Git connector, an Account connector with repoName under it).
GIT_CONNECTOR = """\
connector:
  name: infrastructure
  identifier: infrastructure_git
  type: Git
  spec:
    url: https://git.example.com/platform
    connectionType: Account
    validationRepo: infrastructure-repo
    type: Http
    spec:
      username: deployer
      passwordRef: account.git_token
"""


def test_the_terraform_pipeline_is_refused_only_for_its_secret_manager(tmp_path: Path) -> None:
    """vmfarm runs TerraformPlan and TerraformApply with InheritFromPlan (tests/unit/
    test_terraform.py, tests/e2e/test_terraform.py); the plan's secretManagerRef (Harness
    encrypts the saved plan with it) is refused by name; without that line the block plans:
    the store's repository comes from the Git connector, the apply inherits the plan."""
    git = write(tmp_path, "git.yaml", GIT_CONNECTOR)
    text = BLOCKS[TERRAFORM_PIPELINE]
    pipe = write(tmp_path, "pipeline.yaml", text)
    with pytest.raises((SpecError, SpecErrors)) as exc:
        load([*documents(tmp_path), git, pipe])
    (err,) = errors(exc)
    assert err.message.startswith("secretManagerRef is not supported")
    assert (
        err.line
        == text.split("\n").index("                      secretManagerRef: vault_connector") + 1
    )

    without = write(
        tmp_path,
        "pipeline.yaml",
        text.replace("                      secretManagerRef: vault_connector\n", ""),
    )
    bundle = load([*documents(tmp_path), git, without])
    plan = resolve(bundle, choose_pipeline(bundle, None), execution_id="EX1").to_json()
    (planned,), (applied,) = (s["steps"] for s in plan["stages"])
    assert planned["type"] == "TerraformPlan"
    assert planned["spec"]["provisionerIdentifier"] == "plan_infra"
    assert planned["spec"]["configuration"]["workspace"] == "production"
    (repo,) = planned["repositories"].values()
    assert repo["url"] == "https://git.example.com/platform/infrastructure-repo"
    assert repo["passwordRef"] == "account.git_token"
    assert applied["spec"] == {
        "provisionerIdentifier": "plan_infra",
        "configuration": {"type": "InheritFromPlan"},
        "delegateSelectors": [],
    }


def test_the_ansible_playbook_is_not_a_pipeline_file(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as exc:
        load([write(tmp_path, "playbook.yaml", BLOCKS[ANSIBLE_PLAYBOOK])])
    assert "got a list" in exc.value.message


@pytest.mark.parametrize("block", sorted(NOT_DOCUMENTS))
def test_blocks_that_are_not_pipeline_documents_are_refused_by_their_first_key(
    tmp_path: Path, block: int
) -> None:
    key, points_to = NOT_DOCUMENTS[block]
    path = write(tmp_path, f"b{block}.yaml", BLOCKS[block])
    with pytest.raises(SpecError) as exc:
        load([path])
    assert f"'{key}' at the top of a document is not something vmfarm reads" in exc.value.message
    assert points_to in exc.value.message
    line = next(n for n, t in enumerate(BLOCKS[block].split("\n"), 1) if t.startswith(key))
    assert exc.value.line == line
