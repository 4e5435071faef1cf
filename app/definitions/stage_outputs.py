"""Outputs across stages: a later stage reads an earlier stage's step output as Harness writes
it, ``<+pipeline.stages.STAGE.spec.execution.steps.STEP.output.outputVariables.NAME>``.

An output comes from a host (a Command step ran on each of the stage's hosts) or from the
delegate (a Custom stage's ShellScript, an ``onDelegate`` step): one value per host that ran
the step. On a host of the later stage the expression is that host's own value when the
earlier step ran there, or the delegate's when it ran on a delegate; a host with neither (the
earlier step was skipped or failed there, or the host was not in that stage) fails its step
naming the hosts that have one. ``...NAME.list`` gathers
every value, in the earlier stage's host order, as a JSON list (``["a", "b"]``).

The names are checked when the pipeline is planned (an unknown stage, step or output, a later
stage, a Secret output: exit 2 with file:line); the worker reads the values from the ledger
(app.execution.ledger.stage_outputs). Nothing here runs anything.
"""

from __future__ import annotations

import re
from typing import Any

from app.definitions import models as m

STAGE_OUTPUT_RE = re.compile(
    r"pipeline\.stages\.([A-Za-z_]\w*)\.spec\.execution\.steps\.([A-Za-z_]\w*)"
    r"\.output\.outputVariables\.([A-Za-z_]\w*)(\.list)?"
)
FORM = "<+pipeline.stages.STAGE.spec.execution.steps.STEP.output.outputVariables.NAME>"


def _outputs(stage: Any) -> dict[str, list[m.StepVariable]]:
    """Step identifier -> its output variables, for the stages that have steps with some."""
    if isinstance(stage, m.StageSpec):
        return {
            st.identifier: list(st.spec.output_variables)
            for _, st, _ in m.flat_steps(stage.spec.execution.steps)
            if isinstance(st, m.CommandStep)
        }
    if isinstance(stage, m.CustomStageSpec):
        return {
            el.step.identifier: list(el.step.spec.output_variables)
            for el in stage.spec.execution.steps
            if isinstance(el.step, m.ShellScriptStep)
        }
    return {}


def _terraform_steps(stage: Any) -> list[str]:
    """A Custom stage's Terraform steps: their outputs are the configuration's (output.X)."""
    if not isinstance(stage, m.CustomStageSpec):
        return []
    return [
        el.step.identifier
        for el in stage.spec.execution.steps
        if str(getattr(el.step, "type", "")).startswith("Terraform")
    ]


def readable(stages: list[Any], index: int) -> dict[str, str]:
    """What stage ``index`` may read of the stages before it: expression -> '' (readable), or
    why not (a Secret output is never kept in the ledger)."""
    out: dict[str, str] = {}
    for stage in stages[:index]:
        for step, variables in _outputs(stage).items():
            for var in variables:
                key = (
                    f"pipeline.stages.{stage.identifier}.spec.execution.steps.{step}"
                    f".output.outputVariables.{var.name}"
                )
                why = (
                    f"<+{key}> is a Secret output: its value is never kept, so a later stage "
                    "cannot read it; put the secret in a secret backend and read it with "
                    '<+secrets.getValue("id")>'
                    if var.type == "Secret"
                    else ""
                )
                out[key] = out[f"{key}.list"] = why
        for step in _terraform_steps(stage):
            out[f"pipeline.stages.{stage.identifier}.spec.execution.steps.{step}.output."] = ""
        if isinstance(stage, m.PipelineStageSpec):  # its child's outputs (app.definitions.chaining)
            for o in stage.spec.outputs:
                out[f"pipeline.stages.{stage.identifier}.output.{o.name}"] = ""
    return out


def check(key: str, known: dict[str, str]) -> None:
    """Raise ExpressionError unless ``<+key>`` names an output ``known`` (readable())."""
    from app.definitions.expressions import ExpressionError

    why = known.get(key)
    if why is None and any(k.endswith(".") and key.startswith(k) for k in known):
        why = ""  # a Terraform step's output: its names come from the configuration
    if why is None:
        raise ExpressionError(unknown_message(key, known))
    if why:
        raise ExpressionError(why)


def unknown_message(key: str, known: dict[str, str]) -> str:
    """Why ``<+key>`` names no earlier stage's output, and what it could name."""
    shown = sorted(k + ("X" if k.endswith(".") else "") for k in known if not k.endswith(".list"))
    hint = (
        f" (this stage may read: {', '.join(shown[:6])}{', ...' if len(shown) > 6 else ''})"
        if shown
        else " (no earlier stage has a step with outputVariables)"
    )
    if not STAGE_OUTPUT_RE.fullmatch(key):
        return f"unknown expression <+{key}>: an earlier stage's step output reads {FORM}{hint}"
    return (
        f"unknown expression <+{key}>: no earlier stage has that step and output (a stage "
        f"reads only the stages before it){hint}"
    )
