"""Fixtures of the chaos suite: its own lab and the table of faults and outcomes.

The host faults' lab is three real sshd hosts; the service faults (test_service_faults.py:
Redis and PostgreSQL restarted, on private servers) have their own four, and the worker faults
(test_worker_faults.py: a region worker killed with SIGKILL mid-phase, on private servers too)
three. Their addresses, and the private servers' ports, are leased from the allocator
(tests/alloc.py), like every other suite's. Each test adds a row
(fault, outcome, time from the fault to the terminal state); the table is printed at the end of
the session and written to ``tests/chaos/last-run.md``.
"""

from __future__ import annotations

import platform
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.alloc import Allocator
from tests.chaos.services import FAST, Fleet, PrivatePostgres, PrivateRedis, require_services
from tests.conftest import _stop, _wait_for_workers, base_env, lab_hosts

CHAOS_HOSTS = 3  # host faults
SERVICE_HOSTS = 4  # service faults
WORKER_HOSTS = 3  # worker faults
LAST_RUN = Path(__file__).resolve().parent / "last-run.md"


@dataclass
class ChaosRow:
    fault: str
    outcome: str
    seconds: float | None  # from the fault to the execution's terminal state


@dataclass
class ChaosTable:
    rows: list[ChaosRow] = field(default_factory=list)

    def add(self, fault: str, outcome: str, seconds: float | None) -> None:
        self.rows.append(ChaosRow(fault, outcome, seconds))

    @contextmanager
    def row(self, fault: str) -> Iterator[ChaosRow]:
        """A row for ``fault``, added when the block ends however it ends; the block sets its
        outcome and seconds (until then: "no fault injected", no time)."""
        row = ChaosRow(fault, "no fault injected", None)
        try:
            yield row
        finally:
            self.rows.append(row)

    def markdown(self) -> str:
        lines = ["| fault | outcome | time to terminal state |", "|---|---|---|"]
        for r in self.rows:
            secs = "n/a" if r.seconds is None else f"{r.seconds:.1f} s"
            lines.append(f"| {r.fault} | {r.outcome.replace('|', '/')} | {secs} |")
        return "\n".join(lines) + "\n"


TABLE = ChaosTable()


@pytest.fixture(scope="session")
def chaos_table() -> Iterator[ChaosTable]:
    yield TABLE
    if TABLE.rows:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        LAST_RUN.write_text(
            f"# Chaos run, {stamp} on {platform.node()}\n\n"
            "Written by tests/chaos (see tests/chaos/test_host_faults.py, "
            "tests/chaos/test_service_faults.py and tests/chaos/test_worker_faults.py); time "
            "is measured from the fault to the execution's terminal state.\n\n" + TABLE.markdown()
        )


@pytest.fixture(scope="session")
def chaos_lab(tmp_path_factory: pytest.TempPathFactory, alloc: Allocator) -> Iterator[Any]:
    """Three real sshd hosts, one region (embedded mode runs them all)."""
    with lab_hosts(
        tmp_path_factory, alloc, CHAOS_HOSTS, regions=["r1"], folder="chaoslab"
    ) as state:
        yield state


@pytest.fixture(scope="module")
def service_lab(tmp_path_factory: pytest.TempPathFactory, alloc: Allocator) -> Iterator[Any]:
    """Four real sshd hosts, alternating regions r1 and r2."""
    require_services()
    with lab_hosts(
        tmp_path_factory, alloc, SERVICE_HOSTS, regions=["r1", "r2"], folder="svclab"
    ) as state:
        yield state


@pytest.fixture(scope="module")
def worker_lab(tmp_path_factory: pytest.TempPathFactory, alloc: Allocator) -> Iterator[Any]:
    """Three real sshd hosts, all in region r1."""
    require_services()
    with lab_hosts(tmp_path_factory, alloc, WORKER_HOSTS, regions=["r1"], folder="wlab") as state:
        yield state


# --- private services and workers (see services.py) -----------------------------------------------


@pytest.fixture(scope="module")
def private_redis(
    tmp_path_factory: pytest.TempPathFactory, alloc: Allocator
) -> Iterator[PrivateRedis]:
    """The module's own redis-server, on a leased port."""
    require_services()
    with alloc.port() as port:
        server = PrivateRedis(tmp_path_factory.mktemp("redis"), port.port)
        try:
            server.start()
            yield server
        finally:
            server.stop()


@pytest.fixture(scope="module")
def private_pg(alloc: Allocator) -> Iterator[PrivatePostgres]:
    """The module's own PostgreSQL cluster, on a leased port."""
    require_services()
    with alloc.port() as port:
        yield from _private_pg(port.port)


def _private_pg(port: int) -> Iterator[PrivatePostgres]:
    cluster = PrivatePostgres(port)
    try:
        cluster.init()
        cluster.start()
        yield cluster
    finally:
        cluster.cleanup()


@pytest.fixture
def fleet_of(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    private_redis: PrivateRedis,
    private_pg: PrivatePostgres,
) -> Iterator[Callable[[dict[str, list[str]]], Fleet]]:
    """fleet_of({name: worker arguments}): those workers (``<name>@chaos``, started in that
    order, with FAST liveness) on an empty private Redis and a database of the test's own,
    once every one answers a ping; stopped after the test."""
    import redis

    if not private_redis.ping():  # an earlier test's restart failed half-way
        private_redis.start()
    if not private_pg.running:
        private_pg.start()
    for db in (0, 1):
        redis.Redis.from_url(f"{private_redis.url}/{db}").flushdb()
    db_url = private_pg.create_database("fleet_" + re.sub(r"\W", "_", request.node.name)[-40:])
    home = tmp_path / "home"
    home.mkdir()
    env = base_env(
        VMFARM_BROKER_URL=f"{private_redis.url}/0",
        VMFARM_RESULT_BACKEND=f"{private_redis.url}/1",
        VMFARM_DATABASE_URL=db_url,
        VMFARM_HOME=str(home),
        NO_COLOR="1",
        **FAST,
    )
    fleet = Fleet(env=env, home=home, workers=[], logs=[])

    def make(workers: dict[str, list[str]]) -> Fleet:
        for name, args in workers.items():
            fleet.start(name, args)
        try:
            _wait_for_workers(env, [f"{name}@chaos" for name in workers])
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{fleet.worker_logs()}") from None
        return fleet

    try:
        yield make
    finally:
        _stop(fleet.workers)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if TABLE.rows:
        terminalreporter.section("chaos: faults and outcomes")
        terminalreporter.write(TABLE.markdown())
        terminalreporter.write_line(f"(also written to {LAST_RUN})")
