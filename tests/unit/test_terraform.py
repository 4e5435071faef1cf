"""Terraform steps at load: what is carried out, what is refused by name (file, line, field),
the checks between steps, and the pieces of the runner that need no terraform (the CLI
configuration that keeps terraform off every registry, outputs as a later stage's hosts).
tests/e2e/test_terraform.py runs them with a real terraform."""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from app.coordinator.outputs import render_outputs
from app.definitions.loader import choose_pipeline, load
from app.definitions.resolve import resolve
from app.errors import SpecError, SpecErrors

GIT = """\
connector:
  name: infra
  identifier: infra_repo
  type: Git
  spec:
    url: file:///srv/git/infra.git
    type: Http
    spec: {}
"""

PLAN = """\
- step:
    type: TerraformPlan
    name: Plan
    identifier: plan
    spec:
      configuration:
        command: Apply
        workspace: prod
        configFiles:
          store:
            type: Git
            spec:
              gitFetchType: Branch
              branch: main
              folderPath: terraform/
"""

APPLY = """\
- step:
    type: TerraformApply
    name: Apply
    identifier: apply
    spec:
      provisionerIdentifier: plan
      configuration:
        type: InheritFromPlan
"""


def pipeline(*steps: str, stage_type: str = "Custom") -> str:
    body = textwrap.indent("".join(steps), " " * 12)
    return f"""\
apiVersion: v1
kind: Pipeline
metadata: {{name: infra}}
spec:
  stages:
    - stage:
        name: Infra
        identifier: infra
        type: {stage_type}
        spec:
          execution:
            steps:
{body}"""


@pytest.fixture
def files(tmp_path: Path) -> Iterator[Any]:
    def write(text: str, *, git: str = GIT) -> list[Path]:
        (tmp_path / "pipeline.yaml").write_text(text)
        out = [tmp_path / "pipeline.yaml"]
        if git:
            (tmp_path / "git.yaml").write_text(git)
            out.append(tmp_path / "git.yaml")
        return out

    yield write


def refusals(paths: list[Path]) -> list[SpecError]:
    with pytest.raises((SpecError, SpecErrors)) as exc:
        load(paths)
    return exc.value.errors if isinstance(exc.value, SpecErrors) else [exc.value]


def line_of(path: Path, needle: str) -> int:
    (line,) = [i for i, t in enumerate(path.read_text().split("\n"), 1) if needle in t]
    return line


def test_plan_and_inherited_apply_load_into_the_plan(files: Any) -> None:
    bundle = load(files(pipeline(PLAN, APPLY)))
    plan = resolve(bundle, choose_pipeline(bundle, None), execution_id="EX").to_json()
    planned, applied = plan["stages"][0]["steps"]
    # the plan's provisionerIdentifier is its identifier when none is written
    assert planned["spec"]["provisionerIdentifier"] == "plan"
    assert planned["repositories"] == {
        "spec.configuration.configFiles.store": {
            "connector": "infra_repo",
            "url": "file:///srv/git/infra.git",
            "type": "Http",
        }
    }
    assert applied["spec"]["configuration"] == {"type": "InheritFromPlan"}


@pytest.mark.parametrize(
    ("field", "value", "says"),
    [
        ("secretManagerRef", "vault", "keeps the saved plan in its own Terraform folder"),
        (
            "backendConfig",
            "{type: Inline, spec: {content: x}}",
            "keeps each provisionerIdentifier's state",
        ),
        ("exportTerraformPlanJson", "true", "shown in the step's log"),
        ("exportTerraformHumanReadablePlan", "true", "shown in the step's log"),
        ("commandFlags", "[{commandType: Plan, flag: -lock=false}]", "its own flags"),
    ],
)
def test_fields_vmfarm_does_not_carry_out_are_refused_by_name(
    files: Any, field: str, value: str, says: str
) -> None:
    text = pipeline(
        PLAN.replace(
            "        workspace: prod\n", f"        workspace: prod\n        {field}: {value}\n"
        )
    )
    paths = files(text)
    (err,) = refusals(paths)
    assert err.message.startswith(f"{field} is not supported")
    assert says in err.message
    assert err.line == line_of(paths[0], f"{field}:")
    assert err.field.endswith(f"configuration.{field}")


