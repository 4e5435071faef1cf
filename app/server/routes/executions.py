"""Executions: submit pipeline files, read them back, decide on them, follow them.

::

    POST /api/v1/executions                      pipeline:execute   201 {"id": ...}
    GET  /api/v1/executions                      pipeline:view      as ``vmfarm executions -o json``
    GET  /api/v1/executions/{id}                 pipeline:view      as ``vmfarm status -o json``
                                                 (+ environment:view per stage, as every read
                                                 of one execution)
    GET  /api/v1/executions/{id}/logs            pipeline:view      as ``vmfarm logs -o json``
    GET  /api/v1/executions/{id}/events          pipeline:view      server-sent events until it ends
    POST /api/v1/executions/{id}/approve|reject  pipeline:approve
    POST /api/v1/executions/{id}/abort           pipeline:abort     (rollback: + pipeline:rollback)
    POST /api/v1/executions/{id}/retry           pipeline:execute   201 {"id": the new one}
    POST /api/v1/executions/{id}/rollback        pipeline:rollback  201 {"id": the new one}

Who acts is the verified token's subject (``Actor`` built from the ``Identity`` only: no header,
body field, variable or file names a user). ``app.operations`` then checks the rest of what
the action needs (environment permissions per stage, an approval's own rules) against the
server's RBAC configuration, and records the audit trail with the subject and token id.

Submitted files are pipeline files only in the sense that they run nowhere but on the hosts
they target: a file naming a path or a process on the server's or a worker's own machine
(``privateKeyFile``, ``knownHostsFile``, ``sandboxRoot``, a ``Local`` or ``Sandbox``
connection, a ``Local`` artifact or traffic switch) is refused with 422 and its place, rather
than read from the server's disk. SSH keys come from the secrets store
(``privateKeySecret``).
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request, status
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from app.auth.identity import Identity
from app.errors import SpecError
from app.operations import Actor
from app.rbac import RbacConfig
from app.server.deps import needs, rbac, require

router = APIRouter(prefix="/api/v1/executions", tags=["executions"])

FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\.ya?ml$")
MAX_FILES = 100
MAX_BYTES = 4 * 1024 * 1024
# How often the event stream reads the ledger, and how often it says it is still there.
POLL_SECONDS = 0.5
KEEPALIVE_SECONDS = 15.0

# Fields that name a file, a folder or a process on the machine that reads them.
_LOCAL_KEYS = ("privateKeyFile", "knownHostsFile", "sandboxRoot")
_LOCAL_TYPES = ("Local", "Sandbox")


class Submission(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    files: dict[str, str] = Field(
        default_factory=dict,
        description="Pipeline files: name (e.g. pipeline.yaml) -> YAML text; none to run a "
        "stored pipeline. They may not define an Environment, Infrastructure or Connector "
        "(those come from the registry)",
        examples=[{"pipeline.yaml": "apiVersion: v1\nkind: Pipeline\n..."}],
    )
    pipeline: str | None = Field(
        default=None,
        description="The pipeline to run: one of the files' when they define several, or "
        "a stored one (the registry's latest version) when they define none",
    )
    inputs: dict[str, str] = Field(
        default_factory=dict, alias="set", description="Runtime inputs (``--set NAME=VALUE``)"
    )


class Decision(BaseModel):
    model_config = ConfigDict(extra="forbid")

    comment: str = Field(default="", max_length=2000)


class AbortRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rollback: bool = Field(
        default=False, description="Then roll back the current stage (needs pipeline:rollback too)"
    )


class Submitted(BaseModel):
    id: str
    of: str | None = None


class Outcome(BaseModel):
    id: str
    outcome: str


def actor_of(who: Identity) -> Actor:
    """The Actor of a verified identity: its subject, groups, token id and (API token) roles;
    nothing else the request carries."""
    return Actor(
        name=who.subject,
        groups=tuple(sorted(who.groups)),
        token_id=who.token_id,
        roles=tuple(who.roles) if who.kind == "token" else None,
        kind=who.kind,
    )


def _http(exc: Exception, *, strip: str | None = None) -> HTTPException:
    """An error of ``app.operations`` as the HTTP answer it means."""
    from app.errors import ApprovalRefused, ConfigError, SpecError, SpecErrors
    from app.policy import PolicyViolation
    from app.rbac import PermissionRefused

    text = str(exc)
    if strip:
        text = text.replace(strip, "")
    if isinstance(exc, PermissionRefused | ApprovalRefused):
        return HTTPException(status.HTTP_403_FORBIDDEN, detail=text)
    if isinstance(exc, SpecError | SpecErrors | PolicyViolation):
        return HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=text)
    if isinstance(exc, LookupError):
        missing = text.startswith("no execution")
        return HTTPException(
            status.HTTP_404_NOT_FOUND if missing else status.HTTP_409_CONFLICT,
            detail=text.strip("'\""),
        )
    if isinstance(exc, ConfigError):
        return HTTPException(status.HTTP_409_CONFLICT, detail=text)
    raise exc


def local_references(name: str, text: str) -> list[str]:
    """Where a submitted file names something on the machine that reads it (see the module
    docstring), as ``name:line:col: message``; YAML errors are left to the loader."""
    import yaml

    found: list[str] = []

    def at(node: yaml.Node) -> str:
        return f"{name}:{node.start_mark.line + 1}:{node.start_mark.column + 1}"

    def walk(node: yaml.Node, depth: int = 0) -> None:
        if depth > 200:
            return
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                k = key.value if isinstance(key, yaml.ScalarNode) else None
                if k in _LOCAL_KEYS:
                    found.append(
                        f"{at(key)}: {k} names a path on the server's machines; "
                        "a submitted file may not (use privateKeySecret for SSH keys)"
                    )
                elif (
                    k == "type"
                    and isinstance(value, yaml.ScalarNode)
                    and value.value in _LOCAL_TYPES
                ):
                    found.append(
                        f"{at(value)}: type {value.value} runs on or reads from the "
                        "server's machines; a submitted file may not use it"
                    )
                walk(value, depth + 1)
        elif isinstance(node, yaml.SequenceNode):
            for item in node.value:
                walk(item, depth + 1)

    try:
        for doc in yaml.compose_all(text, Loader=yaml.SafeLoader):
            if doc is not None:
                walk(doc)
    except yaml.YAMLError:
        return []
    return found


def check_files(files: dict[str, str]) -> None:
    """413/422 for too many or too large files, bad names, paths on the server's machines."""
    if len(files) > MAX_FILES:
        raise HTTPException(
            status.HTTP_413_CONTENT_TOO_LARGE, detail=f"at most {MAX_FILES} files per submission"
        )
    if sum(len(t.encode()) for t in files.values()) > MAX_BYTES:
        raise HTTPException(
            status.HTTP_413_CONTENT_TOO_LARGE,
            detail=f"at most {MAX_BYTES // (1024 * 1024)} MiB of files",
        )
    bad = [n for n in files if not FILE_NAME.match(n)]
    if bad:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            detail=f"file name(s) {', '.join(map(repr, sorted(bad)))}: a plain "
            "name ending in .yaml or .yml (letters, digits, _ . -)",
        )
    problems = [p for n, t in sorted(files.items()) for p in local_references(n, t)]
    if problems:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail="\n".join(problems))


