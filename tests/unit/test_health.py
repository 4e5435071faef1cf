"""`python -m app.health worker|control|autoscaler`: the container healthchecks, from registry
entries and the autoscaler's record of its rounds (the ping to a real worker is in
tests/service/test_ops_service.py)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from app.health import check_autoscaler, check_worker, main, mark_alive
from app.settings import get_settings


@pytest.fixture
def service_mode(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    # A broker URL makes it service mode; nothing connects to it (no ping here).
    monkeypatch.setenv("VMFARM_BROKER_URL", "redis://127.0.0.1:1/0")
    monkeypatch.setenv("VMFARM_HOME", str(tmp_path))
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def _w(
    name: str, host: str, *, regions: list[str], queues: list[str], live: bool, age: float = 1.0
) -> dict[str, Any]:
    return {
        "name": name,
        "hostname": host,
        "regions": regions,
        "queues": queues,
        "live": live,
        "age": age,
    }


def test_a_worker_of_this_host_must_be_registered_and_beating(service_mode: None) -> None:
    fleet = [
        _w("vmfarm-r1@c1", "c1", regions=["r1"], queues=["vmfarm.r1"], live=True),
        _w("vmfarm-r2@c2", "c2", regions=["r2"], queues=["vmfarm.r2"], live=False, age=400),
        _w("vmfarm-control@c3", "c3", regions=[], queues=["vmfarm.control"], live=True),
    ]
    ok, why = check_worker("worker", hostname="c1", ping=False, workers=fleet)
    assert ok and "vmfarm-r1@c1: live" in why
    ok, why = check_worker("worker", hostname="c2", ping=False, workers=fleet)
    assert not ok and "vmfarm-r2@c2: last heartbeat 400s ago" in why
    ok, why = check_worker("worker", hostname="c9", ping=False, workers=fleet)
    assert not ok and "no region worker of c9 is registered" in why
    # The control check wants the control queue: a region worker is not a control worker.
    assert not check_worker("control", hostname="c1", ping=False, workers=fleet)[0]
    assert check_worker("control", hostname="c3", ping=False, workers=fleet)[0]
    assert not check_worker("worker", hostname="c3", ping=False, workers=fleet)[0]


def test_without_a_broker_there_is_no_worker_to_check(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("VMFARM_BROKER_URL", raising=False)
    monkeypatch.setenv("VMFARM_HOME", str(tmp_path))
    get_settings.cache_clear()
    ok, why = check_worker("worker", ping=False, workers=[])
    assert not ok and "no broker" in why
    get_settings.cache_clear()


def test_the_autoscaler_is_alive_while_its_rounds_are_recent(tmp_path: Path) -> None:
    path = tmp_path / "autoscale" / "alive.json"
    assert not check_autoscaler(path)[0]
    mark_alive(path, interval=15.0)
    at = json.loads(path.read_text())["at"]
    assert check_autoscaler(path, now=at + 59)[0]
    ok, why = check_autoscaler(path, now=at + 61)  # three intervals, at least a minute
    assert not ok and "61s ago" in why
    mark_alive(path, interval=60.0)
    assert check_autoscaler(path, now=json.loads(path.read_text())["at"] + 170)[0]


def test_the_command_exits_0_1_or_2(service_mode: None, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bogus"]) == 2
    assert main(["autoscaler"]) == 1  # no round recorded under VMFARM_HOME
    assert "no autoscale round recorded" in capsys.readouterr().err
    mark_alive(get_settings().home_dir / "autoscale" / "alive.json", interval=15)
    assert main(["autoscaler"]) == 0
