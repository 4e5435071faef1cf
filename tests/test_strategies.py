"""Planners are plain data: every host once, in inventory order."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from strategies import plan
from strategies.basic import plan_basic


@given(st.lists(st.text(min_size=1, max_size=12), unique=True, max_size=300))
def test_basic_puts_every_host_in_one_phase_in_inventory_order(hosts: list[str]) -> None:
    phases = plan_basic(hosts)
    if not hosts:
        assert phases == []
        return
    assert len(phases) == 1
    assert list(phases[0].hosts) == hosts
    assert phases[0].index == 0


def test_a_stage_without_a_strategy_is_basic() -> None:
    phases = plan({"identifier": "deploy", "steps": []}, ["a", "b", "c"])
    assert [p.hosts for p in phases] == [("a", "b", "c")]
