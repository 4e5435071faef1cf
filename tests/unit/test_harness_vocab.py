"""Harness's SSH vocabulary (tests/data/harness, written from the shapes of Harness's docs and
example apps) loads and plans the phases Harness would run; what vmfarm does not carry out is
refused by name, at the line the file says it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from app.definitions.loader import choose_pipeline, load
from app.definitions.resolve import resolve
from app.errors import SpecError, SpecErrors
from cli.main import main
from tests.unit.test_native_shape import comparable
from tests.unit.test_spec import line_of

HARNESS = Path(__file__).resolve().parents[1] / "data" / "harness"
RACK_A = ["10.20.0.11:2222", "10.20.0.12:2222", "10.20.0.14:2222", "10.20.0.15:2222"]


def plan(paths: list[Path], pipeline: str) -> dict[str, Any]:
    bundle = load(paths, require_inputs=True)
    return resolve(bundle, choose_pipeline(bundle, pipeline), execution_id="EX1").to_json()


def phases(paths: list[Path], pipeline: str) -> list[tuple[str, list[str]]]:
    """(name, hosts) of the first Deployment stage's phases, as ``vmfarm plan`` shows them."""
    from app.coordinator.dryrun import dry_run

    result = dry_run(paths, pipeline=pipeline, inputs={})
    stage = next(s for s in result["stages"] if s.get("phases"))
    return [(p["name"], list(p["hosts"])) for p in stage["phases"]]


def copy_with(tmp_path: Path, name: str, old: str, new: str) -> tuple[Path, Path]:
    """tests/data/harness in tmp_path with the first ``old`` replaced by ``new`` in ``name``."""
    folder = tmp_path / "harness"
    shutil.copytree(HARNESS, folder)
    f = folder / name
    text = f.read_text()
    assert old in text, old
    f.write_text(text.replace(old, new, 1))
    return folder, f


def refusal(paths: list[Path]) -> list[SpecError]:
    with pytest.raises((SpecError, SpecErrors)) as exc:
        load(paths)
    return exc.value.errors if isinstance(exc.value, SpecErrors) else [exc.value]


# --- what loads ----------------------------------------------------------------------------------


def test_every_harness_shaped_file_validates() -> None:
    bundle = load([HARNESS])
    assert sorted(bundle.pipelines) == [
        "todolist_approved",
        "todolist_basic",
        "todolist_canary",
        "todolist_rolling",
    ]
    assert sorted(bundle.connectors) == ["jfrog"]  # the PDC connector became the hosts


def test_the_rolling_phase_group_plans_parts_of_half_the_hosts() -> None:
    # Given a Phase over <+stage.output.hosts> with partitionSize 50, unit Percentage, and
    # the HostAttributes filter keeping the four hosts of rack a
    got = phases([HARNESS], "todolist_rolling")
    # Then the stage runs in two phases of two hosts, in the PDC connector's order
    assert got == [("Phase 1", RACK_A[:2]), ("Phase 2", RACK_A[2:])]
    stage = plan([HARNESS], "todolist_rolling")["stages"][0]
    assert stage["strategy"]["type"] == "Rolling"
    assert [s["identifier"] for s in stage["steps"]] == ["deploy"]
    assert [s["identifier"] for s in stage["rollbackSteps"]] == ["rollback"]


def test_a_partition_size_as_a_count_gives_phases_of_that_many_hosts(tmp_path: Path) -> None:
    folder, _ = copy_with(
        tmp_path,
        "pipeline-rolling.yaml",
        "partitionSize: 50\n                      unit: Percentage",
        "partitionSize: 3\n                      unit: Count",
    )
    got = phases([folder], "todolist_rolling")
    assert got == [("Phase 1", RACK_A[:3]), ("Phase 2", RACK_A[3:])]


def test_canary_phases_with_start_and_end_are_the_canary_and_the_rest() -> None:
    got = phases([HARNESS], "todolist_canary")
    assert got == [("Canary 1", RACK_A[:2]), ("Primary", RACK_A[2:])]
    stage = plan([HARNESS], "todolist_canary")["stages"][0]
    assert stage["strategy"]["type"] == "Canary"
    # one set of steps for both phases (Harness numbers them per phase)
    assert [s["identifier"] for s in stage["steps"]] == ["deploy_1"]


