"""The reference's ``blueGreenDeployment`` block: what vmfarm carries out and what it refuses.

tests/data/reference_bluegreen/block.txt is the block as shared/reference/harness-vm-deployments.md
writes it ("2. Blue-Green Deployment"); as-written/pipeline.yaml puts it, unchanged but for
its indentation, into a stage; pipeline.yaml leaves out its two Auto Scaling group settings,
which vmfarm refuses by name. Every other field is carried out: the slots are vmfarm's two
sets, the switch step's load balancers become the stage's traffic.
"""

from __future__ import annotations

import shutil
import textwrap
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from app.definitions.loader import choose_pipeline, load
from app.definitions.plan import Plan
from app.definitions.resolve import resolve
from app.errors import SpecError, SpecErrors, VmfarmError
from cli.main import main
from strategies import plan as plan_phases

DATA = Path(__file__).resolve().parents[1] / "data" / "reference_bluegreen"
BLOCK = (DATA / "block.txt").read_text()
SIDE = [DATA / "service.yaml", DATA / "environment.yaml", DATA / "infrastructure.yaml"]
ARN = "arn:aws:elasticloadbalancing:us-east-1:123456789012:targetgroup/web-app-tg/1234567890123456"
WHERE = "spec.stages[0].stage.spec.blueGreenDeployment"


def block_in(path: Path) -> str:
    """The lines of ``path`` from the block's comment to its last line, dedented."""
    lines = path.read_text().split("\n")
    start = next(i for i, t in enumerate(lines) if "# Blue-Green Deployment" in t)
    end = next(i for i, t in enumerate(lines) if t.strip().startswith("execution:"))
    return textwrap.dedent("\n".join(lines[start:end]) + "\n")


def line_of(path: Path, needle: str) -> int:
    (line,) = [i for i, t in enumerate(path.read_text().split("\n"), 1) if needle in t]
    return line


def errors_of(exc: pytest.ExceptionInfo[VmfarmError]) -> list[SpecError]:
    errors = exc.value.errors if isinstance(exc.value, SpecErrors) else [exc.value]
    assert all(isinstance(e, SpecError) for e in errors)
    return [e for e in errors if isinstance(e, SpecError)]


def plan_of(paths: list[Path]) -> Plan:
    bundle = load(paths, inputs={"version": "1.0"}, require_inputs=True)
    return resolve(bundle, choose_pipeline(bundle, None), execution_id="EX1")


def variant(tmp_path: Path, old: str, new: str, *, infra: str | None = None) -> list[Path]:
    """The runnable set with one text replacement in the pipeline (and another infrastructure
    file when given)."""
    dest = tmp_path / "files"
    shutil.copytree(DATA, dest)
    text = (dest / "pipeline.yaml").read_text()
    assert text.count(old) == 1, old
    (dest / "pipeline.yaml").write_text(text.replace(old, new))
    if infra is not None:
        (dest / "infrastructure.yaml").write_text(textwrap.dedent(infra))
    return [
        dest / "service.yaml",
        dest / "environment.yaml",
        dest / "infrastructure.yaml",
        dest / "pipeline.yaml",
    ]


def refused(paths: list[Path]) -> SpecError:
    with pytest.raises((SpecError, SpecErrors)) as exc:
        load(paths, inputs={"version": "1.0"}, require_inputs=True)
    errors = errors_of(exc)
    assert len(errors) == 1, "\n".join(map(str, errors))
    return errors[0]


# --- the block as written -------------------------------------------------------------------------


def test_the_test_files_hold_the_reference_block_byte_for_byte() -> None:
    assert BLOCK.startswith(
        "# Blue-Green Deployment with Load Balancer Switch\nblueGreenDeployment:\n"
    )
    assert block_in(DATA / "as-written" / "pipeline.yaml") == BLOCK
    kept = "".join(
        t
        for t in BLOCK.splitlines(keepends=True)
        if not t.strip().startswith(("useAppAutoScaling:", "autoScalingGroupName:"))
    )
    assert block_in(DATA / "pipeline.yaml") == kept
    assert len(kept.splitlines()) == len(BLOCK.splitlines()) - 2