# --- new executions -------------------------------------------------------------------------


def _from_registry(files: dict[str, str], pipeline: str | None) -> list[Any]:
    """The registry entries a run of ``files`` (or of the stored ``pipeline`` when they define
    none) is resolved with: what they name and do not define, their latest versions."""
    from app import registry
    from app.db import session_scope

    submitted: list[registry.Entry] = []
    for name, text in sorted(files.items()):
        try:
            submitted.extend(registry.documents(name, text))
        except SpecError:
            continue  # the loader says what is wrong with it
    with session_scope() as s:
        stored = {k: registry.entry_of(r) for k, r in registry.latest(s).items()}
    start = [e.data for e in submitted]
    first = []
    if pipeline and not any(e.kind == "Pipeline" for e in submitted):
        chosen = stored.get(("Pipeline", pipeline))
        if chosen is None:
            raise HTTPException(
                status.HTTP_404_NOT_FOUND if not files else status.HTTP_422_UNPROCESSABLE_CONTENT,
                detail=f"no Pipeline '{pipeline}' in the files or the registry "
                "(vmfarm get Pipeline lists the stored ones)",
            )
        first.append(chosen)
        start.append(chosen.data)
    return first + registry.reach(start, stored, skip={e.key for e in submitted})


def _record_uses(execution_id: str, used: list[Any]) -> None:
    """Record which registry versions the execution was resolved with (of the
    infrastructures, those its stages deploy to)."""
    from app.db import session_scope
    from app.models import Execution, RegistryUse

    if not used:
        return
    with session_scope() as s:
        ex = s.get(Execution, execution_id)
        plan = ex.plan if ex is not None else {}
        infras = {
            i.get("identifier")
            for st in plan.get("stages", [])
            for i in (st.get("infrastructures") or [])
            if isinstance(i, dict)
        }
        for e in used:
            if e.kind == "Infrastructure" and e.ident not in infras:
                continue
            s.add(
                RegistryUse(
                    execution_id=execution_id, kind=e.kind, ident=e.ident, version=e.version
                )
            )


