"""Templates (Stage, Step, StepGroup, Pipeline, Service, Environment) and input sets (--inputs).

tests/data/templates holds a pipeline built from a Stage template that uses a Step template
(templated/, templates/), the same pipeline written out (inline/), and input sets (inputs/). The
templated pipeline with an input set must plan exactly like the inline one with --set values;
every refusal names the file, line and field a user has to change. Nothing here needs a host,
a network or a database; `vmfarm plan` in a subprocess is in tests/e2e/test_templates.py.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from app.definitions.bundle import Bundle
from app.definitions.inputsets import merge_inputs, read_input_sets
from app.definitions.loader import choose_pipeline, load
from app.definitions.resolve import resolve
from app.definitions.templates import ExpandedDocument, templates_of
from app.errors import SpecError, SpecErrors, VmfarmError
from tests.unit.test_spec import GOOD, line_of, refusal

DATA = Path(__file__).resolve().parents[1] / "data"
TPL = DATA / "templates"
COMMON = [GOOD / "service.yaml", GOOD / "environment.yaml", GOOD / "infrastructure.yaml"]
# What the input set inputs/prod.yaml gives, as --set values for the inline pipeline.
SETS = {
    "release_note": "second release",
    "tag": "1.10",
    "CHANNEL": "beta",
    "destinationPath": "/srv/hello/incoming",
    "PORT": "9090",
}
STAGE = "pipeline.hello.stages.deploy"


def tpl_copy(tmp_path: Path, replace: dict[str, tuple[str, str]] | None = None) -> Path:
    """tests/data/templates copied to tmp_path, with ``{relative file: (old, new)}`` applied."""
    dest = tmp_path / "templates"
    shutil.copytree(TPL, dest)
    for rel, (old, new) in (replace or {}).items():
        f = dest / rel
        text = f.read_text()
        assert text.count(old) == 1, f"{old!r} must occur once in {rel}"
        f.write_text(text.replace(old, new))
    return dest


def templated(
    root: Path = TPL, inputs: dict[str, str] | None = None, *, require: bool = True
) -> Bundle:
    return load(
        [*COMMON, root / "templates", root / "templated"],
        inputs=inputs or {},
        require_inputs=require,
    )


def plan(bundle: Bundle) -> dict[str, Any]:
    return resolve(bundle, choose_pipeline(bundle, None), execution_id="EX1").to_json()


def inline_plan(inputs: dict[str, str] = SETS) -> dict[str, Any]:
    return plan(load([*COMMON, TPL / "inline"], inputs=inputs, require_inputs=True))


def without_files(p: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in p.items() if k != "files"}


def errors_of(exc: pytest.ExceptionInfo[VmfarmError]) -> list[SpecError]:
    errors = exc.value.errors if isinstance(exc.value, SpecErrors) else [exc.value]
    assert all(isinstance(e, SpecError) for e in errors)
    return [e for e in errors if isinstance(e, SpecError)]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# --- the same plan, written with templates or inline --------------------------------------------


def test_templated_pipeline_with_an_input_set_plans_like_the_inline_one_with_set() -> None:
    values = read_input_sets([TPL / "inputs" / "prod.yaml"])
    got = plan(templated(inputs=values))
    want = inline_plan()
    assert without_files(got) == without_files(want)
    # Spot checks, so that equal cannot mean equally empty.
    (stage,) = got["stages"]
    assert stage["artifact"]["tag"] == "1.10"  # written 1.10 (a YAML number): kept as written
    assert [s["identifier"] for s in stage["steps"]] == ["install", "configure"]
    configure = stage["steps"][1]
    assert configure["timeout"] == "1m"  # version "2" of configure_step, not "1" (2m)
    assert {v["name"]: v["value"] for v in configure["spec"]["environmentVariables"]} == {
        "PORT": "9090",
        "GREETING": "hello there",
    }
    assert stage["externalValues"]["pipeline.variables.release_note"] == "second release"
    # The plan names the template files among the files it came from.
    assert {Path(f).name for f in got["files"]} >= {
        "deploy_stage.yaml",
        "configure_v2.yaml",
        "pipeline.yaml",
    }


def test_templated_pipeline_dry_runs_like_the_inline_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`vmfarm plan -o json` (coordinator.dry_run): static hosts only, nothing is contacted."""
    from app.coordinator import dry_run

    monkeypatch.setenv("VMFARM_HOME", str(tmp_path / "home"))
    files = [str(p) for p in COMMON]
    got = dry_run(
        [*files, str(TPL / "templates"), str(TPL / "templated")],
        inputs=read_input_sets([TPL / "inputs" / "prod.yaml"]),
    )
    want = dry_run([*files, str(TPL / "inline")], inputs=SETS)
    assert got == want
    assert got["stages"][0]["hosts_by_region"] == {"r1": ["127.0.1.201"], "r2": ["127.0.1.202"]}


