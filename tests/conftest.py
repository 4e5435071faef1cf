"""Fixtures every lane shares: the allocator, the vmfarm command, PostgreSQL, Redis, sshd lab
hosts and Celery workers.

Tests live in lanes, one directory each, run in this order by ``scripts/test`` (DESIGN §10):
``unit/`` (no root, no network service, no lab, no subprocess worker), ``lab/`` (real sshd lab
hosts, embedded mode), ``service/`` (Redis, PostgreSQL, Celery worker processes, the server),
``cloud/`` (moto, the fake Azure and GCP servers of ``fakes/``), ``browser/``, ``chaos/`` and
``e2e/`` (the ``vmfarm`` command in a subprocess, as a user runs it, where it needs no
service: too slow for the unit lane's minute). Each test gets its lane's marker from its
directory, so ``pytest -m unit`` works as well as ``pytest tests/unit``; a run of several lanes
runs them in that order.

Nothing here is mocked. A missing service fails the test (it never skips): CI must provide
Redis on 127.0.0.1:6379, PostgreSQL on 127.0.0.1:5432 and openssh-server, and run as root.
Lab addresses, TCP ports and Redis databases come from the allocator (``tests/alloc.py``), never
from a number written in a test: other checkouts run their tests on this machine at the same time.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.alloc import AddressLease, Allocator
from tests.waiting import wait_for

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
DATA = REPO / "tests" / "data"
PG_ADMIN_URL = os.environ.get("VMFARM_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_BASE = os.environ.get("VMFARM_TEST_REDIS", "redis://127.0.0.1:6379")
LANES = ("unit", "lab", "service", "cloud", "browser", "chaos", "e2e")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark each test with its lane (its directory under tests/) and run the lanes in order."""

    def lane(item: pytest.Item) -> str | None:
        try:
            first = item.path.relative_to(TESTS).parts[0]
        except ValueError:
            return None
        return first if first in LANES else None

    for item in items:
        name = lane(item)
        if name is not None:
            item.add_marker(getattr(pytest.mark, name))
    items.sort(key=lambda item: LANES.index(lane(item) or "chaos"))  # stable within a lane


