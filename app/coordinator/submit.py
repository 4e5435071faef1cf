"""Recording executions: a new run from pipeline files, a retry of the hosts that failed, a
rollback of a successful execution. Nothing is recorded when the input is wrong.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from sqlmodel import col, select

from app.coordinator.discovery import discover_stage
from app.coordinator.ledger import all_static, new_execution_id, plan_of
from app.coordinator.machine import advance
from app.coordinator.outputs import names_outputs
from app.coordinator.records import deploying_elsewhere, record_rows
from app.coordinator.rollback import rollback_plan
from app.coordinator.routing import (
    choose_tags,
    discovered_by_workers,
    discovery_region,
    infra_tags,
    unserved_delegates,
)
from app.db import session_scope
from app.definitions.plan import DeploymentStagePlan, PipelineStagePlan, Plan
from app.errors import ConfigError
from app.models import (
    Execution,
    HostStepRun,
    PhaseRun,
    StageRun,
    Status,
    StepRun,
    utcnow,
)
from app.providers.base import Host
from app.settings import get_settings

if TYPE_CHECKING:
    from app.policy import Finding


def submit(
    paths: Iterable[str],
    *,
    pipeline: str | None = None,
    inputs: Mapping[str, str] | None = None,
    user: str = "",
    publish: bool = True,
) -> str:
    """Validate and record an execution, dispatch its first phase; return the execution id.

    Raises SpecError/SpecErrors (nothing is recorded) when the files or inputs are wrong.
    Who may run it, and the audit trail, are the caller's: ``app.operations.run`` (which
    prepares once, checks RBAC on the plan, then calls ``record``).
    """
    execution_id = new_execution_id()
    plan, stage_hosts = prepare(paths, pipeline=pipeline, inputs=inputs, execution_id=execution_id)
    record(plan, stage_hosts, execution_id=execution_id, inputs=inputs, user=user, publish=publish)
    return execution_id


def record(
    plan: Plan,
    stage_hosts: list[list[Host]],
    *,
    execution_id: str,
    inputs: Mapping[str, str] | None,
    user: str,
    publish: bool = True,
) -> list[Finding]:
    """Record a prepared plan as execution ``execution_id`` (the id it was resolved with),
    after its policy rules and the live workers allow it; returns the policy's warnings.

    Raises PolicyViolation or ConfigError (nothing is recorded) when it may not run."""
    from app import policy

    who = user or get_settings().user or ""
    data = plan.to_json()  # what the ledger stores; policies read it as a document
    warnings = policy.enforce(data, stage_hosts, user=who, execution_id=execution_id)
    host_dicts = [[h.to_dict() for h in hosts] for hosts in stage_hosts]  # once: 10,000s
    deployments = [
        (st, hosts)
        for st, hosts in zip(plan.stages, host_dicts, strict=True)
        if isinstance(st, DeploymentStagePlan)
    ]
    for child in chained_plans(plan):  # a Pipeline stage's child: the same checks apply
        child_hosts = static_hosts(child)
        warnings += policy.enforce(
            child.to_json(), child_hosts, user=who, execution_id=execution_id
        )
        deployments += [
            (st, [h.to_dict() for h in hosts])
            for st, hosts in zip(child.stages, child_hosts, strict=True)
            if isinstance(st, DeploymentStagePlan)
        ]
    refused = [
        f"stage '{st.identifier}': {why}"
        for st, hosts in deployments
        for why in unserved_delegates(st, hosts)
    ]
    # Cloud hosts are listed by their region's workers: one with the tags must be live.
    refused += [
        f"stage '{st.identifier}', infrastructure '{infra.identifier}': {why}"
        for st, _ in deployments
        if discovered_by_workers(st)
        for infra in st.infrastructures
        for chosen, why in [choose_tags(st, discovery_region(infra), infra_tags(st, infra))]
        if chosen is None
    ]
    if refused:  # nothing is recorded: no live worker could take this work
        raise ConfigError(
            "; ".join(refused) + " (start one with `vmfarm worker --region R "
            "--tags ...`, or give the stage a delegateFallback)"
        )
    with session_scope() as s:
        busy = deploying_elsewhere(s, plan)
        if busy:  # nothing is recorded: allowSimultaneousDeployments is false there
            raise ConfigError("; ".join(busy))
        ex = Execution(
            id=execution_id,
            pipeline=plan.identifier,
            pipeline_name=plan.name,
            plan=data,
            inputs={k: str(v) for k, v in (inputs or {}).items()},
            created_by=who,
        )
        s.add(ex)
        s.flush()
        record_rows(s, execution_id, plan, host_dicts)
    if publish:
        advance(execution_id)
    return list(warnings)


def prepare(
    paths: Iterable[str],
    *,
    pipeline: str | None,
    inputs: Mapping[str, str] | None,
    execution_id: str,
) -> tuple[Plan, list[list[Host]]]:
    """Load, validate and resolve the files; discover static hosts (bad input raises)."""
    from app.definitions import choose_pipeline, load, resolve

    # The mapping as given: an input set's values remember the file and line they came from.
    bundle = load(paths, inputs=inputs if inputs is not None else {}, require_inputs=True)
    pipe = choose_pipeline(bundle, pipeline)
    plan = resolve(bundle, pipe, execution_id=execution_id)
    return plan, static_hosts(plan)


def chained_plans(plan: Plan) -> list[Plan]:
    """The plans of the pipelines ``plan`` chains (Pipeline stages), at any depth."""
    out: list[Plan] = []
    for st in plan.stages:
        if isinstance(st, PipelineStagePlan):
            child = st.child_plan()
            out += [child, *chained_plans(child)]
    return out


def static_hosts(plan: Plan) -> list[list[Host]]:
    """Each stage's static hosts ([] where they are discovered when it starts)."""
    # Discover static hosts now: a bad host list is bad input, refused before anything runs.
    return [
        discover_stage(st)
        if isinstance(st, DeploymentStagePlan)
        and all_static(st)
        # hosts named by an earlier stage's outputs are known when the stage starts
        and not names_outputs([i.to_json()["spec"] for i in st.infrastructures])
        else []
        for st in plan.stages
    ]