def test_inputs_left_by_the_templates_have_the_inline_pipelines_names() -> None:
    names = [s.name for s in templated(require=False).inputs]
    inline = [s.name for s in load([*COMMON, TPL / "inline"]).inputs]
    assert names == inline
    assert f"{STAGE}.spec.execution.steps.configure.spec.environmentVariables.PORT" in names


def test_templates_in_separate_files_and_folders_and_in_one_file_load(tmp_path: Path) -> None:
    # Folders and single files, in any order (only version "2" of configure_step is given).
    bundle = load(
        [
            TPL / "templated",
            TPL / "templates" / "steps" / "configure_v2.yaml",
            *COMMON,
            TPL / "templates" / "stages",
        ],
        inputs=SETS,
        require_inputs=True,
    )
    assert without_files(plan(bundle)) == without_files(inline_plan())
    # Everything in one multi-document file.
    parts = [
        (TPL / "templates" / "stages" / "deploy_stage.yaml").read_text(),
        (TPL / "templates" / "steps" / "configure_v2.yaml").read_text(),
        (TPL / "templated" / "pipeline.yaml").read_text(),
    ]
    one = write(tmp_path / "all.yaml", "\n---\n".join(parts))
    bundle = load([*COMMON, one], inputs=SETS, require_inputs=True)
    assert without_files(plan(bundle)) == without_files(inline_plan())
    assert sorted(templates_of(bundle.templates)) == [
        ("configure_step", "2", "Step"),
        ("deploy_stage", "v1", "Stage"),
    ]
    assert len(bundle.documents) == 4  # the templates are set aside


def test_a_pipeline_template_with_stage_and_step_templates_inside(tmp_path: Path) -> None:
    """Three levels: Pipeline template -> Stage template -> Step template; templateInputs of
    each level reach the next one's template.templateInputs (Harness's shape)."""
    write(
        tmp_path / "pipeline.yaml",
        """\
apiVersion: v1
kind: Template
metadata: {name: hello pipeline, identifier: hello_pipeline}
spec:
  type: Pipeline
  versionLabel: 1.0
  spec:
    variables:
      - name: release_note
        type: String
        value: <+input>
    stages:
      - stage:
          name: Deploy hello
          identifier: deploy
          template:
            templateRef: account.deploy_stage
            versionLabel: v1
            templateInputs:
              type: Deployment
              spec:
                service: {serviceRef: <+input>}
                environment:
                  environmentRef: <+input>
                  infrastructureDefinitions:
                    - identifier: <+input>
---
apiVersion: v1
kind: Pipeline
metadata: {name: hello deployment, identifier: hello}
spec:
  template:
    templateRef: hello_pipeline
    versionLabel: "1.0"
    templateInputs:
      stages:
        - stage:
            identifier: deploy
            template:
              templateInputs:
                spec:
                  service: {serviceRef: hello_app}
                  environment:
                    environmentRef: test_env
                    infrastructureDefinitions:
                      - identifier: test_hosts
""",
    )
    bundle = load(
        [*COMMON, TPL / "templates", tmp_path / "pipeline.yaml"], inputs=SETS, require_inputs=True
    )
    assert without_files(plan(bundle)) == without_files(inline_plan())
    # The Harness input set of a pipeline that is a template: pipeline.template.templateInputs.
    sets = write(
        tmp_path / "inputs.yaml",
        """\
pipeline:
  identifier: hello
  template:
    templateInputs:
      variables:
        - name: release_note
          type: String
          value: from the input set
""",
    )
    values = read_input_sets([sets])
    assert dict(values) == {"pipeline.hello.variables.release_note": "from the input set"}
    bundle = load(
        [*COMMON, TPL / "templates", tmp_path / "pipeline.yaml"],
        inputs=merge_inputs(values, {k: v for k, v in SETS.items() if k != "release_note"}),
        require_inputs=True,
    )
    assert (
        plan(bundle)["stages"][0]["externalValues"]["pipeline.variables.release_note"]
        == "from the input set"
    )


