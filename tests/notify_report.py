"""A failed run's report as app.report.execution_report shapes it, for the notification tests
(tests/unit/test_notify.py builds messages from it, tests/service/test_notify.py delivers
them)."""

from __future__ import annotations

from typing import Any

from app.models import Status

EX = "a1b2c3d4e5f6"
SECRET = "hunter2-s3cr3t"


def host_row(
    name: str,
    status: str,
    *,
    step_error: str | None = None,
    cls: str = "CommandFailed",
    exit_code: int | None = 1,
    verification: str | None = None,
) -> dict[str, Any]:
    steps = [
        {
            "step": "fetch",
            "status": Status.SUCCEEDED,
            "error": None,
            "error_class": None,
            "exit_code": 0,
        }
    ]
    if step_error is not None:
        steps.append(
            {
                "step": "install",
                "status": Status.FAILED,
                "error": step_error,
                "error_class": cls,
                "exit_code": exit_code,
            }
        )
    return {
        "host": name,
        "region": "r1",
        "status": status,
        "steps": steps,
        "verification": verification,
        "rollback": None,
    }


def failed_report() -> dict[str, Any]:
    """The shape of app.report.execution_report for a run whose second stage failed."""
    disk = [
        host_row(f"web-{i:02d}", Status.FAILED, step_error="No space left on device")
        for i in range(1, 13)
    ]
    refused = [
        host_row(
            f"db-{i}",
            Status.FAILED,
            step_error=f"connection to db-{i} refused",
            cls="Connectivity",
            exit_code=None,
        )
        for i in (1, 2)
    ]
    unverified = [host_row("api-1", Status.FAILED, verification="FAILED")]
    leaked = [host_row("cache-1", Status.FAILED, step_error=f"bad token {SECRET}\nmore detail")]
    fine = [host_row("web-99", Status.SUCCEEDED)]
    return {
        "id": EX,
        "pipeline": "web_app",
        "pipeline_name": "Web App",
        "status": Status.FAILED,
        "error": "stage 'deploy_prod': 16 host(s) failed in phase 1",
        "intervention": None,
        "stages": [
            {
                "index": 0,
                "identifier": "deploy_staging",
                "name": "Staging",
                "status": Status.SUCCEEDED,
                "error": None,
                "phases": [],
                "hosts": [host_row("stg-1", Status.SUCCEEDED)],
            },
            {
                "index": 1,
                "identifier": "deploy_prod",
                "name": "Production",
                "status": Status.FAILED,
                "error": "16 host(s) failed in phase 1",
                "phases": [],
                "hosts": [*disk, *refused, *unverified, *leaked, *fine],
            },
        ],
    }
