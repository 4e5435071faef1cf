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
    return out


def unknown_message(key: str, known: dict[str, str]) -> str:
    """Why ``<+key>`` names no earlier stage's output, and what it could name."""
    shown = sorted(k for k in known if not k.endswith(".list"))
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