def test_environment_and_service_templates_of_the_reference() -> None:
    """The reference's environment and service templates, verbatim, used by documents that fill
    their inputs; the artifact tag stays a runtime input written in the template's file."""
    ref = TPL / "reference"
    bundle = load([ref])
    env = bundle.environments["prod"].model.spec
    assert env.type == "Production"
    assert env.tags == {
        "environment": "production",
        "deployment_type": "vm",
        "managed_by": "harness",
    }
    assert {v.name: v.value for v in env.variables} == {
        "instance_type": "t3.medium",
        "min_instances": 2,
        "max_instances": 6,
        "region": "us-east-1",
    }
    # "<+input>-infrastructure" and "<+input>_infra": an input inside a longer string.
    infra = bundle.infrastructures["prod_infra"]
    assert infra.model.metadata.name == "prod-infrastructure"
    assert infra.model.spec.spec.region == "us-east-1"
    assert infra.model.spec.spec.tags == {"Environment": "production", "ManagedBy": "harness"}
    art = bundle.services["web"].model.spec.service_definition.spec.artifacts.primary
    assert art is not None and art.type == "Artifactory"
    assert art.spec == {
        "connectorRef": "artifactory_connector",
        "artifactPath": "web/web.tar.gz",
        "tag": "<+input>",
    }
    (slot,) = bundle.inputs
    assert slot.name == "service.web.artifacts.primary.spec.tag"
    with pytest.raises(SpecError) as exc:
        load([ref], require_inputs=True)
    assert exc.value.file.endswith("reference/service_template.yaml")
    assert exc.value.line == line_of(ref / "service_template.yaml", "tag: <+input>")
    assert "--set service.web.artifacts.primary.spec.tag=VALUE" in exc.value.message


def test_step_and_step_group_templates_in_a_pipeline(tmp_path: Path) -> None:
    """A step group from a (Harness-form) StepGroup template: its runtime input is named by
    the group's identifier, and an input set reaches it through templateInputs."""
    write(
        tmp_path / "pipe" / "group.yaml",
        """\
template:
  name: checks group
  identifier: checks_group
  versionLabel: v1
  type: StepGroup
  spec:
    stageType: Deployment
    steps:
      - step:
          name: Configure
          identifier: configure
          template:
            templateRef: configure_step
            versionLabel: "2"
            templateInputs:
              spec:
                environmentVariables:
                  - name: PORT
                    value: "8080"
      - step:
          type: HealthCheck
          name: Health
          identifier: health
          spec:
            type: HTTP
            url: http://<+instance.hostName>:<+input>/health
""",
    )
    pipe = (GOOD / "pipeline.yaml").read_text()
    marker = (
        "              - step:\n                  type: Command\n                  name: Configure"
    )
    assert pipe.count(marker) == 1
    group = (
        "              - stepGroup:\n                  name: Checks\n"
        "                  identifier: checks\n                  template:\n"
        "                    templateRef: checks_group\n"
    )
    write(
        tmp_path / "pipe" / "pipeline.yaml",
        pipe.replace(marker, group + marker).replace(
            "identifier: configure\n                  timeout: 1m",
            "identifier: configure_app\n                  timeout: 1m",
        ),
    )
    files = [*COMMON, TPL / "templates" / "steps" / "configure_v2.yaml", tmp_path / "pipe"]
    names = [s.name for s in load(files).inputs]
    url = f"{STAGE}.spec.execution.steps.checks.stepGroup.steps.health.spec.url"
    assert url in names
    sets = write(
        tmp_path / "sets" / "in.yaml",
        """\
inputSet:
  name: in
  identifier: in
  pipeline:
    identifier: hello
    stages:
      - stage:
          identifier: deploy
          type: Deployment
          spec:
            execution:
              steps:
                - stepGroup:
                    identifier: checks
                    template:
                      templateInputs:
                        steps:
                          - step:
                              identifier: health
                              type: HealthCheck
                              spec:
                                url: 8080
""",
    )
    values = read_input_sets([sets])
    assert dict(values) == {url: "8080"}
    p = plan(load(files, inputs=merge_inputs(values, {"tag": "1.0"}), require_inputs=True))
    steps = {s["identifier"]: s for s in p["stages"][0]["steps"]}
    assert steps["health"]["group"] == "checks"
    assert steps["health"]["spec"]["url"] == "http://<+instance.hostName>:8080/health"
    assert steps["configure"]["group"] == "checks"
    assert steps["configure"]["timeout"] == "1m"