def start_run(
    actor: Actor,
    files: dict[str, str],
    pipeline: str | None,
    inputs: Mapping[str, str],
    cfg: RbacConfig,
) -> str:
    """Record and start a run of ``files`` (or of the stored ``pipeline``) by ``actor``, with
    the registry's latest versions of what the files do not define (a submission's and a
    webhook trigger's way in); HTTPException when refused, nothing recorded then."""
    from app import coordinator, operations, registry

    check_files(files)
    problems = registry.redefinitions(files)
    if problems:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail="\n".join(problems))
    used = _from_registry(files, pipeline)
    with registry.folder(files, used, prefix="vmfarm-submit-") as (tmp, paths):
        try:
            ex_id = operations.run(
                actor, paths, pipeline=pipeline, inputs=inputs, rules=cfg, publish=False
            )
        except Exception as exc:
            raise _http(exc, strip=tmp + "/") from None
    _record_uses(ex_id, used)
    coordinator.advance(ex_id)
    return ex_id


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=Submitted,
    openapi_extra=needs("pipeline:execute"),
)
def submit(
    body: Submission,
    who: Annotated[Identity, Depends(require("pipeline:execute"))],
    cfg: Annotated[RbacConfig, Depends(rbac)],
) -> Submitted:
    """Run the pipeline in ``files`` (or the stored ``pipeline``) as the caller; the
    execution's id. Environments, infrastructures and connectors, and what else the files do
    not define, come from the registry's latest versions; the environments' deploy permissions
    are checked on the resolved plan; nothing is recorded when refused."""
    if not body.files and not body.pipeline:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            detail="give pipeline files, or the id of a stored pipeline in 'pipeline'",
        )
    ex_id = start_run(actor_of(who), body.files, body.pipeline, body.inputs, cfg)
    return Submitted(id=ex_id)


@router.post(
    "/{execution_id}/retry",
    status_code=status.HTTP_201_CREATED,
    response_model=Submitted,
    openapi_extra=needs("pipeline:execute"),
)
def retry(
    execution_id: str,
    who: Annotated[Identity, Depends(require("pipeline:execute"))],
    cfg: Annotated[RbacConfig, Depends(rbac)],
) -> Submitted:
    """Run an ended execution again on the hosts that did not succeed; the new id."""
    from app import operations

    try:
        return Submitted(
            id=operations.retry(actor_of(who), execution_id, rules=cfg), of=execution_id
        )
    except Exception as exc:
        raise _http(exc) from None


