"""A region worker's warm start (app.warm) against real sshd lab hosts: after a real embedded
deployment has recorded its hosts in the ledger, warming region r1 opens one pooled SSH
connection per r1 host (none to r2), and a step's lease then reuses it instead of connecting.
The warm start itself runs in this process, as it runs in a `vmfarm worker` process."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from app.connectors.pool import get_pool
from app.settings import get_settings
from app.warm import recent_hosts, warm_start
from tests.conftest import REPO, base_env, run_vmfarm

DEMO = str(REPO / "configs" / "demo")


@pytest.fixture
def deployed_home(tmp_path: Path, lab: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A vmfarm home whose ledger holds one real deployment to every lab host; this process's
    settings point at it; the pool is empty before and after."""
    home = tmp_path / "home"
    done = run_vmfarm(
        "run",
        DEMO,
        str(lab.infrastructure_file),
        "--set",
        "tag=3.0.0",
        env=base_env(VMFARM_HOME=str(home)),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    for name in ("VMFARM_BROKER_URL", "VMFARM_DATABASE_URL", "VMFARM_TEST_CONNECTION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("VMFARM_HOME", str(home))
    get_settings.cache_clear()
    get_pool().close_all()
    try:
        yield home
    finally:
        get_pool().close_all()
        get_settings.cache_clear()


def test_warm_start_connects_the_recent_hosts_of_its_regions_only(
    deployed_home: Path, lab: Any
) -> None:
    r1 = sorted(h.address for h in lab.hosts if h.region == "r1")
    assert r1 and len(r1) < len(lab.hosts)

    report = warm_start(["r1"])

    assert (report.hosts, report.connected, report.failed) == (len(r1), len(r1), [])
    assert get_pool().stats().idle == len(r1)  # none to r2's hosts
    # A step on an r1 host leases the warm connection: nothing new is opened
    host = next(h for h in recent_hosts(["r1"], limit=10, hours=1) if h.address == r1[0])
    from app.execution.step import host_target

    with get_pool().lease(host_target(host, on_delegate=False)) as conn:
        assert conn.run("echo warm").stdout.strip() == "warm"
        stats = get_pool().stats()
        assert (stats.idle, stats.leased) == (len(r1) - 1, 1)


def test_warm_start_obeys_its_limit_and_can_be_turned_off(
    deployed_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VMFARM_WARM_HOSTS", "1")
    get_settings.cache_clear()
    assert warm_start(["r1", "r2"]).connected == 1
    assert get_pool().stats().idle == 1

    get_pool().close_all()
    monkeypatch.setenv("VMFARM_WARM_HOSTS", "0")
    get_settings.cache_clear()
    assert warm_start(["r1", "r2"]).hosts == 0
    assert get_pool().stats().idle == 0


def test_a_host_that_does_not_answer_is_skipped_and_the_others_are_warmed(
    deployed_home: Path, lab: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The ledger also remembers a host on a port where nothing listens (a host since removed)
    from sqlmodel import select

    from app.db import session_scope
    from app.models import StageRun

    with session_scope() as s:
        stage = s.exec(select(StageRun)).first()
        assert stage is not None
        gone = {**stage.hosts[0], "name": "gone", "port": 2, "region": "r1"}
        stage.hosts = [*stage.hosts, gone]
        s.add(stage)
    r1 = [h for h in lab.hosts if h.region == "r1"]

    report = warm_start(["r1"])

    assert report.hosts == len(r1) + 1
    assert report.connected == len(r1)
    assert len(report.failed) == 1 and f"{gone['address']}:2" in report.failed[0]
