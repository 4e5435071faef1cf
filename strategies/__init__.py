"""Deployment strategies: plans as plain data, no Celery, no SQL, no I/O.

``plan(strategy, hosts)`` reads a resolved stage's strategy (``app.definitions.plan``) and
returns its phases. Each planner documents its YAML with an example.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

from app.definitions.plan import StrategyPlan
from strategies.basic import Phase, plan_basic
from strategies.bluegreen import plan_blue_green
from strategies.rolling import batch_sizes, plan_canary, plan_rolling, size_of

__all__ = [
    "Phase",
    "batch_sizes",
    "plan",
    "plan_basic",
    "plan_blue_green",
    "plan_canary",
    "plan_rolling",
    "size_of",
]


def plan(
    strategy: StrategyPlan,
    hosts: Sequence[str],
    *,
    live: Collection[str] = (),
    slots: Mapping[str, str] | None = None,
) -> list[Phase]:
    """Phases for a resolved stage's strategy over its hosts (inventory order)."""
    kind = strategy.type
    verify = strategy.verification is not None
    names = strategy.phase_names
    if kind == "Rolling":
        return plan_rolling(
            hosts,
            strategy.phases or [],
            names=names,
            cumulative=strategy.cumulative,
            verify=verify,
            verify_after=strategy.verify_after,
        )
    if kind == "Canary":
        return plan_canary(
            hosts, strategy.phases or [], names=names, verify_after=strategy.verify_after
        )
    if kind == "BlueGreen":
        return plan_blue_green(hosts, live=live, slots=slots, switch_name=strategy.switch_name)
    return plan_basic(hosts)
