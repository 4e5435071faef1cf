"""A looped stage whose iterations run side by side (``maxConcurrency`` above 1): what the plan
says about it (its group and cap), and what cannot be carried out side by side refused at load
with exit 2, file:line and the field, through the command line as a user meets it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.unit.test_loops import STATIC, loops_copy
from tests.unit.test_spec import line_of, plan_of

CAP = "            maxConcurrency: 1\n        spec:"


def _cap(n: int) -> str:
    return f"            maxConcurrency: {n}\n        spec:"


def _plan_cli(folder: Path, tmp_path: Path, *args: str) -> tuple[int, str]:
    from cli.main import main

    res = CliRunner().invoke(
        main,
        ["plan", str(folder), str(STATIC), *args],
        env={"VMFARM_HOME": str(tmp_path / "home")},
    )
    return res.exit_code, res.output


@pytest.mark.parametrize(
    ("cap", "group"),
    [
        (1, None),
        (2, {"first": 0, "last": 2, "cap": 2}),
        (3, {"first": 0, "last": 2, "cap": 3}),
        (5, {"first": 0, "last": 2, "cap": 3}),  # never more than there are iterations
    ],
)
def test_the_plan_marks_the_iterations_that_run_side_by_side_with_their_cap(
    tmp_path: Path, cap: int, group: dict[str, int] | None
) -> None:
    # Given the Deploy stage repeated over three regions with maxConcurrency `cap`
    folder = loops_copy(tmp_path, CAP, _cap(cap))
    stages = plan_of([folder, STATIC])["stages"]
    # Then each of its iterations names its group (plan indexes 0 to 2) and the cap, or none
    # with 1 (they run one after another); the stage after the loop never has one
    assert [s["identifier"] for s in stages] == ["deploy_0", "deploy_1", "deploy_2", "smoke"]
    assert [s.get("concurrency") for s in stages[:3]] == [group] * 3
    assert "concurrency" not in stages[3]


def test_more_iterations_than_the_cap_are_one_group_run_cap_at_a_time(tmp_path: Path) -> None:
    # Given five regions, two at a time
    folder = loops_copy(
        tmp_path,
        "items: [us-east-1, eu-west-1, ap-south-1]",
        "items: [us-east-1, eu-west-1, ap-south-1, us-west-2, sa-east-1]",
    )
    f = folder / "pipeline.yaml"
    f.write_text(f.read_text().replace(CAP, _cap(2)))
    stages = plan_of([folder, STATIC])["stages"]
    # Then the five iterations form one group (plan indexes 0 to 4) with cap 2
    assert [s["identifier"] for s in stages] == [f"deploy_{i}" for i in range(5)] + ["smoke"]
    assert {json.dumps(s["concurrency"]) for s in stages[:5]} == {
        json.dumps({"first": 0, "last": 4, "cap": 2})
    }
    # and vmfarm plan says how many run at once
    code, out = _plan_cli(folder, tmp_path)
    assert code == 0, out
    assert "side by side: deploy_0 to deploy_4, 2 at a time" in out
    assert out.count("side by side:") == 5  # on each iteration, not on smoke


def test_plan_says_all_iterations_run_at_once_when_the_cap_covers_them(tmp_path: Path) -> None:
    folder = loops_copy(tmp_path, CAP, _cap(3))
    code, out = _plan_cli(folder, tmp_path)
    assert code == 0, out
    assert "side by side: deploy_0 to deploy_2, all 3 at once" in out
    # and what a failed iteration does
    assert "this iteration rolls back alone" in " ".join(out.split())
    code, out = _plan_cli(folder, tmp_path, "-o", "json")
    assert code == 0, out
    (first,) = [s for s in json.loads(out)["stages"] if s["identifier"] == "deploy_0"]
    assert first["concurrency"]["cap"] == 3
    # one after another: nothing said
    code, out = _plan_cli(loops_copy(tmp_path / "one", CAP, _cap(1)), tmp_path)
    assert code == 0, out
    assert "side by side" not in out


_STAGE_PIPELINE_ROLLBACK = (
    "        failureStrategies:\n"
    "          - onFailure:\n"
    "              errors: [AllErrors]\n"
    "              action:\n"
    "                type: PipelineRollback\n"
)
_STEP_MANUAL = (
    "                  failureStrategies:\n"
    "                    - onFailure:\n"
    "                        errors: [AllErrors]\n"
    "                        action:\n"
    "                          type: ManualIntervention\n"
    "                          spec:\n"
    "                            timeout: 1h\n"
    "                            onTimeout:\n"
    "                              action:\n"
    "                                type: Abort\n"
)
_APPROVAL = (
    "              - step:\n"
    "                  type: HarnessApproval\n"
    "                  name: Ok\n"
    "                  identifier: ok\n"
    "                  timeout: 1h\n"
    "                  spec:\n"
    "                    approvalMessage: go\n"
    "                    approvers:\n"
    "                      userGroups: [release_managers]\n"
    "                      minimumCount: 1\n"
)
_WATCH = (
    "        rollbackStrategy:\n"
    "          interval: 1s\n"
    "          triggers:\n"
    "            - name: High Error Rate\n"
    '              condition: "error_rate > 5%"\n'
    "              evaluation_window: 12s\n"
    "              action: automatic_rollback\n"
)
_CUSTOM = (
    "    - stage:\n"
    "        name: Checks\n"
    "        identifier: checks\n"
    "        type: Custom\n"
    "        strategy:\n"
    "          parallelism: 2\n"
    "          maxConcurrency: 2\n"
    "        spec:\n"
    "          execution:\n"
    "            steps:\n"
    "              - step:\n"
    "                  type: ShellScript\n"
    "                  name: Check\n"
    "                  identifier: check\n"
    "                  spec:\n"
    "                    shell: Bash\n"
    "                    onDelegate: true\n"
    "                    source:\n"
    "                      type: Inline\n"
    "                      spec:\n"
    "                        script: echo ok\n"
)
_SMOKE = "    - stage:\n        name: Smoke\n"
_REGION_STEP = (
    "              - step:\n                  type: Command\n                  name: Region\n"
)
_REGION = "                  name: Region\n                  identifier: region\n"


@pytest.mark.parametrize(
    ("edits", "at", "field", "message"),
    [
        (
            [(CAP, _cap(3).replace("        spec:", _STAGE_PIPELINE_ROLLBACK + "        spec:"))],
            "type: PipelineRollback",
            "failureStrategies[0].onFailure.action.type",
            "a failure strategy PipelineRollback cannot apply to a stage whose iterations run "
            "side by side (strategy maxConcurrency 3): it would roll back iterations that are "
            "still running",
        ),
        (
            [(CAP, _cap(2)), (_REGION, _REGION + _STEP_MANUAL)],
            "type: ManualIntervention",
            "failureStrategies[0].onFailure.action.type",
            "a failure strategy ManualIntervention cannot apply to a stage whose iterations run "
            "side by side (strategy maxConcurrency 2)",
        ),
        (
            [
                (CAP, _cap(2)),
                (
                    "  stages:\n",
                    "  failureStrategies:\n"
                    "    - onFailure:\n"
                    "        errors: [AllErrors]\n"
                    "        action:\n"
                    "          type: PipelineRollback\n"
                    "  stages:\n",
                ),
            ],
            "type: PipelineRollback",
            "spec.failureStrategies[0].onFailure.action.type",
            "the pipeline's failure strategy PipelineRollback cannot apply to a stage whose "
            "iterations run side by side",
        ),
        (
            [(CAP, _cap(2)), (_REGION_STEP, _APPROVAL + _REGION_STEP)],
            "type: HarnessApproval",
            "steps[1].step.type",
            "a stage whose iterations run side by side (strategy maxConcurrency 2) cannot hold "
            "a HarnessApproval step",
        ),
        (
            [(CAP, _cap(3).replace("        spec:", _WATCH + "        spec:"))],
            "interval: 1s",  # a mapping's line is its first field's
            "stage.rollbackStrategy",
            "cannot have a rollbackStrategy (the watch after deployment watches one stage at a "
            "time)",
        ),
        (
            [(_SMOKE, _CUSTOM + _SMOKE)],
            "type: Custom",
            "stage.type",
            "a stage whose iterations run side by side (strategy maxConcurrency 2) cannot be a "
            "Custom stage",
        ),
    ],
    ids=[
        "stage-pipeline-rollback",
        "step-manual-intervention",
        "pipeline-level-pipeline-rollback",
        "harness-approval-step",
        "watch",
        "custom-stage",
    ],
)
def test_what_cannot_run_side_by_side_exits_2_naming_file_line_and_field(
    tmp_path: Path, edits: list[tuple[str, str]], at: str, field: str, message: str
) -> None:
    # Given the looped Deploy stage with maxConcurrency above 1 and one thing it cannot carry
    # out side by side
    folder = loops_copy(tmp_path)
    f = folder / "pipeline.yaml"
    text = f.read_text()
    for old, new in edits:
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    f.write_text(text)
    # When it is planned from the command line
    code, out = _plan_cli(folder, tmp_path)
    # Then it exits 2, naming the file, the line of the field, the field and why
    assert code == 2, out
    flat = " ".join(out.split())
    assert f"pipeline.yaml:{line_of(f, at)}:" in out, out
    assert field in flat, out
    assert " ".join(message.split()) in flat, out
    assert "write maxConcurrency: 1 to run the iterations one after another" in flat


def test_maxconcurrency_1_accepts_what_side_by_side_refuses(tmp_path: Path) -> None:
    # Given the same PipelineRollback and watch with iterations one after another
    folder = loops_copy(
        tmp_path, CAP, CAP.replace("        spec:", _STAGE_PIPELINE_ROLLBACK + "        spec:")
    )
    code, out = _plan_cli(folder, tmp_path)
    assert code == 0, out
