"""``GET /api/health``: is the server up, can it reach the ledger and the broker? Open (no
token): load balancers and orchestrators ask it. It says only yes or no per component."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response, status

router = APIRouter(tags=["health"])


def _ledger() -> bool:
    from sqlalchemy import text

    from app.db import session_scope

    try:
        with session_scope(wait=0) as s:
            s.execute(text("SELECT 1"))
        return True
    except Exception:
        return False


def _broker() -> bool:
    from app.celery import app

    try:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=3)
        return True
    except Exception:
        return False


@router.get("/api/health")
def health(response: Response) -> dict[str, Any]:
    """``ok`` when the ledger and the broker answer; 503 and ``degraded`` otherwise."""
    checks = {"ledger": _ledger(), "broker": _broker()}
    ok = all(checks.values())
    if not ok:
        response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    return {"status": "ok" if ok else "degraded", **checks}
