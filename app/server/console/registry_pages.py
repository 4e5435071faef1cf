"""The registry's pages, when the server has a registry (``app.registry``): the latest entry
of each kind, and an entry's versions with the diff between each and the one before.

::

    GET /console/registry                      registry:view   every kind's latest entries
    GET /console/registry/{kind}/{ident}       registry:view   versions, diffs; ?version=N its text

Installed by ``app.server.console.install`` only when ``app.registry`` can be imported: the
console reads the registry, never defines one. The module is reached through ``importlib``
so that this file type-checks on a tree without it.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

from fastapi import APIRouter, HTTPException, Request, status
from fastapi.responses import HTMLResponse

from app.server.console.auth import SignedIn, authorize, rules

router = APIRouter(prefix="/console/registry", include_in_schema=False)


def available() -> bool:
    """Whether this server has a registry to show."""
    return importlib.util.find_spec("app.registry") is not None


def _registry() -> Any:
    return importlib.import_module("app.registry")


def _row(r: Any) -> dict[str, Any]:
    return {
        "kind": r.kind,
        "id": r.ident,
        "version": r.version,
        "author": r.author,
        "created_at": r.created_at.isoformat(timespec="seconds") + "Z",
        "type": r.env_type,
        "environment": r.env_ref,
    }


def used_by(execution_id: str) -> list[dict[str, Any]]:
    """The registry versions an execution was resolved with (none without a registry)."""
    if not available():
        return []
    from app.db import session_scope

    with session_scope() as s:
        found: list[dict[str, Any]] = _registry().uses(s, execution_id)
    return found


@router.get("", name="console_registry")
def listing(request: Request, session: SignedIn) -> HTMLResponse:
    """The latest version of every entry, by kind."""
    from app.db import session_scope
    from app.server.console.pages import _render

    authorize(rules(request), session.identity, "registry:view")
    reg = _registry()
    with session_scope() as s:
        rows = [_row(r) for r in reg.latest(s).values()]
    kinds = {
        k: sorted((r for r in rows if r["kind"] == k), key=lambda r: r["id"]) for k in reg.KINDS
    }
    return _render(request, session, "registry.html", kinds=kinds)


@router.get("/{kind}/{ident}", name="console_registry_entry")
def entry(
    request: Request, session: SignedIn, kind: str, ident: str, version: int | None = None
) -> HTMLResponse:
    """One entry: every version (newest first) with its diff, and one version's text."""
    from app.db import session_scope
    from app.secrets import mask
    from app.server.console.pages import _render

    authorize(rules(request), session.identity, "registry:view")
    reg = _registry()
    name = reg.kind_of(kind)
    if name is None:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND, detail=f"the registry keeps no kind '{kind}'"
        )
    with session_scope() as s:
        rows = list(reg.versions(s, name, ident))
    if not rows:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND, detail=f"no {name} '{ident}' in the registry"
        )
    history = []
    before: str | None = None
    for r in rows:
        history.append({**_row(r), "diff": mask(reg.diff(name, ident, before, r.text, r.version))})
        before = r.text
    shown = next((r for r in rows if r.version == version), rows[-1])
    return _render(
        request,
        session,
        "registry_entry.html",
        kind=name,
        ident=ident,
        history=list(reversed(history)),
        shown={**_row(shown), "text": mask(shown.text)},
    )


__all__ = ["available", "router", "used_by"]
