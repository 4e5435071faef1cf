"""``GET /api/v1/auth/config``: how a client signs in to this server. Open (no token): the
CLI asks it before it has one (``vmfarm login URL``).

It says which OpenID Connect issuer the server trusts, the client id tokens must be issued to
(the server's audience, unless ``VMFARM_SERVER_CLI_CLIENT_ID`` names another), and the scopes
to ask for. ``client_secret`` is there only for providers that insist on one even for an
installed application (``VMFARM_SERVER_CLI_CLIENT_SECRET``): such a secret is not a secret,
as the provider's own documentation for native apps says; PKCE protects the sign-in.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, Request, status

router = APIRouter(tags=["auth"])


@router.get("/api/v1/auth/config")
def auth_config(request: Request) -> dict[str, Any]:
    """The issuer, client id and scopes ``vmfarm login`` signs in with; 404 when the server
    takes API tokens only."""
    cfg = request.app.state.settings
    if not cfg.issuer:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND,
            detail="this server has no sign-in (no OIDC issuer configured): use an API token "
            "(VMFARM_TOKEN)",
        )
    out: dict[str, Any] = {
        "issuer": cfg.issuer,
        "client_id": cfg.cli_client_id or cfg.audience,
        "scopes": cfg.cli_scopes.split(),
    }
    if cfg.cli_client_secret:
        out["client_secret"] = cfg.cli_client_secret
    return out