def test_a_step_over_part_of_the_hosts_is_a_phase(tmp_path: Path) -> None:
    # Given Harness's step-level form: the Command step itself repeats over a part of the
    # hosts (start/end), its spec naming the iteration's host
    folder, _ = copy_with(
        tmp_path,
        "pipeline-basic.yaml",
        "        items: <+stage.output.hosts>\n                  spec:\n",
        "        items: <+stage.output.hosts>\n                      maxConcurrency: 2\n"
        "                      start: 0\n                      end: 100\n"
        "                      unit: Percentage\n                  spec:\n"
        "                    host: <+repeat.item>\n",
    )
    stage = plan([folder], "todolist_basic")["stages"][0]
    assert stage["strategy"]["maxConcurrency"] == 2
    assert "host" not in json.dumps(stage["steps"][0]["spec"])
    assert phases([folder], "todolist_basic") == [("Canary 1", RACK_A)]


def test_repeat_over_the_stage_hosts_is_the_per_host_fan_out() -> None:
    got = phases([HARNESS], "todolist_basic")
    assert got == [("Phase 1", RACK_A)]


def test_credentials_ref_to_an_ssh_key_secret_gives_user_port_and_key_secret() -> None:
    infra = plan([HARNESS], "todolist_basic")["stages"][0]["infrastructures"][0]
    assert infra["spec"]["connection"] == {
        "type": "SSH",
        "user": "deploy",
        "port": 2222,
        "hostKeyPolicy": "strict",
        "connectTimeout": 10.0,
        "privateKeySecret": "deploy_private_key",
    }
    assert infra["spec"]["delegateSelectors"] == ["dc-east"]  # from the PDC connector


def test_credentials_ref_naming_a_secret_id_is_the_private_key(tmp_path: Path) -> None:
    folder, _ = copy_with(
        tmp_path, "infrastructure.yaml", "credentialsRef: deploy_ssh", "credentialsRef: lab_key"
    )
    infra = plan([folder], "todolist_basic")["stages"][0]["infrastructures"][0]
    assert infra["spec"]["connection"]["privateKeySecret"] == "lab_key"
    assert infra["spec"]["connection"]["user"] == "root"


def test_a_password_credential_gives_the_password_secret(tmp_path: Path) -> None:
    folder, _ = copy_with(
        tmp_path,
        "secret-ssh.yaml",
        "credentialType: KeyReference\n        spec:\n          userName: deploy\n"
        "          key: deploy_private_key",
        "credentialType: Password\n        spec:\n          userName: ops\n"
        "          password: ops_password",
    )
    conn = plan([folder], "todolist_basic")["stages"][0]["infrastructures"][0]["spec"]["connection"]
    assert (conn["user"], conn["passwordSecret"]) == ("ops", "ops_password")
    assert "privateKeySecret" not in conn


def test_host_names_filter_keeps_the_named_hosts(tmp_path: Path) -> None:
    folder, _ = copy_with(
        tmp_path,
        "infrastructure.yaml",
        "type: HostAttributes\n      spec:\n        value:\n          rack: a",
        "type: HostNames\n      spec:\n        value: [10.20.0.13, 10.20.0.15]",
    )
    got = phases([folder], "todolist_basic")
    assert got == [("Phase 1", ["10.20.0.13:2222", "10.20.0.15:2222"])]


def test_plain_host_strings_are_hosts(tmp_path: Path) -> None:
    folder, f = copy_with(
        tmp_path,
        "infrastructure.yaml",
        "connectorRef: datacenter",
        "hosts: [10.30.0.1, 10.30.0.2]",
    )
    f.write_text(f.read_text().replace("      type: HostAttributes", "      type: All"))
    f.write_text(
        f.read_text()
        .replace("value:\n          rack: a", "{}")
        .replace("spec:\n        {}", "spec: {}")
    )
    got = phases([folder], "todolist_basic")
    assert got == [("Phase 1", ["10.30.0.1:2222", "10.30.0.2:2222"])]


