"""`vmfarm autoscale` scaling real `vmfarm worker` processes of region rs up under a deep queue
and back down once it drains (Redis databases leased from the allocator, the session's
PostgreSQL ledger; the slow tasks are real `vmfarm.discover` tasks whose EC2 endpoint is a
local server that answers after a pause). The decision, the configuration and the process
executor are in tests/unit/test_autoscale.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from app.autoscale import (
    _is_our_worker,
)
from tests.conftest import REPO, base_env
from tests.waiting import wait_for

# `vmfarm` with the service commands registered (cli/main.py may or may not do it already).
VMFARM = [
    sys.executable,
    "-c",
    "import sys; from cli.main import main; sys.argv[0] = 'vmfarm'; main()",
]


# --- the decision --------------------------------------------------------------------------------


# --- the loop with a fake executor ---------------------------------------------------------------


# --- the local process executor ------------------------------------------------------------------


# --- vmfarm autoscale on real workers ------------------------------------------------------------


class _SlowEC2(BaseHTTPRequestHandler):
    """An EC2 endpoint that lists no instances, a quarter of a second after each request."""

    calls = 0
    lock = threading.Lock()

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        with _SlowEC2.lock:
            _SlowEC2.calls += 1
        time.sleep(0.25)  # the behaviour under test: a slow endpoint keeps discovery in flight
        body = (
            b'<?xml version="1.0" encoding="UTF-8"?><DescribeInstancesResponse '
            b'xmlns="http://ec2.amazonaws.com/doc/2016-11-15/"><requestId>1</requestId>'
            b"<reservationSet/></DescribeInstancesResponse>"
        )
        self.send_response(200)
        self.send_header("Content-Type", "text/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


SLOW_INFRA = {
    "identifier": "slow",
    "name": "slow",
    "provider": "aws",
    "source": "test:1",
    "spec": {
        "region": "eu-west-1",
        "hostConnectionType": "PrivateIP",
        "tags": {"Fleet": "none"},
        "connection": {"user": "ec2-user"},
    },
}


@pytest.fixture
def slow_ec2() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _SlowEC2)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def as_env(
    pg_url: str,
    slow_ec2: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    redis_db: Callable[[], str],
) -> Iterator[dict[str, str]]:
    """The environment of the autoscaler and its workers; this process's app and ledger point
    at the same Redis databases and PostgreSQL."""
    from app.celery import reconfigure
    from app.db import reset_engines

    broker, results = redis_db(), redis_db()
    empty = tmp_path / "empty"
    empty.write_text("")
    env = base_env(
        VMFARM_BROKER_URL=broker,
        VMFARM_RESULT_BACKEND=results,
        VMFARM_DATABASE_URL=pg_url,
        VMFARM_HOME=str(tmp_path / "home"),
        VMFARM_HEARTBEAT_INTERVAL="0.5",
        AWS_ENDPOINT_URL_EC2=slow_ec2,
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
    for k, v in env.items():
        if k.startswith("VMFARM_"):
            monkeypatch.setenv(k, v)
    reconfigure()
    reset_engines()
    yield env
    monkeypatch.undo()
    reconfigure()
    reset_engines()


def _rs_workers() -> dict[str, dict[str, Any]]:
    from app.delegates import live_workers

    return {w["name"]: w for w in live_workers() if "rs" in w["regions"]}


def _runs_an_autoscaled_worker(pid: int) -> bool:
    try:
        return b"autoscale-rs-" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _wait(what: str, check: Callable[[], bool], timeout: float, logs: Callable[[], str]) -> None:
    wait_for(check, timeout, what, interval=0.25, explain=logs)


def test_vmfarm_autoscale_scales_a_region_up_under_load_and_back_down(
    as_env: dict[str, str], tmp_path: Path
) -> None:
    from app.celery import app
    from app.delegates import queue_depths
    from tasks.discovery import discover_hosts

    out, errf = tmp_path / "autoscale.out", tmp_path / "autoscale.err"
    log_dir = tmp_path / "workers"
    pids: set[int] = set()

    def logs() -> str:
        text = [
            f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
            for p in (out, errf, *sorted(log_dir.glob("*.log")))
            if p.exists()
        ]
        return "\n".join(text)

    with out.open("wb") as o, errf.open("wb") as e:
        scaler = subprocess.Popen(
            [
                *VMFARM,
                "autoscale",
                "--region",
                "rs",
                "--min",
                "1",
                "--max",
                "4",
                "--scale-up-depth",
                "3",
                "--scale-up-after",
                "1s",
                "--scale-down-depth",
                "1",
                "--scale-down-after",
                "2s",
                "--interval",
                "0.5",
                "-c",
                "1",
                "--log-dir",
                str(log_dir),
                "--stop-timeout",
                "60s",
            ],
            env=as_env,
            cwd=REPO,
            stdout=o,
            stderr=e,
            start_new_session=True,
        )
    try:
        _wait("one autoscaled worker of rs registered", lambda: len(_rs_workers()) == 1, 90, logs)
        [first] = _rs_workers()
        assert first.startswith("autoscale-rs-1@")

        results = [
            discover_hosts.apply_async(kwargs={"infra": SLOW_INFRA, "region": "rs"}, expires=600)
            for _ in range(120)
        ]
        most = [1]

        def more_than_one() -> bool:
            live = _rs_workers()
            pids.update(int(w["pid"]) for w in live.values())
            most[0] = max(most[0], len(live))
            return len(live) > 1

        _wait("the region scaled up while its queue was deep", more_than_one, 120, logs)
        done = [r.get(timeout=300) for r in results]
        assert all(d == {"hosts": [], "worker": d["worker"], "queue": "vmfarm.rs"} for d in done), (
            done[:3]
        )
        ran_on = {d["worker"] for d in done}
        assert len(ran_on) > 1 and all(n.startswith("autoscale-rs-") for n in ran_on), ran_on
        assert _SlowEC2.calls >= 120
        assert queue_depths(["vmfarm.rs"])["vmfarm.rs"] == 0
        _wait("the region scaled back down to min", lambda: len(_rs_workers()) == 1, 180, logs)

        decisions = out.read_text()
        assert "(up): depth" in decisions and "(down): depth" in decisions, decisions
        assert max(most) <= 4

        scaler.send_signal(signal.SIGTERM)
        assert scaler.wait(timeout=120) == 0, logs()
        assert _rs_workers() == {}
        assert "autoscaler stopped" in errf.read_text()
        assert not [pid for pid in pids if _runs_an_autoscaled_worker(pid)], pids
    finally:
        if scaler.poll() is None:
            os.killpg(scaler.pid, signal.SIGKILL)
            scaler.wait()
        # Workers outlive a killed autoscaler (a later one adopts them): end ours here.
        from app.delegates import all_workers

        for w in all_workers():
            if w["name"].startswith("autoscale-rs-") and _is_our_worker(int(w["pid"]), w["name"]):
                os.kill(int(w["pid"]), signal.SIGKILL)
        with app.connection_for_write() as conn:
            conn.default_channel.queue_purge("vmfarm.rs")


def test_autoscale_once_in_dry_run_prints_decisions_and_starts_nothing(
    as_env: dict[str, str],
) -> None:
    res = subprocess.run(
        [
            *VMFARM,
            "autoscale",
            "--region",
            "rs",
            "--min",
            "2",
            "--max",
            "3",
            "--once",
            "--dry-run",
            "-o",
            "json",
        ],
        env=as_env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    [line] = res.stdout.strip().splitlines()
    assert json.loads(line) == {
        "region": "rs",
        "current": 0,
        "target": 2,
        "action": "up",
        "reason": "0 below min 2",
        "depth": 0,
        "dry_run": True,
        "stops": [],
        "keeps": [],
        "reached": 2,
    }
    assert _rs_workers() == {}
    bad = subprocess.run(
        [*VMFARM, "autoscale", "--region", "rs", "--min", "3", "--max", "2", "--once"],
        env=as_env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "max (2) must be at least min (3)" in bad.stderr
    embedded = subprocess.run(
        [*VMFARM, "autoscale", "--region", "rs", "--once"],
        env=base_env(VMFARM_HOME=as_env["VMFARM_HOME"]),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert embedded.returncode == 2 and "needs a broker" in embedded.stderr
