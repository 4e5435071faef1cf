"""The console's pages and the actions their forms post.

::

    GET  /console/executions                          pipeline:view   filters: pipeline,
                                                                      environment, status, user, since
    GET  /console/executions/{id}                     pipeline:view   (+ environment:view per stage)
    GET  /console/executions/{id}/hosts/{host}        pipeline:view   steps, attempts, log
    GET  /console/executions/{id}/hosts/{host}/log    pipeline:view   the log, live (server-sent events)
    GET  /console/executions/{id}/confirm/{action}    the action's   the confirmation form
    POST /console/executions/{id}/approve|reject      pipeline:approve
    POST /console/executions/{id}/abort               pipeline:abort (+ pipeline:rollback with rollback)
    POST /console/executions/{id}/retry               pipeline:execute
    POST /console/executions/{id}/rollback            pipeline:rollback
    POST /console/executions/{id}/intervene           pipeline:intervene
    GET  /console/run                                 pipeline:execute  the run form
    POST /console/run                                 pipeline:execute  (+ environment:deploy per stage)
    GET  /console/fleet                               fleet:view
    GET  /console/audit                               audit:view

Every read renders without JavaScript; ``?partial=1`` returns the part a page's script
replaces while the execution runs. Every action goes through ``app.operations`` as the signed-in
subject (audited there), after a confirmation page.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, HTTPException, Request, status
from fastapi.responses import (
    FileResponse,
    HTMLResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from fastapi.templating import Jinja2Templates

from app.auth.identity import Identity
from app.rbac import RbacConfig
from app.server.console import data
from app.server.console.auth import (
    Posted,
    SignedIn,
    authorize,
    current_session,
    may,
    rules,
)
from app.server.console.session import Session
from app.status import Status

HERE = Path(__file__).parent
templates = Jinja2Templates(directory=str(HERE / "templates"))
router = APIRouter(prefix="/console", include_in_schema=False)

# The permission each action needs before app.operations checks the rest.
ACTIONS: dict[str, str] = {
    "approve": "pipeline:approve",
    "reject": "pipeline:approve",
    "abort": "pipeline:abort",
    "retry": "pipeline:execute",
    "rollback": "pipeline:rollback",
    "intervene": "pipeline:intervene",
}
# What a manual intervention may be answered with.
INTERVENTIONS = ("Ignore", "Retry", "MarkAsSuccess", "Abort", "StageRollback", "PipelineRollback")
STATIC = {"console.css": "text/css", "console.js": "text/javascript"}
LOG_POLL_SECONDS = 0.5


def _actor(who: Identity) -> Any:
    from app.server.routes.executions import actor_of

    return actor_of(who)


def _render(request: Request, session: Session | None, name: str, **context: Any) -> HTMLResponse:
    cfg = rules(request)
    who = session.identity if session else None
    shown = (*set(ACTIONS.values()), "fleet:view", "audit:view", "registry:view")
    can = {p: bool(who and may(cfg, who, p)) for p in shown}
    # the registry's link only where the server has a registry
    can["registry:view"] &= bool(getattr(request.app.state, "console_registry", False))
    return templates.TemplateResponse(
        request,
        name,
        {"session": session, "who": who, "can": can, "Status": Status, **context},
        headers={"Cache-Control": "no-store"},
    )


def _view(request: Request, session: Session, execution_id: str) -> dict[str, Any]:
    """The execution's report, masked, after checking the caller may read it."""
    from app import operations
    from app.report import execution_report
    from app.secrets import mask_obj
    from app.server.routes.executions import _http

    cfg = rules(request)
    authorize(cfg, session.identity, "pipeline:view")
    try:
        operations.view(_actor(session.identity), execution_id, rules=cfg)
    except Exception as exc:
        raise _http(exc) from None
    report = execution_report(execution_id)
    if report is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"no execution '{execution_id}'")
    masked: dict[str, Any] = mask_obj(report)
    return masked


@router.get("/static/{name}", name="console_static")
def static(name: str) -> Response:
    if name not in STATIC:
        raise HTTPException(status.HTTP_404_NOT_FOUND)
    return FileResponse(
        HERE / "static" / name,
        media_type=STATIC[name],
        headers={"Cache-Control": "public, max-age=300"},
    )


