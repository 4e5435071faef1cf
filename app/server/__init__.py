"""``vmfarm server``: the control plane's HTTP API (FastAPI on uvicorn), over the same ledger
and broker as every other process.

Every route but ``/api/health`` needs a bearer token (an OIDC token of the configured issuer
or an API token: ``deps.current_identity``) and checks a permission of the server's RBAC
configuration (``deps.require``). One module per resource under ``routes/``; each is a
router that ``create_app`` includes. OpenAPI at ``/api/docs``.
"""

from __future__ import annotations

from app.server.app import create_app

__all__ = ["create_app"]
