"""Pipeline stages (pipeline chaining): the parent's stage records the child's plan as an
execution of its own (``parent_execution_id``, ``parent_stage``) and waits; nothing sleeps.

::

    parent advance()  stage PENDING  -> record the child execution, stage RUNNING,
                                        a timer advances the child (after the commit)
                      stage RUNNING  -> child not ended: "waiting"
                                        child SUCCEEDED: the stage takes its outputs from the
                                        child's ledger, SUCCEEDED, and the parent goes on
                                        child FAILED / ABORTED: the stage's failure strategy
                                        (MarkAsFailure by default; Abort, Ignore, MarkAsSuccess)
    child advance()   ends           -> wake_parent(): the parent's advance() decides again

The child's plan was resolved with the parent (app.definitions.chaining), so RBAC, policies
and freeze windows judged it when the parent was submitted; its ``<+pipeline.executionId>``
was rendered as a placeholder that is replaced here by the child's own id.
"""

from __future__ import annotations

import json
from typing import Any

from sqlmodel import Session, col, select

from app.coordinator.failure import fail_stage
from app.coordinator.ledger import finish, new_execution_id
from app.coordinator.precedence import stage_action
from app.coordinator.publish import Dispatch
from app.coordinator.records import deploying_elsewhere, record_rows
from app.definitions.plan import PipelineStagePlan, Plan
from app.models import Execution, HostStepRun, StageRun, Status, utcnow


def child_of(s: Session, parent_id: str, stage_index: int) -> Execution | None:
    """The latest child execution a parent's Pipeline stage started (None: not yet)."""
    return s.exec(
        select(Execution)
        .where(
            Execution.parent_execution_id == parent_id,
            Execution.parent_stage == stage_index,
        )
        .order_by(col(Execution.created_at).desc())
    ).first()


def running_children(s: Session, parent_id: str) -> list[str]:
    """The children of a parent that have not ended (an abort of the parent aborts them)."""
    return list(
        s.exec(
            select(Execution.id).where(
                Execution.parent_execution_id == parent_id,
                col(Execution.status).not_in(list(Status.TERMINAL)),
            )
        ).all()
    )


def decide_pipeline_stage(
    s: Session,
    ex: Execution,
    run: StageRun,
    stage: PipelineStagePlan,
    dispatches: list[Dispatch],
) -> str | None:
    """The Pipeline stage's next move: what happened ("waiting", "failed", ...), or None when
    the stage is done and the parent goes on to its next stage."""
    if run.status == Status.PENDING:
        child_id = start_child(s, ex, run, stage)
        if not child_id:
            return fail_stage(s, ex, run, f"its child could not start: {run.error}")
        dispatches.append(Dispatch("timer", child_id, 0, -1, [], countdown=0.0))
        return f"started child execution {child_id} (pipeline {stage.pipeline})"
    child = child_of(s, ex.id, run.stage_index)
    if child is None:  # recorded with the stage; only a hand-edited ledger gets here
        return fail_stage(s, ex, run, "its child execution is missing from the ledger")
    if child.status not in Status.TERMINAL:
        return "waiting"
    if child.status == Status.SUCCEEDED:
        outputs, problem = child_outputs(s, child, stage)
        if problem:
            return fail_stage(s, ex, run, f"child execution {child.id}: {problem}")
        run.status, run.finished_at = Status.SUCCEEDED, utcnow()
        run.error, run.outputs = None, outputs or None
        s.add(run)
        return None  # the caller (app.coordinator.machine) goes on to the next stage
    error = f"child execution {child.id} (pipeline {stage.pipeline}) {child.status}" + (
        f": {child.error}" if child.error else ""
    )
    action = stage_action(stage, [(None, "Unknown")]).type
    if action in ("Ignore", "MarkAsSuccess"):
        run.status, run.finished_at = Status.SUCCEEDED, utcnow()
        run.error = f"{error} ({action} by the failure strategy)"
        s.add(run)
        return None  # the caller (app.coordinator.machine) goes on to the next stage
    if action == "Abort":
        run.status, run.error, run.finished_at = Status.ABORTED, error, utcnow()
        s.add(run)
        finish(
            s,
            ex,
            Status.ABORTED,
            error=f"stage '{run.identifier}': {error} (aborted by the failure strategy)",
        )
        return "aborted"
    if action == "StageRollback":  # the pipeline's: the stage's own is refused at load
        error += (
            f" (a Pipeline stage has nothing of its own to roll back: roll the child back "
            f"with vmfarm rollback {child.id})"
        )
    # MarkAsFailure (the default); Retry and ManualIntervention are refused at load.
    return fail_stage(s, ex, run, error)


