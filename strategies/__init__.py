"""Deployment strategies: plans as plain data (see strategies/basic.py)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from strategies.basic import Phase, plan_basic

__all__ = ["Phase", "plan", "plan_basic"]


def plan(stage: dict[str, Any], hosts: Sequence[str]) -> list[Phase]:
    """Phases for a resolved stage (``app.spec.resolve``) over the hosts, by its strategy."""
    return plan_basic(hosts)
