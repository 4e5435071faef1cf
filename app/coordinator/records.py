"""The rows a recorded execution starts with: one StageRun per stage (with its hosts, when
known) and one StepRun per step. Written by a run (submit.record) and by a Pipeline stage
that starts its child (chaining.start_child)."""

from __future__ import annotations

from typing import Any

from sqlmodel import Session

from app.definitions.plan import Plan
from app.models import StageRun, StepRun


def record_rows(
    s: Session, execution_id: str, plan: Plan, host_dicts: list[list[dict[str, Any]]]
) -> None:
    """Add the execution's stage and step rows (the Execution row is already added)."""
    for i, stage in enumerate(plan.stages):
        s.add(
            StageRun(
                execution_id=execution_id,
                stage_index=i,
                identifier=stage.identifier,
                name=stage.name,
                hosts=host_dicts[i],
            )
        )
        for j, step in enumerate(stage.steps):
            s.add(
                StepRun(
                    execution_id=execution_id,
                    stage_index=i,
                    step_index=j,
                    identifier=step.identifier,
                    name=step.name,
                )
            )