# --- input sets ---------------------------------------------------------------------------------


def test_input_set_fields_get_the_names_set_uses() -> None:
    values = read_input_sets([TPL / "inputs" / "prod.yaml"])
    steps = f"{STAGE}.spec.execution.steps"
    assert dict(values) == {
        "pipeline.hello.variables.release_note": "second release",
        # serviceInputs without serviceRef: the name's end (--set matching takes it).
        "artifacts.primary.spec.tag": "1.10",
        f"{steps}.install.spec.environmentVariables.CHANNEL": "beta",
        f"{steps}.install.spec.commandUnits.copy_app.spec.destinationPath": "/srv/hello/incoming",
        f"{steps}.configure.spec.environmentVariables.PORT": "9090",
    }


def test_an_input_set_without_templates_gives_the_same_names() -> None:
    """The inline pipeline's input set has no template.templateInputs levels: same names."""
    inline = read_input_sets([TPL / "inputs" / "prod_inline.yaml"])
    assert dict(inline) == dict(read_input_sets([TPL / "inputs" / "prod.yaml"]))
    p = plan(load([*COMMON, TPL / "inline"], inputs=inline, require_inputs=True))
    assert without_files(p) == without_files(inline_plan())


def test_later_input_files_win_and_set_wins_over_all() -> None:
    values = read_input_sets([TPL / "inputs" / "prod.yaml", TPL / "inputs" / "hotfix.yaml"])
    stage = plan(templated(inputs=values))["stages"][0]
    assert stage["externalValues"]["pipeline.variables.release_note"] == "hotfix"
    install = stage["steps"][0]
    env = {v["name"]: v["value"] for v in install["spec"]["environmentVariables"]}
    assert env["CHANNEL"] == "stable"
    # --set wins, even with a short name over the input set's full one.
    both = merge_inputs(values, {"CHANNEL": "beta", "spec.tag": "3.0", "release_note": "set"})
    stage = plan(templated(inputs=both))["stages"][0]
    env = {v["name"]: v["value"] for v in stage["steps"][0]["spec"]["environmentVariables"]}
    assert env["CHANNEL"] == "beta"
    assert stage["artifact"]["tag"] == "3.0"
    assert stage["externalValues"]["pipeline.variables.release_note"] == "set"
    # And the other order of files: prod's full names beat nothing of hotfix's any more.
    values = read_input_sets([TPL / "inputs" / "hotfix.yaml", TPL / "inputs" / "prod.yaml"])
    stage = plan(templated(inputs=values))["stages"][0]
    assert stage["externalValues"]["pipeline.variables.release_note"] == "second release"


def test_overlay_input_set_applies_its_references_in_order() -> None:
    values = read_input_sets([TPL / "inputs" / "prod.yaml", TPL / "inputs" / "overlay.yaml"])
    stage = plan(templated(inputs=values))["stages"][0]
    assert stage["artifact"]["tag"] == "2.0-rc1"  # canary_tag comes after prod
    assert stage["externalValues"]["pipeline.variables.release_note"] == "second release"


def test_a_name_no_input_has_points_into_the_input_file(tmp_path: Path) -> None:
    text = (TPL / "inputs" / "prod.yaml").read_text()
    f = write(tmp_path / "typo.yaml", text.replace("- name: CHANNEL", "- name: CHANEL"))
    with pytest.raises(SpecError) as exc:
        templated(inputs=read_input_sets([f]))
    assert exc.value.file == str(f)
    assert exc.value.line == line_of(f, "value: beta")
    assert exc.value.field.endswith("install.spec.environmentVariables.CHANEL")
    assert "no runtime input <+input> is named" in exc.value.message
    # A --set name is still reported as --set.
    with pytest.raises(SpecError) as exc:
        templated(
            inputs=merge_inputs(read_input_sets([TPL / "inputs" / "prod.yaml"]), {"nope": "1"})
        )
    assert exc.value.file == "--set"


