"""The FastAPI application: settings, the verifier, the RBAC configuration, the routers."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from app.auth.oidc import OidcVerifier
from app.errors import ConfigError
from app.rbac import RbacConfig, load_rbac
from app.server.settings import ServerSettings


class RbacSource:
    """The server's RBAC configuration, read again when its file (or the users file)
    changes; a file that became invalid keeps the last good configuration and says so."""

    def __init__(self, path: Path, users_file: Path | None) -> None:
        self.path = path
        self.users_file = users_file
        self._lock = threading.Lock()
        self._stamp: tuple[float, float] | None = None
        self._cfg: RbacConfig | None = None
        self.get()  # a bad file stops the server at start, not at the first request

    def _mtimes(self) -> tuple[float, float]:
        users = (
            self.users_file.stat().st_mtime if self.users_file and self.users_file.exists() else 0.0
        )
        return self.path.stat().st_mtime, users

    def _groups(self) -> dict[str, frozenset[str]]:
        import yaml

        if self.users_file is None:
            return {}
        try:
            data = yaml.safe_load(self.users_file.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(
                f"cannot read the server's users file {self.users_file}: {exc}"
            ) from None
        raw = data.get("groups") if isinstance(data, dict) else None
        if not isinstance(raw, dict):
            raise ConfigError(
                f"{self.users_file}: 'groups' must map group names to lists of subjects"
            )
        return {str(g): frozenset(str(u) for u in (m or [])) for g, m in raw.items()}

    def get(self) -> RbacConfig:
        with self._lock:
            try:
                stamp = self._mtimes()
            except OSError as exc:
                if self._cfg is None:
                    raise ConfigError(
                        f"cannot read the server's RBAC file {self.path}: {exc.strerror}"
                    ) from None
                return self._cfg
            if self._cfg is not None and stamp == self._stamp:
                return self._cfg
            try:
                cfg = load_rbac(self.path, groups=self._groups())
            except ConfigError:
                if self._cfg is None:
                    raise
                import logging

                logging.getLogger("vmfarm.server").exception(
                    "the RBAC configuration changed and is invalid: keeping the last good one"
                )
                self._stamp = stamp
                return self._cfg
            assert cfg is not None
            self._cfg, self._stamp = cfg, stamp
            return cfg


def create_app(settings: ServerSettings | None = None) -> FastAPI:
    """The server application. ConfigError when its configuration is incomplete: no RBAC
    file, or an issuer without an audience."""
    from app.server.routes import auth, executions, health, registry, tokens, webhooks

    cfg = settings or ServerSettings()
    if cfg.rbac_file is None:
        raise ConfigError(
            "the server needs its RBAC configuration: set "
            "VMFARM_SERVER_RBAC_FILE (roles and bindings; see app/rbac.py)"
        )
    if bool(cfg.issuer) != bool(cfg.audience):
        raise ConfigError(
            "OIDC needs both VMFARM_SERVER_ISSUER and VMFARM_SERVER_AUDIENCE "
            "(the client id tokens are issued to)"
        )
    verifier = (
        OidcVerifier(
            cfg.issuer,
            cfg.audience,
            groups_claim=cfg.groups_claim,
            jwks_lifespan=cfg.jwks_cache_seconds,
        )
        if cfg.issuer and cfg.audience
        else None
    )
    api = FastAPI(
        title="vmfarm",
        summary="Deployments to fleets of VMs: the control plane",
        docs_url="/api/docs",
        openapi_url="/api/openapi.json",
        redoc_url=None,
    )
    state: Any = api.state
    state.settings = cfg
    state.verifier = verifier
    state.rbac = RbacSource(cfg.rbac_file, cfg.users_file)
    api.include_router(health.router)
    api.include_router(auth.router)
    api.include_router(tokens.router)
    api.include_router(executions.router)
    api.include_router(webhooks.router)
    api.include_router(registry.router)
    from app.server.console import install

    install(api)  # the web console (/console)
    return api


__all__ = ["RbacSource", "create_app"]
