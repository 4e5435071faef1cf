"""Read an execution back from the ledger as plain data (for ``status``, ``--watch``, JSON)."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from sqlmodel import col, select

from app.db import session_scope
from app.definitions.plan import DeploymentStagePlan, Plan
from app.models import Execution, HostStepRun, Instance, LogChunk, PhaseRun, StageRun, Status


def _t(d: datetime | None) -> str | None:
    return d.isoformat(timespec="milliseconds") + "Z" if d else None


def _gate_verdict(verdict: dict[str, Any] | None) -> dict[str, Any] | None:
    """A phase's verdict without ``resent`` (the hosts whose message the reconciler sent again,
    app.coordinator.resend: shown apart); None while the gate has not written one."""
    if not verdict:
        return verdict
    return {k: v for k, v in verdict.items() if k != "resent"} or None


def _epoch(value: Any) -> str | None:
    if value is None:
        return None
    moment = datetime.fromtimestamp(float(value), tz=UTC).replace(tzinfo=None)
    return moment.isoformat(timespec="seconds") + "Z"


def watch_view(rec: PhaseRun | None, *, planned: bool) -> dict[str, Any] | None:
    """The stage's watch after deployment (app.coordinator.watch) as people read it: its
    state, window, last numbers per trigger and why it breached; None when the stage has no
    watch. ``planned``: the stage has one that has not started yet."""
    if rec is None:
        return {"status": "PENDING", "state": "not started"} if planned else None
    v = rec.verdict or {}
    return {
        "status": rec.status,
        "state": v.get("state"),
        "started_at": _epoch(v.get("started")),
        "ends_at": _epoch(v.get("ends")),
        "window": v.get("window"),
        "interval": v.get("interval"),
        "checks": v.get("checks", 0),
        "checked_at": _epoch(v.get("checked_at")),
        "prometheus": v.get("prometheus"),
        "hosts": rec.hosts,
        "triggers": v.get("triggers") or [],
        "last": v.get("last"),
        "reasons": v.get("reasons") or [],
        "passed": v.get("passed"),
    }


def execution_report(execution_id: str) -> dict[str, Any] | None:
    """Everything a person or a script wants to know about one execution."""
    with session_scope() as s:
        ex = s.get(Execution, execution_id)
        if ex is None:
            return None
        stages = s.exec(
            select(StageRun)
            .where(StageRun.execution_id == execution_id)
            .order_by(col(StageRun.stage_index))
        ).all()
        phases = s.exec(
            select(PhaseRun)
            .where(PhaseRun.execution_id == execution_id)
            .order_by(col(PhaseRun.stage_index), col(PhaseRun.phase))
        ).all()
        rows = s.exec(
            select(HostStepRun)
            .where(HostStepRun.execution_id == execution_id)
            .order_by(col(HostStepRun.id))
        ).all()
        # Pipeline chaining: each Pipeline stage's child, and the parent of a child.
        children = {
            c.parent_stage: c
            for c in s.exec(
                select(Execution)
                .where(Execution.parent_execution_id == execution_id)
                .order_by(col(Execution.created_at))
            ).all()
        }
        parent_stage = (
            s.exec(
                select(StageRun.identifier).where(
                    StageRun.execution_id == ex.parent_execution_id,
                    StageRun.stage_index == ex.parent_stage,
                )
            ).first()
            if ex.parent_execution_id
            else None
        )
        names = {h["name"] for st in stages for h in st.hosts}
        instances = (
            s.exec(select(Instance).where(col(Instance.host).in_(names))).all() if names else []
        )
    versions = {(i.service, i.environment, i.infrastructure, i.host): i for i in instances}
    intervention = next(
        (p.verdict for p in phases if p.kind.startswith("mi-") and p.status == Status.RUNNING), None
    )
    # Every lookup below is by key: the report of a 10,000-host stage is O(rows + hosts).
    rows_of: dict[int, list[HostStepRun]] = {}
    for r in rows:
        rows_of.setdefault(r.stage_index, []).append(r)
    out_stages = []
    typed = Plan.of(ex.plan)
    requested = (ex.rollback or {}).get("cause") == "requested"
    for st in stages:
        plan = typed.stages[st.stage_index]
        deploying = plan if isinstance(plan, DeploymentStagePlan) else None
        # A `vmfarm rollback` execution ran rollback steps only: they are its hosts' steps.
        shown = "rollback" if requested else "deploy"
        latest: dict[tuple[str, int], HostStepRun] = {}
        undo: dict[tuple[str, int], HostStepRun] = {}
        tries: dict[tuple[str, int], list[HostStepRun]] = {}  # every attempt of the shown kind
        for r in rows_of.get(st.stage_index, []):
            k = (r.host, r.step_index)
            if r.kind == shown:
                tries.setdefault(k, []).append(r)
            into = latest if r.kind == "deploy" else undo
            if k not in into or r.attempt >= into[k].attempt:
                into[k] = r
        if requested:
            undo_ids = {i: r.step_id for (_, i), r in sorted(undo.items())}
            indexes = sorted(undo_ids)
            step_ids = [undo_ids[i] for i in indexes]
        else:
            step_ids = [x.identifier for x in plan.steps]
            indexes = list(range(len(step_ids)))
        undo_of: dict[str, list[HostStepRun]] = {}
        for (h_name, _), r in undo.items():
            undo_of.setdefault(h_name, []).append(r)
        rb_plan = st.rollback or {}
        rb_skipped = {
            h: why
            for ph in rb_plan.get("phases", [])
            for h, why in (ph.get("skipped") or {}).items()
        }
        # Hosts whose deploy passed but whose verification gate failed them.
        unverified = {
            h
            for p in phases
            if p.stage_index == st.stage_index and p.kind == "verify"
            for h in (p.verdict or {}).get("failed", [])
        }
        hosts = []
        for h in st.hosts:
            steps = [
                _step(
                    sid,
                    (undo if requested else latest).get((h["name"], i)),
                    tries.get((h["name"], i), []),
                )
                for i, sid in zip(indexes, step_ids, strict=True)
            ]
            inst = versions.get(
                (
                    str(deploying.service.identifier if deploying else None),
                    str(deploying.environment.identifier if deploying else None),
                    h["infrastructure"],
                    h["name"],
                )
            )
            rollback = _host_rollback(h["name"], undo_of.get(h["name"], []), rb_plan, rb_skipped)
            status = _host_status(steps)
            if requested:  # what the rollback did on the host (nothing: SKIPPED)
                status = rollback["status"] if rollback else Status.SKIPPED
                if status == Status.PENDING and st.status in Status.TERMINAL:
                    status = Status.SKIPPED
            elif h["name"] in unverified:
                status = Status.FAILED
            elif status == Status.PENDING and st.status in Status.TERMINAL:
                status = Status.SKIPPED  # its phase never started
            hosts.append(
                {
                    "host": h["name"],
                    "region": h["region"],
                    "infrastructure": h["infrastructure"],
                    "status": status,
                    "verification": "FAILED" if h["name"] in unverified else None,
                    "version": inst.version if inst else None,
                    "previous_version": inst.previous_version if inst else None,
                    "steps": steps,
                    "rollback": rollback,
                }
            )
        out_stages.append(
            {
                "index": st.stage_index,
                "identifier": st.identifier,
                "name": st.name,
                "status": st.status,
                "error": st.error,
                "type": plan.type,
                # A Pipeline stage's child execution (the latest it started).
                "child_execution": (
                    {
                        "id": children[st.stage_index].id,
                        "pipeline": children[st.stage_index].pipeline,
                        "status": children[st.stage_index].status,
                    }
                    if st.stage_index in children
                    else None
                ),
                "outputs": st.outputs,
                # The iteration of a looping strategy the stage is (repeat 2/3: eu-west-1).
                "loop": deploying.loop if deploying else None,
                "service": deploying.service.identifier if deploying else None,
                "environment": deploying.environment.identifier if deploying else None,
                "version": deploying.artifact.tag if deploying and deploying.artifact else None,
                "steps": step_ids,
                "discovery": _discovery(
                    next(
                        (
                            p
                            for p in phases
                            if p.stage_index == st.stage_index and p.kind == "discover"
                        ),
                        None,
                    )
                ),
                "phases": [
                    {
                        "phase": p.phase,
                        "kind": p.kind,
                        "status": p.status,
                        "hosts": p.hosts,
                        "verdict": _gate_verdict(p.verdict),
                        "resent": (p.verdict or {}).get("resent") or {},
                        "dispatched_at": _t(p.dispatched_at),
                        "gate_at": _t(p.gate_at),
                    }
                    for p in phases
                    if p.stage_index == st.stage_index
                ],
                "watch": watch_view(
                    next(
                        (
                            p
                            for p in phases
                            if p.stage_index == st.stage_index and p.kind == "watch"
                        ),
                        None,
                    ),
                    planned=getattr(plan, "watch", None) is not None,
                ),
                "hosts": hosts,
                "strategy": plan.strategy.type,
                "plan": st.phases,
                "rollback_plan": st.rollback,
                "started_at": _t(st.started_at),
                "finished_at": _t(st.finished_at),
            }
        )
    return {
        "id": ex.id,
        "pipeline": ex.pipeline,
        "pipeline_name": ex.pipeline_name,
        "status": ex.status,
        "error": ex.error,
        "created_by": ex.created_by,
        "inputs": ex.inputs,
        "created_at": _t(ex.created_at),
        "started_at": _t(ex.started_at),
        "finished_at": _t(ex.finished_at),
        "rollback": ex.rollback,
        "parent": (
            {"id": ex.parent_execution_id, "stage": parent_stage}
            if ex.parent_execution_id
            else None
        ),
        "intervention": intervention,
        "stages": out_stages,
    }


def _step(sid: str, row: HostStepRun | None, tries: list[HostStepRun]) -> dict[str, Any]:
    """One host's step: its latest attempt (``row``; None: not started) and every attempt."""
    return {
        "step": row.step_id if row and row.step_id else sid,
        "status": row.status if row else Status.PENDING,
        "exit_code": row.exit_code if row else None,
        "failed_unit": row.failed_unit if row else None,
        "error_class": row.error_class if row else None,
        "error": row.error if row else None,
        "stderr_tail": row.stderr_tail if row and row.status == Status.FAILED else None,
        "outputs": row.outputs if row else {},
        "worker": row.worker if row else None,
        "queue": row.queue if row else None,
        "attempt": row.attempt if row else None,
        "started_at": _t(row.started_at) if row else None,
        "finished_at": _t(row.finished_at) if row else None,
        "attempts": [_attempt(a) for a in sorted(tries, key=lambda a: a.attempt)],
    }