@pytest.fixture(scope="session", autouse=True)
def no_stored_sign_in(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A config folder of the session's own: a developer's ``vmfarm login`` (in
    ~/.config/vmfarm) would turn every CLI the tests run into a client of their server."""
    old = os.environ.get("XDG_CONFIG_HOME")
    os.environ["XDG_CONFIG_HOME"] = str(tmp_path_factory.mktemp("xdg-config"))
    yield
    if old is None:
        os.environ.pop("XDG_CONFIG_HOME", None)
    else:
        os.environ["XDG_CONFIG_HOME"] = old


# --- the allocator -----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def alloc() -> Iterator[Allocator]:
    """The session's allocator of lab addresses, TCP ports and Redis databases (tests/alloc.py);
    fixtures take leases from it for their own scope, and whatever is left is released here."""
    allocator = Allocator()
    yield allocator
    allocator.close()


@pytest.fixture
def free_port(alloc: Allocator) -> Iterator[Callable[[], int]]:
    """``free_port()``: a TCP port leased for this test (nobody else is handed it meanwhile)."""
    leases = []

    def take() -> int:
        lease = alloc.port()
        leases.append(lease)
        return lease.port

    yield take
    for lease in leases:
        lease.release()


@pytest.fixture
def redis_db(alloc: Allocator) -> Iterator[Callable[[], str]]:
    """``redis_db()``: the URL of an emptied database of the test Redis, leased for this test."""
    leases = []

    def take() -> str:
        lease = alloc.redis_db(REDIS_BASE)
        leases.append(lease)
        return lease.url

    yield take
    for lease in leases:
        lease.release()


@pytest.fixture
def lease_addresses(alloc: Allocator) -> Iterator[Callable[[int], AddressLease]]:
    """``lease_addresses(n)``: a block of n consecutive 127.0.1.x addresses leased for this test
    (``.first`` for ``lab_up(first=...)``, ``.addresses``); every port on them is the test's."""
    leases = []

    def take(count: int) -> AddressLease:
        lease = alloc.addresses(count)
        leases.append(lease)
        return lease

    yield take
    for lease in leases:
        lease.release()


def run_vmfarm(
    *args: str, env: dict[str, str], timeout: float = 180, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the vmfarm command as a user would, in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "cli.main", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        input=input,
    )


@contextmanager
def vmfarm_in_background(*args: str, env: dict[str, str]) -> Iterator[subprocess.Popen[str]]:
    """Start the vmfarm command as a user would, in the background (its output piped, as
    text); kill it on the way out if it still runs."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli.main", *args],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VMFARM_")}
    env["PYTHONPATH"] = str(REPO)
    env.update(extra)
    return env


@contextmanager
def moto_server(
    tmp_path_factory: pytest.TempPathFactory,
    alloc: Allocator,
    *,
    region: str,
    endpoint_env: bool = True,
) -> Iterator[str]:
    """moto in server mode on a free 127.0.0.1 port, and an environment in which boto3 reaches
    only it: fake credentials, no profile, config file, role or instance metadata to fall back
    on, no proxy; with ``endpoint_env`` AWS_ENDPOINT_URL points at it. Yields its URL."""
    import logging

    from moto.server import ThreadedMotoServer

    empty = tmp_path_factory.mktemp("aws") / "none"
    with pytest.MonkeyPatch.context() as env:
        for key in (
            "AWS_PROFILE",
            "AWS_DEFAULT_PROFILE",
            "AWS_ROLE_ARN",
            "AWS_REGION",
            "AWS_WEB_IDENTITY_TOKEN_FILE",
            "AWS_CONTAINER_CREDENTIALS_FULL_URI",
            "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
            "AWS_ENDPOINT_URL_EC2",
            "AWS_ENDPOINT_URL_S3",
            "AWS_ENDPOINT_URL_SECRETS_MANAGER",
            "AWS_ENDPOINT_URL",
            "AWS_SESSION_TOKEN",
            "AWS_MAX_ATTEMPTS",
            "AWS_RETRY_MODE",
            "HTTP_PROXY",
            "HTTPS_PROXY",
            "http_proxy",
            "https_proxy",
        ):
            env.delenv(key, raising=False)
        env.setenv("NO_PROXY", "127.0.0.1,localhost")
        env.setenv("AWS_ACCESS_KEY_ID", "testing")
        env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        env.setenv("AWS_DEFAULT_REGION", region)
        env.setenv("AWS_CONFIG_FILE", str(empty))
        env.setenv("AWS_SHARED_CREDENTIALS_FILE", str(empty))
        env.setenv("AWS_EC2_METADATA_DISABLED", "true")
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        lease = alloc.port()
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=lease.port, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        url = f"http://{host}:{port}"
        if endpoint_env:
            env.setenv("AWS_ENDPOINT_URL", url)
        try:
            yield url
        finally:
            server.stop()
            lease.release()


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session, dropped at the end."""
    import psycopg

    name = f"vmfarm_test_{os.getpid()}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    yield f"{base}/{name}"
    from app.db import reset_engines

    reset_engines()
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def redis_urls(alloc: Allocator) -> Iterator[tuple[str, str]]:
    """Broker and result-backend URLs on two emptied Redis databases leased for the session."""
    with alloc.redis_db(REDIS_BASE) as broker, alloc.redis_db(REDIS_BASE) as results:
        yield broker.url, results.url


def stop_listeners(addresses: list[str], port: int | None = None) -> None:
    """Stop the processes listening on these lab addresses (on ``port``, or on any port): the
    apps tests deployed to lab hosts keep running after the test (and after ``lab down``), and
    the lab hosts are shared by a session's tests, so an app left by one test would answer for
    another's. Waits until nothing listens there any more."""
    import re

    wanted = set(addresses)

    def listening() -> list[int]:
        query = ["ss", "-ltnpH"] + ([f"sport = :{port}"] if port is not None else [])
        out = subprocess.run(query, capture_output=True, text=True, check=False).stdout
        pids = []
        for line in out.splitlines():
            fields = line.split()
            if len(fields) >= 4 and fields[3].rsplit(":", 1)[0] in wanted:
                pids += [int(p) for p in re.findall(r"pid=(\d+)", line)]
        return pids

    for pid in set(listening()):
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    wait_for(lambda: not listening(), timeout=15, what=f"the apps on {sorted(wanted)} to stop")


@contextmanager
def lab_hosts(
    factory: pytest.TempPathFactory,
    alloc: Allocator,
    hosts: int,
    *,
    regions: list[str],
    folder: str = "lab",
) -> Iterator[Any]:
    """``hosts`` real sshd hosts on leased addresses, stopped (and the lease released) when the
    block ends. sandbox=False: without root or sshd, lab_up raises LabError saying why."""
    from app.lab import lab_down, lab_up

    root = factory.mktemp(folder)
    with alloc.addresses(hosts) as block:
        state = lab_up(hosts, root=root, regions=regions, sandbox=False, first=block.first)
        try:
            assert state.mode == "ssh" and state.running, state.reason
            yield state
        finally:
            lab_down(root=root)
            stop_listeners([h.address for h in state.hosts])


@pytest.fixture(scope="session")
def lab(tmp_path_factory: pytest.TempPathFactory, alloc: Allocator) -> Iterator[Any]:
    """Six real sshd hosts on leased addresses, alternating regions r1 and r2."""
    with lab_hosts(tmp_path_factory, alloc, 6, regions=["r1", "r2"]) as state:
        yield state


@pytest.fixture(scope="session")
def lab8(tmp_path_factory: pytest.TempPathFactory, alloc: Allocator) -> Iterator[Any]:
    """Eight real sshd hosts on leased addresses, alternating regions r1 and r2 (strategies)."""
    with lab_hosts(tmp_path_factory, alloc, 8, regions=["r1", "r2"], folder="lab8") as state:
        yield state


@dataclass
class Cluster:
    """Redis + PostgreSQL + region and control worker processes, and the env to reach them."""

    env: dict[str, str]
    home: Path
    workers: list[subprocess.Popen[bytes]]
    logs: list[Path]

    def vmfarm(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        return run_vmfarm(*args, env=self.env, timeout=timeout)

    def worker_logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-4000:]}"
            for p in self.logs
            if p.exists()
        )


