"""Planners are plain data: every host exactly once, phases in order, sizes as the rule says."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from strategies import batch_sizes, plan, plan_basic, plan_blue_green, plan_canary, plan_rolling

hosts_st = st.integers(min_value=1, max_value=400).map(lambda n: [f"h{i}" for i in range(n)])
size_st = st.one_of(
    st.integers(min_value=1, max_value=500),
    st.integers(min_value=1, max_value=100).map(lambda p: f"{p}%"),
)


def want(value: int | str, total: int) -> int:
    if isinstance(value, str):
        return max(1, math.ceil(int(value[:-1]) * total / 100))
    return value


def flat(phases: list) -> list[str]:  # type: ignore[type-arg]
    return [h for p in phases for h in p.hosts]


@given(st.lists(st.text(min_size=1, max_size=12), unique=True, max_size=300))
def test_basic_puts_every_host_in_one_phase_in_inventory_order(hosts: list[str]) -> None:
    phases = plan_basic(hosts)
    if not hosts:
        assert phases == []
        return
    assert len(phases) == 1 and list(phases[0].hosts) == hosts


@given(hosts_st, st.lists(size_st, min_size=1, max_size=6))
def test_rolling_batches_follow_serial_rules(hosts: list[str], sizes: list[int | str]) -> None:
    phases = plan_rolling(hosts, sizes)
    # every host exactly once, in inventory order, phases numbered in order
    assert flat(phases) == hosts
    assert [p.index for p in phases] == list(range(len(phases)))
    # each batch is its entry's size (last entry repeating), except a smaller final remainder
    for i, p in enumerate(phases):
        expected = min(
            want(sizes[min(i, len(sizes) - 1)], len(hosts)),
            len(hosts) - sum(len(q.hosts) for q in phases[:i]),
        )
        assert len(p.hosts) == expected >= 1


@given(hosts_st, st.lists(size_st, min_size=1, max_size=5))
def test_cumulative_phases_reach_each_target_then_the_rest(
    hosts: list[str], sizes: list[int | str]
) -> None:
    phases = plan_canary(hosts, sizes)
    assert flat(phases) == hosts
    # Each phase reaches the next target above what is already deployed (a target that is
    # already reached adds no phase); the last phase takes the rest.
    reached, targets = 0, []
    for v in sizes:
        t = min(len(hosts), want(v, len(hosts)))
        if t > reached:
            targets.append(t)
            reached = t
    if reached < len(hosts):
        targets.append(len(hosts))
    assert [sum(len(q.hosts) for q in phases[: i + 1]) for i in range(len(phases))] == targets
    assert all(p.verify for p in phases[:-1]) and not phases[-1].verify


def test_examples_from_the_issue_and_the_peers() -> None:
    assert batch_sizes(8, ["25%", "50%", "100%"], cumulative=False) == [2, 4, 2]
    assert batch_sizes(8, ["25%", "50%", "100%"], cumulative=True) == [2, 2, 4]
    assert batch_sizes(20, ["30%"], cumulative=False) == [6, 6, 6, 2]  # Ansible docs
    assert batch_sizes(10, [3], cumulative=False) == [3, 3, 3, 1]  # Harness docs
    assert batch_sizes(10, [1, 5, 10], cumulative=False) == [1, 5, 4]  # serial list
    assert batch_sizes(3, ["1%"], cumulative=False) == [1, 1, 1]  # never below 1
    assert batch_sizes(8, [1, "25%", "50%", "100%"], cumulative=False) == [1, 2, 4, 1]
    canary = plan_canary([f"h{i}" for i in range(10)], ["10%", "50%"])
    assert [(p.name, len(p.hosts), p.verify) for p in canary] == [
        ("Canary 1", 1, True),
        ("Canary 2", 4, True),
        ("Primary", 5, False),
    ]


@given(st.integers(min_value=2, max_value=200), st.integers(min_value=0, max_value=2))
def test_blue_green_deploys_to_the_set_without_traffic(n: int, which: int) -> None:
    hosts = [f"h{i}" for i in range(n)]
    half = (n + 1) // 2
    blue, green = hosts[:half], hosts[half:]
    live = [blue, green, []][which]
    deploy, switch = plan_blue_green(hosts, live=live)
    expected = green if live == blue or not live else blue
    assert list(deploy.hosts) == expected and deploy.verify and deploy.kind == "deploy"
    assert switch.kind == "switch" and switch.hosts == deploy.hosts


def test_blue_green_uses_slot_attributes_when_given() -> None:
    slots = {"a": "blue", "b": "green", "c": "blue", "d": "green"}
    deploy, _ = plan_blue_green(list(slots), live=["a", "c"], slots=slots)
    assert deploy.hosts == ("b", "d")
    with pytest.raises(ValueError, match="two non-empty sets"):
        plan_blue_green(["only"], live=[])


def test_a_stage_without_a_strategy_is_basic() -> None:
    from app.definitions.plan import StrategyPlan

    phases = plan(StrategyPlan(), ["a", "b", "c"])
    assert [p.hosts for p in phases] == [("a", "b", "c")]
