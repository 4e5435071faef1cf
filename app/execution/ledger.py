"""What a step reads and writes in the ledger: its claim (the idempotency key, before anything
touches the host), the immutable plan of its stage (read once per process), the execution's
status (abort), earlier outputs, versions, and its outcome.

Run one step's command units on one host and record the outcome in the ledger.

Order matters: the idempotency key is claimed in SQL before anything touches the host, so a
duplicate delivery returns the recorded result instead of running the commands again. Expected
failures (non-zero exit, unreachable host, timeout) are recorded and returned, never raised: the
chord's gate must run and decide from SQL.

The ledger may restart under a running step (design note: a short outage is survived): the
claim, the outcome and the reads are tried again on a lost connection (``app.db.retrying``),
log chunks wait in memory for the next flush, heartbeats resume at the next beat, and a unit
on the host is never interrupted because the ledger was away.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import Any

from sqlalchemy import update
from sqlmodel import col, select

from app.canvas import HostStepKey
from app.db import insert_stmt, retrying, session_scope
from app.definitions.expressions import Context
from app.definitions.plan import DeploymentStagePlan, StepPlan
from app.errors import HostError
from app.execution.logs import heartbeats
from app.models import Execution, HostStepRun, StageRun, Status, utcnow

log = logging.getLogger("vmfarm.tasks")


_plan_cache: dict[tuple[str, int], tuple[DeploymentStagePlan, dict[str, dict[str, Any]]]] = {}


_plan_lock = threading.Lock()


_plan_loads: dict[tuple[str, int], threading.Lock] = {}


def stage_data(
    execution_id: str, stage_index: int
) -> tuple[DeploymentStagePlan, dict[str, dict[str, Any]]]:
    """The resolved stage (typed) and its hosts by name; immutable once the stage runs, so
    cached.

    One thread reads it; the pool's other threads wait for its copy (32 threads decoding a
    10,000-host stage at once tripled a worker's memory)."""
    key = (execution_id, stage_index)
    with _plan_lock:
        hit = _plan_cache.get(key)
        loading = _plan_loads.setdefault(key, threading.Lock())
    if hit:
        return hit
    with loading:
        with _plan_lock:
            hit = _plan_cache.get(key)
        return hit or _read_stage_data(execution_id, stage_index)


def typed_stage(execution_id: str, stage_index: int) -> DeploymentStagePlan:
    """The resolved stage (decoded once per process)."""
    return stage_data(execution_id, stage_index)[0]


def _read_stage_data(
    execution_id: str, stage_index: int
) -> tuple[DeploymentStagePlan, dict[str, dict[str, Any]]]:
    def read() -> tuple[DeploymentStagePlan, dict[str, dict[str, Any]]]:
        with session_scope() as s:
            ex = s.get(Execution, execution_id)
            run = s.exec(
                select(StageRun).where(
                    StageRun.execution_id == execution_id, StageRun.stage_index == stage_index
                )
            ).one()
            if ex is None:
                raise LookupError(f"execution {execution_id} not found")
            stage = DeploymentStagePlan.model_validate(ex.plan["stages"][stage_index])
            return stage, {h["name"]: h for h in run.hosts}

    data = retrying(read, what=f"reading the plan of {execution_id}")
    with _plan_lock:
        if len(_plan_cache) > 256:
            _plan_cache.clear()
            _plan_loads.clear()
        _plan_cache[(execution_id, stage_index)] = data
    return data


