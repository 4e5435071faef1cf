"""API tokens: ``POST /api/v1/tokens`` (the token is in this answer only), ``GET`` (without
hashes), ``DELETE /api/v1/tokens/{id}`` (revoke). A token's roles may give no permission its
maker lacks."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Response, status
from pydantic import BaseModel, Field

from app.auth.identity import Identity
from app.models import ApiToken
from app.rbac import RbacConfig
from app.server.deps import needs, rbac, require

router = APIRouter(prefix="/api/v1/tokens", tags=["tokens"])


class TokenCreate(BaseModel):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", examples=["ci"])
    roles: list[str] = Field(min_length=1, examples=[["deployer"]])
    expires: str = Field(
        default="90d",
        examples=["90d"],
        description="How long the token lives (e.g. 90d, 12h; at most 366d)",
    )


class TokenInfo(BaseModel):
    id: str
    name: str
    prefix: str
    roles: list[str]
    created_by: str
    created_at: datetime
    expires_at: datetime | None
    last_used_at: datetime | None
    revoked_at: datetime | None

    @classmethod
    def of(cls, row: ApiToken) -> TokenInfo:
        return cls(
            id=row.id,
            name=row.name,
            prefix=row.prefix,
            roles=list(row.roles),
            created_by=row.created_by,
            created_at=row.created_at,
            expires_at=row.expires_at,
            last_used_at=row.last_used_at,
            revoked_at=row.revoked_at,
        )


class TokenCreated(TokenInfo):
    token: str = Field(description="The token: shown here once, never stored")


def _audit(action: str, who: Identity, outcome: str, **detail: object) -> None:
    from app.audit import record

    record(action, user=who.subject, outcome=outcome, detail={"actor": who.actor(), **detail})


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=TokenCreated,
    openapi_extra=needs("token:create"),
)
def create(
    body: TokenCreate,
    who: Annotated[Identity, Depends(require("token:create"))],
    cfg: Annotated[RbacConfig, Depends(rbac)],
) -> TokenCreated:
    """Make an API token with ``roles``; its value is in this answer only."""
    from app.auth.permissions import may_grant_roles
    from app.auth.tokens import MAX_LIFETIME, create_token
    from app.definitions.base import parse_duration

    try:
        lifetime = timedelta(seconds=parse_duration(body.expires))
    except ValueError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=str(exc)) from None
    if not timedelta(0) < lifetime <= MAX_LIFETIME:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            detail=f"expires: more than 0 and at most {MAX_LIFETIME.days}d",
        )
    try:
        lacking = may_grant_roles(cfg, who, body.roles)
    except ValueError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=str(exc)) from None
    if lacking:
        _audit(
            "token-create",
            who,
            "refused",
            name=body.name,
            roles=body.roles,
            reason=f"lacks {', '.join(lacking)}",
        )
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            detail=f"{who.subject} may not make a token with role(s) "
            f"{', '.join(body.roles)}: they lack {', '.join(lacking)}",
        )
    token, row = create_token(
        name=body.name, roles=body.roles, created_by=who.subject, lifetime=lifetime
    )
    _audit("token-create", who, "created", ref=row.id, name=row.name, roles=row.roles)
    return TokenCreated(**TokenInfo.of(row).model_dump(), token=token)


@router.get("", response_model=list[TokenInfo], openapi_extra=needs("token:view"))
def list_(who: Annotated[Identity, Depends(require("token:view"))]) -> list[TokenInfo]:
    """Every API token (never a token's value or hash), newest first."""
    from app.auth.tokens import list_tokens

    return [TokenInfo.of(r) for r in list_tokens()]


@router.delete(
    "/{token_id}", status_code=status.HTTP_204_NO_CONTENT, openapi_extra=needs("token:revoke")
)
def revoke(token_id: str, who: Annotated[Identity, Depends(require("token:revoke"))]) -> Response:
    """Revoke a token: it is refused from now on (idempotent)."""
    from app.auth.tokens import revoke_token

    row = revoke_token(token_id, by=who.subject)
    if row is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"no API token {token_id}")
    _audit("token-revoke", who, "revoked", ref=row.id, name=row.name)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
