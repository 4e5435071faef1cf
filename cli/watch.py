"""Sending a recorded execution its first work, then watching it to the end.

Embedded (no broker) the worker is a thread of this process, so a run is always watched; with
a broker ``--detach`` returns as soon as the work is sent. The command exits 0 when the
execution succeeded, 1 otherwise.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from rich.live import Live
from rich.text import Text

from cli.console import err, fail, out
from cli.context import Cli
from cli.render import live_view, print_summary


def refuse_detach_when_embedded(watch: bool | None) -> None:
    """``--detach`` needs a broker: embedded, the worker lives (and dies) with this process."""
    from app.settings import get_settings

    if get_settings().embedded and watch is False:
        fail(
            "--detach needs a broker (VMFARM_BROKER_URL): in embedded mode the worker lives "
            "in this process; nothing was run."
        )


def dispatch_and_watch(cli: Cli, execution_id: str, *, watch: bool | None, output: str) -> None:
    """Send a recorded execution's first work, then watch it (or return when detached)."""
    from app.coordinator import advance
    from app.settings import get_settings

    settings = get_settings()
    if output != "json":
        err.print(Text.assemble("execution ", (execution_id, "bold")))
    if settings.embedded:
        from app.worker import EmbeddedWorker

        with EmbeddedWorker(_regions_of(execution_id)):
            advance(execution_id)
            report = _wait(execution_id, live=_live(watch, output))
    else:
        advance(execution_id)
        if watch is False:
            if output == "json":
                cli.json({"id": execution_id, "status": "RUNNING"})
            else:
                out.print(execution_id)
            return
        report = _wait(execution_id, live=_live(watch, output))
    if output == "json":
        cli.json(report)
    else:
        print_summary(report)
    sys.exit(0 if report["status"] == "SUCCEEDED" else 1)


def _live(watch: bool | None, output: str) -> bool:
    """Whether to show the live view: --watch, or by default when stdout is a terminal."""
    if output == "json":
        return False
    return sys.stdout.isatty() if watch is None else watch


def _regions_of(execution_id: str) -> list[str]:
    """The region queues the embedded worker consumes: those of the hosts known now, and those
    cloud discovery will give hosts (it runs once the worker is up: an AWS host's region is
    the region searched)."""
    from sqlmodel import select

    from app.coordinator.outputs import names_outputs
    from app.coordinator.routing import discovery_region
    from app.db import session_scope
    from app.definitions.plan import DeploymentStagePlan, PipelineStagePlan, Plan
    from app.models import Execution, StageRun

    with session_scope() as s:
        runs = s.exec(select(StageRun).where(StageRun.execution_id == execution_id)).all()
        regions = {h["region"] for r in runs for h in r.hosts}
        ex = s.get(Execution, execution_id)
        plan = Plan.of(ex.plan) if ex is not None and ex.plan else None
    stages = list(plan.stages) if plan is not None else []
    while stages:
        stage = stages.pop(0)
        if isinstance(stage, PipelineStagePlan):  # the child's hosts run in this process too
            from app.coordinator.submit import static_hosts

            child = stage.child_plan()
            regions.update(h.region for hosts in static_hosts(child) for h in hosts)
            stages.extend(child.stages)
            continue
        if not isinstance(stage, DeploymentStagePlan):
            continue
        for infra in stage.infrastructures:
            if infra.provider == "static" and names_outputs(infra.spec):
                # hosts named by an earlier stage's outputs: listed when the stage starts
                from app.providers.base import DEFAULT_REGION

                hosts = infra.spec.get("hosts") or []
                regions.update(str(h.get("region") or "") for h in hosts if h.get("region"))
                regions.add(str(infra.spec.get("region") or DEFAULT_REGION))
            if infra.provider == "static":
                continue
            regions.add(discovery_region(infra))
            listed = ((infra.spec.get("hostFilter") or {}).get("spec") or {}).get("regions")
            regions.update(str(r) for r in listed or [])
    return sorted(regions) or ["default"]


def _wait(execution_id: str, *, live: bool) -> dict[str, Any]:
    from app.models import Status

    if not live:
        # Poll the status column (one short query) and build the report once at the end:
        # a report of a large run costs tens of milliseconds.
        from app.settings import get_settings

        # Embedded, every read takes SQLite's write lock (BEGIN IMMEDIATE): ask less often.
        pause = 0.25 if get_settings().embedded else 0.1
        told = False
        watched: set[int] = set()
        polls = 0
        status = _status_of(execution_id)
        while status not in Status.TERMINAL:
            time.sleep(pause)
            status = _status_of(execution_id) or status
            polls += 1
            if status == Status.RUNNING and polls % 8 == 0:  # every second or two
                for stage, ends in _watches(execution_id, watched):
                    err.print(
                        f"execution {execution_id}: stage {stage} passed its last phase; "
                        f"watching it until {ends} (rollbackStrategy.triggers): the run "
                        "ends when the watch does"
                    )
            if status == Status.WAITING and not told:
                if _report(execution_id).get("intervention"):
                    err.print(
                        f"execution {execution_id} waits for a manual intervention: "
                        f"vmfarm intervene {execution_id} ACTION"
                    )
                else:
                    err.print(
                        f"execution {execution_id} is waiting for approval: "
                        f"vmfarm approve {execution_id} (or reject)"
                    )
                told = True
        return _report(execution_id)
    report = _report(execution_id)
    with Live(live_view(report), console=out, refresh_per_second=8, transient=True) as view:
        while report["status"] not in Status.TERMINAL:
            time.sleep(0.25)
            report = _report(execution_id)
            view.update(live_view(report))
    return report


def _watches(execution_id: str, told: set[int]) -> list[tuple[str, str]]:
    """Watches after deployment that started since the last call: (stage, window end)."""
    from sqlmodel import select

    from app.db import session_scope
    from app.models import PhaseRun, StageRun
    from app.report import watch_view

    found: list[tuple[str, str]] = []
    with session_scope() as s:
        for rec in s.exec(
            select(PhaseRun).where(PhaseRun.execution_id == execution_id, PhaseRun.kind == "watch")
        ).all():
            if rec.stage_index in told:
                continue
            told.add(rec.stage_index)
            run = s.exec(
                select(StageRun).where(
                    StageRun.execution_id == execution_id,
                    StageRun.stage_index == rec.stage_index,
                )
            ).one()
            found.append(
                (run.identifier, str((watch_view(rec, planned=True) or {}).get("ends_at")))
            )
    return found


def _status_of(execution_id: str) -> str:
    from sqlmodel import select

    from app.db import retrying, session_scope
    from app.models import Execution

    def read() -> str:
        with session_scope() as s:
            return s.exec(select(Execution.status).where(Execution.id == execution_id)).one()

    # A watcher outlives a ledger restart: it waits for the server instead of failing.
    return retrying(read, what="watching the execution")


def _report(execution_id: str) -> dict[str, Any]:
    from app.db import retrying
    from app.report import execution_report

    report = retrying(lambda: execution_report(execution_id), what="watching the execution")
    assert report is not None
    return report
