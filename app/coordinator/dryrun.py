"""``vmfarm plan``: what a run would do, as plain data. Touches no host and writes nothing."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from app.coordinator.failure import failure_policy
from app.coordinator.ledger import after_failure_status, live_set
from app.coordinator.submit import prepare
from app.db import session_scope
from app.definitions.plan import ApprovalStagePlan, PipelineStagePlan, Plan, StepPlan
from app.definitions.plan import step_when as own_when
from app.providers.base import Host
from app.status import Status


def dry_run(
    paths: Iterable[str], *, pipeline: str | None = None, inputs: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """What a run would do, as plain data: hosts per region, phases, every command unit
    rendered for the stage's first host, and what happens on failure. Touches no host and
    writes nothing."""
    plan, stage_hosts = prepare(paths, pipeline=pipeline, inputs=inputs, execution_id="<dry-run>")
    return {"pipeline": plan.identifier, "name": plan.name, "stages": _stages(plan, stage_hosts)}


def _stages(plan: Plan, stage_hosts: list[list[Host]]) -> list[dict[str, Any]]:
    """Each stage of ``plan`` as ``vmfarm plan`` shows it (a Pipeline stage: its child's)."""
    from app.coordinator.submit import static_hosts
    from app.units import render_step
    from strategies import plan as plan_phases

    stages: list[dict[str, Any]] = []
    for stage, hosts in zip(plan.stages, stage_hosts, strict=True):
        from app.coordinator.machine import stage_skip

        skipped = stage_skip(stage, failed=False).removeprefix(Status.WHEN) or None
        after = after_failure_status(stage)
        if after != "Success":  # what the plan of a run that goes well cannot show
            skipped = (
                (f"{skipped}; it runs only if an earlier stage fails" if skipped else None)
                if after == "Failure"
                else skipped
            )
        if isinstance(stage, PipelineStagePlan):
            child = stage.child_plan()
            stages.append(
                {
                    "identifier": stage.identifier,
                    "name": stage.name,
                    "type": "Pipeline",
                    "skipped_by_when": skipped,
                    "pipeline": stage.pipeline,
                    "inputs": dict(stage.child_inputs),
                    "outputs": {o["name"]: o["value"] for o in stage.outputs},
                    "summary": f"runs pipeline '{stage.pipeline}' ({child.name}) as an "
                    "execution of its own and waits for it; a failed child fails the stage",
                    "stages": _stages(child, static_hosts(child)),
                }
            )
            continue
        if isinstance(stage, ApprovalStagePlan):
            approvers = stage.approval.spec.approvers
            stages.append(
                {
                    "identifier": stage.identifier,
                    "type": "Approval",
                    "skipped_by_when": skipped,
                    "approval": stage.approval.to_json(),
                    "summary": f"waits for {approvers.minimum_count} approval(s) "
                    f"from {', '.join(approvers.user_groups)}",
                }
            )
            continue
        by_region: dict[str, list[str]] = {}
        for h in hosts:
            by_region.setdefault(h.region, []).append(h.name)
        notes = []
        later = [
            st.identifier
            for st in plan.stages[stage.index + 1 :]
            if after_failure_status(st) != "Success"
        ]
        if later:
            notes.append(
                f"if this stage fails, the pipeline goes on to {', '.join(later)} "
                "(their when runs them after a failure), then ends FAILED"
            )
        live: list[str] = []
        if stage.strategy.type == "BlueGreen":
            with session_scope() as s:
                live = live_set(s, stage)
            notes.append(f"traffic is live on: {', '.join(live) if live else 'no host yet'}")
            if stage.strategy.traffic is not None:
                notes.append(f"traffic switches in: {stage.strategy.traffic.describe()}")
        slots = {h.name: str(h.attributes["slot"]) for h in hosts if h.attributes.get("slot")}
        phases = (
            [
                p.to_dict()
                for p in plan_phases(
                    stage.strategy, [h.name for h in hosts], live=live, slots=slots
                )
            ]
            if hosts
            else []
        )
        sample = hosts[0] if hosts else None
        steps = [
            {**render_step(stage, step, sample), "when": step_when(step), "loop": step.loop}
            for step in stage.steps
        ]
        stages.append(
            {
                "identifier": stage.identifier,
                "name": stage.name,
                "loop": stage.loop,
                # Iterations of its loop run side by side, this many at once.
                "concurrency": {
                    **stage.concurrency.to_json(),
                    "says": stage.concurrency.describe([st.identifier for st in plan.stages]),
                }
                if stage.concurrency
                else None,
                "skipped_by_when": skipped,
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
                "watch": watch_plan(stage),
            }
        )
    return stages


def watch_plan(stage: Any) -> dict[str, Any] | None:
    """What the stage's watch after deployment will do (``vmfarm plan``); None without one."""
    from app.settings import get_settings

    spec = getattr(stage, "watch", None)
    if spec is None:
        return None
    return {
        "window": spec.window_seconds(),
        "interval": spec.interval_seconds(),
        "lookback": spec.lookback_seconds(),
        "prometheus": spec.prometheus_url or get_settings().prometheus_url,
        "instance": spec.instance,
        "health_check": spec.health_check.url if spec.health_check else None,
        "triggers": [
            {"name": t.name, "condition": t.condition, "window": t.window_seconds()}
            for t in spec.triggers
        ],
    }


def step_when(step: StepPlan) -> str | None:
    """What the step's ``when`` (and its group's) does, in one sentence; None without one."""
    from app.definitions.conditions import ConditionError, evaluate, parse

    whens = [w for w in (own_when(step), step.group_when) if w is not None]
    if not whens:
        return None
    statuses = {w.stage_status for w in whens}
    said = []
    if "Failure" in statuses:
        said.append("runs only on hosts where an earlier step failed (skipped on the others)")
    elif statuses == {"All"}:
        said.append("runs on every host, whether earlier steps failed or not")
    for w in whens:
        if not w.condition:
            continue

        def lookup(name: str) -> str:
            raise ConditionError(name)

        try:
            holds = evaluate(parse(w.condition), lookup)
        except ConditionError:  # names a host's value: judged on each host
            said.append(f"runs where {w.condition} holds (judged on each host)")
            continue
        said.append(
            f"condition {w.condition} is {'true' if holds else 'false'}"
            + ("" if holds else ": skipped on every host")
        )
    return "; ".join(said) or None
