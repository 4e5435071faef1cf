"""Host discovery: static hosts at submit, cloud hosts by the region's workers (a chord);
``vmfarm hosts`` in service mode asks the region's workers too (``discover_on_workers``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlmodel import Session, select

from app.coordinator.failure import fail_stage, stage_failed
from app.coordinator.publish import Dispatch
from app.coordinator.routing import choose_tags, discovery_region, infra_tags
from app.definitions.plan import DeploymentStagePlan
from app.errors import SpecError
from app.models import (
    Execution,
    PhaseRun,
    StageRun,
    Status,
    utcnow,
)
from app.providers.base import Host, discover
from app.settings import get_settings

# The one host of a Custom stage: the delegate (a worker) that runs its steps.
DELEGATE = "delegate"


def delegate_host(stage: DeploymentStagePlan) -> Host:
    """Where a Custom stage's steps run: the control worker (region ``control``, the queue
    vmfarm.control), or with delegateSelectors (the stage's and its steps') a live worker that
    has every tag (the first by name; its first region). When none is live, the stage keeps
    its tags on the control region and submitting it is refused with the live workers named
    (routing.unserved_delegates)."""
    region = "control"
    tags = {
        *stage.delegate_selectors,
        *(t for st in stage.steps for t in getattr(st.spec, "delegate_selectors", [])),
    }
    if tags and not get_settings().embedded:
        from app.delegates import live_workers, normalise_tags

        want = set(normalise_tags(tags))
        for w in live_workers():
            if want <= set(w.get("tags") or []) and w.get("regions"):
                region = sorted(w["regions"])[0]
                break
    return Host(
        name=DELEGATE, address="localhost", region=region, infrastructure="", connection="Local"
    )


def discover_stage(
    stage: DeploymentStagePlan, *, execution_id: str | None = None, s: Session | None = None
) -> list[Host]:
    """The hosts of every infrastructure of the stage, listed here (static lists, or cloud
    discovery in embedded mode); a host named twice or no host at all is bad input. A Custom
    stage's one host is its delegate. With ``execution_id``, earlier stages' outputs named in
    an infrastructure (``<+pipeline.stages.S...output.X>``, e.g. a Terraform step's
    addresses as static hosts) are read from the ledger (app.coordinator.outputs), in ``s``
    when the caller holds a session."""
    from app.coordinator.outputs import names_outputs, render_outputs, stage_outputs

    if stage.type == "Custom":
        return [delegate_host(stage)]
    hosts: list[Host] = []
    seen: dict[str, str] = {}
    for infra in stage.infrastructures:
        data = infra.to_json()
        if execution_id is not None and names_outputs(data["spec"]):
            values = stage_outputs(execution_id, stage.index, s=s)
            data["spec"] = render_outputs(data["spec"], values)
        for h in discover(data):
            if h.name in seen:
                raise SpecError(
                    f"host {h.name} appears in infrastructures '{seen[h.name]}' and "
                    f"'{infra.identifier}' of stage '{stage.identifier}'",
                    file=infra.source,
                )
            seen[h.name] = infra.identifier
            hosts.append(h)
    if not hosts:
        raise SpecError(
            f"stage '{stage.identifier}' targets no hosts",
            file=stage.infrastructures[0].source if stage.infrastructures else "",
        )
    return hosts


def decide_discovery(
    s: Session,
    ex: Execution,
    run: StageRun,
    stage_plan: DeploymentStagePlan,
    dispatches: list[Dispatch],
) -> str:
    """'' once the stage's hosts are known, else what is happening (discovery sent, waiting,
    or the stage failed)."""
    rec = s.exec(
        select(PhaseRun).where(
            PhaseRun.execution_id == ex.id,
            PhaseRun.stage_index == run.stage_index,
            PhaseRun.kind == "discover",
        )
    ).first()
    if rec is None:
        work, problems = [], []
        for infra in stage_plan.infrastructures:
            region = discovery_region(infra)
            want = infra_tags(stage_plan, infra)
            chosen, why = choose_tags(stage_plan, region, want)
            if chosen is None:
                problems.append(f"infrastructure '{infra.identifier}': {why}")
            work.append((infra.to_json(), region, want if chosen is None else chosen))
        rec = PhaseRun(
            execution_id=ex.id,
            stage_index=run.stage_index,
            phase=-1,
            kind="discover",
            hosts=[],
            verdict={
                "infrastructures": [
                    {"identifier": i["identifier"], "region": r, "tags": list(t)}
                    for i, r, t in work
                ]
            },
        )
        if problems:  # nobody could list the hosts: fail now instead of waiting in a queue
            rec.status, rec.gate_at = Status.FAILED, utcnow()
            rec.verdict = {
                **(rec.verdict or {}),
                "error": "; ".join(problems),
                "error_class": "Unknown",
            }
        s.add(rec)
        s.flush()
        if ex.status == Status.QUEUED:
            ex.status, ex.started_at = Status.RUNNING, utcnow()
            s.add(ex)
        run.started_at = utcnow()
        s.add(run)
        if not problems:
            dispatches.append(Dispatch("discover", ex.id, run.stage_index, -1, [], discover=work))
            return "discovering hosts"
    if rec.status == Status.RUNNING:
        return "discovering hosts"
    if rec.status == Status.FAILED:
        v = rec.verdict or {}
        return stage_failed(
            s,
            ex,
            run,
            v.get("error", "host discovery failed"),
            [(None, v.get("error_class") or "Unknown")],
            None,
            dispatches,
        ) or fail_stage(s, ex, run, v.get("error", "host discovery failed"))
    return ""


def discover_on_workers(
    work: Sequence[tuple[dict[str, Any], Sequence[str], Sequence[str] | None]], *, timeout: float
) -> list[dict[str, Any]]:
    """The hosts of each (infrastructure, worker tags, fallback tags or None) as a worker of
    its region lists them: the ``vmfarm.discover`` task a run sends, on the region's (tag)
    queue, so that the caller needs no cloud credentials. One result per item, in order: the
    task's (``{"hosts", "worker", "queue"}``, or ``{"error", "error_class", ...}``), or an error
    when no live worker serves the region or none answered within ``timeout`` seconds."""
    from app import canvas
    from app.coordinator.publish import NO_ANSWER, ask
    from app.delegates import resolve_queue

    out: list[dict[str, Any]] = []
    sent: list[tuple[int, str]] = []
    asked: list[tuple[dict[str, Any], str, tuple[str, ...]]] = []
    for infra, tags, fallback in work:
        region = discovery_region(infra)
        choice = resolve_queue(region, tags)
        if not choice.queue and fallback is not None:
            choice = resolve_queue(region, fallback, True)
        if not choice.queue:
            out.append(
                {
                    "error": choice.message,
                    "error_class": "Unknown",
                    "error_type": "NoWorker",
                    "infrastructure": infra.get("identifier"),
                }
            )
            continue
        out.append({})
        sent.append((len(out) - 1, choice.queue))
        asked.append((infra, region, tuple(choice.tags)))
    answers = ask(canvas.discovery_tasks(asked), timeout=timeout) if asked else []
    for (i, queue), value in zip(sent, answers, strict=True):
        ident = str(work[i][0].get("identifier", ""))
        if value is NO_ANSWER:
            value = {
                "error": f"infrastructure '{ident}': no worker took the discovery from "
                f"queue {queue} within {timeout:g} s",
                "error_class": "Unknown",
                "error_type": "NoAnswer",
            }
        elif isinstance(value, BaseException):
            value = {
                "error": f"infrastructure '{ident}': discovery failed on the worker: "
                f"{type(value).__name__}: {value}",
                "error_class": "Unknown",
                "error_type": type(value).__name__,
            }
        out[i] = {"infrastructure": ident, "queue": queue, **value}
    return out
