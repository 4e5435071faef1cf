"""Delegates: which workers (region queue and tags) take a stage's tasks."""

from __future__ import annotations

import logging
from typing import Any

from app.coordinator.ledger import all_static
from app.definitions.plan import (
    AnyStagePlan,
    DeploymentStagePlan,
    InfrastructurePlan,
    StepPlan,
)
from app.settings import get_settings

log = logging.getLogger("vmfarm.coordinator")


def wanted_tags(
    stage: DeploymentStagePlan, host: dict[str, Any], step: StepPlan | None
) -> tuple[str, ...]:
    """The worker tags a task on ``host`` needs: the pipeline's and stage's selectors, its
    infrastructure's, and the step's own."""
    infra = next(
        (i for i in stage.infrastructures if i.identifier == host.get("infrastructure")), None
    )
    tags = {
        *stage.delegate_selectors,
        *((infra.spec.get("delegateSelectors") or []) if infra else []),
        *(getattr(step.spec, "delegate_selectors", []) if step is not None else []),
    }
    return tuple(sorted(tags))


def infra_tags(stage: DeploymentStagePlan, infra: InfrastructurePlan) -> tuple[str, ...]:
    """The worker tags that list an infrastructure's hosts (discovery)."""
    return wanted_tags(stage, {"infrastructure": infra.identifier}, None)


def choose_tags(
    stage: DeploymentStagePlan, region: str, tags: tuple[str, ...]
) -> tuple[tuple[str, ...] | None, str]:
    """(the tags to route with, a note) for a task of ``region`` that wants ``tags``: the live
    workers with them, else the stage's delegateFallback; (None, why) when nobody can serve."""
    from app.delegates import resolve_queue

    if not tags:
        return (), ""
    choice = resolve_queue(region, tags)
    if choice.queue:
        return tuple(choice.tags), ""
    fallback = stage.delegate_fallback
    if fallback is not None:
        second = resolve_queue(region, fallback, True)
        if second.queue:
            return tuple(second.tags), (
                f"no live worker of region {region} has tags "
                f"[{', '.join(tags)}]: using the fallback "
                f"[{', '.join(fallback) or 'any worker'}]"
            )
    return None, choice.message


def tags_of(
    stage: DeploymentStagePlan, hosts: list[dict[str, Any]], steps: list[StepPlan]
) -> dict[tuple[str, int], tuple[str, ...]]:
    """Routing tags per (host, step index), step -1 being the host's verification checks. A
    requirement no live worker serves keeps its tags: the task waits in its queue for one
    (and fails with Timeout past its dispatch deadline)."""
    out: dict[tuple[str, int], tuple[str, ...]] = {}
    memo: dict[tuple[str, tuple[str, ...]], tuple[str, ...]] = {}
    for h in hosts:
        pairs: list[tuple[int, StepPlan | None]] = [(-1, None), *enumerate(steps)]
        for i, step in pairs:
            want = wanted_tags(stage, h, step)
            if not want:
                continue
            k = (h["region"], want)
            if k not in memo:
                chosen, note = choose_tags(stage, h["region"], want)
                if note:
                    log.warning("stage %s: %s", stage.identifier, note)
                memo[k] = want if chosen is None else chosen
            if memo[k]:
                out[(h["name"], i)] = memo[k]
    return out


def unserved_delegates(stage: DeploymentStagePlan, hosts: list[dict[str, Any]]) -> list[str]:
    """Why no live worker could take some of the stage's tasks (empty when all can)."""
    problems: dict[str, None] = {}
    seen: set[tuple[Any, Any]] = set()
    for h in hosts:
        # The answer depends on the host's infrastructure and region only.
        if (h.get("infrastructure"), h["region"]) in seen:
            continue
        seen.add((h.get("infrastructure"), h["region"]))
        for step in [None, *stage.steps]:
            want = wanted_tags(stage, h, step)
            chosen, why = choose_tags(stage, h["region"], want)
            if chosen is None:
                problems.setdefault(why, None)
    return list(problems)


def queue_served(region: str, tags: tuple[str, ...] = ()) -> bool:
    """Does a live worker consume the region's queue (its tag queue with ``tags``)? Asked of
    the workers themselves (Celery remote control); embedded mode counts as served."""
    from app.celery import app
    from app.delegates import queue_for

    if not get_settings().celery_broker.startswith(("redis://", "rediss://")):
        return True  # embedded: the worker is this process
    try:
        replies = app.control.inspect(timeout=1.0).active_queues()
    except Exception:  # no remote control on this transport
        return True
    if replies is None:
        return False
    queue = queue_for(region, tags)
    return any(q.get("name") == queue for qs in replies.values() for q in qs or [])


def discovered_by_workers(stage: AnyStagePlan) -> bool:
    """Cloud hosts are listed by the region's workers (they hold its credentials); embedded
    runs, and static host lists, need no task."""
    return not get_settings().embedded and not all_static(stage)


def discovery_region(infra: InfrastructurePlan | dict[str, Any]) -> str:
    """The region whose workers list an infrastructure's hosts: its ``region``, else the first
    of ``hostFilter.spec.regions``, else ``default``."""
    spec = infra.spec if isinstance(infra, InfrastructurePlan) else (infra.get("spec") or {})
    regions = ((spec.get("hostFilter") or {}).get("spec") or {}).get("regions") or []
    return str(spec.get("region") or (regions[0] if regions else "") or "default")