def retry_failed(execution_id: str, *, user: str = "", publish: bool = True) -> str:
    """A new execution of the same plan on the hosts that did not succeed; returns its id.

    Stages where every host succeeded are skipped; so are approvals that were granted. The
    ledger keeps both executions: the new one names the one it retries.
    """
    with session_scope() as s:
        ex = s.get(Execution, execution_id)
        if ex is None:
            raise LookupError(f"no execution '{execution_id}'")
        if ex.status not in Status.TERMINAL:
            raise LookupError(
                f"execution {execution_id} is still {ex.status}; retry it when "
                "it has ended (or abort it)"
            )
        runs = s.exec(
            select(StageRun)
            .where(StageRun.execution_id == execution_id)
            .order_by(col(StageRun.stage_index))
        ).all()
        rows = s.exec(
            select(HostStepRun).where(
                HostStepRun.execution_id == execution_id, HostStepRun.kind == "deploy"
            )
        ).all()
        approvals = {
            p.stage_index: p.status
            for p in s.exec(
                select(PhaseRun).where(
                    PhaseRun.execution_id == execution_id, PhaseRun.kind == "approval"
                )
            ).all()
        }
        plan, inputs, stages = plan_of(ex), dict(ex.inputs), []
        for run in runs:
            latest: dict[tuple[str, int], HostStepRun] = {}
            for r in rows:
                if r.stage_index == run.stage_index:
                    k = (r.host, r.step_index)
                    if k not in latest or r.attempt > latest[k].attempt:
                        latest[k] = r
            n_steps = len(plan.stages[run.stage_index].steps)
            redo = [
                h
                for h in run.hosts
                if not all(
                    (
                        latest.get((h["name"], i)) is not None
                        and Status.passed(
                            latest[(h["name"], i)].status, latest[(h["name"], i)].error
                        )
                    )
                    for i in range(n_steps)
                )
            ]
            kind = plan.stages[run.stage_index].type
            skip = (
                approvals.get(run.stage_index) == Status.SUCCEEDED
                if kind == "Approval"
                else run.status == Status.SUCCEEDED  # its child runs again otherwise
                if kind == "Pipeline"
                else not redo
            )
            stages.append((run, redo, skip))
    if all(skip for _, _, skip in stages):
        raise LookupError(f"execution {execution_id} has no failed host to retry")
    new_id = new_execution_id()
    # <+pipeline.executionId> was rendered into the plan: the retry is a new execution, so it
    # names its own id (ids are 12 random hex digits: replacing them is exact).
    data = json.loads(json.dumps(plan.to_json()).replace(execution_id, new_id))
    with session_scope() as s:
        s.add(
            Execution(
                id=new_id,
                pipeline=plan.identifier,
                pipeline_name=plan.name,
                plan=data,
                inputs={**inputs, "retry_of": execution_id},
                created_by=user or get_settings().user or "",
            )
        )
        s.flush()
        for run, redo, skip in stages:
            s.add(
                StageRun(
                    execution_id=new_id,
                    stage_index=run.stage_index,
                    identifier=run.identifier,
                    name=run.name,
                    hosts=redo,
                    status=Status.SKIPPED if skip else Status.PENDING,
                )
            )
            for j, step in enumerate(plan.stages[run.stage_index].steps):
                s.add(
                    StepRun(
                        execution_id=new_id,
                        stage_index=run.stage_index,
                        step_index=j,
                        identifier=step.identifier,
                        name=step.name,
                    )
                )
    if publish:
        advance(new_id)
    return new_id


