"""API tokens: machines' credentials for the server (CI systems, schedules).

A token is ``vmf_`` and 43 characters of a random 32-byte value; the server shows it once,
when it is made, and keeps only its SHA-256 (``ApiToken.token_hash``) and its first
characters (to recognise it in a list). A token carries roles of the server's RBAC
configuration, expires (90 days unless told otherwise), can be revoked, and records when it
was last used. Its identity is ``token:NAME`` with its roles; its id goes into audit records.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import uuid
from datetime import datetime, timedelta

from sqlmodel import col, select

from app.auth.identity import AuthError, Identity
from app.models import ApiToken, utcnow

PREFIX = "vmf_"
DEFAULT_LIFETIME = timedelta(days=90)
MAX_LIFETIME = timedelta(days=366)
# last_used_at is written at most this often per token (a write per request costs).
LAST_USED_EVERY = timedelta(seconds=60)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def looks_like_api_token(token: str) -> bool:
    return token.startswith(PREFIX)


def create_token(
    *,
    name: str,
    roles: list[str],
    created_by: str,
    lifetime: timedelta | None = DEFAULT_LIFETIME,
    now: datetime | None = None,
) -> tuple[str, ApiToken]:
    """Make a token; returns (the token, its row). The token is never stored."""
    from app.db import session_scope

    if not _NAME.match(name or ""):
        raise ValueError(f"'{name}' is not a token name (letters, digits, _ . -; at most 64)")
    if not roles:
        raise ValueError("a token needs at least one role")
    if lifetime is not None and not timedelta(0) < lifetime <= MAX_LIFETIME:
        raise ValueError(f"a token lives more than 0 and at most {MAX_LIFETIME.days} days")
    token = PREFIX + secrets.token_urlsafe(32)
    at = now or utcnow()
    row = ApiToken(
        id=uuid.uuid4().hex,
        name=name,
        token_hash=hash_token(token),
        prefix=token[:10],
        roles=list(roles),
        created_by=created_by[:255],
        created_at=at,
        expires_at=at + lifetime if lifetime else None,
    )
    with session_scope() as s:
        s.add(row)
    return token, row


def list_tokens() -> list[ApiToken]:
    from app.db import session_scope

    with session_scope() as s:
        return list(s.exec(select(ApiToken).order_by(col(ApiToken.created_at).desc())).all())


def revoke_token(token_id: str, *, by: str, now: datetime | None = None) -> ApiToken | None:
    """Revoke a token (idempotent); None when there is no such token."""
    from app.db import session_scope

    with session_scope() as s:
        row = s.get(ApiToken, token_id)
        if row is None:
            return None
        if row.revoked_at is None:
            row.revoked_at, row.revoked_by = now or utcnow(), by[:255]
            s.add(row)
        return row


def verify_token(token: str, *, now: datetime | None = None) -> Identity:
    """The identity an API token proves; AuthError when unknown, revoked or expired."""
    from app.db import session_scope

    if not looks_like_api_token(token):
        raise AuthError("not an API token")
    digest = hash_token(token)
    at = now or utcnow()
    with session_scope() as s:
        row = s.exec(select(ApiToken).where(ApiToken.token_hash == digest)).first()
        if row is None:
            raise AuthError("unknown API token")
        if row.revoked_at is not None:
            raise AuthError(f"API token '{row.name}' was revoked")
        if row.expires_at is not None and at >= row.expires_at:
            raise AuthError(f"API token '{row.name}' expired")
        if row.last_used_at is None or at - row.last_used_at >= LAST_USED_EVERY:
            row.last_used_at = at
            s.add(row)
        return Identity(
            subject=f"token:{row.name}", kind="token", roles=tuple(row.roles), token_id=row.id
        )


__all__ = [
    "DEFAULT_LIFETIME",
    "MAX_LIFETIME",
    "PREFIX",
    "create_token",
    "hash_token",
    "list_tokens",
    "looks_like_api_token",
    "revoke_token",
    "verify_token",
]