def test_the_artifact_keeps_its_file_name_and_path() -> None:
    stage = plan([HARNESS], "todolist_basic")["stages"][0]
    art = stage["artifact"]
    assert (art["type"], art["fileName"], art["tag"]) == (
        "Artifactory",
        "todolist.war",
        "todolist.war",
    )
    assert art["spec"]["artifactPath"] == "todolist.war"


def test_artifact_path_expression_renders(tmp_path: Path) -> None:
    folder, _ = copy_with(
        tmp_path,
        "pipeline-basic.yaml",
        "mkdir -p $HOME/<+service.name>/<+env.name>/runtime\n",
        "mkdir -p $HOME/<+service.name>/<+env.name>/runtime\n"
        "                                echo <+artifact.artifactPath>\n",
    )
    stage = plan([folder], "todolist_basic")["stages"][0]
    from app.coordinator.dryrun import dry_run

    shown = dry_run([folder], pipeline="todolist_basic", inputs={})
    assert "echo todolist.war" in str(shown)
    assert stage["artifact"]["fileName"] == "todolist.war"


def test_an_artifact_without_tag_or_path_is_an_error_before_anything_runs(tmp_path: Path) -> None:
    folder, f = copy_with(
        tmp_path, "service.yaml", "                artifactPath: todolist.war\n", ""
    )
    errors = refusal([folder])
    assert any("the artifact has no tag" in e.message for e in errors), errors
    assert {e.file for e in errors} == {str(f)}


def test_serviceinputs_with_values_are_still_refused(tmp_path: Path) -> None:
    folder, f = copy_with(
        tmp_path, "pipeline-basic.yaml", "primaryArtifactRef: <+input>", "primaryArtifactRef: x"
    )
    (err,) = refusal([folder])
    assert "serviceInputs with values is not supported" in err.message
    assert err.file == str(f)


def test_copy_config_with_no_config_files_copies_nothing() -> None:
    from app.coordinator.dryrun import dry_run

    (step,) = dry_run([HARNESS], pipeline="todolist_basic", inputs={})["stages"][0]["steps"]
    units = {u["identifier"]: u for u in step["units"]}
    assert units["copy_config"]["sourceType"] == "Config"
    assert units["copy_config"]["source"] == "the service's config files (it has none)"
    assert units["copy_artifact"]["destination"] == "$HOME/todolist/staging/todolist.war"


def test_an_error_inside_a_phase_group_points_at_the_line_written(tmp_path: Path) -> None:
    folder, f = copy_with(
        tmp_path,
        "pipeline-rolling.yaml",
        "                              timeout: 10m\n                              spec:\n"
        "                                onDelegate: false",
        "                              timeout: 10m\n                              spec:\n"
        "                                onDelegat: false",
    )
    errors = refusal([folder])
    (err,) = [e for e in errors if "onDelegat" in e.message]
    assert err.file == str(f)
    assert err.line == line_of(f, "onDelegat:")


# --- what is refused by name ---------------------------------------------------------------------