def child_outputs(
    s: Session, child: Execution, stage: PipelineStagePlan
) -> tuple[dict[str, str], str]:
    """The stage's outputs, read from the child's ledger: (name -> value, '') or ({}, what
    is wrong). A step output that ran on several hosts is one value only when every host
    recorded the same (``.list`` gathers them, in the child stage's host order)."""
    from app.definitions.chaining import OUTPUT_RE

    if not stage.outputs:
        return {}, ""
    plan = Plan.of(child.plan)
    out: dict[str, str] = {}
    for o in stage.outputs:
        key = o["value"].strip().removeprefix("<+").removesuffix(">").strip()
        found = OUTPUT_RE.fullmatch(key)
        if found is None:  # checked at load
            return {}, f"output {o['name']}: {o['value']} is not a step output"
        sid, tid, name, gather = found.groups()
        index = next((i for i, st in enumerate(plan.stages) if st.identifier == sid), None)
        step = (
            None
            if index is None
            else next(
                (j for j, st in enumerate(plan.stages[index].steps) if st.identifier == tid), None
            )
        )
        if index is None or step is None:
            return {}, f"output {o['name']}: the child has no step {tid} in a stage {sid}"
        run = s.exec(
            select(StageRun).where(StageRun.execution_id == child.id, StageRun.stage_index == index)
        ).one()
        latest: dict[str, Any] = {}
        for r in s.exec(
            select(HostStepRun)
            .where(
                HostStepRun.execution_id == child.id,
                HostStepRun.stage_index == index,
                HostStepRun.step_index == step,
                HostStepRun.kind == "deploy",
                HostStepRun.status == Status.SUCCEEDED,
            )
            .order_by(col(HostStepRun.attempt))
        ).all():
            latest[r.host] = dict(r.outputs or {})  # the latest attempt wins
        values = [
            str(latest[h["name"]][name])
            for h in run.hosts
            if h["name"] in latest and name in latest[h["name"]]
        ]
        if gather:
            out[o["name"]] = json.dumps(values)
        elif not values:
            return {}, (
                f"output {o['name']}: step {tid} of stage {sid} recorded no {name} "
                "(skipped or failed on every host)"
            )
        elif len(set(values)) > 1:
            return {}, (
                f"output {o['name']}: step {tid} of stage {sid} recorded {len(set(values))} "
                f"different values of {name} on its hosts; read them with {name}.list"
            )
        else:
            out[o["name"]] = values[0]
    return out, ""


def start_child(s: Session, ex: Execution, run: StageRun, stage: PipelineStagePlan) -> str:
    """Record the child execution (its rows as a run records them) and start the stage; ''
    with the reason in ``run.error`` when the child may not start now."""
    child_id = new_execution_id()
    data = json.loads(json.dumps(stage.child).replace(stage.child_execution_id, child_id))
    plan = Plan.of(data)
    busy = deploying_elsewhere(s, plan)
    if busy:  # allowSimultaneousDeployments: false, as for any run
        run.error = "; ".join(busy)
        return ""
    s.add(
        Execution(
            id=child_id,
            pipeline=plan.identifier,
            pipeline_name=plan.name,
            plan=data,
            inputs={
                **{
                    f"pipeline.{stage.pipeline}.variables.{k}": v
                    for k, v in stage.child_inputs.items()
                },
                "chained_by": f"{ex.id}/{run.identifier}",
            },
            created_by=ex.created_by,
            parent_execution_id=ex.id,
            parent_stage=run.stage_index,
        )
    )
    s.flush()
    record_rows(s, child_id, plan, [[] for _ in plan.stages])
    run.status, run.started_at, run.error = Status.RUNNING, utcnow(), None
    s.add(run)
    if ex.status == Status.QUEUED:
        ex.status, ex.started_at = Status.RUNNING, utcnow()
        s.add(ex)
    return child_id