@router.get("", name="console_home")
@router.get("/", name="console_root")
def home() -> Response:
    return RedirectResponse("/console/executions", status.HTTP_303_SEE_OTHER)


@router.get("/signed-out", name="console_signed_out")
def signed_out(request: Request) -> HTMLResponse:
    return _render(request, current_session(request), "signed_out.html")


# --- executions -----------------------------------------------------------------------------


@router.get("/executions", name="console_executions")
def executions(
    request: Request,
    session: SignedIn,
    pipeline: str = "",
    environment: str = "",
    user: str = "",
    since: str = "",
    partial: bool = False,
) -> HTMLResponse:
    """Recent executions with filters; ``status`` may be given as ``status=``."""
    status_ = request.query_params.get("status", "")
    authorize(rules(request), session.identity, "pipeline:view")
    hours = {"1h": 1.0, "24h": 24.0, "7d": 24.0 * 7, "30d": 24.0 * 30}.get(since)
    try:
        rows = data.executions(
            pipeline=pipeline.strip(),
            environment=environment.strip(),
            statuses=[status_] if status_ else None,
            user=user.strip(),
            since_hours=hours,
        )
    except ValueError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=str(exc)) from None
    filters = {
        "pipeline": pipeline,
        "environment": environment,
        "status": status_,
        "user": user,
        "since": since,
    }
    return _render(
        request,
        session,
        "executions_rows.html" if partial else "executions.html",
        rows=rows,
        filters=filters,
        query=urlencode({k: v for k, v in filters.items() if v}),
        statuses=Status.EXECUTION,
    )


@router.get("/executions/{execution_id}", name="console_execution")
def execution(
    request: Request,
    session: SignedIn,
    execution_id: str,
    stage: int | None = None,
    q: str = "",
    page: int = 1,
    partial: bool = False,
) -> HTMLResponse:
    """One execution: stages, the chosen stage's phases and a page of its hosts."""
    status_ = request.query_params.get("status", "")
    report = _view(request, session, execution_id)
    stages = report["stages"]
    current = stage if stage is not None else _stage_to_show(report)
    chosen = next((s for s in stages if s["index"] == current), stages[0] if stages else None)
    summary = (
        data.summarise(chosen, status=status_, search=q.strip(), page=page) if chosen else None
    )
    from app.server.console.registry_pages import used_by

    return _render(
        request,
        session,
        "execution_live.html" if partial else "execution.html",
        registry=[] if partial else used_by(execution_id),
        ex=report,
        stage=chosen,
        summary=summary,
        approval=data.approval_of(report),
        filters={"status": status_, "q": q, "stage": chosen["index"] if chosen else None},
        # A live update follows the stage that is running unless the person chose one.
        pinned=stage,
        interventions=INTERVENTIONS,
        live=report["status"] not in Status.TERMINAL,
    )


def _stage_to_show(report: dict[str, Any]) -> int:
    """The stage a person wants first: the running or waiting one, else the last one with
    hosts, else the last that started."""
    stages = report["stages"]
    for s in stages:
        if s["status"] in (Status.RUNNING, Status.WAITING, Status.ROLLING_BACK):
            return int(s["index"])
    started = [s for s in stages if s["status"] != Status.PENDING]
    with_hosts = [s for s in started if s["hosts"]]
    pick = with_hosts or started or stages
    return int(pick[-1]["index"]) if pick else 0


@router.get("/executions/{execution_id}/hosts/{host}", name="console_host")
def host(request: Request, session: SignedIn, execution_id: str, host: str) -> HTMLResponse:
    """One host: each stage's steps with every attempt, and its log (followed live)."""
    report = _view(request, session, execution_id)
    found = data.host_of(report, host)
    if found is None:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND, detail=f"execution '{execution_id}' has no host '{host}'"
        )
    chunks, last = data.log_since(execution_id, host)
    return _render(
        request,
        session,
        "host.html",
        ex=report,
        host=found,
        chunks=chunks,
        last=last,
        live=report["status"] not in Status.TERMINAL,
    )


