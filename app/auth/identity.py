"""The caller as the server knows it, once its token is verified."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from app.errors import VmfarmError


class AuthError(VmfarmError):
    """A bearer token that proves nothing: missing, malformed, expired, revoked, for another
    audience or issuer, or badly signed. The message says which (never the token)."""


@dataclass(frozen=True)
class Identity:
    """A verified caller. ``subject`` is the OIDC ``sub`` (or ``token:NAME`` for an API
    token); ``groups`` come from the token's groups claim; an API token carries ``roles`` of
    its own and its ``token_id``. Audit records and approvals name ``subject``."""

    subject: str
    kind: Literal["oidc", "token"]
    groups: frozenset[str] = frozenset()
    roles: tuple[str, ...] = ()
    token_id: str | None = None
    issuer: str | None = None
    claims: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def actor(self) -> dict[str, Any]:
        """The identity as recorded in an audit event's detail (no secret in it)."""
        out: dict[str, Any] = {"subject": self.subject, "kind": self.kind}
        if self.token_id:
            out["ref"] = self.token_id
        if self.groups:
            out["groups"] = sorted(self.groups)
        return out