def test_a_module_source_is_refused_by_name(files: Any) -> None:
    text = pipeline(
        PLAN.replace(
            "        configFiles:\n",
            "        configFiles:\n          moduleSource: {useConnectorCredentials: true}\n",
        )
    )
    (err,) = refusals(files(text))
    assert err.message.startswith("moduleSource is not supported")


def test_an_apply_must_inherit_from_an_earlier_plan_of_its_provisioner(files: Any) -> None:
    paths = files(
        pipeline(APPLY.replace("provisionerIdentifier: plan", "provisionerIdentifier: web"), PLAN)
    )
    (err,) = refusals(paths)
    assert "no TerraformPlan before it has that provisionerIdentifier" in err.message
    assert err.line == line_of(paths[0], "provisionerIdentifier: web")


def test_a_destroy_plan_is_carried_out_by_terraform_destroy(files: Any) -> None:
    text = pipeline(PLAN.replace("command: Apply", "command: Destroy"), APPLY)
    (err,) = refusals(files(text))
    assert "a Destroy plan is carried out by TerraformDestroy" in err.message
    ok = pipeline(
        PLAN.replace("command: Apply", "command: Destroy"),
        APPLY.replace("TerraformApply", "TerraformDestroy"),
    )
    assert load(files(ok)).pipelines


def test_inherit_from_plan_takes_no_spec_and_inline_needs_one(files: Any) -> None:
    text = pipeline(
        PLAN,
        APPLY.replace(
            "type: InheritFromPlan",
            "type: InheritFromPlan\n        spec: {configFiles: {store: {type: Inline, spec: {files: "
            "[{name: main.tf, content: x}]}}}}",
        ),
    )
    (err,) = refusals(files(text))
    assert "configuration type InheritFromPlan takes no spec" in err.message
    (err,) = refusals(files(pipeline(APPLY.replace("InheritFromPlan", "Inline"))))
    assert "configuration type Inline needs spec" in err.message


def test_a_store_without_connector_needs_exactly_one_git_connector(files: Any) -> None:
    (err,) = refusals(files(pipeline(PLAN, APPLY), git=""))
    assert "no Git connector: write connectorRef" in err.message
    two = GIT + "---\n" + GIT.replace("infra_repo", "other_repo")
    (err,) = refusals(files(pipeline(PLAN, APPLY), git=two))
    assert "several Git connectors (infra_repo, other_repo)" in err.message


def test_repo_name_goes_with_an_account_connector(files: Any) -> None:
    with_name = PLAN.replace("branch: main", "branch: main\n              repoName: infra")
    (err,) = refusals(files(pipeline(with_name, APPLY)))
    assert "repoName goes with an Account Git connector" in err.message
    account = GIT.replace(
        "    type: Http\n",
        "    connectionType: Account\n    validationRepo: infra\n    type: Http\n",
    )
    (err,) = refusals(files(pipeline(PLAN, APPLY), git=account))
    assert "is an Account connector: name the repository with repoName" in err.message
    bundle = load(files(pipeline(with_name, APPLY), git=account))
    step = resolve(bundle, choose_pipeline(bundle, None), execution_id="EX").to_json()["stages"][0][
        "steps"
    ][0]
    assert (
        step["repositories"]["spec.configuration.configFiles.store"]["url"]
        == "file:///srv/git/infra.git/infra"
    )


def test_a_connector_of_another_type_is_refused(files: Any) -> None:
    http = """\
connector:
  name: files
  identifier: files
  type: Http
  spec:
    url: https://files.example.com
    auth: {type: Anonymous}
"""
    text = pipeline(
        PLAN.replace(
            "gitFetchType: Branch", "connectorRef: files\n              gitFetchType: Branch"
        ),
        APPLY,
    )
    (err,) = refusals(files(text, git=http))
    assert (
        "connector 'files' is an Http connector; a Terraform Git store takes a Git connector"
        in err.message
    )


def test_a_github_store_is_refused_with_the_way_to_write_it(files: Any) -> None:
    (err,) = refusals(files(pipeline(PLAN.replace("type: Git\n", "type: Github\n"), APPLY)))
    assert "write the repository as a Git connector (type: Git)" in err.message


def test_terraform_steps_run_in_custom_stages_only(files: Any) -> None:
    errs = refusals(files(pipeline(PLAN, stage_type="Deployment")))
    assert any("a TerraformPlan step runs in a Custom stage" in e.message for e in errs)


