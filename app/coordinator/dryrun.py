"""``vmfarm plan``: what a run would do, as plain data. Touches no host and writes nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from app.coordinator.failure import failure_policy
from app.coordinator.ledger import live_set
from app.coordinator.submit import prepare
from app.db import session_scope
from app.definitions.plan import ApprovalStagePlan


def dry_run(paths: Iterable[str], *, pipeline: str | None = None,
            inputs: Mapping[str, str] | None = None) -> dict[str, Any]:
    """What a run would do, as plain data: hosts per region, phases, every command unit
    rendered for the stage's first host, and what happens on failure. Touches no host and
    writes nothing."""
    from app.units import render_step
    from strategies import plan as plan_phases

    plan, stage_hosts = prepare(paths, pipeline=pipeline, inputs=inputs,
                                execution_id="<dry-run>")
    stages: list[dict[str, Any]] = []
    for stage, hosts in zip(plan.stages, stage_hosts, strict=True):
        if isinstance(stage, ApprovalStagePlan):
            approvers = stage.approval.spec.approvers
            stages.append({"identifier": stage.identifier, "type": "Approval",
                           "approval": stage.approval.to_json(),
                           "summary": f"waits for {approvers.minimum_count} approval(s) "
                                      f"from {', '.join(approvers.user_groups)}"})
            continue
        by_region: dict[str, list[str]] = {}
        for h in hosts:
            by_region.setdefault(h.region, []).append(h.name)
        notes = []
        live: list[str] = []
        if stage.strategy.type == "BlueGreen":
            with session_scope() as s:
                live = live_set(s, stage)
            notes.append(f"traffic is live on: {', '.join(live) if live else 'no host yet'}")
        slots = {h.name: str(h.attributes["slot"]) for h in hosts if h.attributes.get("slot")}
        phases = [p.to_dict() for p in plan_phases(stage.strategy, [h.name for h in hosts],
                                                   live=live, slots=slots)] if hosts else []
        sample = hosts[0] if hosts else None
        steps = [render_step(stage, step, sample) for step in stage.steps]
        stages.append({
            "identifier": stage.identifier,
            "type": stage.type,
            "service": stage.service.identifier,
            "environment": stage.environment.identifier,
            "version": stage.artifact.tag if stage.artifact else None,
            "strategy": stage.strategy.to_json(),
            "hosts_by_region": by_region if hosts else "discovered when the run starts",
            "phases": phases,
            "rendered_for": sample.name if sample else None,
            "steps": steps,
            "on_failure": failure_policy(stage),
            "notes": notes,
        })
    return {"pipeline": plan.identifier, "name": plan.name, "stages": stages}