def _attempt(r: HostStepRun) -> dict[str, Any]:
    """One attempt of a host's step, as ``status`` shows it among the others."""
    return {
        "attempt": r.attempt,
        "status": r.status,
        "exit_code": r.exit_code,
        "failed_unit": r.failed_unit,
        "error_class": r.error_class,
        "error": r.error,
        "worker": r.worker,
        "queue": r.queue,
        "started_at": _t(r.started_at),
        "finished_at": _t(r.finished_at),
    }


def _discovery(rec: PhaseRun | None) -> dict[str, Any] | None:
    """How the region workers listed a stage's hosts (None: the hosts were static): status,
    how many hosts, which workers on which queues, the infrastructures asked, the error."""
    if rec is None:
        return None
    v = rec.verdict or {}
    return {
        "status": rec.status,
        "hosts": v.get("hosts", len(rec.hosts)),
        "workers": list(v.get("workers") or []),
        "infrastructures": list(v.get("infrastructures") or []),
        "error": v.get("error"),
    }


def _host_rollback(
    host: str, undo: list[HostStepRun], plan: dict[str, Any], skipped: dict[str, str]
) -> dict[str, Any] | None:
    """One host's rollback (``undo``: its latest rollback row per step): status, the version
    it returns to, the failing step if any."""
    target = (plan.get("hosts") or {}).get(host)
    if target is None:
        return None
    if host in skipped:
        return {"status": Status.SKIPPED, "to": target.get("version"), "reason": skipped[host]}
    mine = sorted(undo, key=lambda r: r.step_index)
    failed = next((r for r in mine if r.status == Status.FAILED), None)
    if failed is not None:
        status = Status.ROLLBACK_FAILED
    elif len(mine) == int(target.get("steps", 0)) and all(
        Status.passed(r.status, r.error) for r in mine
    ):
        status = Status.ROLLED_BACK
    else:
        status = Status.RUNNING if mine else Status.PENDING
    return {
        "status": status,
        "to": target.get("version"),
        "step": failed.step_id if failed else None,
        "error": failed.error if failed else None,
        "stderr_tail": failed.stderr_tail if failed else None,
    }