@router.get("/executions/{execution_id}/hosts/{host}/log", name="console_host_log")
def host_log(
    request: Request, session: SignedIn, execution_id: str, host: str, after: int = 0
) -> StreamingResponse:
    """The host's log as server-sent events (``log`` per chunk, masked) until the execution
    ends; ``after`` (or Last-Event-ID) resumes after a chunk id."""
    _view(request, session, execution_id)
    resume = request.headers.get("last-event-id", "")
    start = int(resume) if resume.isdigit() else after
    return StreamingResponse(
        _follow_log(request, execution_id, host, start),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


async def _follow_log(
    request: Request, execution_id: str, host: str, after: int
) -> AsyncIterator[str]:
    from anyio import to_thread

    from app.report import execution_progress

    quiet = 0.0
    while True:
        chunks, after = await to_thread.run_sync(data.log_since, execution_id, host, after)
        for c in chunks:
            yield f"id: {c['id']}\nevent: log\ndata: {json.dumps(c)}\n\n"
        progress = await to_thread.run_sync(execution_progress, execution_id)
        if not chunks and (progress is None or progress["status"] in Status.TERMINAL):
            state = progress["status"] if progress else "MISSING"
            yield f"event: end\ndata: {json.dumps({'status': state})}\n\n"
            return
        if await request.is_disconnected():
            return
        quiet = 0.0 if chunks else quiet + LOG_POLL_SECONDS
        if quiet >= 15.0:
            yield ": still following\n\n"
            quiet = 0.0
        await asyncio.sleep(LOG_POLL_SECONDS)


# --- actions --------------------------------------------------------------------------------


@router.get("/executions/{execution_id}/confirm/{action}", name="console_confirm")
def confirm(request: Request, session: SignedIn, execution_id: str, action: str) -> HTMLResponse:
    """The confirmation of an action: what it does, the approval and its votes, the form."""
    if action not in ACTIONS:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"no action '{action}'")
    report = _view(request, session, execution_id)
    authorize(rules(request), session.identity, ACTIONS[action])
    return _render(
        request,
        session,
        "confirm.html",
        ex=report,
        action=action,
        approval=data.approval_of(report),
        interventions=INTERVENTIONS,
    )


def _act(
    request: Request, sent: tuple[Session, dict[str, str]], execution_id: str, action: str
) -> Response:
    from app import operations
    from app.server.routes.executions import _http

    session, form = sent
    cfg: RbacConfig = rules(request)
    authorize(cfg, session.identity, ACTIONS[action])
    actor = _actor(session.identity)
    comment = form.get("comment", "")[:2000]
    target = execution_id
    try:
        if action == "approve":
            said = operations.approve(actor, execution_id, comment=comment, rules=cfg)
        elif action == "reject":
            said = operations.reject(actor, execution_id, comment=comment, rules=cfg)
        elif action == "abort":
            rollback = form.get("rollback") in ("1", "on", "true")
            if rollback:
                authorize(cfg, session.identity, "pipeline:rollback")
            said = operations.abort(actor, execution_id, rollback=rollback, rules=cfg)
        elif action == "retry":
            target = operations.retry(actor, execution_id, rules=cfg)
            said = f"retrying as {target}"
        elif action == "rollback":
            target = operations.rollback(actor, execution_id, rules=cfg)
            said = f"rolling back as {target}"
        else:
            chosen = form.get("action", "")
            if chosen not in INTERVENTIONS:
                raise HTTPException(
                    status.HTTP_422_UNPROCESSABLE_CONTENT,
                    detail=f"answer one of {', '.join(INTERVENTIONS)}",
                )
            said = operations.intervene(actor, execution_id, chosen, comment=comment, rules=cfg)
    except HTTPException:
        raise
    except Exception as exc:
        raise _http(exc) from None
    return RedirectResponse(
        f"/console/executions/{target}?{urlencode({'done': f'{action}: {said}'})}",
        status.HTTP_303_SEE_OTHER,
    )


@router.post("/executions/{execution_id}/approve", name="console_approve")
def approve(request: Request, sent: Posted, execution_id: str) -> Response:
    return _act(request, sent, execution_id, "approve")


