"""The registry: apply documents, list them, read a version, read their history.

::

    POST /api/v1/registry                        registry:apply   {"applied": [...]}
                                                 (+ environment:edit:<qualifier> on each
                                                 environment a changed Environment or
                                                 Infrastructure is, or was, part of)
    GET  /api/v1/registry/{kind}                 registry:view    the latest of each entry
    GET  /api/v1/registry/{kind}/{id}            registry:view    one version (?version=N)
    GET  /api/v1/registry/{kind}/{id}/history    registry:view    every version with its diff

``kind``: environment, infrastructure, service, connector, template, pipeline (any case).
An apply is all or nothing: the files are split into documents, each must be valid together
with what the registry already holds (a run would load them so), and only then is a version
added for each document whose text changed. Who may change which environment is the
server's RBAC: ``environment:edit`` qualified by the environment's type (``production`` /
``non-production``) on the environment's identifier, for its type before and after.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, status
from pydantic import BaseModel, ConfigDict, Field

from app import registry
from app.auth.identity import Identity
from app.errors import SpecError, SpecErrors
from app.rbac import PermissionRefused, RbacConfig
from app.server.deps import needs, rbac, require

router = APIRouter(prefix="/api/v1/registry", tags=["registry"])

EDIT = "environment:edit"
# Template types whose change can change an environment that uses the template.
_ENV_TEMPLATES = registry.REGISTRY_ONLY_TEMPLATES


class ApplyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    files: dict[str, str] = Field(
        min_length=1,
        description="YAML files: name (e.g. envs.yaml) -> text; every document is an entry",
        examples=[{"prod.yaml": "apiVersion: v1\nkind: Environment\n..."}],
    )


class AppliedEntry(BaseModel):
    kind: str
    id: str
    version: int
    changed: bool


class Applied(BaseModel):
    applied: list[AppliedEntry]


class Listed(BaseModel):
    kind: str
    id: str
    version: int
    author: str
    created_at: datetime
    type: str | None = Field(default=None, description="An Environment's type")


class Shown(BaseModel):
    kind: str
    id: str
    version: int
    author: str
    created_at: datetime
    text: str


class Change(BaseModel):
    version: int
    author: str
    created_at: datetime
    diff: str


def _kind(name: str) -> str:
    kind = registry.kind_of(name)
    if kind is None:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND,
            detail=f"the registry keeps no kind '{name}' (one of: "
            + ", ".join(k.lower() for k in registry.KINDS)
            + ")",
        )
    return kind


def _type(value: str | None) -> str | None:
    return value if value in ("Production", "PreProduction") else None


def environment_checks(
    changed: list[registry.Entry],
    applied: list[registry.Entry],
    current: dict[tuple[str, str], Any],
) -> list[tuple[str, str | None]]:
    """(environment id, type or None) for each environment a change touches: an Environment's
    type before and after; an Infrastructure's environment (before and after) with that
    environment's types; every environment whose hosts use a changed Connector, with its
    types; every environment using a changed Environment or Infrastructure template (None: its
    type may change with the template)."""
    applied_types = {e.ident: _type(e.env_type) for e in applied if e.kind == "Environment"}

    def types_of(env: str) -> set[str | None]:
        out: set[str | None] = set()
        if env in applied_types:
            out.add(applied_types[env])
        old = current.get(("Environment", env))
        if old is not None:
            out.add(_type(old.env_type))
        return out or {None}

    def using(name: str) -> set[str]:
        """The environments whose Environment or Infrastructure documents (applied, else
        stored) name ``name``."""
        docs = {x.key: x for x in applied if x.kind in ("Environment", "Infrastructure")}
        for key, row in current.items():
            if key[0] in ("Environment", "Infrastructure") and key not in docs:
                docs[key] = registry.entry_of(row)
        out: set[str] = set()
        for u in docs.values():
            names: set[str] = set()
            registry.refs(u.data, names)
            env = u.ident if u.kind == "Environment" else u.env_ref
            if name in names and env:
                out.add(env)
        return out

    needed: set[tuple[str, str | None]] = set()
    for e in changed:
        old = current.get(e.key)
        if e.kind == "Environment":
            needed |= {(e.ident, t) for t in types_of(e.ident)}
        elif e.kind == "Infrastructure":
            for env in {e.env_ref, getattr(old, "env_ref", None)} - {None}:
                assert env is not None
                needed |= {(env, t) for t in types_of(env)}
        elif e.kind == "Template" and e.template_type in _ENV_TEMPLATES:
            needed |= {(env, None) for env in using(e.ident.split("@")[0])}
        elif e.kind == "Connector":
            needed |= {(env, t) for env in using(e.ident) for t in types_of(env)}
    return sorted(needed, key=lambda p: (p[0], p[1] or ""))


def _audit(who: Identity, outcome: str, **detail: object) -> None:
    from app.audit import record_quietly

    record_quietly(
        "registry-apply", user=who.subject, outcome=outcome, detail={"actor": who.actor(), **detail}
    )


def _connector_types(entries: list[Any], current: dict[Any, Any]) -> dict[str, str]:
    """Every stored or applied connector's type, by id (for artifact triggers' checks)."""
    from app import registry

    out = {
        ident: str(((registry.entry_of(row).data or {}).get("spec") or {}).get("type"))
        for (kind, ident), row in current.items()
        if kind == "Connector"
    }
    for e in entries:
        if e.kind == "Connector" and isinstance(e.data, dict):
            out[e.ident] = str((e.data.get("spec") or {}).get("type"))
    return out


@router.post("", response_model=Applied, openapi_extra=needs("registry:apply"))
def apply(
    body: ApplyRequest,
    who: Annotated[Identity, Depends(require("registry:apply"))],
    cfg: Annotated[RbacConfig, Depends(rbac)],
) -> Applied:
    """Store a new version of each document of ``files`` that changed (all or nothing)."""
    from sqlalchemy.exc import IntegrityError

    from app.audit import record
    from app.auth.permissions import authorize
    from app.db import session_scope
    from app.server.routes.executions import check_files

    check_files(body.files)
    try:
        entries = registry.split(body.files)
    except (SpecError, SpecErrors) as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=str(exc)) from None
    with session_scope() as s:
        current = registry.latest(s)
    changed = [
        e
        for e in entries
        if e.key not in current or current[e.key].text != registry.normalise(e.text)
    ]
    for env, env_type in environment_checks(changed, entries, current):
        try:
            authorize(cfg, who, EDIT, resource=env, environment_type=env_type)
        except PermissionRefused as exc:
            _audit(who, "refused", environment=env, permission=exc.permission, reason=str(exc))
            raise HTTPException(status.HTTP_403_FORBIDDEN, detail=str(exc)) from None
    mine = {e.key for e in entries}
    try:
        registry.check(
            body.files, [registry.entry_of(r) for k, r in current.items() if k not in mine]
        )
        registry.check_triggers(
            entries,
            [e.ident for e in entries if e.kind == "Pipeline"]
            + [ident for kind, ident in current if kind == "Pipeline"],
            body.files,
            _connector_types(entries, current),
        )
    except (SpecError, SpecErrors) as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=str(exc)) from None
    try:
        with session_scope() as s:
            done = registry.store(s, entries, current, author=who.subject, token_id=who.token_id)
            for e, version, was_changed in done:
                if was_changed:
                    record(
                        "registry-apply",
                        user=who.subject,
                        outcome="applied",
                        detail={
                            "actor": who.actor(),
                            "kind": e.kind,
                            "id": e.ident,
                            "version": version,
                        },
                        session=s,
                    )
    except IntegrityError:
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            detail="another apply changed these entries at the same time: apply again",
        ) from None
    return Applied(
        applied=[AppliedEntry(kind=e.kind, id=e.ident, version=v, changed=c) for e, v, c in done]
    )


@router.get(
    "/{kind}",
    response_model=list[Listed],
    response_model_exclude_none=True,
    openapi_extra=needs("registry:view"),
)
def list_(kind: str, who: Annotated[Identity, Depends(require("registry:view"))]) -> list[Listed]:
    """The latest version of every entry of ``kind``, by identifier."""
    from app.db import session_scope

    k = _kind(kind)
    with session_scope() as s:
        rows = sorted(registry.latest(s, kind=k).values(), key=lambda r: r.ident)
    return [
        Listed(
            kind=r.kind,
            id=r.ident,
            version=r.version,
            author=r.author,
            created_at=r.created_at,
            type=r.env_type if k == "Environment" else None,
        )
        for r in rows
    ]


def _versions(kind: str, ident: str) -> list[Any]:
    from app.db import session_scope

    k = _kind(kind)
    with session_scope() as s:
        rows = registry.versions(s, k, ident)
    if not rows:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"no {k} '{ident}' in the registry")
    return rows


@router.get("/{kind}/{ident}", response_model=Shown, openapi_extra=needs("registry:view"))
def show(
    kind: str,
    ident: str,
    who: Annotated[Identity, Depends(require("registry:view"))],
    version: Annotated[int | None, Query(ge=1)] = None,
) -> Shown:
    """One version of an entry (the latest by default), with its text."""
    rows = _versions(kind, ident)
    row = rows[-1] if version is None else next((r for r in rows if r.version == version), None)
    if row is None:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND,
            detail=f"{rows[0].kind} '{ident}' has no version {version} (latest: "
            f"{rows[-1].version})",
        )
    return Shown(
        kind=row.kind,
        id=row.ident,
        version=row.version,
        author=row.author,
        created_at=row.created_at,
        text=row.text,
    )


@router.get(
    "/{kind}/{ident}/history", response_model=list[Change], openapi_extra=needs("registry:view")
)
def history(
    kind: str, ident: str, who: Annotated[Identity, Depends(require("registry:view"))]
) -> list[Change]:
    """Every version of an entry, oldest first, each with its diff against the one before."""
    rows = _versions(kind, ident)
    out, before = [], None
    for r in rows:
        out.append(
            Change(
                version=r.version,
                author=r.author,
                created_at=r.created_at,
                diff=registry.diff(r.kind, r.ident, before, r.text, r.version),
            )
        )
        before = r.text
    return out