def claim(
    key: HostStepKey, *, task_id: str | None, worker: str | None, queue: str | None
) -> tuple[int, HostStepRun | None]:
    """Take or insert the HostStepRun for ``key`` in one transaction; (id, None) if we own it,
    (id, row) if another delivery did (a duplicate: the unique idempotency key). Tried again
    across a ledger restart: a commit whose answer was lost is recognised as this call's."""
    now = utcnow()
    values = dict(
        idem_key=key.idem,
        execution_id=key.execution,
        stage_index=key.stage,
        phase=key.phase,
        step_index=key.step,
        step_id="",
        kind=key.kind,
        host=key.host,
        region=key.region,
        attempt=key.attempt,
        status=Status.RUNNING,
        outputs={},
        worker=worker,
        queue=queue,
        task_id=task_id,
        started_at=now,
        heartbeat_at=now,
    )
    owner = {
        "status": Status.RUNNING,
        "worker": worker,
        "queue": queue,
        "task_id": task_id,
        "started_at": now,
        "heartbeat_at": now,
    }

    def take() -> tuple[int, HostStepRun | None]:
        # One transaction (one commit per claim). A retried attempt (or a host handed over to
        # a retry's lane) was recorded PENDING by the retry engine before it was sent: the
        # first delivery takes it over; otherwise the row is inserted unless it exists.
        with session_scope() as s:
            taken = s.execute(
                update(HostStepRun)
                .where(
                    col(HostStepRun.idem_key) == key.idem, col(HostStepRun.status) == Status.PENDING
                )
                .values(**owner)
                .returning(col(HostStepRun.id))
            ).scalar()
            if taken is not None:
                return int(taken), None
            new_id = s.execute(
                insert_stmt(HostStepRun)
                .values(**values)
                .on_conflict_do_nothing(index_elements=["idem_key"])
                .returning(col(HostStepRun.id))
            ).scalar()
            if new_id is not None:
                return int(new_id), None
            row = s.exec(select(HostStepRun).where(HostStepRun.idem_key == key.idem)).one()
        # Ours if this call's own commit was lost: the same owner to the microsecond.
        if all(getattr(row, k) == owner[k] for k in ("status", "task_id", "worker", "started_at")):
            return int(row.id or 0), None
        return int(row.id or 0), row

    return retrying(take, what=f"claiming {key.idem}")