@router.post(
    "/{execution_id}/rollback",
    status_code=status.HTTP_201_CREATED,
    response_model=Submitted,
    openapi_extra=needs("pipeline:rollback"),
)
def rollback(
    execution_id: str,
    who: Annotated[Identity, Depends(require("pipeline:rollback"))],
    cfg: Annotated[RbacConfig, Depends(rbac)],
) -> Submitted:
    """Roll a successful execution back on every host it changed; the new id."""
    from app import operations

    try:
        return Submitted(
            id=operations.rollback(actor_of(who), execution_id, rules=cfg), of=execution_id
        )
    except Exception as exc:
        raise _http(exc) from None


# --- decisions ------------------------------------------------------------------------------


@router.post(
    "/{execution_id}/approve", response_model=Outcome, openapi_extra=needs("pipeline:approve")
)
def approve(
    execution_id: str,
    who: Annotated[Identity, Depends(require("pipeline:approve"))],
    cfg: Annotated[RbacConfig, Depends(rbac)],
    body: Decision | None = None,
) -> Outcome:
    """Approve the Approval stage the execution waits in, as the caller (one vote each; the
    executor may not when the approval disallows it)."""
    from app import operations

    try:
        return Outcome(
            id=execution_id,
            outcome=operations.approve(
                actor_of(who), execution_id, comment=(body or Decision()).comment, rules=cfg
            ),
        )
    except Exception as exc:
        raise _http(exc) from None


@router.post(
    "/{execution_id}/reject", response_model=Outcome, openapi_extra=needs("pipeline:approve")
)
def reject(
    execution_id: str,
    who: Annotated[Identity, Depends(require("pipeline:approve"))],
    cfg: Annotated[RbacConfig, Depends(rbac)],
    body: Decision | None = None,
) -> Outcome:
    """Reject the Approval stage the execution waits in: the stage fails."""
    from app import operations

    try:
        return Outcome(
            id=execution_id,
            outcome=operations.reject(
                actor_of(who), execution_id, comment=(body or Decision()).comment, rules=cfg
            ),
        )
    except Exception as exc:
        raise _http(exc) from None


@router.post("/{execution_id}/abort", response_model=Outcome, openapi_extra=needs("pipeline:abort"))
def abort(
    execution_id: str,
    who: Annotated[Identity, Depends(require("pipeline:abort"))],
    cfg: Annotated[RbacConfig, Depends(rbac)],
    body: AbortRequest | None = None,
) -> Outcome:
    """Stop an execution (and roll back its current stage with ``rollback``)."""
    from app import operations

    try:
        return Outcome(
            id=execution_id,
            outcome=operations.abort(
                actor_of(who), execution_id, rollback=(body or AbortRequest()).rollback, rules=cfg
            ),
        )
    except Exception as exc:
        raise _http(exc) from None


# --- reads ----------------------------------------------------------------------------------


@router.get("", openapi_extra=needs("pipeline:view"))
def list_(
    who: Annotated[Identity, Depends(require("pipeline:view"))],
    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
    statuses: Annotated[list[str] | None, Query(alias="status")] = None,
) -> list[dict[str, Any]]:
    """Recent executions, newest first (``vmfarm executions -o json``)."""
    from app.report import recent_executions

    try:
        rows = recent_executions(limit, statuses=statuses)
    except ValueError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=str(exc)) from None
    return [
        {
            "id": e.id,
            "pipeline": e.pipeline,
            "status": e.status,
            "created_at": e.created_at.isoformat() + "Z",
            "created_by": e.created_by,
        }
        for e in rows
    ]


def _may_view(who: Identity, cfg: RbacConfig, execution_id: str) -> None:
    """pipeline:view on the execution's pipeline and environment:view on each environment it
    deploys to (403 otherwise)."""
    from app import operations

    try:
        operations.view(actor_of(who), execution_id, rules=cfg)
    except Exception as exc:
        raise _http(exc) from None


