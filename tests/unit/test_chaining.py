"""Pipeline chaining (a stage of type Pipeline): what loads, what the plan holds, and what is
refused at load with file:line and the field.

Runs of chained pipelines are in tests/lab/test_chaining.py (embedded) and
tests/service/test_chaining.py (server mode).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlmodel import select

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


def test_a_variable_given_with_another_type_than_the_childs_is_refused(tmp_path: Path) -> None:
    paths = write(
        tmp_path,
        parent().replace("type: String, value: <+pipeline", "type: Number, value: <+pipeline"),
    )
    (err,) = errors_of(paths)
    assert "variable 'release' of pipeline 'child' is a String, not a Number" in err.message
    assert err.field.endswith("variables[0].type")


def test_other_inputs_of_the_child_are_refused_by_name(tmp_path: Path) -> None:
    text = parent().replace("            identifier: child\n", "            stages: []\n")
    errs = errors_of(write(tmp_path, text))
    assert any("unknown field 'stages'" in e.message for e in errs), [e.message for e in errs]


def _with_outputs(*outputs: str, later: str = "") -> str:
    text = parent().replace(
        "          inputs:",
        "          outputs:\n"
        + "".join(
            f"            - {{name: {o.split('=')[0]}, value: '{o.split('=', 1)[1]}'}}\n"
            for o in outputs
        )
        + "          inputs:",
    )
    return text + later


SAY = "<+pipeline.stages.hello.spec.execution.steps.say.output.outputVariables.{}>"
LATER = """\
    - stage:
        name: After
        identifier: after
        type: Custom
        spec:
          execution:
            steps:
              - step:
                  type: ShellScript
                  name: Use
                  identifier: use
                  spec:
                    shell: Bash
                    onDelegate: true
                    source: {{type: Inline, spec: {{script: 'echo {}'}}}}
