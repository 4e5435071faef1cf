"""Host discovery: static hosts at submit, cloud hosts by the region's workers (a chord).
"""

from __future__ import annotations

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
    has every tag (the first by name; its first region). When none is live, the stage keeps its tags on the control region
    and submitting it is refused with the live workers named (routing.unserved_delegates)."""
    region = "control"
    tags = {*stage.delegate_selectors,
            *(t for st in stage.steps for t in getattr(st.spec, "delegate_selectors", []))}
    if tags and not get_settings().embedded:
        from app.delegates import live_workers, normalise_tags

        want = set(normalise_tags(tags))
        for w in live_workers():
            if want <= set(w.get("tags") or []) and w.get("regions"):
                region = sorted(w["regions"])[0]
                break
    return Host(name=DELEGATE, address="localhost", region=region, infrastructure="",
                connection="Local")


def discover_stage(stage: DeploymentStagePlan) -> list[Host]:
    """The hosts of every infrastructure of the stage, listed here (static lists, or cloud
    discovery in embedded mode); a host named twice or no host at all is bad input. A Custom
    stage's one host is its delegate."""
    if stage.type == "Custom":
        return [delegate_host(stage)]
    hosts: list[Host] = []
    seen: dict[str, str] = {}
    for infra in stage.infrastructures:
        for h in discover(infra.to_json()):
            if h.name in seen:
                raise SpecError(
                    f"host {h.name} appears in infrastructures '{seen[h.name]}' and "
                    f"'{infra.identifier}' of stage '{stage.identifier}'", file=infra.source)
            seen[h.name] = infra.identifier
            hosts.append(h)
    if not hosts:
        raise SpecError(f"stage '{stage.identifier}' targets no hosts",
                        file=stage.infrastructures[0].source if stage.infrastructures else "")
    return hosts


def decide_discovery(s: Session, ex: Execution, run: StageRun, stage_plan: DeploymentStagePlan,
                     dispatches: list[Dispatch]) -> str:
    """'' once the stage's hosts are known, else what is happening (discovery sent, waiting,
    or the stage failed)."""
    rec = s.exec(select(PhaseRun).where(PhaseRun.execution_id == ex.id,
                                        PhaseRun.stage_index == run.stage_index,
                                        PhaseRun.kind == "discover")).first()
    if rec is None:
        work, problems = [], []
        for infra in stage_plan.infrastructures:
            region = discovery_region(infra)
            want = infra_tags(stage_plan, infra)
            chosen, why = choose_tags(stage_plan, region, want)
            if chosen is None:
                problems.append(f"infrastructure '{infra.identifier}': {why}")
            work.append((infra.to_json(), region, want if chosen is None else chosen))
        rec = PhaseRun(execution_id=ex.id, stage_index=run.stage_index, phase=-1,
                       kind="discover", hosts=[],
                       verdict={"infrastructures": [{"identifier": i["identifier"],
                                                     "region": r, "tags": list(t)}
                                                    for i, r, t in work]})
        if problems:  # nobody could list the hosts: fail now instead of waiting in a queue
            rec.status, rec.gate_at = Status.FAILED, utcnow()
            rec.verdict = {**(rec.verdict or {}), "error": "; ".join(problems),
                           "error_class": "Unknown"}
        s.add(rec)
        s.flush()
        if ex.status == Status.QUEUED:
            ex.status, ex.started_at = Status.RUNNING, utcnow()
            s.add(ex)
        run.started_at = utcnow()
        s.add(run)
        if not problems:
            dispatches.append(Dispatch("discover", ex.id, run.stage_index, -1, [],
                                        discover=work))
            return "discovering hosts"
    if rec.status == Status.RUNNING:
        return "discovering hosts"
    if rec.status == Status.FAILED:
        v = rec.verdict or {}
        return stage_failed(s, ex, run, v.get("error", "host discovery failed"),
                             [(None, v.get("error_class") or "Unknown")], None, dispatches) \
            or fail_stage(s, ex, run, v.get("error", "host discovery failed"))
    return ""