@pytest.mark.parametrize(
    ("text", "needle", "field", "message"),
    [
        (
            "release_note:\n  nested: 1\n",
            "release_note:",
            "release_note",
            "'release_note' must be a string, number or boolean, got a mapping",
        ),
        (
            "overlayInputSet:\n  identifier: o\n  inputSetReferences: [missing]\n",
            "[missing]",
            "overlayInputSet.inputSetReferences[0]",
            "input set 'missing' is not in the given --inputs",
        ),
        (
            "inputSet:\n  identifier: s\n  name: s\n",
            "inputSet:",
            "inputSet",
            "an inputSet needs 'pipeline'",
        ),
        (
            "inputSet:\n  identifier: s\n  pipelne: {}\n",
            "pipelne",
            "inputSet.pipelne",
            "unknown field 'pipelne'",
        ),
        ("- a\n- b\n", "- a", "", "an input file holds a mapping of input names to values"),
    ],
)
def test_bad_input_files_name_file_line_and_field(
    tmp_path: Path, text: str, needle: str, field: str, message: str
) -> None:
    f = write(tmp_path / "in.yaml", text)
    with pytest.raises((SpecError, SpecErrors)) as exc:
        read_input_sets([f])
    (err,) = [e for e in errors_of(exc) if message in e.message]
    assert (err.file, err.line, err.field) == (str(f), line_of(f, needle), field)
    assert message in err.message


def test_input_set_folder_and_bare_pipeline_form(tmp_path: Path) -> None:
    write(
        tmp_path / "sets" / "a.yaml",
        "pipeline:\n  identifier: hello\n  variables:\n"
        "    - name: release_note\n      value: from a\n",
    )
    write(tmp_path / "sets" / "b.yml", "tag: 4.2\n")
    values = read_input_sets([tmp_path / "sets"])
    assert dict(values) == {"pipeline.hello.variables.release_note": "from a", "tag": "4.2"}
    with pytest.raises(SpecError) as exc:
        read_input_sets([tmp_path / "missing.yaml"])
    assert exc.value.message == "no such file or folder"


# --- refusals: file:line and field of what to change --------------------------------------------

ENTRY = "spec.stages[0].stage"
INPUTS = f"{ENTRY}.template.templateInputs"
PIPE = "templated/pipeline.yaml"
STAGE_TPL = "templates/stages/deploy_stage.yaml"
STEP_TPL = "templates/steps/configure_v2.yaml"
STEPS_INPUT = """\
              execution:
                steps:
                  - step:
                      identifier: install
                      spec:
                        environmentVariables:
                          - name: CHANNEL
                            value: nightly
"""


