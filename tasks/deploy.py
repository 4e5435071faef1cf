"""Region tasks: run on ``vmfarm.<region>`` workers (threads pool), do the SSH work."""

from __future__ import annotations

from typing import Any

from app.canvas import HostStepKey
from app.celery import app


@app.task(name="vmfarm.run_step", bind=True)
def run_step(self: Any, prev: dict[str, Any] | None = None, *,
             key: dict[str, Any]) -> dict[str, Any]:
    """Run one step on one host. ``prev`` is the host's previous step result (chain link)."""
    from tasks.hoststep import execute

    req = self.request
    queue = (req.delivery_info or {}).get("routing_key")
    return execute(HostStepKey.from_dict(key), prev=prev, task_id=req.id, worker=req.hostname,
                   queue=queue)


@app.task(name="vmfarm.check_host", bind=True)
def check_host(self: Any, *, key: dict[str, Any]) -> dict[str, Any]:
    """Verification checks of one host (health endpoint, probe), from its region's worker."""
    from tasks.checks import check

    return check(HostStepKey.from_dict(key), worker=self.request.hostname)