def _wait_for_workers(env: dict[str, str], names: list[str], timeout: float = 60) -> None:
    code = (
        "import sys, json\n"
        "from app.celery import app\n"
        "r = app.control.ping(timeout=1.0) or []\n"
        "print(json.dumps(sorted(k for d in r for k in d)))\n"
    )
    import json

    seen: list[str] = []

    def all_answer() -> bool:
        out = subprocess.run(
            [sys.executable, "-c", code],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=30,
        )
        if out.returncode == 0 and out.stdout.strip():
            seen[:] = json.loads(out.stdout.strip().splitlines()[-1])
        return all(n in seen for n in names)

    wait_for(
        all_answer, timeout, f"workers {names} to answer a ping", explain=lambda: f"(saw {seen})"
    )


@pytest.fixture(scope="session")
def cluster(
    pg_url: str, redis_urls: tuple[str, str], lab: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    """Two region workers (vmfarm.r1, vmfarm.r2) and a control worker, as separate processes."""
    home = tmp_path_factory.mktemp("home")
    env = base_env(
        VMFARM_BROKER_URL=redis_urls[0],
        VMFARM_RESULT_BACKEND=redis_urls[1],
        VMFARM_DATABASE_URL=pg_url,
        VMFARM_HOME=str(home),
    )
    specs = [
        ("w-r1@test", ["--region", "r1", "-c", "8"]),
        ("w-r2@test", ["--region", "r2", "-c", "8"]),
        ("w-control@test", ["--control", "-c", "2"]),
    ]
    workers, logs = [], []
    for name, args in specs:
        log = home / f"{name.split('@')[0]}.log"
        logs.append(log)
        fh = log.open("wb")
        workers.append(
            subprocess.Popen(
                [sys.executable, "-m", "cli.main", "worker", "-n", name, "-l", "INFO", *args],
                env=env,
                cwd=REPO,
                stdout=fh,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
    cl = Cluster(env=env, home=home, workers=workers, logs=logs)
    try:
        _wait_for_workers(env, [n for n, _ in specs])
    except AssertionError:
        _stop(workers)
        raise AssertionError(cl.worker_logs()) from None
    yield cl
    _stop(workers)


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


@contextmanager
def app_pointed_at(env: dict[str, str]) -> Iterator[Any]:
    """This test process's Celery app and ledger, pointed at the Redis and PostgreSQL that the
    VMFARM_ variables of ``env`` name (this process's environment restored on the way out)."""
    saved = dict(os.environ)
    os.environ.update({k: v for k, v in env.items() if k.startswith("VMFARM_")})
    from app.celery import app, reconfigure
    from app.db import reset_engines

    reconfigure()
    reset_engines()
    try:
        yield app
    finally:
        os.environ.clear()
        os.environ.update(saved)
        reconfigure()
        reset_engines()


@pytest.fixture
def in_process_app(cluster: Cluster) -> Iterator[Any]:
    """This test process's Celery app and ledger, pointed at the cluster's Redis and PostgreSQL."""
    with app_pointed_at(cluster.env) as app:
        yield app
