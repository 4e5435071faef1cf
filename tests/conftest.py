"""Fixtures for integration tests: real PostgreSQL, Redis, sshd lab hosts and Celery workers.

Nothing here is mocked. A missing service fails the test (it never skips): CI must provide
Redis on 127.0.0.1:6379, PostgreSQL on 127.0.0.1:5432 and openssh-server, and run as root.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"
PG_ADMIN_URL = os.environ.get("VMFARM_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_BASE = os.environ.get("VMFARM_TEST_REDIS", "redis://127.0.0.1:6379")
# Redis databases reserved for the test session (broker, results).
BROKER_DB, RESULT_DB = 10, 11


def run_vmfarm(*args: str, env: dict[str, str], timeout: float = 180,
               input: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run the vmfarm command as a user would, in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "cli.main", *args], env=env, cwd=REPO, capture_output=True,
        text=True, timeout=timeout, input=input,
    )


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VMFARM_")}
    env["PYTHONPATH"] = str(REPO)
    env.update(extra)
    return env


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
def redis_urls() -> tuple[str, str]:
    """Broker and result-backend URLs on two emptied Redis databases."""
    import redis

    broker, results = f"{REDIS_BASE}/{BROKER_DB}", f"{REDIS_BASE}/{RESULT_DB}"
    for url in (broker, results):
        redis.Redis.from_url(url).flushdb()
    return broker, results


@pytest.fixture(scope="session")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Six real sshd hosts, 127.0.1.101-106, alternating regions r1 and r2."""
    from app.lab import lab_down, lab_up

    root = tmp_path_factory.mktemp("lab")
    state = lab_up(6, root=root, regions=["r1", "r2"], sandbox=False, first=101)
    assert state.mode == "ssh" and state.running, state.reason
    yield state
    lab_down(root=root)


@pytest.fixture(scope="session")
def lab8(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Eight real sshd hosts, 127.0.1.141-148, alternating regions r1 and r2 (strategies)."""
    from app.lab import lab_down, lab_up

    root = tmp_path_factory.mktemp("lab8")
    state = lab_up(8, root=root, regions=["r1", "r2"], sandbox=False, first=141)
    assert state.running, state.reason
    yield state
    lab_down(root=root)


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
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-4000:]}"
                         for p in self.logs if p.exists())


def _wait_for_workers(env: dict[str, str], names: list[str], timeout: float = 60) -> None:
    code = (
        "import sys, json\n"
        "from app.celery import app\n"
        "r = app.control.ping(timeout=1.0) or []\n"
        "print(json.dumps(sorted(k for d in r for k in d)))\n"
    )
    deadline = time.monotonic() + timeout
    seen: list[str] = []
    while time.monotonic() < deadline:
        out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO,
                             capture_output=True, text=True, timeout=30)
        if out.returncode == 0 and out.stdout.strip():
            import json

            seen = json.loads(out.stdout.strip().splitlines()[-1])
            if all(n in seen for n in names):
                return
        time.sleep(0.5)
    raise AssertionError(f"workers {names} did not answer a ping within {timeout}s (saw {seen})")


@pytest.fixture(scope="session")
def cluster(pg_url: str, redis_urls: tuple[str, str], lab: Any,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Two region workers (vmfarm.r1, vmfarm.r2) and a control worker, as separate processes."""
    home = tmp_path_factory.mktemp("home")
    env = base_env(VMFARM_BROKER_URL=redis_urls[0], VMFARM_RESULT_BACKEND=redis_urls[1],
                   VMFARM_DATABASE_URL=pg_url, VMFARM_HOME=str(home))
    specs = [("w-r1@test", ["--region", "r1", "-c", "8"]),
             ("w-r2@test", ["--region", "r2", "-c", "8"]),
             ("w-control@test", ["--control", "-c", "2"])]
    workers, logs = [], []
    for name, args in specs:
        log = home / f"{name.split('@')[0]}.log"
        logs.append(log)
        fh = log.open("wb")
        workers.append(subprocess.Popen(
            [sys.executable, "-m", "cli.main", "worker", "-n", name, "-l", "INFO", *args],
            env=env, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True))
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


@pytest.fixture
def in_process_app(cluster: Cluster) -> Iterator[Any]:
    """This test process's Celery app and ledger, pointed at the cluster's Redis and PostgreSQL."""
    saved = dict(os.environ)
    os.environ.update({k: v for k, v in cluster.env.items() if k.startswith("VMFARM_")})
    from app.celery import app, reconfigure
    from app.db import reset_engines

    reconfigure()
    reset_engines()
    yield app
    os.environ.clear()
    os.environ.update(saved)
    reconfigure()
    reset_engines()
