"""The server's settings (``VMFARM_SERVER_*``); the ledger and broker come from app.settings.

The RBAC configuration is the server's own file (``VMFARM_SERVER_RBAC_FILE``), with an
optional users file for groups the identity provider does not send: nothing the caller has
(environment, working directory, files) decides what they may do.
"""

from __future__ import annotations

from pathlib import Path

from pydantic_settings import BaseSettings, SettingsConfigDict


class ServerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="VMFARM_SERVER_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = 8000
    # OpenID Connect: the issuer URL (its discovery document and JWKS), the audience tokens
    # must name (the client id the CLI signs in with), the claim that lists a person's groups.
    issuer: str | None = None
    audience: str | None = None
    groups_claim: str = "groups"
    jwks_cache_seconds: float = 300.0
    # What ``vmfarm login`` signs in with (GET /api/v1/auth/config): the client id (default:
    # the audience), the scopes, and a client secret only for providers that require one of
    # installed applications (it is handed to every client: not a secret).
    cli_client_id: str | None = None
    cli_scopes: str = "openid profile email"
    cli_client_secret: str | None = None
    # Roles and bindings (app.rbac's file format); required: a server without it refuses.
    rbac_file: Path | None = None
    # Groups the identity provider does not send (``groups: {name: [subject, ...]}``).
    users_file: Path | None = None
    # The web console (/console): its sign-in uses the issuer above with ``audience`` as the
    # client id; the provider may require a client secret. Sessions last this long; cookies
    # are Secure unless the console is served over plain HTTP on purpose (local trials).
    console_client_secret: str | None = None
    console_session_hours: float = 8.0
    console_insecure_cookies: bool = False