def test_a_credentialed_file_repository_is_refused() -> None:
    from app.definitions import models as m

    with pytest.raises(ValueError, match="a file:// repository takes no credentials"):
        m.connector.GitSpec.model_validate(
            {
                "url": "file:///srv/x.git",
                "type": "Http",
                "spec": {"username": "u", "passwordRef": "tok"},
            }
        )


OUTPUT = "<+pipeline.stages.infra.spec.execution.steps.apply.output.hosts>"


def later_stage(expr: str) -> str:
    return f"""\
    - stage:
        name: Use
        identifier: use
        type: Custom
        spec:
          execution:
            steps:
              - step:
                  type: ShellScript
                  name: Use
                  identifier: use
                  spec:
                    source: {{type: Inline, spec: {{script: "echo {expr}"}}}}
"""


@pytest.mark.parametrize(
    ("expr", "says"),
    [
        (OUTPUT, None),
        # (app.definitions.stage_outputs checks them; a Terraform step's outputs are X)
        (OUTPUT.replace("stages.infra", "stages.nope"), "unknown expression"),
        (OUTPUT.replace("stages.infra", "stages.use"), "unknown expression"),
        (OUTPUT.replace("steps.apply", "steps.nope"), "unknown expression"),
    ],
)
def test_an_earlier_stages_output_is_checked_where_it_is_written(
    files: Any, expr: str, says: str | None
) -> None:
    paths = files(pipeline(PLAN, APPLY) + later_stage(expr))
    if says is None:
        assert load(paths).pipelines
        return
    (err,) = refusals(paths)
    assert says in err.message
    assert "pipeline.stages.infra.spec.execution.steps.apply.output.X" in err.message
    assert err.line == line_of(paths[0], "script:")


@pytest.mark.parametrize(
    ("spec", "values", "hosts"),
    [
        # a list output: one host per address, the entry's other fields on each
        (
            {"hosts": [{"hostname": OUTPUT, "user": "ops"}]},
            {OUTPUT[2:-1]: '["10.0.0.1","10.0.0.2"]'},
            [{"hostname": "10.0.0.1", "user": "ops"}, {"hostname": "10.0.0.2", "user": "ops"}],
        ),
        # a string output: one host
        ({"hosts": [{"hostname": OUTPUT}]}, {OUTPUT[2:-1]: "10.0.0.9"}, [{"hostname": "10.0.0.9"}]),
        # written inside text: rendered in place
        ({"hosts": [{"hostname": f"web-{OUTPUT}"}]}, {OUTPUT[2:-1]: "a"}, [{"hostname": "web-a"}]),
    ],
)
def test_outputs_become_hosts(
    spec: dict[str, Any], values: dict[str, str], hosts: list[Any]
) -> None:
    assert render_outputs(spec, values)["hosts"] == hosts


def test_an_output_no_stage_recorded_is_an_error_not_a_host_name() -> None:
    with pytest.raises(ValueError, match="has no value: no earlier stage's step recorded"):
        render_outputs({"hosts": [{"hostname": OUTPUT}]}, {})