def summary(row: HostStepRun, *, duplicate: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {
        "status": row.status,
        "host": row.host,
        "step": row.step_index,
        "exit_code": row.exit_code,
    }
    if duplicate:
        out["duplicate"] = True
    if row.status == Status.SKIPPED:
        out["skipped"] = row.error
    return out


def failed_before(key: HostStepKey) -> bool:
    """Did a step before ``key``'s fail on this host in this phase (its latest attempt)?"""

    def read() -> list[tuple[int, int, str, str | None]]:
        with session_scope() as s:
            return list(
                s.exec(
                    select(
                        HostStepRun.step_index,
                        HostStepRun.attempt,
                        HostStepRun.status,
                        HostStepRun.error,
                    ).where(
                        HostStepRun.execution_id == key.execution,
                        HostStepRun.stage_index == key.stage,
                        HostStepRun.phase == key.phase,
                        HostStepRun.host == key.host,
                        HostStepRun.kind == key.kind,
                        HostStepRun.step_index < key.step,
                    )
                ).all()
            )

    latest: dict[int, tuple[int, str, str | None]] = {}
    for step, attempt, status, error in retrying(read, what=f"reading earlier steps of {key.idem}"):
        if step not in latest or attempt > latest[step][0]:
            latest[step] = (attempt, status, error)
    return any(not Status.passed(st, err) for _, st, err in latest.values())


# Asked before every step and unit of every host: one read per execution and process per
# STATUS_TTL seconds serves them all (an abort still stops each host at its next unit).
STATUS_TTL = 0.5


_status_cache: dict[str, tuple[float, str | None]] = {}


_status_lock = threading.Lock()


def _execution_status(execution_id: str) -> str | None:
    now = time.monotonic()
    with _status_lock:
        hit = _status_cache.get(execution_id)
    if hit is not None and now - hit[0] < STATUS_TTL:
        return hit[1]

    def read() -> str | None:
        with session_scope() as s:  # the status column only
            return s.exec(select(Execution.status).where(Execution.id == execution_id)).first()

    status = retrying(read, what=f"reading the status of {execution_id}")
    with _status_lock:
        if len(_status_cache) > 1024:
            _status_cache.clear()
        _status_cache[execution_id] = (time.monotonic(), status)
    return status


def aborted(execution_id: str, kind: str = "deploy") -> bool:
    """Must this host stop? Deploy steps stop when the execution is aborted or rolls back;
    rollback steps only when it is aborted again."""
    stop = {Status.ABORTED, Status.ROLLING_BACK} if kind == "deploy" else {Status.ABORTED}
    status = _execution_status(execution_id)
    return status is None or status in stop


def step_of(key: HostStepKey, stage: DeploymentStagePlan) -> tuple[DeploymentStagePlan, StepPlan]:
    """(the stage to render with, the step) for a key: a deploy step, a rollbackStep, or a step
    of the plan that deployed the version a built-in rollback returns to."""
    if key.kind == "deploy":
        return stage, stage.steps[key.step]
    if key.src is not None:
        source, _ = stage_data(*key.src)
        return source, source.steps[key.step]
    return stage, stage.rollback_steps[key.step]


def rollback_version(key: HostStepKey) -> str:
    """``<+rollbackArtifact.tag>``: the version this host returns to on rollback ('' if none).

    In a rollback step it is the version of the stage's rollback plan; in a deploy step, the
    version the host ran before this execution."""
    return retrying(lambda: _rollback_version(key), what=f"reading versions for {key.idem}")


def _rollback_version(key: HostStepKey) -> str:
    from app.models import Instance

    with session_scope() as s:
        run = s.exec(
            select(StageRun).where(
                StageRun.execution_id == key.execution, StageRun.stage_index == key.stage
            )
        ).one()
        if key.kind != "deploy":
            target = ((run.rollback or {}).get("hosts") or {}).get(key.host) or {}
            return str(target.get("version") or "")
        stage = typed_stage(key.execution, key.stage)
        for inst in s.exec(
            select(Instance).where(
                Instance.host == key.host,
                Instance.service == stage.service.identifier,
                Instance.environment == stage.environment.identifier,
            )
        ).all():
            if inst.execution_id == key.execution:
                return inst.previous_version or ""
            return inst.version or ""
    return ""


def earlier_outputs(key: HostStepKey, ctx: Context, stage: DeploymentStagePlan) -> None:
    """``<+steps.ID.output.outputVariables.X>`` from this host's earlier steps in this phase."""

    def read() -> list[HostStepRun]:
        with session_scope() as s:
            return list(
                s.exec(
                    select(HostStepRun).where(
                        HostStepRun.execution_id == key.execution,
                        HostStepRun.stage_index == key.stage,
                        HostStepRun.phase == key.phase,
                        HostStepRun.host == key.host,
                        HostStepRun.kind == key.kind,
                        HostStepRun.step_index < key.step,
                    )
                ).all()
            )

    rows = retrying(read, what=f"reading earlier outputs for {key.idem}")
    for r in rows:
        sid = step_of(dataclasses.replace(key, step=r.step_index), stage)[1].identifier
        for name, value in (r.outputs or {}).items():
            ctx.set(f"steps.{sid}.output.outputVariables.{name}", value, external=True)
            ctx.set(f"steps.{sid}.output.{name}", value, external=True)  # Terraform's outputs


def stage_outputs(key: HostStepKey, ctx: Context, written: str) -> None:
    """``<+pipeline.stages.S.spec.execution.steps.T.output.outputVariables.X>`` (and its
    ``.list``) named in ``written``, from earlier stages' rows (app.definitions.stage_outputs):
    this host's own value, or the delegate's when the step ran on a delegate; a host with
    neither fails (HostError) naming the hosts that have one."""
    import json

    from app.definitions.expressions import expressions_in
    from app.definitions.stage_outputs import STAGE_OUTPUT_RE

    wanted = [
        (e, found)
        for e in dict.fromkeys(expressions_in(written))
        if (found := STAGE_OUTPUT_RE.fullmatch(e)) is not None
    ]
    if not wanted:
        return

    Found = tuple[list[str], dict[str, dict[str, Any]], bool]

    def read() -> dict[tuple[str, str], Found]:
        out: dict[tuple[str, str], Found] = {}
        with session_scope() as s:
            ex = s.get(Execution, key.execution)
            if ex is None:
                raise LookupError(f"execution {key.execution} not found")
            stages = ex.plan["stages"]
            for _, found in wanted:
                sid, tid = found.group(1), found.group(2)
                if (sid, tid) in out:
                    continue
                index = next(
                    (i for i, st in enumerate(stages[: key.stage]) if st["identifier"] == sid),
                    None,
                )
                step = (
                    None
                    if index is None
                    else next(
                        (
                            j
                            for j, st in enumerate(stages[index]["steps"])
                            if st["identifier"] == tid
                        ),
                        None,
                    )
                )
                if index is None or step is None:  # e.g. a looping stage: S_<iteration>
                    raise HostError(
                        f"no step {tid} in an earlier stage {sid} of this execution (the "
                        f"earlier stages: {', '.join(st['identifier'] for st in stages[: key.stage])})",
                        host=key.host,
                    )
                run = s.exec(
                    select(StageRun).where(
                        StageRun.execution_id == key.execution, StageRun.stage_index == index
                    )
                ).one()
                rows: dict[str, dict[str, Any]] = {}
                for r in s.exec(
                    select(HostStepRun)
                    .where(
                        HostStepRun.execution_id == key.execution,
                        HostStepRun.stage_index == index,
                        HostStepRun.step_index == step,
                        HostStepRun.kind == "deploy",
                        HostStepRun.status == Status.SUCCEEDED,
                    )
                    .order_by(col(HostStepRun.attempt))
                ).all():
                    rows[r.host] = dict(r.outputs or {})  # the latest attempt wins
                spec = stages[index]["steps"][step].get("spec") or {}
                on_delegate = stages[index].get("type") == "Custom" or bool(spec.get("onDelegate"))
                out[(sid, tid)] = ([h["name"] for h in run.hosts], rows, on_delegate)
        return out

    found_rows = retrying(read, what=f"reading earlier stages' outputs for {key.idem}")
    for expr, found in wanted:
        order, rows, on_delegate = found_rows[(found.group(1), found.group(2))]
        name = found.group(3)
        values = {h: rows[h][name] for h in order if h in rows and name in rows[h]}
        if found.group(4):
            ctx.set(expr, json.dumps(list(values.values())), external=True)
        elif key.host in rows and key.host in values:
            ctx.set(expr, values[key.host], external=True)
        elif on_delegate and len(values) == 1:  # the delegate's one value, for every host
            ctx.set(expr, next(iter(values.values())), external=True)
        else:
            have = ", ".join(list(values)[:5]) + (" ..." if len(values) > 5 else "")
            raise HostError(
                f"<+{expr}> has no value for host {key.host}: step {found.group(2)} of stage "
                f"{found.group(1)} recorded {name} on {len(values)} host(s)"
                + (f" ({have}), not on this one" if values else "")
                + f"; <+{expr}.list> gathers them all",
                host=key.host,
            )


# How long a step's outcome waits for an unreachable ledger: the units ran, and an outcome
# that is not recorded ends as "worker lost" (which a Retry strategy would run again).
FINISH_RETRY_SECONDS = 120.0


def finish_step(run_id: int, key: HostStepKey, fields: dict[str, Any]) -> dict[str, Any]:
    """Record the attempt's outcome (its heartbeat goes on until it is written).

    Only a RUNNING row is written: if the reconciler has meanwhile called this attempt lost
    (its heartbeat went stale while the ledger was away) its verdict stands, and is returned,
    since the failure strategy may already have sent a new attempt.
    """
    fields.setdefault("status", Status.FAILED)
    fields["finished_at"] = utcnow()
    fields["heartbeat_at"] = fields["finished_at"]

    def write() -> tuple[str, str | None] | None:
        with session_scope() as s:
            done = s.execute(
                update(HostStepRun)
                .where(col(HostStepRun.id) == run_id, col(HostStepRun.status) == Status.RUNNING)
                .values(**fields)
            )
            if getattr(done, "rowcount", 1):
                return None
            status, error_class, finished_at = s.exec(
                select(HostStepRun.status, HostStepRun.error_class, HostStepRun.finished_at).where(
                    HostStepRun.id == run_id
                )
            ).one()
            if finished_at == fields["finished_at"]:
                return None  # this call's own write: its commit's answer was lost
            return status, error_class

    try:
        decided = retrying(
            write, what=f"recording the outcome of {key.idem}", within=FINISH_RETRY_SECONDS
        )
    finally:
        heartbeats.discard(run_id)
    status, error_class = fields["status"], fields.get("error_class")
    if decided is not None:
        log.warning(
            "%s ended %s on the host, but the ledger had already recorded it as %s "
            "(%s): that stands",
            key.idem,
            status,
            decided[0],
            decided[1],
        )
        status, error_class = decided
    return {
        "status": status,
        "host": key.host,
        "step": key.step,
        "exit_code": fields.get("exit_code"),
        "error_class": error_class,
        "attempt": key.attempt,
    }