@router.post("/executions/{execution_id}/reject", name="console_reject")
def reject(request: Request, sent: Posted, execution_id: str) -> Response:
    return _act(request, sent, execution_id, "reject")


@router.post("/executions/{execution_id}/abort", name="console_abort")
def abort(request: Request, sent: Posted, execution_id: str) -> Response:
    return _act(request, sent, execution_id, "abort")


@router.post("/executions/{execution_id}/retry", name="console_retry")
def retry(request: Request, sent: Posted, execution_id: str) -> Response:
    return _act(request, sent, execution_id, "retry")


@router.post("/executions/{execution_id}/rollback", name="console_rollback")
def rollback(request: Request, sent: Posted, execution_id: str) -> Response:
    return _act(request, sent, execution_id, "rollback")


@router.post("/executions/{execution_id}/intervene", name="console_intervene")
def intervene(request: Request, sent: Posted, execution_id: str) -> Response:
    return _act(request, sent, execution_id, "intervene")


# --- a new run -----------------------------------------------------------------------------


def _inputs(text: str) -> dict[str, str]:
    """``NAME=VALUE`` lines (blank lines and ``#`` comments skipped); 422 naming a bad line."""
    out: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, eq, value = line.partition("=")
        if not eq or not name.strip():
            raise HTTPException(
                status.HTTP_422_UNPROCESSABLE_CONTENT,
                detail=f"inputs line {n}: NAME=VALUE expected, got {line[:80]!r}",
            )
        out[name.strip()] = value.strip()
    return out


@router.get("/run", name="console_run_form")
def run_form(request: Request, session: SignedIn) -> HTMLResponse:
    """A form to run pipeline files (the YAML documents of the pipeline and what it uses)."""
    authorize(rules(request), session.identity, "pipeline:execute")
    return _render(request, session, "run.html", form={}, error=None)


@router.post("/run", name="console_run")
def run(request: Request, sent: Posted) -> Response:
    """Run the submitted files as the signed-in person: exactly what POST /api/v1/executions
    does with them (the same checks, the same refusals); the form again, with the error and
    the text kept, when they are refused."""
    from pydantic import ValidationError

    from app.server.routes.executions import Submission, submit

    session, form = sent
    cfg: RbacConfig = rules(request)
    authorize(cfg, session.identity, "pipeline:execute")
    text = form.get("files", "")
    try:
        try:
            body = Submission.model_validate(
                {
                    "files": {"pipeline.yaml": text} if text.strip() else {},
                    "pipeline": form.get("pipeline", "").strip() or None,
                    "set": _inputs(form.get("inputs", "")),
                }
            )
        except ValidationError:
            raise HTTPException(
                status.HTTP_422_UNPROCESSABLE_CONTENT,
                detail="paste the pipeline's YAML (or name a stored pipeline)",
            ) from None
        ex_id = submit(body, session.identity, cfg).id
    except HTTPException as exc:
        if exc.status_code not in (404, 409, 413, 422):
            raise
        page = _render(request, session, "run.html", form=form, error=exc.detail)
        page.status_code = exc.status_code
        return page
    return RedirectResponse(f"/console/executions/{ex_id}", status.HTTP_303_SEE_OTHER)


# --- fleet and audit ------------------------------------------------------------------------


@router.get("/fleet", name="console_fleet")
def fleet(request: Request, session: SignedIn) -> HTMLResponse:
    """Regions, queues and workers; the instances of each service per environment."""
    authorize(rules(request), session.identity, "fleet:view")
    return _render(request, session, "fleet.html", fleet=data.fleet())


@router.get("/audit", name="console_audit")
def audit(
    request: Request,
    session: SignedIn,
    user: str = "",
    action: str = "",
    execution: str = "",
    outcome: str = "",
) -> HTMLResponse:
    """The audit trail, newest first, with filters."""
    authorize(rules(request), session.identity, "audit:view")
    filters = {"user": user, "action": action, "execution": execution, "outcome": outcome}
    rows = data.audit(
        user=user.strip(),
        action=action.strip(),
        execution_id=execution.strip(),
        outcome=outcome.strip(),
    )
    return _render(request, session, "audit.html", rows=rows, filters=filters)


__all__ = ["ACTIONS", "router"]
