"""Redis with the ACL users of docker-compose.yml (docker/redis/users.acl.sh, run for real):
no anonymous access, the control plane and the region workers each with their own user and
password, and Flower unable to push work onto a worker's queue. Tried as an attacker who has
Flower's credentials or none at all."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from base64 import b64encode
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

from app.celery import region_queue
from tests.alloc import Allocator
from tests.conftest import DATA, REPO, base_env
from tests.service.conftest import Keys, _secure_cluster
from tests.waiting import wait_for

PASSWORDS = {
    "REDIS_PASSWORD": "control-pw-1",
    "REDIS_WORKER_PASSWORD": "worker-pw-2",
    "REDIS_FLOWER_PASSWORD": "flower-pw-3",
}


@dataclass
class AclRedis:
    port: int
    acl: Path

    def url(self, user: str, password: str, db: int = 0) -> str:
        return f"redis://{user}:{password}@127.0.0.1:{self.port}/{db}"

    def client(self, user: str | None = None, password: str | None = None) -> redis.Redis:
        return redis.Redis(
            host="127.0.0.1", port=self.port, username=user, password=password, socket_timeout=5
        )


@pytest.fixture(scope="module")
def acl_redis(tmp_path_factory: pytest.TempPathFactory, alloc: Allocator) -> Iterator[AclRedis]:
    tmp = tmp_path_factory.mktemp("acl-redis")
    acl = tmp / "users.acl"
    made = subprocess.run(
        ["sh", str(REPO / "docker" / "redis" / "users.acl.sh")],
        env={"PATH": os.environ["PATH"], **PASSWORDS},
        capture_output=True,
        text=True,
        check=True,
    )
    acl.write_text(made.stdout)
    with alloc.port() as lease:
        yield from _run_redis(tmp, acl, lease.port)


def _run_redis(tmp: Path, acl: Path, port: int) -> Iterator[AclRedis]:
    proc = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--aclfile",
            str(acl),
            "--dir",
            str(tmp),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    r = AclRedis(port, acl)

    def up() -> bool:
        assert proc.poll() is None, "redis-server refused the ACL file"
        try:
            return bool(r.client("vmfarm", PASSWORDS["REDIS_PASSWORD"]).ping())
        except redis.ConnectionError:
            return False

    wait_for(up, 20, "redis-server with the ACL file")
    try:
        yield r
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)


def test_the_acl_file_holds_no_password_in_clear(acl_redis: AclRedis) -> None:
    text = acl_redis.acl.read_text()
    for pw in PASSWORDS.values():
        assert pw not in text
    assert "user default off" in text


def test_without_a_user_or_with_a_wrong_password_nothing_is_possible(acl_redis: AclRedis) -> None:
    with pytest.raises(redis.AuthenticationError):
        acl_redis.client().lpush(region_queue("r1"), "x")
    with pytest.raises(redis.AuthenticationError):
        acl_redis.client("worker", "guess").ping()
    with pytest.raises(redis.AuthenticationError):  # a user's password is only its own
        acl_redis.client("flower", PASSWORDS["REDIS_PASSWORD"]).ping()


def test_no_vmfarm_user_may_flush_reconfigure_or_list_keys(acl_redis: AclRedis) -> None:
    for user, env in (("vmfarm", "REDIS_PASSWORD"), ("worker", "REDIS_WORKER_PASSWORD")):
        c = acl_redis.client(user, PASSWORDS[env])
        for command in (
            ("FLUSHALL",),
            ("CONFIG", "SET", "dir", "/tmp"),
            ("KEYS", "*"),
            ("ACL", "SETUSER", "default", "on"),
        ):
            with pytest.raises(redis.exceptions.NoPermissionError):
                c.execute_command(*command)


def test_flower_reads_queues_but_cannot_push_work_onto_one(acl_redis: AclRedis) -> None:
    c = acl_redis.client("flower", PASSWORDS["REDIS_FLOWER_PASSWORD"])
    queue = region_queue("r1")
    assert c.llen(queue) == 0  # it may read (Flower's broker page)
    for push in (c.lpush, c.rpush):
        with pytest.raises(redis.exceptions.NoPermissionError):
            push(queue, json.dumps({"body": "x"}))
    with pytest.raises(redis.exceptions.NoPermissionError):
        c.delete(queue)
    with pytest.raises(redis.exceptions.NoPermissionError):  # nor re-bind the exchange
        c.sadd("_kombu.binding.vmfarm", "evil")


def test_a_signed_deployment_runs_with_the_control_and_worker_users(
    acl_redis: AclRedis,
    pg_url: str,
    lab: Any,
    signing_keys: Keys,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    control_pw, worker_pw = PASSWORDS["REDIS_PASSWORD"], PASSWORDS["REDIS_WORKER_PASSWORD"]
    # Databases 4/5: this Redis is the test's own, nothing else uses it.
    cluster_gen = _secure_cluster(
        pg_url,
        signing_keys,
        tmp_path_factory,
        acl_redis.url("vmfarm", control_pw, 4),
        acl_redis.url("vmfarm", control_pw, 5),
        region_broker=(
            acl_redis.url("worker", worker_pw, 4),
            acl_redis.url("worker", worker_pw, 5),
        ),
    )
    cluster = next(cluster_gen)
    try:
        res = cluster.vmfarm(
            "run",
            str(DATA / "itest" / "pipeline.yaml"),
            str(lab.infrastructure_file),
            "--set",
            "tag=4.0.1",
        )
        assert res.returncode == 0, res.stdout + res.stderr + cluster.worker_logs()
        assert "SUCCEEDED" in res.stdout + res.stderr
        for pw in (control_pw, worker_pw):  # the URLs' passwords are never printed
            assert pw not in res.stdout + res.stderr + cluster.worker_logs()
    finally:
        next(cluster_gen, None)


def test_flower_with_its_user_runs_but_its_task_api_cannot_start_work(
    acl_redis: AclRedis, tmp_path: Path, free_port: Callable[[], int]
) -> None:
    port = free_port()
    flower_pw = PASSWORDS["REDIS_FLOWER_PASSWORD"]
    env = base_env(
        VMFARM_BROKER_URL=acl_redis.url("flower", flower_pw, 4),
        VMFARM_RESULT_BACKEND=acl_redis.url("flower", flower_pw, 5),
        VMFARM_HOME=str(tmp_path),
        FLOWER_BASIC_AUTH="admin:s3cret",
    )
    log = tmp_path / "flower.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "flower", "--port", str(port)],
            env=env,
            cwd=REPO,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}"
    auth = "Basic " + b64encode(b"admin:s3cret").decode()

    def call(path: str, body: dict[str, Any] | None = None) -> int:
        req = urllib.request.Request(
            base + path,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": auth, "Content-Type": "application/json"},
            method="GET" if body is None else "POST",
        )
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)

    def healthy() -> bool:
        assert proc.poll() is None, log.read_text()
        try:
            return call("/healthcheck") == 200
        except OSError:
            return False

    try:
        wait_for(healthy, 90, "flower to answer", interval=0.3, explain=log.read_text)
        assert call("/api/workers") == 200  # Flower works with its user
        queue = region_queue("r1")
        owner = acl_redis.client("vmfarm", PASSWORDS["REDIS_PASSWORD"])
        owner.execute_command("SELECT", 4)
        before = owner.llen(queue)
        status = call(
            "/api/task/async-apply/vmfarm.run_host",
            # arguments of the task's real signature: Celery checks them before publishing
            {
                "args": [],
                "kwargs": {"key": {"region": "r1"}, "until": 1},
                "options": {"queue": queue},
            },
        )
        assert status != 200, "Flower published a task onto a region queue"
        assert owner.llen(queue) == before
        # refused by Redis (the exchange's binding is the first key it may not write), not
        # by a mistake in the call
        assert "no permissions to access one of the keys" in log.read_text()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
