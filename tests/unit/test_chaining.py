"""Pipeline chaining (a stage of type Pipeline): what loads, what the plan holds, and what is
refused at load with file:line and the field.

Runs of chained pipelines are in tests/lab/test_chaining.py (embedded) and
tests/service/test_chaining.py (server mode).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from app.definitions.loader import choose_pipeline, load
from app.definitions.plan import PipelineStagePlan
from app.definitions.resolve import resolve
from app.errors import SpecError, SpecErrors
from cli.main import main

CHILD = """\
pipeline:
  name: Child
  identifier: child
  projectIdentifier: shop
  variables:
    - {name: release, type: String, value: <+input>}
    - {name: fixed, type: String, value: "1"}
    - {name: token, type: Secret, value: tok}
  stages:
    - stage:
        name: Hello
        identifier: hello
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
                      spec: {script: 'echo release <+pipeline.variables.release> of <+pipeline.executionId>'}
"""

PARENT = """\
pipeline:
  name: Parent
  identifier: parent
  variables:
    - {{name: version, type: String, value: "2.0"}}
  stages:
    - stage:
        name: Run child
        identifier: run_child
        type: Pipeline
        spec:
          org: default
          project: shop
          pipeline: {child}
          inputs:
            identifier: {child}
            variables:
              - {{name: {var}, type: String, value: <+pipeline.variables.version>}}
{extra}"""


def write(tmp_path: Path, parent: str, child: str = CHILD) -> list[Path]:
    (tmp_path / "parent.yaml").write_text(parent)
    (tmp_path / "child.yaml").write_text(child)
    return [tmp_path / "parent.yaml", tmp_path / "child.yaml"]


def parent(child: str = "child", var: str = "release", extra: str = "") -> str:
    return PARENT.format(child=child, var=var, extra=extra)


def errors_of(paths: list[Path], **inputs: str) -> list[SpecError]:
    with pytest.raises((SpecError, SpecErrors)) as exc:
        load(paths, inputs=inputs, require_inputs=False)
    return list(exc.value.errors if isinstance(exc.value, SpecErrors) else [exc.value])


def line_of(path: Path, needle: str) -> int:
    return next(i for i, ln in enumerate(path.read_text().splitlines(), 1) if needle in ln)


def test_a_pipeline_stage_carries_its_childs_plan_with_the_values_it_gives(tmp_path: Path) -> None:
    # Given a parent whose Pipeline stage gives the child's <+input> variable from its own
    paths = write(tmp_path, parent())
    # When the files load and the parent (the only pipeline no other chains) is resolved
    bundle = load(paths, inputs={}, require_inputs=True)
    pipe = choose_pipeline(bundle, None)
    plan = resolve(bundle, pipe, execution_id="abc")
    # Then the stage holds the child's plan, the variable rendered in the parent's context
    assert pipe.ident == "parent"
    stage = plan.stages[0]
    assert isinstance(stage, PipelineStagePlan)
    assert stage.pipeline == "child" and stage.child_inputs == {"release": "2.0"}
    child = stage.child_plan()
    script = child.stages[0].steps[0].model_dump(by_alias=True)
    assert "release" in str(script) and "2.0" in str(script)
    # and the child's <+pipeline.executionId> is the id the coordinator replaces
    assert stage.child_execution_id in str(script) and "abc" not in str(script)


def test_the_child_run_alone_still_needs_its_runtime_input(tmp_path: Path) -> None:
    paths = write(tmp_path, parent())
    bundle = load(paths, inputs={}, require_inputs=True)
    with pytest.raises(SpecError) as exc:
        resolve(bundle, choose_pipeline(bundle, "child"), execution_id="x")
    assert "--set pipeline.child.variables.release=VALUE" in str(exc.value)
    assert exc.value.line == line_of(paths[1], "name: release")


def test_an_unknown_child_is_refused_with_the_nearest_identifier(tmp_path: Path) -> None:
    paths = write(tmp_path, parent(child="chld"))
    (err,) = errors_of(paths)
    assert "Pipeline 'chld' is not defined" in err.message and "did you mean 'child'" in err.message
    assert err.file == str(paths[0]) and err.line == line_of(paths[0], "pipeline: chld")
    assert err.field.endswith("spec.pipeline")


def test_a_variable_the_child_does_not_declare_as_input_is_refused(tmp_path: Path) -> None:
    for var, said in (
        ("fixed", "not a runtime input"),
        ("nope", "has no variable 'nope'"),
        ("token", "is a Secret"),
    ):
        paths = write(tmp_path, parent(var=var))
        errs = errors_of(paths)
        hit = [e for e in errs if said in e.message]
        assert hit, [e.message for e in errs]
        assert hit[0].line == line_of(paths[0], f"name: {var}")


def test_other_inputs_of_the_child_are_refused_by_name(tmp_path: Path) -> None:
    text = parent().replace("            identifier: child\n", "            stages: []\n")
    errs = errors_of(write(tmp_path, text))
    assert any("unknown field 'stages'" in e.message for e in errs), [e.message for e in errs]


def test_outputs_are_refused_rather_than_ignored(tmp_path: Path) -> None:
    text = parent().replace(
        "          inputs:",
        "          outputs:\n            - {name: v, value: <+pipeline.variables.release>}\n"
        "          inputs:",
    )
    paths = write(tmp_path, text)
    (err,) = errors_of(paths)
    assert "outputs of a Pipeline stage are not supported" in err.message
    assert err.line == line_of(paths[0], "outputs:") + 1 or err.line == line_of(
        paths[0], "outputs:"
    )


def test_a_cycle_of_chains_is_refused_at_load(tmp_path: Path) -> None:
    # child chains parent back: parent -> child -> parent
    child = CHILD + (
        "    - stage:\n"
        "        name: Back\n"
        "        identifier: back\n"
        "        type: Pipeline\n"
        "        spec: {pipeline: parent}\n"
    )
    paths = write(tmp_path, parent(), child)
    errs = errors_of(paths)
    assert any("is a cycle" in e.message and "child" in e.message for e in errs), [
        e.message for e in errs
    ]
    # a pipeline chaining itself
    own = write(tmp_path, parent(child="parent", var="version"), CHILD)
    assert any("cannot run itself" in e.message for e in errors_of(own))


def test_a_project_that_is_not_the_childs_is_refused(tmp_path: Path) -> None:
    paths = write(tmp_path, parent().replace("project: shop", "project: other"))
    (err,) = errors_of(paths)
    assert "project 'other' does not match" in err.message
    assert err.line == line_of(paths[0], "project: other")


def test_pipeline_rollback_at_or_after_a_pipeline_stage_is_refused(tmp_path: Path) -> None:
    extra = (
        "  failureStrategies:\n"
        "    - onFailure: {errors: [AllErrors], action: {type: PipelineRollback}}\n"
    )
    paths = write(tmp_path, parent(extra=extra))
    errs = errors_of(paths)
    assert any("PipelineRollback" in e.message for e in errs)
    own = parent().replace(
        "        type: Pipeline\n",
        "        type: Pipeline\n"
        "        failureStrategies:\n"
        "          - onFailure: {errors: [AllErrors], action: {type: StageRollback}}\n",
    )
    paths = write(tmp_path, own)
    (err,) = errors_of(paths)
    assert "StageRollback on a Pipeline stage" in err.message
    assert err.line == line_of(paths[0], "type: StageRollback")


def test_validate_exits_2_naming_the_file_line_and_field(tmp_path: Path) -> None:
    paths = write(tmp_path, parent(var="fixed"))
    res = CliRunner().invoke(main, ["validate", *map(str, paths)])
    assert res.exit_code == 2, res.output
    assert f"parent.yaml:{line_of(paths[0], 'name: fixed')}" in res.output
    assert "not a runtime input" in res.output


def test_plan_shows_the_childs_stages_under_the_pipeline_stage(tmp_path: Path) -> None:
    paths = write(tmp_path, parent())
    res = CliRunner().invoke(main, ["plan", *map(str, paths)])
    assert res.exit_code == 0, res.output
    assert "runs pipeline 'child'" in res.output
    assert "variable release = 2.0" in res.output
    assert "echo release 2.0" in res.output


def test_in_server_mode_the_registry_brings_the_child_and_what_it_names() -> None:
    import yaml

    from app import registry

    child = (
        "apiVersion: v1\nkind: Pipeline\nmetadata: {name: child}\nspec:\n  stages:\n"
        "    - stage:\n        name: d\n        identifier: d\n        type: Deployment\n"
        "        spec:\n          service: {serviceRef: shop}\n"
        "          environment: {environmentRef: prod}\n"
    )
    other = child.replace("name: child", "name: other")
    env = "apiVersion: v1\nkind: Environment\nmetadata: {name: prod}\nspec: {type: Production}\n"
    stored = {e.key: e for e in registry.split({"c.yaml": child, "o.yaml": other, "e.yaml": env})}
    top = (
        "apiVersion: v1\nkind: Pipeline\nmetadata: {name: top}\nspec:\n  stages:\n"
        "    - stage: {name: c, identifier: c, type: Pipeline, spec: {pipeline: child}}\n"
    )
    reached = registry.reach([yaml.safe_load(top)], stored, skip=set())
    # the chained pipeline, and the environment it names; not the pipeline nothing chains
    assert [e.key for e in reached] == [("Environment", "prod"), ("Pipeline", "child")]
