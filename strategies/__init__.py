"""Deployment strategies: plans as plain data, no Celery, no SQL, no I/O.

``plan(stage, hosts)`` reads the resolved stage's ``strategy`` (see ``app.definitions.loader``) and
returns its phases. Each planner documents its YAML with an example.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

from strategies.basic import Phase, plan_basic
from strategies.bluegreen import plan_blue_green
from strategies.rolling import batch_sizes, plan_canary, plan_rolling, size_of

__all__ = ["Phase", "batch_sizes", "plan", "plan_basic", "plan_blue_green", "plan_canary",
           "plan_rolling", "size_of"]


def plan(stage: dict[str, Any], hosts: Sequence[str], *, live: Collection[str] = (),
         slots: Mapping[str, str] | None = None) -> list[Phase]:
    """Phases for a resolved stage over its hosts (inventory order), by its strategy."""
    strategy = stage.get("strategy") or {}
    kind = strategy.get("type", "Basic")
    verify = bool(strategy.get("verification"))
    names = strategy.get("phaseNames")
    if kind == "Rolling":
        return plan_rolling(hosts, strategy["phases"], names=names,
                            cumulative=bool(strategy.get("cumulative")), verify=verify)
    if kind == "Canary":
        return plan_canary(hosts, strategy["phases"], names=names,
                           verify_after=strategy.get("verifyAfter"))
    if kind == "BlueGreen":
        return plan_blue_green(hosts, live=live, slots=slots)
    return plan_basic(hosts)
