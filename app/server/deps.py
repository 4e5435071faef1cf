"""Dependencies every route uses: who is calling (``current_identity``) and may they
(``require``). Sync functions: FastAPI runs them in its thread pool (they read the ledger)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.auth.identity import AuthError, Identity
from app.rbac import PermissionRefused, RbacConfig

log = logging.getLogger("vmfarm.server")

bearer = HTTPBearer(
    auto_error=False, description="An OIDC token of the server's issuer, or an API token (vmf_...)"
)


def _unauthorized(error: str, description: str) -> HTTPException:
    # RFC 6750: the challenge says what went wrong, never echoing the token.
    desc = description.replace('"', "'")
    challenge = 'Bearer realm="vmfarm"' + (
        f', error="{error}", error_description="{desc}"' if error else ""
    )
    return HTTPException(
        status.HTTP_401_UNAUTHORIZED, detail=description, headers={"WWW-Authenticate": challenge}
    )


def current_identity(
    request: Request,
    creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Identity:
    """The caller, from ``Authorization: Bearer TOKEN``; 401 when there is none or it proves
    nothing."""
    if creds is None or creds.scheme.lower() != "bearer" or not creds.credentials:
        raise _unauthorized("", "authentication required: Authorization: Bearer TOKEN")
    token = creds.credentials
    from app.auth.tokens import looks_like_api_token, verify_token

    try:
        if looks_like_api_token(token):
            return verify_token(token)
        verifier = request.app.state.verifier
        if verifier is None:
            raise AuthError("this server accepts API tokens only (no OIDC issuer configured)")
        who: Identity = verifier.verify(token)
        return who
    except AuthError as exc:
        log.info(
            "refused a bearer token from %s: %s",
            request.client.host if request.client else "?",
            exc,
        )
        raise _unauthorized("invalid_token", str(exc)) from None


CurrentIdentity = Annotated[Identity, Depends(current_identity)]


def rbac(request: Request) -> RbacConfig:
    cfg: RbacConfig = request.app.state.rbac.get()
    return cfg


def require(permission: str) -> Callable[..., Identity]:
    """A dependency: the caller, when they hold ``permission`` (403 otherwise)."""
    from app.rbac import check_permission

    check_permission(permission)

    def dependency(who: CurrentIdentity, cfg: Annotated[RbacConfig, Depends(rbac)]) -> Identity:
        from app.auth.permissions import authorize

        try:
            authorize(cfg, who, permission)
        except PermissionRefused as exc:
            raise HTTPException(status.HTTP_403_FORBIDDEN, detail=str(exc)) from None
        return who

    dependency.__name__ = f"require_{permission.replace(':', '_')}"
    return dependency


def needs(permission: str) -> dict[str, str]:
    """A route's ``openapi_extra``: the permission it requires, in the OpenAPI document."""
    return {"x-permission": permission}


__all__ = ["CurrentIdentity", "bearer", "current_identity", "needs", "rbac", "require"]
