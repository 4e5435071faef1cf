"""Outputs of earlier stages' steps, as expressions of later stages:
``<+pipeline.stages.S.spec.execution.steps.ID.output.X>`` (Harness's form for a Terraform
step's outputs) and ``...output.outputVariables.X`` (its form for a script's output
variables).

They are read from the ledger when the stage that names them starts (a static
infrastructure's hosts: app.coordinator.discovery) or when its step runs (on the worker).
An expression that names an output no earlier stage recorded is an error there, never text
passed on.
"""

from __future__ import annotations

import json
from typing import Any

from sqlmodel import Session, col, select

from app.db import retrying, session_scope
from app.definitions.expressions import EXPR_RE, Context, render
from app.definitions.plan import Plan
from app.models import Execution, HostStepRun, StageRun, Status

PREFIX = "pipeline.stages."


def names_outputs(data: Any) -> bool:
    """Does ``data`` (text, or a tree of it) name an earlier stage's output?"""
    return f"<+{PREFIX}" in (data if isinstance(data, str) else json.dumps(data))


def stage_outputs(
    execution_id: str, before_stage: int, *, s: Session | None = None
) -> dict[str, str]:
    """Every output recorded by a succeeded step of the stages before ``before_stage``, by
    its expression (without ``<+`` and ``>``). ``s``: the caller's session (the coordinator
    holds the ledger's write lock: a second connection would wait for it)."""

    chained: dict[int, dict[str, Any]] = {}  # a Pipeline stage's outputs (app.coordinator.chaining)

    def read(s: Session) -> tuple[dict[str, Any] | None, list[HostStepRun]]:
        ex = s.get(Execution, execution_id)
        chain = lineage_in(s, execution_id)  # a retry reads what the stages it skipped output
        for ident in reversed(chain):
            for run in s.exec(
                select(StageRun).where(
                    StageRun.execution_id == ident,
                    StageRun.stage_index < before_stage,
                    col(StageRun.outputs).is_not(None),
                )
            ).all():
                chained[run.stage_index] = dict(run.outputs or {})
        rows: list[HostStepRun] = []
        for ident in reversed(chain):  # the oldest first: a later execution's value wins
            rows.extend(
                s.exec(
                    select(HostStepRun)
                    .where(
                        HostStepRun.execution_id == ident,
                        HostStepRun.stage_index < before_stage,
                        HostStepRun.kind == "deploy",
                        col(HostStepRun.status).in_([Status.SUCCEEDED, Status.IGNORED]),
                    )
                    .order_by(col(HostStepRun.attempt), col(HostStepRun.id))
                ).all()
            )
        return (ex.plan if ex is not None else None), rows

    def fresh() -> tuple[dict[str, Any] | None, list[HostStepRun]]:
        with session_scope() as own:
            return read(own)

    if s is not None:
        plan_data, rows = read(s)
    else:
        plan_data, rows = retrying(fresh, what=f"reading earlier stages' outputs of {execution_id}")
    if plan_data is None:
        return {}
    plan = Plan.of(plan_data)
    out: dict[str, str] = {
        f"{PREFIX}{plan.stages[i].identifier}.output.{name}": str(value)
        for i, values in sorted(chained.items())
        for name, value in values.items()
    }
    for r in rows:
        stage = plan.stages[r.stage_index]
        if r.step_index >= len(stage.steps):
            continue
        sid = stage.steps[r.step_index].identifier
        head = f"{PREFIX}{stage.identifier}.spec.execution.steps.{sid}.output"
        for name, value in (r.outputs or {}).items():
            out[f"{head}.{name}"] = str(value)
            out[f"{head}.outputVariables.{name}"] = str(value)
    return out


def lineage_in(s: Session, execution_id: str) -> list[str]:
    """The execution, then the one it retries (``vmfarm retry``), and so on."""
    chain: list[str] = []
    ident: str | None = execution_id
    while ident and ident not in chain and len(chain) < 100:
        chain.append(ident)
        ex = s.get(Execution, ident)
        ident = str((ex.inputs or {}).get("retry_of") or "") if ex is not None else None
    return chain


def lineage(execution_id: str) -> list[str]:
    """``lineage_in`` with a session of its own."""

    def read() -> list[str]:
        with session_scope() as s:
            return lineage_in(s, execution_id)

    return retrying(read, what=f"reading the retries of {execution_id}")


def add_stage_outputs(ctx: Context, execution_id: str, before_stage: int) -> None:
    """Put the earlier stages' outputs into ``ctx`` (values from outside the files)."""
    for key, value in stage_outputs(execution_id, before_stage).items():
        ctx.set(key, value, external=True)


def render_outputs(data: Any, values: dict[str, str]) -> Any:
    """``data`` with every earlier-stage output rendered; an entry of a list that is one such
    expression whose value is a JSON list becomes that list's items (a Terraform output
    listing addresses gives one host each). ValueError names an output with no value."""
    ctx = Context()
    for k, v in values.items():
        ctx.set(k, v, external=True)

    def one(text: str) -> str:
        out = render(text, ctx)
        left = [e.strip() for e in EXPR_RE.findall(out) if e.strip().startswith(PREFIX)]
        if left:
            raise ValueError(
                f"<+{left[0]}> has no value: no earlier stage's step recorded that output"
            )
        return out

    def walk(v: Any) -> Any:
        if isinstance(v, str):
            return one(v) if names_outputs(v) else v
        if isinstance(v, dict):
            if isinstance(v.get("hostname"), str) and _whole(v["hostname"]):
                return v  # expanded by the list that holds it
            return {k: walk(x) for k, x in v.items()}
        if isinstance(v, list):
            items: list[Any] = []
            for x in v:
                items.extend(_expand(x, one, walk))
            return items
        return v

    return walk(data)


def _whole(text: str) -> bool:
    m = EXPR_RE.fullmatch(text.strip())
    return m is not None and m.group(1).strip().startswith(PREFIX)


def _expand(item: Any, one: Any, walk: Any) -> list[Any]:
    """One list entry, or several when it is (or its hostname is) one expression whose value
    is a JSON list."""
    text = item if isinstance(item, str) else None
    if isinstance(item, dict) and isinstance(item.get("hostname"), str):
        text = item["hostname"]
    if text is None or not _whole(text):
        return [walk(item)]
    value = one(text)
    try:
        parsed = json.loads(value)
    except ValueError:
        parsed = value
    values = parsed if isinstance(parsed, list) else [value]
    if isinstance(item, str):
        return [str(v) for v in values]
    return [
        {**walk({k: x for k, x in item.items() if k != "hostname"}), "hostname": str(v)}
        for v in values
    ]