def _host_status(steps: list[dict[str, Any]]) -> str:
    states = [s["status"] for s in steps]
    if any(x == Status.ABORTED for x in states):
        return Status.ABORTED
    if any(x == Status.FAILED for x in states):
        return Status.FAILED
    if any(x == Status.RUNNING for x in states):
        return Status.RUNNING
    if any(x == Status.WAITING for x in states):  # stopped at a Wait or approval step
        return Status.WAITING
    if states and all(Status.passed(x["status"], x.get("error")) for x in steps):
        return Status.SUCCEEDED
    if any(x == Status.SKIPPED for x in states) and not any(x == Status.PENDING for x in states):
        return Status.SKIPPED
    if any(x == Status.SUCCEEDED for x in states):
        return Status.RUNNING
    return Status.PENDING


def execution_logs(
    execution_id: str, *, host: str | None = None, step: str | None = None
) -> list[dict[str, Any]]:
    """Log chunks in order (host, step, sequence); LookupError when there is no such
    execution (an execution that logged nothing yet is an empty list)."""
    with session_scope() as s:
        if s.get(Execution, execution_id) is None:
            raise LookupError(f"no execution '{execution_id}'")
        q = select(HostStepRun).where(HostStepRun.execution_id == execution_id)
        if host:
            q = q.where(HostStepRun.host == host)
        if step:
            q = q.where(HostStepRun.step_id == step)
        runs = s.exec(
            q.order_by(
                col(HostStepRun.stage_index),
                col(HostStepRun.host),
                col(HostStepRun.step_index),
                col(HostStepRun.attempt),
            )
        ).all()
        ids = [r.id for r in runs]
        chunks = (
            s.exec(
                select(LogChunk)
                .where(col(LogChunk.host_step_run_id).in_(ids))
                .order_by(col(LogChunk.host_step_run_id), col(LogChunk.seq))
            ).all()
            if ids
            else []
        )
    by_run: dict[int, list[LogChunk]] = {}
    for c in chunks:
        by_run.setdefault(c.host_step_run_id, []).append(c)
    out = []
    for r in runs:
        for c in by_run.get(r.id or 0, []):
            out.append(
                {
                    "host": r.host,
                    "stage": r.stage_index,
                    "step": r.step_id,
                    "kind": r.kind,
                    "attempt": r.attempt,
                    "unit": c.unit,
                    "stream": c.stream,
                    "text": c.text,
                }
            )
    return out