def test_terraform_never_reaches_a_registry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CLI configuration lists filesystem mirrors only (no direct installation)."""
    from app.execution import terraform
    from app.settings import get_settings

    monkeypatch.setenv("VMFARM_TERRAFORM_DIR", str(tmp_path / "tf"))
    monkeypatch.setenv("VMFARM_TERRAFORM_PLUGINS", str(tmp_path / "plugins"))
    get_settings.cache_clear()
    try:
        text = terraform.cli_config().read_text()
    finally:
        get_settings.cache_clear()
    assert "direct" not in text and "network_mirror" not in text
    assert text.count("filesystem_mirror") == 2
    assert f'path = "{tmp_path / "plugins"}"' in text
    assert f'path = "{tmp_path / "tf" / "providers"}"' in text


def test_plan_says_what_each_terraform_step_does(files: Any) -> None:
    from app.definitions.terraform import describe

    bundle = load(files(pipeline(PLAN, APPLY)))
    steps = resolve(bundle, choose_pipeline(bundle, None), execution_id="EX").to_json()["stages"][
        0
    ]["steps"]
    assert describe(steps[0]) == [
        "terraform plan (Apply), saved for provisioner plan, workspace prod",
        "configuration: file:///srv/git/infra.git at main, terraform/",
    ]
    assert describe(steps[1]) == [
        "terraform apply of the plan saved by provisioner plan in this execution"
    ]


def test_the_reference_cicd_pipelines_terraform_stage_plans_without_its_ci_stage(
    tmp_path: Path,
) -> None:
    """The reference's CI/CD pipeline with its CI stage cut out (every other line as the
    reference writes it), the two pipeline variables it names and never defines, a Git
    connector for its store, and the service and environments it names: its Terraform stage
    plans (workspace from the pipeline variable) as its Deployment stages do."""
    from tests.unit.test_custom_stages import CICD, ENVIRONMENTS

    lines = CICD.read_text().split("\n")
    head = [
        *lines[: lines.index("  stages:")],
        "  variables:",
        "    - {name: environment, type: String, value: production}",
        "    - name: green_target_group",
        "      type: String",
        "      value: arn:aws:elasticloadbalancing:us-east-1:1:targetgroup/green/1",
        "  stages:",
    ]
    tail = lines[next(i for i, t in enumerate(lines) if "# Infrastructure Stage" in t) :]
    (tmp_path / "pipeline.yaml").write_text("\n".join([*head, *tail]))
    artifact = tmp_path / "app"
    artifact.mkdir()
    (artifact / "app.jar").write_text("jar")
    (tmp_path / "environments.yaml").write_text(ENVIRONMENTS.format(artifact=artifact))
    (tmp_path / "git.yaml").write_text(
        GIT.replace(
            "    type: Http\n",
            "    connectionType: Account\n    validationRepo: x\n    type: Http\n",
        )
    )
    bundle = load(sorted(tmp_path.glob("*.yaml")))
    plan = resolve(bundle, choose_pipeline(bundle, None), execution_id="EX").to_json()
    infra = plan["stages"][0]
    assert [s["type"] for s in infra["steps"]] == ["TerraformPlan", "TerraformApply"]
    assert infra["steps"][0]["spec"]["configuration"]["workspace"] == "production"
    assert infra["steps"][0]["repositories"]["spec.configuration.configFiles.store"]["url"] == (
        "file:///srv/git/infra.git/infrastructure-repo"
    )
    assert [s["type"] for s in plan["stages"][1:]] == ["Deployment"] * (len(plan["stages"]) - 1)


class _Log:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def write(self, stream: str, text: str) -> None:
        self.lines.append(text)


def _inline_plan(files: list[dict[str, str]], var_files: list[str]) -> Any:
    from app.definitions.plan import TerraformPlanStepPlan

    return TerraformPlanStepPlan.model_validate(
        {
            "type": "TerraformPlan",
            "name": "Plan",
            "identifier": "plan",
            "spec": {
                "configuration": {
                    "command": "Apply",
                    "configFiles": {"store": {"type": "Inline", "spec": {"files": files}}},
                    "varFiles": [
                        {"varFile": {"type": "Inline", "spec": {"content": c}}} for c in var_files
                    ],
                    "targets": ["null_resource.a"],
                }
            },
        }
    )


def test_the_working_folder_holds_the_files_and_var_files_in_order(tmp_path: Path) -> None:
    from app.execution.terraform import _var_args, prepare

    step = _inline_plan(
        [{"name": "main.tf", "content": "# main"}, {"name": "mod/x.tf", "content": "# x"}],
        ['a = "1"', 'a = "2"'],
    )
    work = tmp_path / "work"
    meta = prepare(step, step.spec.configuration, ("spec", "configuration"), work, _Log())
    assert (work / "main.tf").read_text() == "# main"
    assert (work / "mod" / "x.tf").read_text() == "# x"
    assert [(work / n).read_text() for n in meta["varFiles"]] == ['a = "1"', 'a = "2"']
    assert _var_args(meta) == [
        "-var-file=vmfarm-0.tfvars",
        "-var-file=vmfarm-1.tfvars",
        "-target=null_resource.a",
    ]


def test_a_configuration_with_a_backend_of_its_own_is_refused(tmp_path: Path) -> None:
    from app.execution.terraform import TerraformError, prepare

    step = _inline_plan(
        [{"name": "main.tf", "content": 'terraform {\n  backend "s3" {\n  }\n}\n'}], []
    )
    with pytest.raises(
        TerraformError, match=r'main\.tf declares backend "s3": vmfarm keeps the state'
    ):
        prepare(step, step.spec.configuration, ("spec", "configuration"), tmp_path / "w", _Log())
