"""Worker autoscaling: the pure decision (hysteresis, bounds), the configuration and the local
process executor (on stand-in processes). `vmfarm autoscale` on real workers is in
tests/service/test_autoscale.py.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from app.autoscale import (
    Autoscaler,
    Decision,
    Fleet,
    LocalProcessExecutor,
    Observation,
    Policy,
    State,
    _is_our_worker,
    decide,
    load_config,
    policy_from,
)
from app.errors import ConfigError
from tests.conftest import REPO

P = Policy(
    region="rs",
    min=1,
    max=4,
    scale_up_depth=10,
    scale_up_after=30,
    scale_down_depth=2,
    scale_down_after=60,
    step=1,
)


def run(state: State, depth: int | None, workers: int, now: float) -> Decision:
    return decide(state, Observation(depth=depth, workers=workers), now)


# --- the decision --------------------------------------------------------------------------------


def test_the_count_is_brought_within_min_and_max_at_once() -> None:
    up = run(State(P), depth=0, workers=0, now=0)
    assert (up.action, up.current, up.target) == ("up", 0, 1)
    down = run(State(P), depth=500, workers=6, now=0)
    assert (down.action, down.target) == ("down", 4)
    assert "above max 4" in down.reason
    unknown = run(State(P), depth=None, workers=2, now=0)
    assert (unknown.action, unknown.target) == ("hold", 2)


def test_a_deep_queue_scales_up_only_after_it_stayed_deep_for_the_period() -> None:
    d = run(State(P), depth=11, workers=1, now=100)
    assert (d.action, d.state.above_since) == ("hold", 100)
    d = run(d.state, depth=50, workers=1, now=129)
    assert d.action == "hold" and "of 30s" in d.reason
    d = run(d.state, depth=50, workers=1, now=130)
    assert (d.action, d.target) == ("up", 2)
    # Each step restarts the period: the next one needs another 30 s of deep queue.
    d = run(d.state, depth=50, workers=2, now=131)
    assert d.action == "hold"
    d = run(d.state, depth=50, workers=2, now=160)
    assert (d.action, d.target) == ("up", 3)


def test_the_band_between_the_thresholds_resets_both_periods() -> None:
    d = run(State(P), depth=11, workers=1, now=0)
    d = run(d.state, depth=10, workers=1, now=20)  # not above 10: inside the band
    assert d.action == "hold" and d.state.above_since is None and "within 2..10" in d.reason
    d = run(d.state, depth=11, workers=1, now=25)
    d = run(d.state, depth=11, workers=1, now=50)
    assert d.action == "hold"  # 25 s of deep queue since it came back, not 50
    d = run(d.state, depth=11, workers=1, now=55)
    assert d.action == "up"


def test_a_shallow_queue_scales_down_step_by_step_never_below_min() -> None:
    p = Policy(
        region="rs",
        min=1,
        max=8,
        scale_up_depth=10,
        scale_up_after=0,
        scale_down_depth=2,
        scale_down_after=60,
        step=2,
    )
    d = run(State(p), depth=1, workers=4, now=0)
    d = run(d.state, depth=0, workers=4, now=59)
    assert d.action == "hold"
    d = run(d.state, depth=0, workers=4, now=60)
    assert (d.action, d.target) == ("down", 2)
    d = run(d.state, depth=0, workers=2, now=119)
    assert d.action == "hold"
    d = run(d.state, depth=0, workers=2, now=120)
    assert (d.action, d.target) == ("down", 1)  # the step stops at min
    d = run(d.state, depth=0, workers=1, now=500)
    assert d.action == "hold" and "at min 1" in d.reason
    # With no period, a deep queue scales up at the first look, by step, up to max.
    d = run(State(p), depth=11, workers=7, now=0)
    assert (d.action, d.target) == ("up", 8)
    d = run(d.state, depth=11, workers=8, now=1)
    assert d.action == "hold" and "at max 8" in d.reason


def test_policies_are_checked() -> None:
    for values, says in (
        ({"min": 3, "max": 2}, "max (2) must be at least min (3)"),
        ({"scaleDownQueueDepth": 20, "scaleUpQueueDepth": 10}, "must not exceed scaleUpQueueDepth"),
        ({"scaleUpAfter": "soon"}, "not a duration"),
        ({"step": 0}, "step must be 1 or more"),
        ({"max": "many"}, "whole number"),
        ({"tags": ["GPU"]}, "invalid worker tag"),
        ({"maxWorkers": 3}, "unknown setting"),
    ):
        with pytest.raises(ConfigError, match=re.escape(says)):
            policy_from("rs", values)
    with pytest.raises(ConfigError, match="invalid region"):
        policy_from("Bad Region", {})
    p = policy_from("rs", {"scaleUpAfter": "1m30s", "tags": "pci,gpu", "concurrency": 4})
    assert (p.scale_up_after, p.tags, p.concurrency) == (90.0, ("gpu", "pci"), 4)
    assert p.queues() == ["vmfarm.rs", "vmfarm.rs[gpu,pci]", "vmfarm.rs[gpu]", "vmfarm.rs[pci]"]


def test_the_example_file_and_a_file_of_ours_load(tmp_path: Path) -> None:
    example = load_config(REPO / "configs" / "autoscale.yaml")
    assert {p.region for p in example.policies} == {"us-east-1", "eu-west-1"}
    f = tmp_path / "as.yaml"
    f.write_text("interval: 2s\nregions:\n  rs:\n    min: 2\n    max: 3\n    scaleDownAfter: 1m\n")
    cfg = load_config(f)
    assert cfg.interval == 2.0
    [p] = cfg.policies
    assert (p.region, p.min, p.max, p.scale_down_after, p.scale_up_depth) == ("rs", 2, 3, 60, 50)
    f.write_text("regions:\n  rs:\n    min: -1\n")
    with pytest.raises(ConfigError, match=re.escape(f"{f}: regions.rs: min must be 0 or more")):
        load_config(f)
    with pytest.raises(ConfigError, match="no such autoscale file"):
        load_config(tmp_path / "missing.yaml")


# --- the loop with a fake executor ---------------------------------------------------------------


@dataclass
class FakeExecutor:
    started: list[str] = field(default_factory=list)
    stopped: list[str] = field(default_factory=list)
    mine: dict[str, str] = field(default_factory=dict)  # name -> region
    halting: set[str] = field(default_factory=set)

    def refresh(self, fleet: Fleet) -> None:
        pass

    def running(self, region: str) -> list[str]:
        return [n for n, r in self.mine.items() if r == region and n not in self.halting]

    def stopping(self, region: str) -> list[str]:
        return [n for n, r in self.mine.items() if r == region and n in self.halting]

    def start(self, policy: Policy, count: int, taken: Iterable[str] = ()) -> list[str]:
        names = [f"w{len(self.mine) + i}" for i in range(count)]
        self.mine.update(dict.fromkeys(names, policy.region))
        self.started += names
        return names

    def stop(self, region: str, count: int, fleet: Fleet) -> list[str]:
        names = self.running(region)[:count]
        self.halting.update(names)
        self.stopped += names
        return names

    def shutdown(self, timeout: float) -> None:
        pass


def test_workers_starting_or_stopping_are_counted_as_such() -> None:
    clock = [0.0]
    registered: dict[str, dict[str, Any]] = {"static@h": {"in_flight": 0}}
    depth = [0]

    def observe(policies: Sequence[Policy]) -> Fleet:
        return Fleet(workers={"rs": dict(registered)}, depths={"vmfarm.rs": depth[0]})

    ex = FakeExecutor()
    p = Policy(
        region="rs",
        min=2,
        max=3,
        scale_up_depth=5,
        scale_up_after=0,
        scale_down_depth=1,
        scale_down_after=0,
    )
    scaler = Autoscaler(policies=[p], executor=ex, observe=observe, clock=lambda: clock[0])
    [d] = scaler.step()
    assert (d.current, d.target, ex.started) == (1, 2, ["w0"])
    # w0 has not registered yet: it counts, nothing more is started.
    [d] = scaler.step()
    assert (d.current, d.action, ex.started) == (2, "hold", ["w0"])
    depth[0] = 9
    [d] = scaler.step()
    assert (d.current, d.target, ex.started) == (2, 3, ["w0", "w1"])
    registered.update({"w0": {}, "w1": {}})
    depth[0] = 0
    [d] = scaler.step()
    assert (d.current, d.target, ex.stopped) == (3, 2, ["w0"])
    # w0 is stopping but still registered: not counted, not stopped twice.
    [d] = scaler.step()
    assert (d.current, d.action) == (2, "hold") and ex.stopped == ["w0"]
    # Dry run: no executor, decisions only.
    dry = Autoscaler(policies=[p], executor=None, observe=observe)
    [d] = dry.step()
    assert (d.current, d.target) == (3, 2)


# --- the local process executor ------------------------------------------------------------------


def test_the_executor_adopts_and_stops_only_its_own_workers_by_name_and_pid(tmp_path: Path) -> None:
    ex = LocalProcessExecutor(log_dir=tmp_path, hostname="hostx")
    # Stand-ins for worker processes: they only need to exist, with these command lines.
    sleeper = [sys.executable, "-c", "import time; time.sleep(120)", "worker"]
    mine = subprocess.Popen([*sleeper, "autoscale-rs-7@hostx"])
    other = subprocess.Popen([*sleeper, "w-rs@hostx"])
    try:
        assert _is_our_worker(mine.pid, "autoscale-rs-7@hostx")
        assert not _is_our_worker(mine.pid, "autoscale-rs-8@hostx")
        fleet = Fleet(
            workers={
                "rs": {
                    "autoscale-rs-7@hostx": {"pid": mine.pid, "in_flight": 0},
                    "autoscale-rs-9@hostx": {
                        "pid": other.pid,
                        "in_flight": 0,
                    },  # pid not that worker
                    "autoscale-rs-2@elsewhere": {"pid": other.pid, "in_flight": 0},
                    "w-rs@hostx": {"pid": other.pid, "in_flight": 0},
                }
            },
            depths={},
        )
        ex.refresh(fleet)
        assert ex.running("rs") == ["autoscale-rs-7@hostx"]
        assert ex.stop("rs", 5, fleet) == ["autoscale-rs-7@hostx"]
        assert ex.stopping("rs") == ["autoscale-rs-7@hostx"] and ex.running("rs") == []
        assert mine.wait(timeout=30) == -signal.SIGTERM
        ex.refresh(fleet)
        assert ex.stopping("rs") == [] and other.poll() is None
    finally:
        for p in (mine, other):
            if p.poll() is None:
                p.kill()
            p.wait()


# --- vmfarm autoscale on real workers ------------------------------------------------------------
