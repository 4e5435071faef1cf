"""Delegates on real workers: the worker registry and its heartbeats, `vmfarm workers`, discovery
as a region task, and `vmfarm hosts` against a refusing EC2 endpoint. The fleet tests start
real `vmfarm worker` processes on Redis (databases leased from the allocator) and the
session's PostgreSQL; nothing is mocked. Tags, queues and the CLI's input checks are in
tests/unit/test_delegates.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from app.celery import app
from app.delegates import (
    resolve_queue,
    unserved,
)
from tests.alloc import Allocator
from tests.conftest import DATA, REDIS_BASE, REPO, _stop, base_env, run_vmfarm
from tests.waiting import wait_for

GPU, PLAIN = "w-gpu@delegates", "w-plain@delegates"
STATIC = {
    "identifier": "lab_rz",
    "name": "lab-rz",
    "provider": "static",
    "source": "test:1",
    "spec": {
        "region": "rz",
        "hosts": [{"hostname": "127.0.1.250"}, {"hostname": "127.0.1.251", "region": "ry"}],
    },
}


# --- names and routing (no services) --------------------------------------------------------------


# --- a fleet of real worker processes -------------------------------------------------------------


@dataclass
class Fleet:
    env: dict[str, str]
    procs: dict[str, subprocess.Popen[bytes]]
    logs: dict[str, Path]

    def vmfarm(self, *args: str, timeout_s: str = "30") -> subprocess.CompletedProcess[str]:
        return run_vmfarm(*args, env={**self.env, "VMFARM_HEARTBEAT_TIMEOUT": timeout_s})

    def workers(self, timeout_s: str = "30") -> dict[str, Any]:
        res = self.vmfarm("workers", "-o", "json", timeout_s=timeout_s)
        assert res.returncode == 0, res.stderr
        return dict(json.loads(res.stdout))

    def worker_logs(self) -> str:
        return "\n".join(
            f"--- {n}\n{p.read_text(errors='replace')[-3000:]}"
            for n, p in self.logs.items()
            if p.exists()
        )

    def wait_for(self, what: str, check: Callable[[], bool], timeout: float = 60) -> None:
        wait_for(check, timeout, what, interval=0.25, explain=self.worker_logs)


def _by_name(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {w["name"]: w for w in report["workers"]}


@pytest.fixture(scope="module")
def fleet(
    pg_url: str, tmp_path_factory: pytest.TempPathFactory, alloc: Allocator
) -> Iterator[Fleet]:
    """Two region workers of region rz: one tagged gpu, one without tags."""
    with alloc.redis_db(REDIS_BASE) as broker, alloc.redis_db(REDIS_BASE) as results:
        yield from _fleet(pg_url, tmp_path_factory, broker.url, results.url)


def _fleet(
    pg_url: str, tmp_path_factory: pytest.TempPathFactory, broker: str, results: str
) -> Iterator[Fleet]:
    home = tmp_path_factory.mktemp("delegates")
    env = base_env(
        VMFARM_BROKER_URL=broker,
        VMFARM_RESULT_BACKEND=results,
        VMFARM_DATABASE_URL=pg_url,
        VMFARM_HOME=str(home),
        VMFARM_HEARTBEAT_INTERVAL="0.5",
    )
    specs = {GPU: ["--region", "rz", "--tags", "gpu"], PLAIN: ["--region", "rz"]}
    procs, logs = {}, {}
    for name, args in specs.items():
        logs[name] = home / f"{name.split('@')[0]}.log"
        with logs[name].open("wb") as fh:
            procs[name] = subprocess.Popen(
                [sys.executable, "-m", "cli.main", "worker", "-n", name, "-c", "2", *args],
                env=env,
                cwd=REPO,
                stdout=fh,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
    fl = Fleet(env=env, procs=procs, logs=logs)
    try:
        fl.wait_for(
            "both workers registered as live",
            lambda: all(_by_name(fl.workers()).get(n, {}).get("live") for n in specs),
        )
        yield fl
    finally:
        _stop(list(procs.values()))


@pytest.fixture
def fleet_app(fleet: Fleet, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """This process's Celery app and ledger, pointed at the fleet's Redis and PostgreSQL."""
    from app.celery import reconfigure
    from app.db import reset_engines

    for k, v in fleet.env.items():
        if k.startswith("VMFARM_"):
            monkeypatch.setenv(k, v)
    monkeypatch.setenv("VMFARM_HEARTBEAT_TIMEOUT", "30")
    reconfigure()
    reset_engines()
    yield app
    monkeypatch.undo()
    reconfigure()
    reset_engines()


def test_workers_register_with_their_regions_tags_and_queues(fleet: Fleet) -> None:
    report = fleet.workers()
    assert report["broker"] == "redis"
    mine = _by_name(report)
    gpu, plain = mine[GPU], mine[PLAIN]
    assert (gpu["regions"], gpu["tags"], gpu["status"]) == (["rz"], ["gpu"], "live")
    assert (plain["regions"], plain["tags"], plain["status"]) == (["rz"], [], "live")
    assert gpu["queues"] == ["vmfarm.rz", "vmfarm.rz[gpu]"]
    assert plain["queues"] == ["vmfarm.rz"]
    assert gpu["concurrency"] == 2 and gpu["pool"] == "threads" and gpu["in_flight"] == 0
    assert gpu["pid"] == fleet.procs[GPU].pid
    depth = {q["name"]: q for q in report["queues"]}
    assert depth["vmfarm.rz[gpu]"]["consumers"] == [GPU]
    assert sorted(depth["vmfarm.rz"]["consumers"]) == sorted([GPU, PLAIN])
    assert {GPU, PLAIN} <= set(report["regions"]["rz"]["workers"])
    text = fleet.vmfarm("workers")
    assert text.returncode == 0, text.stderr
    assert "region rz" in text.stdout and GPU in text.stdout and "vmfarm.rz[gpu]" in text.stdout


def test_the_workers_consume_exactly_their_queues(fleet: Fleet, fleet_app: Any) -> None:
    # What Celery itself says each worker consumes (the queues are not given with -Q).
    active = fleet_app.control.inspect(destination=[GPU, PLAIN], timeout=5).active_queues()
    assert sorted(q["name"] for q in active[GPU]) == ["vmfarm.rz", "vmfarm.rz[gpu]"]
    assert [q["name"] for q in active[PLAIN]] == ["vmfarm.rz"]


def test_requirements_are_checked_against_the_live_workers(fleet: Fleet, fleet_app: Any) -> None:
    assert unserved([("rz", frozenset({"gpu"})), ("rz", frozenset())]) == []
    [msg] = unserved([("rz", frozenset({"arm"}))])
    assert "region rz with tags [arm]" in msg and GPU in msg and PLAIN in msg
    assert resolve_queue("rz", ["gpu"]) == ("vmfarm.rz[gpu]", "")
    assert resolve_queue("rz", ["arm"], True).queue == "vmfarm.rz"


def test_a_discovery_task_that_requires_a_tag_runs_on_a_worker_with_that_tag(
    fleet: Fleet, fleet_app: Any
) -> None:
    from tasks.discovery import discover_hosts

    tagged = [
        discover_hosts.apply_async(kwargs={"infra": STATIC, "region": "rz", "tags": ["gpu"]})
        for _ in range(4)
    ]
    for res in tagged:
        out = res.get(timeout=60)
        assert (out["worker"], out["queue"], res.worker) == (GPU, "vmfarm.rz[gpu]", GPU)
        assert [(h["name"], h["region"]) for h in out["hosts"]] == [
            ("127.0.1.250", "rz"),
            ("127.0.1.251", "ry"),
        ]
    # Without tags any worker of the region may take it; a bad infrastructure is data.
    bad = discover_hosts.apply_async(
        kwargs={"infra": {**STATIC, "provider": "nope"}, "region": "rz"}
    ).get(timeout=60)
    assert bad["worker"] in (GPU, PLAIN) and bad["queue"] == "vmfarm.rz"
    assert bad["error_type"] == "ConfigError" and "unknown provider 'nope'" in bad["error"]
    assert "hosts" not in bad


def test_work_nobody_can_take_shows_as_queue_depth(fleet: Fleet, fleet_app: Any) -> None:
    from tasks.discovery import discover_hosts

    discover_hosts.apply_async(
        kwargs={"infra": STATIC, "region": "rz", "tags": ["arm"]}, expires=600
    )
    queues = {q["name"]: q for q in fleet.workers()["queues"]}
    assert queues["vmfarm.rz[arm]"]["depth"] == 1
    assert queues["vmfarm.rz[arm]"]["consumers"] == []
    assert queues["vmfarm.rz[arm]"]["tags"] == ["arm"]
    assert queues["vmfarm.rz[gpu]"]["depth"] == 0
    with fleet_app.connection_for_write() as conn:
        conn.default_channel.queue_purge("vmfarm.rz[arm]")


def test_a_killed_worker_goes_stale_and_a_stopped_one_leaves(
    fleet: Fleet, fleet_app: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Runs last in this module: it stops both workers.
    os.killpg(fleet.procs[GPU].pid, signal.SIGKILL)
    fleet.procs[GPU].wait(timeout=30)
    fleet.wait_for(
        "the killed worker shown as stale",
        lambda: _by_name(fleet.workers(timeout_s="2"))[GPU]["status"] == "stale",
    )
    report = _by_name(fleet.workers(timeout_s="2"))
    assert report[GPU]["live"] is False
    text = fleet.vmfarm("workers", timeout_s="2").stdout
    assert "stale" in text

    from app.settings import get_settings

    monkeypatch.setenv("VMFARM_HEARTBEAT_TIMEOUT", "2")
    get_settings.cache_clear()
    [msg] = unserved([("rz", frozenset({"gpu"}))])
    assert "region rz with tags [gpu]" in msg and f"not heard from: {GPU}" in msg

    # A warm shutdown removes the worker from the registry.
    os.killpg(fleet.procs[PLAIN].pid, signal.SIGTERM)
    assert fleet.procs[PLAIN].wait(timeout=60) == 0
    assert PLAIN not in _by_name(fleet.workers())


# --- command line ---------------------------------------------------------------------------------


class _RefusingEC2(BaseHTTPRequestHandler):
    """An EC2 endpoint that refuses every credential (AuthFailure)."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = (
            b'<?xml version="1.0" encoding="UTF-8"?><Response><Errors><Error>'
            b"<Code>AuthFailure</Code><Message>AWS was not able to validate the provided "
            b"access credentials</Message></Error></Errors><RequestID>1</RequestID>"
            b"</Response>"
        )
        self.send_response(401)
        self.send_header("Content-Type", "text/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def test_hosts_exits_1_naming_the_infrastructure_when_discovery_fails(tmp_path: Path) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _RefusingEC2)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        empty = tmp_path / "none"
        empty.write_text("")
        env = base_env(
            VMFARM_HOME=str(tmp_path / "home"),
            AWS_ENDPOINT_URL_EC2=f"http://127.0.0.1:{server.server_port}",
            AWS_ACCESS_KEY_ID="AKIATESTTESTTEST0000",
            AWS_SECRET_ACCESS_KEY="x",
            AWS_CONFIG_FILE=str(empty),
            AWS_SHARED_CREDENTIALS_FILE=str(empty),
            AWS_EC2_METADATA_DISABLED="true",
            NO_PROXY="127.0.0.1",
        )
        for k in (
            "AWS_PROFILE",
            "AWS_ENDPOINT_URL",
            "AWS_SESSION_TOKEN",
            "HTTP_PROXY",
            "HTTPS_PROXY",
            "http_proxy",
            "https_proxy",
        ):
            env.pop(k, None)
        res = run_vmfarm("hosts", str(DATA / "infra_aws.yaml"), "--infra", "aws_inline", env=env)
    finally:
        server.shutdown()
    assert res.returncode == 1, res.stdout + res.stderr
    assert "infrastructure 'aws_inline' (aws)" in res.stderr
    assert "[Authentication]" in res.stderr