REFUSED = {
    "stage variables": (
        "pipeline-basic.yaml",
        "        tags:\n          team: web\n",
        "        tags:\n          team: web\n        variables:\n          - name: x\n"
        "            type: String\n            value: y\n",
        "stage variables are not supported",
        "variables:",
    ),
    "host groups": (
        "infrastructure.yaml",
        "    connectorRef: datacenter\n",
        "    connectorRef: datacenter\n    hostGroups: [web]\n",
        "hostGroups is not supported",
        "hostGroups:",
    ),
    "dynamic provisioner": (
        "infrastructure.yaml",
        "    connectorRef: datacenter\n",
        "    connectorRef: datacenter\n    provisioner: tf\n",
        "provisioner is not supported",
        "provisioner:",
    ),
    "auto approval": (
        "pipeline-approval.yaml",
        "                    approverInputs: []\n",
        "                    approverInputs: []\n                    autoApproval:\n"
        "                      action: APPROVE\n",
        "autoApproval is not supported",
        "autoApproval:",
    ),
    "approver inputs": (
        "pipeline-approval.yaml",
        "approverInputs: []",
        "approverInputs: [{name: why, defaultValue: x}]",
        "approverInputs are not supported",
        "approverInputs:",
    ),
    "auto reject": (
        "pipeline-approval.yaml",
        "isAutoRejectEnabled: false",
        "isAutoRejectEnabled: true",
        "isAutoRejectEnabled: true is not supported",
        "isAutoRejectEnabled:",
    ),
    "two steps in an approval stage": (
        "pipeline-approval.yaml",
        "                    approverInputs: []\n",
        "                    approverInputs: []\n              - step:\n"
        "                  name: Notify\n                  identifier: notify\n"
        "                  type: ShellScript\n                  spec: {}\n",
        "an Approval stage with more than one step is not supported",
        "name: Notify",
    ),
    "WinRM": (
        "pipeline-basic.yaml",
        "deploymentType: Ssh",
        "deploymentType: WinRm",
        "deploymentType WinRm is not supported",
        "deploymentType: WinRm",
    ),
    "a canary that stops before every host": (
        "pipeline-canary.yaml",
        "start: 50\n                      end: 100",
        "start: 50\n                      end: 75",
        "the last Phase ends before every host",
        "end: 75",
    ),
    "phases in parallel": (
        "pipeline-rolling.yaml",
        "                      maxConcurrency: 1\n                      partitionSize: 50",
        "                      maxConcurrency: 2\n                      partitionSize: 50",
        "maxConcurrency of a Phase step group other than 1 is not supported",
        "maxConcurrency: 2",
    ),
    "a text secret among the files": (
        "secret-ssh.yaml",
        "  type: SSHKey",
        "  type: SecretText",
        "does not go in the pipeline files",
        "type: SecretText",
    ),
    "a Kerberos credential": (
        "secret-ssh.yaml",
        "credentialType: KeyReference",
        "credentialType: Kerberos",
        "credentialType 'Kerberos' is not supported",
        "credentialType: Kerberos",
    ),
    "Harness's runtime path variables": (
        "pipeline-basic.yaml",
        "destinationPath: $HOME/<+service.name>/<+env.name>\n",
        "destinationPath: $HARNESS_RUNTIME_PATH\n",
        "HARNESS_RUNTIME_PATH in destinationPath is not set by vmfarm",
        "destinationPath: $HARNESS_RUNTIME_PATH",
    ),
    "a host filter that keeps no host": (
        "infrastructure.yaml",
        "rack: a",
        "rack: z",
        "this host filter keeps none of the hosts",
        "hostFilter:",
    ),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_a_harness_setting_vmfarm_does_not_carry_out_is_refused_by_name(
    case: str, tmp_path: Path
) -> None:
    name, old, new, says, at = REFUSED[case]
    folder, f = copy_with(tmp_path, name, old, new)
    errors = refusal([folder])
    hits = [e for e in errors if says in e.message]
    assert hits, [e.message for e in errors]
    assert hits[0].file == str(f)
    assert hits[0].line == line_of(f, at)


def test_a_trigger_document_is_refused_by_name(tmp_path: Path) -> None:
    f = tmp_path / "trigger.yaml"
    f.write_text("trigger:\n  name: on push\n  identifier: on_push\n")
    (err,) = refusal([f])
    assert "a trigger is kept by the server" in err.message and err.line == 1


def test_a_document_without_kind_hints_at_harness_shape(tmp_path: Path) -> None:
    f = tmp_path / "x.yaml"
    f.write_text("apiVersion: v1\nmetadata: {name: x}\nspec: {}\n")
    (err,) = refusal([f])
    assert "pipeline:, service:, environment:, infrastructureDefinition:" in err.message


# --- convert ------------------------------------------------------------------------------------


def test_convert_of_the_harness_examples_keeps_every_plan(tmp_path: Path) -> None:
    """`vmfarm convert --to vmfarm` then `--to harness`: the same plans, the text back."""
    back = tmp_path / "back"
    shutil.copytree(HARNESS, back)
    runner = CliRunner()
    result = runner.invoke(main, ["convert", "--to", "vmfarm", "--write", str(back)])
    assert result.exit_code == 0, result.output
    assert "kind: Pipeline" in (back / "pipeline-rolling.yaml").read_text()
    for pipeline in ("todolist_basic", "todolist_rolling", "todolist_canary", "todolist_approved"):
        assert comparable(plan([back], pipeline), back) == comparable(
            plan([HARNESS], pipeline), HARNESS
        )
    result = runner.invoke(main, ["convert", "--to", "harness", "--write", str(back)])
    assert result.exit_code == 0, result.output
    for f in HARNESS.iterdir():
        assert (back / f.name).read_text() == f.read_text(), f.name


def lab_infrastructure(folder: Path, tmp_path: Path) -> list[Path]:
    """A static infrastructure for a configs/ folder that has none of its own (the demo deploys
    to the lab's, which `vmfarm lab up` writes)."""
    if (folder / "infrastructure.yaml").exists():
        return []
    good = Path(__file__).resolve().parents[1] / "data" / "good" / "infrastructure.yaml"
    path = tmp_path / "lab-infrastructure.yaml"
    path.write_text(
        good.read_text()
        .replace("environmentRef: test_env", "environmentRef: lab")
        .replace("identifier: test_hosts", "identifier: lab")
    )
    return [path]


CONFIGS = Path(__file__).resolve().parents[2] / "configs"
CONFIG_FOLDERS = sorted(
    {
        f.parent
        for f in CONFIGS.rglob("*.yaml")
        if any(line.startswith(("kind: ", "pipeline:")) for line in f.read_text().splitlines())
    }
)


def test_the_round_trip_covers_every_pipeline_folder_of_configs() -> None:
    assert [f.relative_to(CONFIGS).as_posix() for f in CONFIG_FOLDERS] == [
        "compose/pipeline",
        "demo",
    ]


@pytest.mark.parametrize("folder", CONFIG_FOLDERS, ids=lambda f: f.name)
def test_convert_to_harness_and_back_keeps_the_plan_of_configs(
    folder: Path, tmp_path: Path
) -> None:
    """`vmfarm convert --to harness` then `--to vmfarm` of a configs/ folder: the Harness form
    and the converted-back form plan exactly as the original."""
    roots = {}  # each a copy of configs/ (a folder's files may name files beside it)
    for name in ("original", "harness", "back"):
        shutil.copytree(CONFIGS, tmp_path / name)
        roots[name] = tmp_path / name / folder.relative_to(CONFIGS)
    infra = lab_infrastructure(folder, tmp_path)
    runner = CliRunner()
    for name in ("harness", "back"):
        result = runner.invoke(main, ["convert", "--to", "harness", "--write", str(roots[name])])
        assert result.exit_code == 0, result.output
    result = runner.invoke(main, ["convert", "--to", "vmfarm", "--write", str(roots["back"])])
    assert result.exit_code == 0, result.output
    harness_text = "".join(f.read_text() for f in roots["harness"].glob("*.yaml"))
    assert "\npipeline:\n" in harness_text and "\nkind: " not in harness_text
    plans = {}
    for name, root in roots.items():
        paths = [root, *infra]
        bundle = load(paths, inputs={"tag": "1.0"})
        plans[name] = comparable(
            resolve(bundle, choose_pipeline(bundle, None), execution_id="EX1").to_json(),
            tmp_path / name,
        )
    assert plans["harness"] == plans["original"]
    assert plans["back"] == plans["original"]
    for f in folder.glob("*.yaml"):
        assert (roots["back"] / f.name).read_text() == f.read_text(), f.name


def test_an_aws_connector_retry_override_is_refused_by_name(tmp_path: Path) -> None:
    f = tmp_path / "aws.yaml"
    f.write_text(
        "connector:\n  name: aws\n  identifier: aws\n  type: Aws\n  spec:\n"
        "    credential:\n      type: InheritFromDelegate\n"
        "    awsSdkClientBackOffStrategyOverride:\n"
        "      type: FixedDelayBackoffStrategy\n      spec: {fixedBackoff: 0, retryCount: 0}\n"
    )
    (err,) = refusal([f])
    assert "awsSdkClientBackOffStrategyOverride is not supported" in err.message
    assert (err.file, err.line) == (str(f), line_of(f, "awsSdkClientBackOffStrategyOverride"))