@pytest.mark.parametrize(
    ("file", "old", "new", "where", "needle", "field", "message"),
    [
        pytest.param(
            PIPE,
            "templateRef: deploy_stage",
            "templateRef: deploy_stag",
            PIPE,
            "templateRef: deploy_stag",
            f"{ENTRY}.template.templateRef",
            "template 'deploy_stag' is not defined in the given files; did you mean "
            "'deploy_stage'? (templates: configure_step, deploy_stage)",
            id="unknown-ref",
        ),
        pytest.param(
            PIPE,
            "versionLabel: v1",
            "versionLabel: v2",
            PIPE,
            "versionLabel: v2",
            f"{ENTRY}.template.versionLabel",
            "template 'deploy_stage' has no version 'v2' (versions: v1)",
            id="version",
        ),
        pytest.param(
            STAGE_TPL,
            '                versionLabel: "2"\n',
            "",
            STAGE_TPL,
            "templateRef: configure_step",
            f"{ENTRY}.spec.execution.steps[1].step.template.templateRef",
            "template 'configure_step' has several versions (1, 2): choose one with versionLabel",
            id="nested-ref-without-version",
        ),
        pytest.param(
            PIPE,
            "environmentRef: test_env",
            "environmentRf: test_env",
            PIPE,
            "environmentRf",
            f"{INPUTS}.spec.environment.environmentRf",
            "templateInputs names 'spec.environment.environmentRf', which template "
            "'deploy_stage' v1 does not have; did you mean 'environmentRef'?",
            id="input-field-unknown",
        ),
        pytest.param(
            PIPE,
            "templateRef: deploy_stage\n          versionLabel: v1",
            'templateRef: configure_step\n          versionLabel: "2"',
            PIPE,
            "templateRef: configure_step",
            f"{ENTRY}.template.templateRef",
            "template 'configure_step' 2 is a Step template; a stage needs a Stage template",
            id="type-mismatch",
        ),
        pytest.param(
            PIPE,
            "type: Deployment",
            "type: Approval",
            PIPE,
            "type: Approval",
            f"{INPUTS}.type",
            "'type' is fixed to 'Deployment' by template 'deploy_stage' "
            "v1; templateInputs can only give its <+input> fields",
            id="fixed-field",
        ),
        pytest.param(
            PIPE,
            "                  - identifier: test_hosts\n",
            "                  - identifier: test_hosts\n" + STEPS_INPUT,
            PIPE,
            "value: nightly",
            f"{INPUTS}.spec.execution.steps[0].step.spec.environmentVariables[0].value",
            "'spec.execution.steps[0].step.spec.environmentVariables[1].value' = 'nightly' "
            "is not one of the values template 'deploy_stage' v1 allows ['stable', 'beta']",
            id="allowed-values",
        ),
        pytest.param(
            PIPE,
            "                  - identifier: test_hosts\n",
            "                  - identifier: test_hosts\n"
            + STEPS_INPUT.replace("identifier: install", "identifier: instal"),
            PIPE,
            "- step:",
            f"{INPUTS}.spec.execution.steps[0]",
            "templateInputs names an entry of 'spec.execution.steps' with identifier "
            "'instal', which template 'deploy_stage' v1 does not have",
            id="input-entry-unknown",
        ),
        pytest.param(
            PIPE,
            "        identifier: deploy\n",
            "        identifier: deploy\n        timeout: 5m\n",
            PIPE,
            "timeout: 5m",
            f"{ENTRY}.timeout",
            "'timeout' cannot stand next to 'template': a stage that uses a template takes "
            "only name, identifier, description, template",
            id="field-next-to-template",
        ),
        pytest.param(
            PIPE,
            "        name: Deploy hello\n",
            "",
            PIPE,
            "- stage:",
            ENTRY,
            "a stage that uses a template needs 'name'",
            id="entry-without-name",
        ),
        pytest.param(
            STEP_TPL,
            "timeout: 1m",
            "timeot: 1m",
            STEP_TPL,
            "timeot",
            f"{ENTRY}.spec.execution.steps[1].step.timeot",
            "unknown field 'timeot'; did you mean 'timeout'?",
            id="typo-in-template-body",
        ),
        pytest.param(
            STAGE_TPL,
            "<+pipeline.variables.release_note>",
            "<+pipeline.variables.release_not>",
            STAGE_TPL,
            "release_not>",
            f"{ENTRY}.spec.execution.steps[0].step.spec.commandUnits[0].spec.source.spec.script",
            "unknown expression <+pipeline.variables.release_not>",
            id="expression-in-template-body",
        ),
        pytest.param(
            STEP_TPL,
            "  type: Step\n",
            "",
            STEP_TPL,
            "name: Configure step",
            "template.type",
            "missing required field 'type'",
            id="invalid-template-reported-once",
        ),
    ],
)
def test_template_refusals_name_file_line_and_field(
    tmp_path: Path, file: str, old: str, new: str, where: str, needle: str, field: str, message: str
) -> None:
    root = tpl_copy(tmp_path, {file: (old, new)})
    with pytest.raises((SpecError, SpecErrors)) as exc:
        templated(root, require=False)
    err = refusal(exc)
    assert message in err.message
    assert (err.file, err.line, err.field) == (
        str(root / where),
        line_of(root / where, needle),
        field,
    )


def test_a_template_value_outside_the_body_points_at_the_reference(tmp_path: Path) -> None:
    """Errors in values given by the using file point there: a bad identifier given as the
    entry's identifier, a duplicate stage identifier."""
    root = tpl_copy(tmp_path, {PIPE: ("identifier: deploy\n", "identifier: deploy-it\n")})
    with pytest.raises((SpecError, SpecErrors)) as exc:
        templated(root, require=False)
    err = refusal(exc)
    assert "identifier 'deploy-it' must start with a letter" in err.message
    assert (err.file, err.line) == (str(root / PIPE), line_of(root / PIPE, "deploy-it"))