def test_the_block_as_written_is_refused_for_its_auto_scaling_group_settings_only() -> None:
    # Given the reference's block as written, in a stage
    written = DATA / "as-written" / "pipeline.yaml"
    # When it is loaded
    with pytest.raises(SpecErrors) as exc:
        load([*SIDE, written], inputs={"version": "1.0"}, require_inputs=True)
    # Then exactly its two Auto Scaling group settings are refused, each where it is written
    errors = errors_of(exc)
    assert [(e.line, e.field) for e in errors] == [
        (line_of(written, "useAppAutoScaling:"), f"{WHERE}.steps[0].properties.useAppAutoScaling"),
        (
            line_of(written, "autoScalingGroupName:"),
            f"{WHERE}.steps[0].properties.autoScalingGroupName",
        ),
    ]
    for e in errors:
        assert e.file == str(written)
        assert "is not supported" in e.message and "Auto Scaling groups" in e.message


def test_validate_exits_2_naming_file_line_and_field(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VMFARM_HOME", str(tmp_path / "home"))
    written = DATA / "as-written" / "pipeline.yaml"
    res = CliRunner().invoke(main, ["validate", *map(str, SIDE), str(written)])
    assert res.exit_code == 2
    line = line_of(written, "autoScalingGroupName:")
    assert f"{written}:{line}:" in res.output
    assert "'autoScalingGroupName' is not supported" in res.output
    assert "nothing was run" in res.output


# --- what it becomes ------------------------------------------------------------------------------


def test_the_block_becomes_blue_green_with_its_load_balancers_as_traffic() -> None:
    stage = plan_of([*SIDE, DATA / "pipeline.yaml"]).stages[0]
    strategy = stage.strategy
    assert strategy.type == "BlueGreen"
    assert strategy.switch_name == "Switch Load Balancer"
    traffic = strategy.traffic
    assert traffic is not None
    assert traffic.switch_spec() == {
        "type": "AwsLoadBalancers",
        "region": "us-east-1",
        "targetGroupArns": [ARN],
        "classicLoadBalancers": ["web-app-clb"],
    }


def test_staging_is_deployed_then_the_named_switch_moves_traffic_to_it() -> None:
    stage = plan_of([*SIDE, DATA / "pipeline.yaml"]).stages[0]
    hosts = ["i-01", "i-02", "i-03", "i-04"]
    # The first time, no set has traffic: the second set is staging
    deploy, switch = plan_phases(stage.strategy, hosts)
    assert (deploy.kind, deploy.hosts) == ("deploy", ("i-03", "i-04"))
    assert (switch.kind, switch.name, switch.hosts) == (
        "switch",
        "Switch Load Balancer to green",
        ("i-03", "i-04"),
    )
    # Once green is production, blue is staging
    deploy, switch = plan_phases(stage.strategy, hosts, live=["i-03", "i-04"])
    assert deploy.hosts == switch.hosts == ("i-01", "i-02")
    # Hosts tagged slot=blue/green are split by their tag
    slots = {"i-01": "green", "i-02": "blue", "i-03": "green", "i-04": "blue"}
    deploy, _ = plan_phases(stage.strategy, hosts, live=["i-02", "i-04"], slots=slots)
    assert deploy.hosts == ("i-01", "i-03")


def test_use_app_auto_scaling_false_asks_for_nothing_and_loads(tmp_path: Path) -> None:
    paths = variant(
        tmp_path, "properties:\n", "properties:\n                  useAppAutoScaling: false\n"
    )
    assert plan_of(paths).stages[0].strategy.type == "BlueGreen"


def test_only_classic_load_balancers_switch_in_the_infrastructure_region(tmp_path: Path) -> None:
    paths = variant(
        tmp_path, f"                  targetGroupArns:\n                    - {ARN}\n", ""
    )
    traffic = plan_of(paths).stages[0].strategy.traffic
    assert traffic is not None
    assert (traffic.region, traffic.target_group_arns, traffic.classic_load_balancers) == (
        "us-east-1",
        [],
        ["web-app-clb"],
    )


# --- refusals -------------------------------------------------------------------------------------

STATIC = """\
    apiVersion: v1
    kind: Infrastructure
    metadata: {name: aws-ec2-infrastructure}
    spec:
      environmentRef: prod_vm_env
      type: Pdc
      spec:
        hosts:
          - hostname: 10.0.0.1
            attributes: {instanceId: i-0123456789abcdef0}
          - hostname: 10.0.0.2
    """
AZURE = """\
    apiVersion: v1
    kind: Infrastructure
    metadata: {name: aws-ec2-infrastructure}
    spec:
      environmentRef: prod_vm_env
      type: SshWinRmAzure
      spec: {subscriptionId: sub, resourceGroup: rg, region: eastus}
    """
NO_REGION = """\
    apiVersion: v1
    kind: Infrastructure
    metadata: {name: aws-ec2-infrastructure}
    spec:
      environmentRef: prod_vm_env
      type: SshWinRmAws
      spec:
        hostFilter:
          type: AwsInstanceFilter
          spec: {regions: [us-east-1, eu-west-1]}
    """
CLB_ONLY = (f"                  targetGroupArns:\n                    - {ARN}\n", "")

CASES: list[dict[str, Any]] = [
    {
        "id": "two_production_slots",
        "old": "productionSlots: 1",
        "new": "productionSlots: 2",
        "field": "productionSlots",
        "says": "productionSlots: 2 is not supported",
    },
    {
        "id": "three_staging_slots",
        "old": "stagingSlots: 1",
        "new": "stagingSlots: 3",
        "field": "stagingSlots",
        "says": "write stagingSlots: 1",
    },
    {
        "id": "another_step_type",
        "old": "stepType: AWS_AMI_SWITCH_ROUTES",
        "new": "stepType: AWS_AMI_ROLLBACK_SWITCH_ROUTES",
        "field": "steps[0].stepType",
        "says": "stepType AWS_AMI_ROLLBACK_SWITCH_ROUTES is not supported",
    },
    {
        "id": "a_second_switch",
        "old": "            steps:\n              - stepType",
        "new": "            steps:\n              - stepType: AWS_AMI_SWITCH_ROUTES\n"
        "                properties: {classicLoadBalancers: [other-clb]}\n"
        "              - stepType",
        "field": "steps[1]",
        "says": "a second AWS_AMI_SWITCH_ROUTES step is not supported",
    },
    {
        "id": "misspelt_property",
        "old": "targetGroupArns:",
        "new": "targetGroupArn:",
        "field": "steps[0].properties.targetGroupArn",
        "says": "unknown field 'targetGroupArn' in the AWS_AMI_SWITCH_ROUTES step's properties; "
        "did you mean 'targetGroupArns'?",
    },
    {
        "id": "downsize_old_asg",
        "old": "properties:\n",
        "new": "properties:\n                  downsizeOldAsg: true\n",
        "field": "steps[0].properties.downsizeOldAsg",
        "says": "'downsizeOldAsg' is not supported",
    },
    {
        "id": "not_an_arn",
        "old": ARN,
        "new": "web-app-tg",
        "field": "steps[0].properties.targetGroupArns[0]",
        "says": "'web-app-tg' is not an ELBv2 target group ARN",
    },
    {
        "id": "arns_in_two_regions",
        "old": f"- {ARN}\n",
        "new": f"- {ARN}\n                    - {ARN.replace('us-east-1', 'eu-west-1')}\n",
        "field": "steps[0].properties.targetGroupArns",
        "says": "the target groups are in several regions (eu-west-1, us-east-1)",
    },
    {
        "id": "a_bad_classic_name",
        "old": "- web-app-clb",
        "new": "- web_app_clb",
        "field": "steps[0].properties.classicLoadBalancers[0]",
        "says": "'web_app_clb' is not a classic load balancer name",
    },
    {
        "id": "no_load_balancer",
        "old": "properties:\n                  classicLoadBalancers:\n"
        "                    - web-app-clb\n",
        "new": "properties: {}\n",
        "also": CLB_ONLY,
        "field": "steps[0]",
        "says": "needs targetGroupArns or classicLoadBalancers",
    },
    {
        "id": "unknown_switch_step_field",
        "old": "stepType: AWS_AMI_SWITCH_ROUTES",
        "new": "stepType: AWS_AMI_SWITCH_ROUTES\n                disabled: true",
        "field": "steps[0].disabled",
        "says": "disabled",
    },
    {
        "id": "classic_region_unknown",
        "old": CLB_ONLY[0],
        "new": CLB_ONLY[1],
        "infra": NO_REGION,
        "field": "steps[0].properties.classicLoadBalancers",
        "says": "the classic load balancers' region is not known",
    },
    {
        "id": "azure_hosts",
        "old": "stagingSlots: 1",
        "new": "stagingSlots: 1",
        "infra": AZURE,
        "field": "steps[0].stepType",
        "says": "infrastructure aws_ec2_infrastructure is not AWS",
    },
    {
        "id": "static_hosts_without_instance_id",
        "old": "stagingSlots: 1",
        "new": "stagingSlots: 1",
        "infra": STATIC,
        "field": "steps[0].properties.classicLoadBalancers",
        "says": "these static hosts have none (aws_ec2_infrastructure: 10.0.0.2)",
    },
    {
        "id": "misspelt_block_field",
        "old": "stagingSlots:",
        "new": "stagingSlot:",
        "field": "stagingSlot",
        "says": "stagingSlots",
    },
]


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_what_vmfarm_does_not_carry_out_is_refused_where_it_is_written(
    case: dict[str, Any], tmp_path: Path
) -> None:
    paths = variant(tmp_path, case["old"], case["new"], infra=case.get("infra"))
    if "also" in case:
        text = paths[-1].read_text()
        paths[-1].write_text(text.replace(*case["also"]))
    err = refused(paths)
    assert case["says"] in err.message
    assert err.field == f"{WHERE}.{case['field']}"
    assert err.file == str(paths[-1]) and err.line is not None


def test_no_steps_at_all_is_refused(tmp_path: Path) -> None:
    text = (DATA / "pipeline.yaml").read_text()
    start = text.index("            steps:\n              - stepType")
    end = text.index("          execution:")
    paths = variant(tmp_path, text[start:end], "")
    err = refused(paths)
    assert "blueGreenDeployment needs a AWS_AMI_SWITCH_ROUTES step" in err.message
    assert err.field == WHERE


def test_blue_green_and_another_strategy_form_is_refused(tmp_path: Path) -> None:
    paths = variant(
        tmp_path,
        "          execution:\n",
        "          strategy: {type: Basic}\n          execution:\n",
    )
    with pytest.raises((SpecError, SpecErrors)) as exc:
        load(paths, inputs={"version": "1.0"}, require_inputs=True)
    assert any("give one of strategy, blueGreenDeployment" in e.message for e in errors_of(exc))


# --- the same traffic in vmfarm's own strategy form ---------------------------------------------


def test_vmfarm_form_takes_the_same_load_balancers_and_refuses_what_it_would_ignore() -> None:
    from pydantic import ValidationError

    from app.definitions.models import StrategySpec

    spec = StrategySpec.model_validate(
        {
            "type": "BlueGreen",
            "switchName": "Swap",
            "traffic": {
                "type": "AwsLoadBalancers",
                "region": "us-east-1",
                "classicLoadBalancers": ["web"],
            },
        }
    )
    assert spec.traffic is not None
    assert spec.traffic.switch_spec() == {
        "type": "AwsLoadBalancers",
        "region": "us-east-1",
        "targetGroupArns": [],
        "classicLoadBalancers": ["web"],
    }
    # A port would be ignored (each target group has its own): refused, saying why
    with pytest.raises(ValidationError) as exc:
        StrategySpec.model_validate(
            {
                "type": "BlueGreen",
                "traffic": {
                    "type": "AwsLoadBalancers",
                    "region": "us-east-1",
                    "classicLoadBalancers": ["web"],
                    "port": 9090,
                },
            }
        )
    assert "does not take port (the target groups' ports apply)" in str(exc.value)
    # HAProxy fields on an AWS switch, and a switch name without a switch, are refused too
    with pytest.raises(ValidationError, match="does not take listen"):
        StrategySpec.model_validate(
            {
                "type": "BlueGreen",
                "traffic": {
                    "type": "AwsElbV2",
                    "region": "us-east-1",
                    "targetGroupArn": "arn",
                    "listen": "127.0.0.1:80",
                },
            }
        )
    with pytest.raises(ValidationError, match="switchName names a BlueGreen switch"):
        StrategySpec.model_validate({"type": "Rolling", "phases": [1], "switchName": "x"})
    # Plans stored before: their defaults (port 8080, name vmfarm, mode http) still read
    old = StrategySpec.model_validate(
        {
            "type": "BlueGreen",
            "traffic": {
                "type": "AwsElbV2",
                "region": "us-east-1",
                "targetGroupArn": "arn",
                "port": 8080,
                "name": "vmfarm",
                "mode": "http",
                "timeout": 600,
            },
        }
    )
    assert old.traffic is not None and old.traffic.switch_spec()["timeout"] == 600
