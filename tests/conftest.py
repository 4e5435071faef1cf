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
from contextlib import contextmanager
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


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextmanager
def moto_server(tmp_path_factory: pytest.TempPathFactory, *, region: str,
                endpoint_env: bool = True) -> Iterator[str]:
    """moto in server mode on a free 127.0.0.1 port, and an environment in which boto3 reaches
    only it: fake credentials, no profile, config file, role or instance metadata to fall back
    on, no proxy; with ``endpoint_env`` AWS_ENDPOINT_URL points at it. Yields its URL."""
    import logging

    from moto.server import ThreadedMotoServer

    empty = tmp_path_factory.mktemp("aws") / "none"
    with pytest.MonkeyPatch.context() as env:
        for key in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ROLE_ARN", "AWS_REGION",
                    "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_ENDPOINT_URL_EC2",
                    "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL_SECRETS_MANAGER",
                    "AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN", "AWS_MAX_ATTEMPTS",
                    "AWS_RETRY_MODE", "HTTP_PROXY", "HTTPS_PROXY", "http_proxy",
                    "https_proxy"):
            env.delenv(key, raising=False)
        env.setenv("NO_PROXY", "127.0.0.1,localhost")
        env.setenv("AWS_ACCESS_KEY_ID", "testing")
        env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        env.setenv("AWS_DEFAULT_REGION", region)
        env.setenv("AWS_CONFIG_FILE", str(empty))
        env.setenv("AWS_SHARED_CREDENTIALS_FILE", str(empty))
        env.setenv("AWS_EC2_METADATA_DISABLED", "true")
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        url = f"http://{host}:{port}"
        if endpoint_env:
            env.setenv("AWS_ENDPOINT_URL", url)
        try:
            yield url
        finally:
            server.stop()



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
