"""`vmfarm autoscale --dry-run` says what the real run does: which workers it would stop, and
that a worker it did not start (started by hand) is left running, so the region does not go
down to the target. The real run here is the LocalProcessExecutor on processes of this test
(sleepers named like workers: it only signals its own, found by name and pid)."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from app.autoscale import Autoscaler, Fleet, LocalProcessExecutor, Policy

POLICY = Policy(
    region="rs",
    min=0,
    max=3,
    scale_up_depth=5,
    scale_up_after=0,
    scale_down_depth=1,
    scale_down_after=0,
    step=3,
)


@pytest.fixture
def sleepers() -> Iterator[dict[str, subprocess.Popen[bytes]]]:
    """Two processes named like workers of region rs: one the autoscaler of host hostx
    started, one started by hand."""
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(300)", "worker", name]
        )
        for name in ("autoscale-rs-1@hostx", "w-manual@hostx")
    }
    yield procs
    for p in procs.values():
        if p.poll() is None:
            p.kill()
        p.wait()


def _observe(workers: dict[str, dict[str, Any]]) -> Any:
    def observe(policies: Sequence[Policy]) -> Fleet:
        return Fleet(workers={"rs": dict(workers)}, depths={"vmfarm.rs": 0})

    return observe


def test_a_hand_started_worker_is_not_promised_away(tmp_path: Path) -> None:
    fleet = {"w-manual@hostx": {"pid": 1, "in_flight": 0}}
    dry = Autoscaler(
        policies=[POLICY],
        executor=None,
        observe=_observe(fleet),
        preview=LocalProcessExecutor(log_dir=tmp_path, hostname="hostx"),
    )
    real = Autoscaler(
        policies=[POLICY],
        observe=_observe(fleet),
        executor=LocalProcessExecutor(log_dir=tmp_path, hostname="hostx"),
    )
    [d], [r] = dry.step(), real.step()
    assert (d.current, d.target, d.action) == (1, 0, "down")
    assert d.stops == () and d.keeps == ("w-manual@hostx",) and d.reached == 1
    assert (
        "not stopped (not started by this autoscaler): w-manual@hostx; the region stays "
        "at 1" in str(d)
    )
    assert d.as_dict() == r.as_dict() and str(d) == str(r)


def test_dry_run_and_real_run_stop_the_same_workers(
    tmp_path: Path, sleepers: dict[str, subprocess.Popen[bytes]]
) -> None:
    fleet = {name: {"pid": p.pid, "in_flight": 0} for name, p in sleepers.items()}
    dry = Autoscaler(
        policies=[POLICY],
        executor=None,
        observe=_observe(fleet),
        preview=LocalProcessExecutor(log_dir=tmp_path, hostname="hostx"),
    )
    [d] = dry.step()
    # Nothing was signalled by the dry run.
    assert all(p.poll() is None for p in sleepers.values())
    real = Autoscaler(
        policies=[POLICY],
        observe=_observe(fleet),
        executor=LocalProcessExecutor(log_dir=tmp_path, hostname="hostx"),
    )
    [r] = real.step()
    assert d.as_dict() == r.as_dict() and str(d) == str(r)
    assert (r.current, r.target, r.stops, r.keeps, r.reached) == (
        2,
        0,
        ("autoscale-rs-1@hostx",),
        ("w-manual@hostx",),
        1,
    )
    assert sleepers["autoscale-rs-1@hostx"].wait(timeout=30) == -signal.SIGTERM
    assert sleepers["w-manual@hostx"].poll() is None  # the hand-started one keeps running


def test_a_decision_that_reaches_its_target_names_no_kept_worker(
    tmp_path: Path, sleepers: dict[str, subprocess.Popen[bytes]]
) -> None:
    fleet = {name: {"pid": p.pid, "in_flight": 0} for name, p in sleepers.items()}
    policy = Policy(region="rs", min=1, max=3, scale_down_depth=1, scale_down_after=0)
    dry = Autoscaler(
        policies=[policy],
        executor=None,
        observe=_observe(fleet),
        preview=LocalProcessExecutor(log_dir=tmp_path, hostname="hostx"),
    )
    [d] = dry.step()
    assert (d.target, d.stops, d.keeps, d.reached) == (1, ("autoscale-rs-1@hostx",), (), 1)
    assert str(d).endswith("; stops autoscale-rs-1@hostx")
