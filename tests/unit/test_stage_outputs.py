"""Outputs across stages (<+pipeline.stages.S.spec.execution.steps.T.output.outputVariables.X>):
what plans, and what is refused when the pipeline is planned, with file:line. The values on
lab hosts: tests/lab/test_stage_outputs_lab.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.definitions.loader import choose_pipeline, load
from app.definitions.resolve import resolve
from app.errors import SpecError, SpecErrors

DATA = Path(__file__).resolve().parents[1] / "data"
SERVICE = DATA / "rollback" / "service.yaml"
PIPELINE = DATA / "stage_outputs" / "pipeline.yaml"
INFRA = """\
apiVersion: v1
kind: Infrastructure
metadata: {name: lab, identifier: lab}
spec:
  environmentRef: lab
  deploymentType: Ssh
  type: Pdc
  spec:
    region: r1
    connection: {type: SSH, user: root, port: 22}
    hosts: [{hostname: 127.0.1.201}, {hostname: 127.0.1.202}]
"""
WHO = "<+pipeline.stages.first.spec.execution.steps.mark.output.outputVariables.who>"


def plan(tmp_path: Path, old: str = "", new: str = "") -> tuple[Path, object]:
    text = PIPELINE.read_text()
    if old:
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    path = tmp_path / "pipeline.yaml"
    path.write_text(text)
    (tmp_path / "infra.yaml").write_text(INFRA)
    bundle = load([SERVICE, path, tmp_path / "infra.yaml"], inputs={"tag": "1.0"})
    return path, resolve(bundle, choose_pipeline(bundle, None), execution_id="x")


def test_a_later_stage_reads_earlier_outputs_which_stay_for_the_worker(tmp_path: Path) -> None:
    _, p = plan(tmp_path)
    script = p.stages[2].steps[0].spec.command_units[0].spec.source.spec.script  # type: ignore[attr-defined]
    assert WHO in script and WHO[:-1] + ".list>" in script
    assert "<+pipeline.stages.token.spec.execution.steps.mint.output.outputVariables.token>" in (
        script
    )


@pytest.mark.parametrize(
    ("old", "new", "says"),
    [
        (
            WHO,
            WHO.replace("stages.first", "stages.frist"),
            "no earlier stage has that step and output (a stage reads only the stages before "
            "it) (this stage may read: pipeline.stages.first.spec.execution.steps.mark.output."
            "outputVariables.who, pipeline.stages.token",
        ),
        (
            WHO,
            WHO.replace("outputVariables.who", "outputVariables.whom"),
            "no earlier stage has that step and output",
        ),
        (
            WHO,
            "<+pipeline.stages.first.output.who>",
            "an earlier stage's step output reads <+pipeline.stages.STAGE.spec.execution.steps"
            ".STEP.output.outputVariables.NAME>",
        ),
        (
            'script: WHO="seen-<+instance.hostName>"',
            f'script: WHO="{WHO}"',
            "(no earlier stage has a step with outputVariables)",
        ),
        (
            "- {name: who, type: String, value: WHO}",
            "- {name: who, type: Secret, value: WHO}",
            "is a Secret output: its value is never kept, so a later stage cannot read it",
        ),
    ],
)
def test_what_names_no_earlier_output_is_refused_at_plan_with_its_line(
    tmp_path: Path, old: str, new: str, says: str
) -> None:
    with pytest.raises((SpecError, SpecErrors)) as info:
        plan(tmp_path, old, new)
    exc = info.value
    errors = exc.errors if isinstance(exc, SpecErrors) else [exc]  # type: ignore[union-attr]
    e = next((e for e in errors if says in e.message), None)
    assert e is not None, [e.message for e in errors]
    path = tmp_path / "pipeline.yaml"
    line = next(n for n, t in enumerate(path.read_text().split("\n"), 1) if new.strip() in t)
    # the error stands at the line that names the expression (or, for the Secret, its reader)
    secret = "Secret" in new
    wanted = (
        next(n for n, t in enumerate(path.read_text().split("\n"), 1) if WHO in t)
        if secret
        else line
    )
    assert (e.file, e.line) == (str(path), wanted)