@router.get("/{execution_id}", openapi_extra=needs("pipeline:view"))
def show(
    execution_id: str,
    who: Annotated[Identity, Depends(require("pipeline:view"))],
    cfg: Annotated[RbacConfig, Depends(rbac)],
) -> dict[str, Any]:
    """One execution: stages, phases, hosts, approvals (``vmfarm status -o json``)."""
    from app.report import execution_report
    from app.secrets import mask_obj

    _may_view(who, cfg, execution_id)
    report = execution_report(execution_id)
    if report is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"no execution '{execution_id}'")
    from app import registry
    from app.db import session_scope

    with session_scope() as s:
        used = registry.uses(s, execution_id)
    if used:  # the registry versions it was resolved with (server mode only)
        report["registry"] = used
    masked: dict[str, Any] = mask_obj(report)
    return masked


@router.get("/{execution_id}/logs", openapi_extra=needs("pipeline:view"))
def logs(
    execution_id: str,
    who: Annotated[Identity, Depends(require("pipeline:view"))],
    cfg: Annotated[RbacConfig, Depends(rbac)],
    host: str | None = None,
    step: str | None = None,
) -> list[dict[str, Any]]:
    """The output of an execution's steps in order (``vmfarm logs -o json``), secrets
    masked."""
    from app.report import execution_logs, execution_progress
    from app.secrets import mask_obj

    _may_view(who, cfg, execution_id)
    if execution_progress(execution_id) is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"no execution '{execution_id}'")
    chunks: list[dict[str, Any]] = mask_obj(execution_logs(execution_id, host=host, step=step))
    return chunks


def _event(name: str, data: dict[str, Any], event_id: int) -> str:
    return f"id: {event_id}\nevent: {name}\ndata: {json.dumps(data)}\n\n"


@router.get(
    "/{execution_id}/events",
    openapi_extra={
        **needs("pipeline:view"),
        "responses": {
            "200": {
                "description": "``status`` events (the execution's status, current "
                "stage and each stage's status) whenever they change, then one "
                "``end`` event when it has ended",
                "content": {"text/event-stream": {}},
            }
        },
    },
)
def events(
    execution_id: str,
    request: Request,
    who: Annotated[Identity, Depends(require("pipeline:view"))],
    cfg: Annotated[RbacConfig, Depends(rbac)],
) -> StreamingResponse:
    """Follow an execution: server-sent events of its status changes until it ends. The
    server reads the ledger every half second; a comment line keeps a quiet stream open."""
    from app.report import execution_progress

    _may_view(who, cfg, execution_id)
    first = execution_progress(execution_id)
    if first is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"no execution '{execution_id}'")
    return StreamingResponse(
        _follow(execution_id, request, first),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


async def _follow(execution_id: str, request: Request, first: dict[str, Any]) -> AsyncIterator[str]:
    from anyio import to_thread

    from app.report import execution_progress
    from app.status import Status

    loop = asyncio.get_running_loop()
    seq, last, quiet_since = 0, None, loop.time()
    current: dict[str, Any] | None = first
    while current is not None:
        if current != last:
            seq += 1
            yield _event("status", current, seq)
            last, quiet_since = current, loop.time()
        if current["status"] in Status.TERMINAL:
            yield _event("end", {"id": execution_id, "status": current["status"]}, seq + 1)
            return
        if loop.time() - quiet_since >= KEEPALIVE_SECONDS:
            yield ": still following\n\n"
            quiet_since = loop.time()
        if await request.is_disconnected():
            return
        await asyncio.sleep(POLL_SECONDS)  # the poll interval of a follower of the ledger
        current = await to_thread.run_sync(execution_progress, execution_id)
    yield _event("end", {"id": execution_id, "status": "MISSING"}, seq + 1)


def iter_events(lines: Iterator[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    """The (event, data) pairs of a server-sent event stream's lines (for clients and tests)."""
    name, data = "message", list[str]()
    for line in lines:
        if not line:
            if data:
                yield name, json.loads("\n".join(data))
            name, data = "message", []
        elif line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())