def execution_progress(execution_id: str) -> dict[str, Any] | None:
    """Where an execution stands, cheaply (two small reads, whatever its number of hosts):
    its status, current stage and each stage's status (and the watch after deployment that
    holds it open, if one runs); None when there is no such execution. What a follower (the
    server's event stream) polls."""
    with session_scope() as s:
        ex = s.get(Execution, execution_id)
        if ex is None:
            return None
        stages = s.exec(
            select(StageRun)
            .where(StageRun.execution_id == execution_id)
            .order_by(col(StageRun.stage_index))
        ).all()
        watch = (
            s.exec(
                select(PhaseRun).where(
                    PhaseRun.execution_id == execution_id,
                    PhaseRun.kind == "watch",
                    PhaseRun.status == Status.RUNNING,
                )
            ).first()
            if ex.status == Status.RUNNING
            else None
        )
        return {
            "id": ex.id,
            "pipeline": ex.pipeline,
            "status": ex.status,
            "current_stage": ex.current_stage,
            "error": ex.error,
            "stages": [{"identifier": st.identifier, "status": st.status} for st in stages],
            # A stage's watch after deployment holds the execution open until this time.
            **(
                {
                    "watching": {
                        "stage": stages[watch.stage_index].identifier
                        if watch.stage_index < len(stages)
                        else str(watch.stage_index),
                        "ends_at": _epoch((watch.verdict or {}).get("ends")),
                    }
                }
                if watch is not None
                else {}
            ),
        }


def execution_statuses(values: Iterable[str]) -> list[str]:
    """``values`` as execution statuses (any case); ValueError naming an unknown one and the
    statuses there are."""
    out = []
    for value in values:
        status = value.strip().upper()
        if status not in Status.EXECUTION:
            raise ValueError(
                f"unknown execution status {value!r} (one of: {', '.join(Status.EXECUTION)})"
            )
        out.append(status)
    return out


def recent_executions(limit: int = 20, *, statuses: list[str] | None = None) -> list[Execution]:
    """The newest executions, of these statuses only when given (ValueError for a status
    an execution never has: a typo must not look like "no such executions")."""
    wanted = execution_statuses(statuses or [])
    with session_scope() as s:
        q = select(Execution)
        if wanted:
            q = q.where(col(Execution.status).in_(wanted))
        return list(s.exec(q.order_by(col(Execution.created_at).desc()).limit(limit)).all())
