"""The audit trail: who did what to which execution, and what came of it (``vmfarm audit``).

Rows are ``AuditEvent`` in the ledger. ``app.operations`` records what users did (``run``,
``approve``, ``abort``, ...), whoever asked (the CLI, a schedule, the server), with an outcome
(``submitted``, ``approved``, ``aborted``, ``failed``, ...); ``app.rbac.guard`` records RBAC
refusals (``refused``) and ``app.policy.enforce`` policy denials (``denied``). ``detail`` is a
small JSON object: it is masked with the process's secret values (``app.secrets.mask_obj``),
values under keys that name a secret (password, token, ...) are replaced with ``***``, and long
strings are cut, so a row never holds a secret.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from itertools import pairwise
from typing import Any

from sqlmodel import Session, col, select

from app.models import AuditEvent, Execution, utcnow

log = logging.getLogger("vmfarm.audit")

# A value under a key with such a word (db_password, apiKey, X-Auth-Token) is never stored.
_SECRET_WORDS = frozenset(
    {
        "password",
        "passwd",
        "passphrase",
        "secret",
        "secrets",
        "token",
        "credential",
        "credentials",
        "apikey",
        "privatekey",
    }
)
MAX_STRING = 2000


def _secret_key(key: str) -> bool:
    words = re.split(r"[^a-z0-9]+", re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", key).lower())
    pairs = {a + b for a, b in pairwise(words)}
    return bool(_SECRET_WORDS & (set(words) | pairs))


def _clean(obj: Any, depth: int = 0) -> Any:
    if depth > 20:
        return "..."
    if isinstance(obj, Mapping):
        return {
            str(k): "***" if _secret_key(str(k)) and v not in (None, "") else _clean(v, depth + 1)
            for k, v in obj.items()
        }
    if isinstance(obj, list | tuple | set | frozenset):
        return [_clean(v, depth + 1) for v in obj]
    if isinstance(obj, str):
        return obj if len(obj) <= MAX_STRING else obj[:MAX_STRING] + "...(cut)"
    if obj is None or isinstance(obj, bool | int | float):
        return obj
    return _clean(str(obj), depth + 1)


def safe_detail(detail: Mapping[str, Any] | None) -> dict[str, Any]:
    """``detail`` as it is stored: plain JSON, secret keys starred, secret values masked."""
    from app.secrets import mask_obj

    cleaned: dict[str, Any] = _clean(dict(detail or {}))
    masked: dict[str, Any] = mask_obj(cleaned)
    return json.loads(json.dumps(masked))  # type: ignore[no-any-return]


def record(
    action: str,
    *,
    user: str,
    execution_id: str | None = None,
    pipeline: str | None = None,
    detail: Mapping[str, Any] | None = None,
    outcome: str,
    session: Session | None = None,
) -> int | None:
    """Write one audit event; returns its id. ``pipeline`` defaults to the execution's.

    Without ``session`` the event is committed in a transaction of its own: never call it so
    while a ``session_scope()`` is open (SQLite has one writer: it would wait on itself). Inside
    one, pass ``session=s``: the event is then part of that transaction (returns None: the id
    exists only after the flush)."""
    from app.db import session_scope

    def add(s: Session) -> AuditEvent:
        nonlocal pipeline
        if pipeline is None and execution_id:
            ex = s.get(Execution, execution_id)
            pipeline = ex.pipeline if ex is not None else None
        row = AuditEvent(
            at=utcnow(),
            user=(user or "")[:128],
            action=action[:32],
            execution_id=execution_id[:32] if execution_id else None,
            pipeline=pipeline[:128] if pipeline else None,
            outcome=outcome[:32],
            detail=safe_detail(detail),
        )
        s.add(row)
        return row

    if session is not None:
        add(session)
        return None
    with session_scope() as s:
        row = add(s)
        s.flush()
        return int(row.id or 0)


def record_quietly(
    action: str,
    *,
    user: str,
    execution_id: str | None = None,
    pipeline: str | None = None,
    detail: Mapping[str, Any] | None = None,
    outcome: str,
) -> int | None:
    """``record``, logging (not raising) when the ledger cannot take it: for refusals, whose
    own error must reach the user whatever happens to the audit row."""
    try:
        return record(
            action,
            user=user,
            execution_id=execution_id,
            pipeline=pipeline,
            detail=detail,
            outcome=outcome,
        )
    except Exception as exc:  # the refusal is what the caller must see
        log.error("could not record the audit event %s/%s by %r: %s", action, outcome, user, exc)
        return None


def to_dict(row: AuditEvent) -> dict[str, Any]:
    return {
        "id": row.id,
        "at": row.at.isoformat() + "Z",
        "user": row.user,
        "action": row.action,
        "execution_id": row.execution_id,
        "pipeline": row.pipeline,
        "outcome": row.outcome,
        "detail": row.detail,
    }


def events(
    limit: int = 50,
    *,
    execution_id: str | None = None,
    user: str | None = None,
    action: str | None = None,
) -> list[dict[str, Any]]:
    """The newest ``limit`` events matching every filter given, newest first."""
    from app.db import session_scope

    q = select(AuditEvent)
    if execution_id:
        q = q.where(AuditEvent.execution_id == execution_id)
    if user:
        q = q.where(AuditEvent.user == user)
    if action:
        q = q.where(AuditEvent.action == action)
    q = q.order_by(col(AuditEvent.at).desc(), col(AuditEvent.id).desc()).limit(max(0, limit))
    with session_scope() as s:
        return [to_dict(r) for r in s.exec(q).all()]
