"""The rows a recorded execution starts with: one StageRun per stage (with its hosts, when
known) and one StepRun per step; and whether another execution holds what it would deploy
to. Used by a run (submit.record) and by a Pipeline stage that starts its child
(chaining.start_child)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import text
from sqlmodel import Session, col, select

from app.coordinator.ledger import plan_of
from app.definitions.plan import DeploymentStagePlan, Plan
from app.models import Execution, StageRun, Status, StepRun


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


def deploying_elsewhere(s: Any, plan: Plan) -> list[str]:
    """Why ``plan`` may not start now: a stage under way deploys one of its services to one of
    its infrastructures that does not allow simultaneous deployments (Harness's
    ``allowSimultaneousDeployments: false``, the default). Checked under a lock that serialises
    the recording of runs, so two runs cannot both pass it. (A run refused here can simply be
    submitted again once the other has ended.)"""
    wanted = {
        (st.service.identifier, infra.identifier): infra
        for st in plan.stages
        if isinstance(st, DeploymentStagePlan)
        for infra in st.infrastructures
        if not infra.allow_simultaneous_deployments
    }
    if not wanted:
        return []
    if s.get_bind().dialect.name == "postgresql":
        s.execute(text("SELECT pg_advisory_xact_lock(hashtext('vmfarm.deployment-lock'))"))
    busy = []
    # Only a stage under way holds its infrastructures (one waiting to start holds nothing).
    for run in s.exec(
        select(StageRun).where(col(StageRun.status).in_([Status.RUNNING, Status.ROLLING_BACK]))
    ).all():
        other = s.get(Execution, run.execution_id)
        if other is None or other.status in Status.TERMINAL:
            continue
        st = plan_of(other).stages[run.stage_index]
        if not isinstance(st, DeploymentStagePlan):
            continue
        for infra in st.infrastructures:
            mine = wanted.get((st.service.identifier, infra.identifier))
            if mine is not None:
                busy.append(
                    f"service '{st.service.identifier}' is being deployed to "
                    f"infrastructure '{infra.identifier}' ({mine.source}) by "
                    f"execution {other.id} (stage '{st.identifier}'), and that "
                    "infrastructure does not allow simultaneous deployments: wait "
                    f"for it (vmfarm status {other.id}), or set "
                    "allowSimultaneousDeployments: true"
                )
    return list(dict.fromkeys(busy))