def rollback_execution(execution_id: str, *, user: str = "", publish: bool = True) -> str:
    """Roll a successful execution back on every host it changed: a new execution (the
    ledger keeps both) whose stages run their rollback phases, latest stage first."""
    plan = rollback_plan(execution_id)  # LookupError when there is nothing to roll back
    new_id = new_execution_id()
    with session_scope() as s:
        ex = s.get(Execution, execution_id)
        assert ex is not None
        stored = plan_of(ex)
        order = [
            i
            for i, st in enumerate(stored.stages)
            if st.identifier in {x["stage"] for x in plan["stages"]}
        ][::-1]
        runs = {
            r.stage_index: r
            for r in s.exec(select(StageRun).where(StageRun.execution_id == execution_id)).all()
        }
        s.add(
            Execution(
                id=new_id,
                pipeline=ex.pipeline,
                pipeline_name=ex.pipeline_name,
                plan=ex.plan,
                inputs={**ex.inputs, "rollback_of": execution_id},
                created_by=user or get_settings().user or "",
                status=Status.ROLLING_BACK,
                started_at=utcnow(),
                current_stage=len(stored.stages),
                rollback={
                    "cause": "requested",
                    "scope": "PipelineRollback",
                    "stages": order,
                    "of": execution_id,
                    "error": f"rollback of {execution_id}",
                },
            )
        )
        s.flush()
        for i, st in enumerate(stored.stages):
            old = runs[i]
            s.add(
                StageRun(
                    execution_id=new_id,
                    stage_index=i,
                    identifier=old.identifier,
                    name=old.name,
                    hosts=old.hosts,
                    phases=old.phases,
                    status=Status.PENDING if i in order else Status.SKIPPED,
                )
            )
            for j, step in enumerate(st.steps):
                s.add(
                    StepRun(
                        execution_id=new_id,
                        stage_index=i,
                        step_index=j,
                        identifier=step.identifier,
                        name=step.name,
                    )
                )
    if publish:
        advance(new_id)
    return new_id