def test_unfilled_runtime_inputs_point_into_the_template_that_asks_for_them() -> None:
    with pytest.raises(SpecErrors) as exc:
        templated(inputs={"tag": "1.0", "release_note": "x"})
    (channel,) = [e for e in exc.value.errors if "CHANNEL=VALUE" in e.message]
    (port,) = [e for e in exc.value.errors if "PORT=VALUE" in e.message]
    assert len(exc.value.errors) == 2
    stage_tpl = TPL / STAGE_TPL
    assert (channel.file, channel.line) == (
        str(stage_tpl),
        line_of(stage_tpl, "value: <+input>.allowedValues(stable,beta)"),
    )
    assert (
        f"--set {STAGE}.spec.execution.steps.install.spec.environmentVariables.CHANNEL=VALUE"
        in channel.message
    )
    assert channel.field == (
        f"{ENTRY}.spec.execution.steps[0].step.spec.environmentVariables[1].value"
    )
    # PORT: the Step template asks for it; the Stage template passes it on as <+input>.
    step_tpl = TPL / STEP_TPL
    (port_line,) = [
        i
        for i, t in enumerate(step_tpl.read_text().split("\n"), 1)
        if t.strip() == "value: <+input>"
    ]
    assert (port.file, port.line) == (str(step_tpl), port_line)


def test_a_template_that_uses_itself_is_refused(tmp_path: Path) -> None:
    loop = write(
        tmp_path / "loop.yaml",
        """\
apiVersion: v1
kind: Template
metadata: {name: loop, identifier: loop}
spec:
  type: StepGroup
  versionLabel: v1
  spec:
    steps:
      - stepGroup:
          name: inner
          identifier: inner
          template:
            templateRef: loop
""",
    )
    pipe = (
        (GOOD / "pipeline.yaml")
        .read_text()
        .replace(
            "            steps:\n",
            "            steps:\n              - stepGroup:\n"
            "                  name: g\n                  identifier: g\n"
            "                  template: {templateRef: loop}\n",
            1,
        )
    )
    write(tmp_path / "pipeline.yaml", pipe)
    with pytest.raises((SpecError, SpecErrors)) as exc:
        load([*COMMON, tmp_path])
    err = refusal(exc)
    assert "template 'loop' v1 uses itself ('loop' -> 'loop')" in err.message
    assert (err.file, err.line) == (str(loop), line_of(loop, "templateRef: loop"))


def test_duplicate_template_versions_are_refused(tmp_path: Path) -> None:
    root = tpl_copy(tmp_path)
    again = root / "templates" / "steps" / "configure_v2_again.yaml"
    shutil.copy(root / STEP_TPL, again)
    with pytest.raises((SpecError, SpecErrors)) as exc:
        templated(root, require=False)
    err = refusal(exc)
    assert err.message.startswith("duplicate template 'configure_step' 2 (first defined at ")
    assert (err.file, err.line, err.field) == (
        str(again),
        line_of(again, "identifier: configure_step"),
        "template.identifier",
    )


def test_expanded_documents_keep_their_file_for_inputs_and_plans() -> None:
    bundle = templated(inputs=SETS)
    doc = bundle.pipelines["hello"].doc
    assert isinstance(doc, ExpandedDocument)
    assert doc.file == str(TPL / "templated" / "pipeline.yaml")
    # The stage's name is the using file's; its body the template's.
    pipe = TPL / "templated" / "pipeline.yaml"
    stage_tpl = TPL / STAGE_TPL
    assert doc.where(("spec", "stages", 0, "stage", "name")) == (
        str(pipe),
        line_of(pipe, "name: Deploy hello"),
        15,
    )
    assert doc.where(("spec", "stages", 0, "stage", "spec", "strategy", "type"))[:2] == (
        str(stage_tpl),
        line_of(stage_tpl, "type: Rolling"),
    )
    # A value given by templateInputs points at templateInputs.
    assert doc.where(("spec", "stages", 0, "stage", "spec", "service", "serviceRef"))[:2] == (
        str(pipe),
        line_of(pipe, "serviceRef: hello_app"),
    )


# --- templates nobody uses are checked too ------------------------------------------------------

REF_PIPELINE_TPL = TPL / "reference_pipeline" / "pipeline_template.yaml"


def test_the_references_templates_load_alone_and_are_counted() -> None:
    """The reference's pipeline, environment and service templates, verbatim and used by no
    document, are valid and listed (a template file is not 'valid: 0 documents')."""
    bundle = load(
        [
            REF_PIPELINE_TPL,
            TPL / "reference" / "environment_template.yaml",
            TPL / "reference" / "service_template.yaml",
        ]
    )
    assert sorted((i, k) for i, _, k in templates_of(bundle.templates)) == [
        ("vm_deployment_template", "Pipeline"),
        ("vm_environment_template", "Environment"),
        ("vm_service_template", "Service"),
    ]