"""


def test_outputs_name_a_step_output_of_the_child_and_later_stages_read_them(
    tmp_path: Path,
) -> None:
    child = CHILD.replace(
        "                    shell: Bash\n",
        "                    shell: Bash\n"
        "                    outputVariables: [{name: build, type: String, value: BUILD}]\n",
    )
    text = _with_outputs(
        "build=" + SAY.format("build"),
        "builds=" + SAY.format("build.list"),
        later=LATER.format("<+pipeline.stages.run_child.output.build>"),
    )
    paths = write(tmp_path, text, child)
    bundle = load(paths, inputs={}, require_inputs=True)
    plan = resolve(bundle, choose_pipeline(bundle, None), execution_id="x")
    stage = plan.stages[0]
    assert isinstance(stage, PipelineStagePlan)
    assert [o["name"] for o in stage.outputs] == ["build", "builds"]
    res = CliRunner().invoke(main, ["plan", *map(str, paths)])
    assert res.exit_code == 0, res.output
    assert "output build = " + SAY.format("build") in res.output
    assert "<+pipeline.stages.run_child.output.build>" in res.output
    # an output the child does not have is refused at its line, naming what it may read
    paths = write(tmp_path, _with_outputs("nope=" + SAY.format("nothing")), child)
    (err,) = errors_of(paths)
    assert "output 'nope' of pipeline 'child'" in err.message and "say" in err.message
    assert err.line == line_of(paths[0], "name: nope")
    # a value that is not one step output is refused
    paths = write(tmp_path, _with_outputs("x=<+pipeline.variables.release>"), child)
    (err,) = errors_of(paths)
    assert "reads one step output of pipeline 'child'" in err.message
    # and a later stage may read only the outputs the Pipeline stage declares
    text = _with_outputs(
        "build=" + SAY.format("build"),
        later=LATER.format("<+pipeline.stages.run_child.output.other>"),
    )
    errs = errors_of(write(tmp_path, text, child))
    assert any("pipeline.stages.run_child.output.other" in e.message for e in errs), [
        e.message for e in errs
    ]


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


def test_the_pipelines_stage_rollback_fails_a_pipeline_stage_as_it_does_a_custom_one(
    tmp_path: Path,
) -> None:
    extra = (
        "  failureStrategies:\n"
        "    - onFailure: {errors: [AllErrors], action: {type: StageRollback}}\n"
        "    - onFailure: {errors: [Unknown], action: {type: Retry, spec: {retryCount: 1,"
        " retryIntervals: [1s]}}}\n"
    )
    paths = write(tmp_path, parent(extra=extra))
    (err,) = errors_of(paths)  # the StageRollback loads; the Retry does not
    assert "Retry here applies to the Pipeline stages too" in err.message
    assert err.line == line_of(paths[0], "type: Retry")


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


def test_running_a_chain_needs_the_childs_permissions_too(tmp_path: Path) -> None:
    from app.rbac import PermissionRefused, load_rbac, required_permissions

    # Given erin may run the parent only (a binding scoped to its identifier)
    paths = write(tmp_path, parent())
    bundle = load(paths, inputs={}, require_inputs=True)
    plan = resolve(bundle, choose_pipeline(bundle, None), execution_id="x").to_json()
    rules = tmp_path / "rbac.yaml"
    rules.write_text(
        "roles:\n  runner: [pipeline:execute]\n"
        "bindings:\n  - role: runner\n    users: [erin]\n    resources: [parent]\n"
        "  - role: runner\n    users: [dave]\n"
    )
    cfg = load_rbac(rules)
    assert cfg is not None
    # Then running it needs pipeline:execute on the child as well, named by the chain's stage
    needs = required_permissions("run", plan)
    assert [(n.permission, n.resource, n.stage) for n in needs] == [
        ("pipeline:execute", "parent", None),
        ("pipeline:execute", "child", "run_child → child"),
    ]
    cfg.authorize("erin", "pipeline:execute", resource="parent")
    with pytest.raises(PermissionRefused) as exc:
        cfg.authorize("erin", "pipeline:execute", resource="child", stage=needs[1].stage)
    assert "child" in str(exc.value)
    # and dave, who may run every pipeline, may run the chain
    for n in needs:
        cfg.authorize("dave", n.permission, resource=n.resource)
    # (viewing the parent does not need the child's permissions)
    assert [n.resource for n in required_permissions("view", plan)] == ["parent"]


@pytest.fixture
def ledger(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """An empty SQLite ledger (embedded mode: published work waits in its SQLite broker, no
    worker takes it), and the chain's files with a lab environment of one host that does not
    exist (nothing here contacts it)."""
    import os

    from app.db import reset_engines
    from app.settings import get_settings

    for key in list(os.environ):
        if key.startswith("VMFARM_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("VMFARM_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    get_settings.cache_clear()
    reset_engines()
    infra = tmp_path / "infra.yaml"
    infra.write_text(
        "apiVersion: v1\nkind: Environment\nmetadata: {name: lab}\nspec: {type: PreProduction}\n"
        "---\napiVersion: v1\nkind: Infrastructure\nmetadata: {name: lab}\nspec:\n"
        "  environmentRef: lab\n  type: Pdc\n  spec:\n    hosts: [{hostname: 127.0.1.250}]\n"
    )
    try:
        yield [str(Path(__file__).resolve().parents[1] / "data" / "chain"), str(infra)]
    finally:
        reset_engines()
        get_settings.cache_clear()


def test_the_childs_deployments_answer_to_the_policies_when_the_parent_is_submitted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ledger: list[str]
) -> None:
    from app.coordinator import prepare, record
    from app.policy import PolicyViolation

    # Given a policy that denies static hosts, and a child deploying to static hosts
    policies = tmp_path / "policies.yaml"
    policies.write_text(
        "policies:\n  - name: no static\n    deny:\n"
        "      match: {infrastructure.provider: static}\n      message: cloud hosts only\n"
    )
    monkeypatch.setenv("VMFARM_POLICY_FILE", str(policies))
    plan, hosts = prepare(ledger, pipeline=None, inputs={}, execution_id="p1")
    # When the parent is recorded, the child's stage is judged: the run is refused
    with pytest.raises(PolicyViolation) as exc:
        record(plan, hosts, execution_id="p1", inputs={}, user="dan", publish=False)
    assert "cloud hosts only" in str(exc.value) and "'deploy'" in str(exc.value)


def test_the_reconciler_wakes_a_parent_whose_child_ended_unnoticed(ledger: list[str]) -> None:
    from datetime import timedelta

    from app.coordinator import advance, prepare, reconcile, record
    from app.db import session_scope
    from app.models import Execution, StageRun, utcnow

    # Given a parent whose Pipeline stage started its child
    plan, hosts = prepare(ledger, pipeline=None, inputs={}, execution_id="p1")
    record(plan, hosts, execution_id="p1", inputs={}, user="dan", publish=False)
    assert advance("p1").startswith("started child execution")
    # and the child ended, but the process that ended it stopped before waking the parent
    with session_scope() as s:
        (child,) = s.exec(select(Execution).where(Execution.parent_execution_id == "p1")).all()
        child.status, child.finished_at = "SUCCEEDED", utcnow() - timedelta(hours=1)
        s.add(child)
    # When the reconciler runs, the parent goes on past its Pipeline stage
    said = reconcile()
    assert any(a.startswith("p1: ") for a in said), said
    with session_scope() as s:
        stage = s.exec(
            select(StageRun).where(StageRun.execution_id == "p1", StageRun.stage_index == 0)
        ).one()
        # (the child recorded no step rows here, so the output it promised is missing: the
        # parent's stage, woken, fails saying so)
        assert stage.status == "FAILED"
        assert "output installed: step install of stage deploy recorded no installed" in str(
            stage.error
        )


def test_a_freeze_on_the_childs_environment_holds_for_the_parent(
    tmp_path: Path, ledger: list[str]
) -> None:
    from datetime import UTC, datetime

    from app.coordinator import prepare
    from app.definitions import freeze

    # Given a freeze of every PreProduction environment, and a parent whose child deploys to one
    path = tmp_path / "freeze.yaml"
    path.write_text(
        "freeze:\n  name: Hold\n  identifier: hold\n  status: Enabled\n  entityConfigs:\n"
        "    - name: rule\n      entities:\n"
        "        - {type: EnvType, filterType: Equals, entityRefs: [PreProduction]}\n"
        "  windows:\n    - {timeZone: UTC, startTime: 2026-12-20 06:00 PM, duration: 2w}\n"
    )
    plan, _ = prepare(ledger, pipeline=None, inputs={}, execution_id="p1")
    (found,) = freeze.load([path])
    # Then the freeze holds for the parent's run, at the child's stage
    (hit,) = freeze.active([found], plan, datetime(2026, 12, 25, tzinfo=UTC))
    assert "child/deploy" in hit.stages


def test_a_child_does_not_start_while_another_run_deploys_its_service_there(
    ledger: list[str],
) -> None:
    from app.coordinator import advance, prepare, record
    from app.db import session_scope
    from app.models import Execution, StageRun

    # Given a chain whose child is deploying chained_app to the lab infrastructure
    for ex_id in ("p1", "p2"):
        plan, hosts = prepare(ledger, pipeline=None, inputs={}, execution_id=ex_id)
        record(plan, hosts, execution_id=ex_id, inputs={}, user="dan", publish=False)
    advance("p1")
    with session_scope() as s:
        (child,) = s.exec(select(Execution).where(Execution.parent_execution_id == "p1")).all()
        run = s.exec(select(StageRun).where(StageRun.execution_id == child.id)).one()
        run.status = "RUNNING"  # (its worker would have started it)
        s.add(run)
    # When a second chain reaches its Pipeline stage (the infrastructure does not allow
    # simultaneous deployments, Harness's default)
    assert advance("p2") == "failed"
    # Then its child is not started and the stage fails saying why
    with session_scope() as s:
        assert not s.exec(select(Execution).where(Execution.parent_execution_id == "p2")).all()
        stage = s.exec(
            select(StageRun).where(StageRun.execution_id == "p2", StageRun.stage_index == 0)
        ).one()
        assert stage.status == "FAILED"
        assert "being deployed to infrastructure 'lab'" in (stage.error or "")
        assert child.id in (stage.error or "")


def test_a_chain_of_three_carries_the_grandchild_and_its_permissions(tmp_path: Path) -> None:
    from app.rbac import required_permissions

    # Given parent -> child -> grandchild, the child passing its own input on
    grand = CHILD.replace("name: Child\n  identifier: child", "name: Grand\n  identifier: grand")
    child = (
        "pipeline:\n  name: Child\n  identifier: child\n"
        "  variables:\n    - {name: release, type: String, value: <+input>}\n"
        "  stages:\n    - stage:\n        name: Down\n        identifier: down\n"
        "        type: Pipeline\n        spec:\n          pipeline: grand\n"
        "          inputs:\n            variables:\n"
        "              - {name: release, value: <+pipeline.variables.release>}\n"
    )
    paths = write(tmp_path, parent(), child)
    (tmp_path / "grand.yaml").write_text(grand)
    bundle = load([*paths, tmp_path / "grand.yaml"], inputs={}, require_inputs=True)
    plan = resolve(bundle, choose_pipeline(bundle, None), execution_id="x")
    # Then the parent's plan holds both levels, the value handed down twice
    stage = plan.stages[0]
    assert isinstance(stage, PipelineStagePlan)
    down = stage.child_plan().stages[0]
    assert isinstance(down, PipelineStagePlan) and down.pipeline == "grand"
    assert down.child_inputs == {"release": "2.0"}
    assert "echo release 2.0" in str(down.child_plan().stages[0].steps[0].model_dump())
    # and running it needs permission to run every pipeline of the chain
    needs = required_permissions("run", plan.to_json())
    assert [(n.resource, n.stage) for n in needs] == [
        ("parent", None),
        ("child", "run_child → child"),
        ("grand", "run_child → child/down → grand"),
    ]
    # and a chain of three that comes back is a cycle
    back = grand + (
        "    - stage:\n        name: Back\n        identifier: back\n        type: Pipeline\n"
        "        spec: {pipeline: parent}\n"
    )
    (tmp_path / "grand.yaml").write_text(back)
    errs = errors_of([*paths, tmp_path / "grand.yaml"])
    assert any("is a cycle" in e.message for e in errs), [e.message for e in errs]


def test_the_live_view_and_the_summary_name_the_child_execution() -> None:
    from rich.console import Console

    from cli.render import live_view

    report = {
        "id": "p1",
        "status": "RUNNING",
        "stages": [
            {
                "identifier": "run_child",
                "name": "Run child",
                "status": "RUNNING",
                "type": "Pipeline",
                "child_execution": {"id": "c1", "pipeline": "child", "status": "WAITING"},
                "hosts": [],
                "steps": [],
            }
        ],
    }
    console = Console(record=True, width=120)
    console.print(live_view(report))
    assert "stage run_child RUNNING  child execution c1 (child) WAITING" in console.export_text()


def test_the_reconciler_aborts_a_child_whose_parent_ended_without_it(ledger: list[str]) -> None:
    from app.coordinator import advance, prepare, reconcile, record
    from app.db import session_scope
    from app.models import Execution

    # Given a parent whose child runs, and the parent ended (its abort did not reach the child:
    # the process stopped in between)
    plan, hosts = prepare(ledger, pipeline=None, inputs={}, execution_id="p1")
    record(plan, hosts, execution_id="p1", inputs={}, user="dan", publish=False)
    advance("p1")
    with session_scope() as s:
        parent = s.get(Execution, "p1")
        assert parent is not None
        parent.status = "ABORTED"
        s.add(parent)
        (child,) = s.exec(select(Execution).where(Execution.parent_execution_id == "p1")).all()
        child_id = child.id
    # When the reconciler runs, the child is aborted too, and says why
    said = reconcile()
    assert any(a.startswith(f"{child_id}: its parent p1 is ABORTED") for a in said), said
    with session_scope() as s:
        child = s.get(Execution, child_id)
        assert child is not None and child.status == "ABORTED"
        assert child.error == "aborted by the reconciler"


@pytest.mark.parametrize(
    ("action", "stage_status", "parent_status", "next_stage"),
    [
        ("Ignore", "SUCCEEDED", "RUNNING", "RUNNING"),
        ("MarkAsSuccess", "SUCCEEDED", "RUNNING", "RUNNING"),
        ("Abort", "ABORTED", "ABORTED", "SKIPPED"),
        (None, "FAILED", "FAILED", "SKIPPED"),  # MarkAsFailure, the default
        ("StageRollback", "FAILED", "FAILED", "SKIPPED"),  # nothing of its own to roll back
    ],
)
def test_a_failed_child_meets_the_pipeline_stages_failure_strategy(
    ledger: list[str],
    tmp_path: Path,
    action: str | None,
    stage_status: str,
    parent_status: str,
    next_stage: str,
) -> None:
    import shutil

    from app.coordinator import advance, prepare, record
    from app.db import session_scope
    from app.models import Execution, StageRun

    # Given the chain, its Pipeline stage with the failure strategy (or none)
    files = tmp_path / "chain"
    shutil.copytree(ledger[0], files)
    text = (files / "parent.yaml").read_text()
    strategy = f"- onFailure: {{errors: [AllErrors], action: {{type: {action}}}}}\n"
    if action == "StageRollback":  # the pipeline's (the stage's own is refused at load)
        text = text.replace("  stages:\n", "  failureStrategies:\n    " + strategy + "  stages:\n")
    elif action:
        text = text.replace(
            "        type: Pipeline\n",
            "        type: Pipeline\n        failureStrategies:\n          " + strategy,
        )
    (files / "parent.yaml").write_text(text)
    plan, hosts = prepare([str(files), ledger[1]], pipeline=None, inputs={}, execution_id="p1")
    record(plan, hosts, execution_id="p1", inputs={}, user="dan", publish=False)
    advance("p1")
    # When its child fails
    with session_scope() as s:
        (child,) = s.exec(select(Execution).where(Execution.parent_execution_id == "p1")).all()
        child.status, child.error = "FAILED", "stage 'deploy': install failed"
        s.add(child)
    advance("p1")
    # Then the stage and the parent end as the strategy says, naming the child
    with session_scope() as s:
        runs = {
            r.stage_index: r
            for r in s.exec(select(StageRun).where(StageRun.execution_id == "p1")).all()
        }
        parent = s.get(Execution, "p1")
        assert parent is not None
        assert runs[0].status == stage_status
        assert f"child execution {child.id} (pipeline child_deploy) FAILED" in str(runs[0].error)
        assert parent.status == parent_status
        assert runs[1].status == next_stage
        if action == "StageRollback":
            assert f"roll the child back with vmfarm rollback {child.id}" in str(runs[0].error)


def test_a_pipeline_stage_skipped_by_its_when_starts_no_child(
    ledger: list[str], tmp_path: Path
) -> None:
    import shutil

    from app.coordinator import advance, prepare, record
    from app.db import session_scope
    from app.models import Execution, StageRun

    # Given a Pipeline stage whose condition is false
    files = tmp_path / "chain"
    shutil.copytree(ledger[0], files)
    text = (files / "parent.yaml").read_text()
    (files / "parent.yaml").write_text(
        text.replace(
            "        type: Pipeline\n",
            "        type: Pipeline\n        when:\n"
            '          condition: <+pipeline.variables.fail> == "maybe"\n',
        )
    )
    plan, hosts = prepare([str(files), ledger[1]], pipeline=None, inputs={}, execution_id="p1")
    record(plan, hosts, execution_id="p1", inputs={}, user="dan", publish=False)
    # When the parent starts
    advance("p1")
    # Then the stage is SKIPPED with the reason, no child was recorded, and the parent went on
    with session_scope() as s:
        run = s.exec(
            select(StageRun).where(StageRun.execution_id == "p1", StageRun.stage_index == 0)
        ).one()
        assert run.status == "SKIPPED" and 'condition "no" == "maybe" is false' in str(run.error)
        assert not s.exec(select(Execution).where(Execution.parent_execution_id == "p1")).all()
        nxt = s.exec(
            select(StageRun).where(StageRun.execution_id == "p1", StageRun.stage_index == 1)
        ).one()
        assert nxt.status == "RUNNING"