@pytest.mark.parametrize(
    ("old", "new", "needle", "says"),
    [
        ("              steps:", "              stepz:", "stepz:", "unknown field 'stepz'"),
        (
            "                    type: Command\n                    name: Deploy Application",
            "                    type: Commandx\n                    name: Deploy Application",
            "type: Commandx",
            "unknown type 'Commandx'",
        ),
        (
            "                            shell: Bash\n                            source:\n"
            "                              type: Inline\n                              spec:\n"
            "                                script: sudo",
            "                            shell: Bashh\n                            source:\n"
            "                              type: Inline\n                              spec:\n"
            "                                script: sudo",
            "shell: Bashh",
            "Bashh",
        ),
    ],
)
def test_an_unused_template_with_a_mistake_is_refused_where_the_mistake_is(
    tmp_path: Path, old: str, new: str, needle: str, says: str
) -> None:
    text = REF_PIPELINE_TPL.read_text()
    assert text.count(old) == 1
    bad = write(tmp_path / "tpl.yaml", text.replace(old, new))
    with pytest.raises((SpecError, SpecErrors)) as exc:
        load([bad])
    errors = errors_of(exc)
    hit = [e for e in errors if says in e.message]
    assert hit, [e.message for e in errors]
    assert hit[0].file == str(bad)
    assert hit[0].line == line_of(bad, needle)
    assert hit[0].field is not None and hit[0].field.startswith("spec.spec.stages[0].stage.")


def test_a_runtime_input_in_an_unused_template_is_left_to_its_user(tmp_path: Path) -> None:
    """`type: <+input>` and `region: <+input>` cannot be checked before someone fills them."""
    bundle = load([TPL / "reference" / "environment_template.yaml"])
    assert [k for _, _, k in templates_of(bundle.templates)] == ["Environment"]


def test_unused_stage_and_step_templates_are_checked(tmp_path: Path) -> None:
    """Stage and Step templates alone load; a mistake in an unused Step template is found."""
    bundle = load([TPL / "templates"])
    assert {k for _, _, k in templates_of(bundle.templates)} >= {"Stage", "Step"}
    root = tpl_copy(tmp_path)
    step = next(
        p
        for p in sorted((root / "templates").rglob("*.yaml"))
        if "type: Step" in p.read_text() and "commandUnits:" in p.read_text()
    )
    step.write_text(step.read_text().replace("commandUnits:", "commandUnitz:", 1))
    with pytest.raises((SpecError, SpecErrors)) as exc:
        load([root / "templates"])
    assert any("commandUnitz" in e.message and e.file == str(step) for e in errors_of(exc))


def test_the_reference_pipeline_template_reads_service_variables_as_harness_spells_them(
    tmp_path: Path,
) -> None:
    """`<+service.variables.X>` is `<+serviceVariables.X>`: the reference's pipeline template,
    used as written, puts the service's deployment_path and port into the plan."""
    service = (
        (GOOD / "service.yaml")
        .read_text()
        .replace(
            "      variables:\n",
            "      variables:\n"
            "        - {name: deployment_path, type: String, value: /srv/hello}\n"
            '        - {name: port, type: String, value: "9191"}\n',
        )
    )
    write(tmp_path / "service.yaml", service)
    (tmp_path / "app").mkdir()
    write(
        tmp_path / "pipeline.yaml",
        """\
apiVersion: v1
kind: Pipeline
metadata: {name: from template, identifier: from_template}
spec:
  template:
    templateRef: vm_deployment_template
    templateInputs:
      stages:
        - stage:
            identifier: deploy_stage
            name: Deploy to test
            spec:
              service: {serviceRef: hello_app}
              environment:
                environmentRef: test_env
                infrastructureDefinitions: [{identifier: test_hosts}]
""",
    )
    bundle = load(
        [
            tmp_path / "service.yaml",
            GOOD / "environment.yaml",
            GOOD / "infrastructure.yaml",
            REF_PIPELINE_TPL,
            tmp_path / "pipeline.yaml",
        ],
        inputs={"tag": "1.0"},
    )
    text = str(plan(bundle))
    assert "/srv/hello" in text
    assert "localhost:9191/health" in text
    assert "service.variables" not in text
