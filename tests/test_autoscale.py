"""Worker autoscaling: the pure decision (hysteresis, bounds), the configuration, the local
process executor, and `vmfarm autoscale` scaling real `vmfarm worker` processes of region rs
up under a deep queue and back down once it drains (Redis databases 14 and 15, the session's
PostgreSQL ledger; the slow tasks are real `vmfarm.discover` tasks whose EC2 endpoint is a
local server that answers after a pause).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from app.autoscale import (
    Autoscaler,
    Decision,
    Fleet,
    LocalProcessExecutor,
    Observation,
    Policy,
    State,
    _is_our_worker,
    decide,
    load_config,
    policy_from,
)
from app.errors import ConfigError
from tests.conftest import REPO, base_env
from tests.waiting import wait_for

# `vmfarm` with the service commands registered (cli/main.py may or may not do it already).
VMFARM = [sys.executable, "-c", "import sys; from cli.main import main; "
          "from cli import service_cmd; service_cmd.register(main); sys.argv[0] = 'vmfarm'; "
          "main()"]

P = Policy(region="rs", min=1, max=4, scale_up_depth=10, scale_up_after=30,
           scale_down_depth=2, scale_down_after=60, step=1)


def run(state: State, depth: int | None, workers: int, now: float) -> Decision:
    return decide(state, Observation(depth=depth, workers=workers), now)


# --- the decision --------------------------------------------------------------------------------


def test_the_count_is_brought_within_min_and_max_at_once() -> None:
    up = run(State(P), depth=0, workers=0, now=0)
    assert (up.action, up.current, up.target) == ("up", 0, 1)
    down = run(State(P), depth=500, workers=6, now=0)
    assert (down.action, down.target) == ("down", 4)
    assert "above max 4" in down.reason
    unknown = run(State(P), depth=None, workers=2, now=0)
    assert (unknown.action, unknown.target) == ("hold", 2)


def test_a_deep_queue_scales_up_only_after_it_stayed_deep_for_the_period() -> None:
    d = run(State(P), depth=11, workers=1, now=100)
    assert (d.action, d.state.above_since) == ("hold", 100)
    d = run(d.state, depth=50, workers=1, now=129)
    assert d.action == "hold" and "of 30s" in d.reason
    d = run(d.state, depth=50, workers=1, now=130)
    assert (d.action, d.target) == ("up", 2)
    # Each step restarts the period: the next one needs another 30 s of deep queue.
    d = run(d.state, depth=50, workers=2, now=131)
    assert d.action == "hold"
    d = run(d.state, depth=50, workers=2, now=160)
    assert (d.action, d.target) == ("up", 3)


def test_the_band_between_the_thresholds_resets_both_periods() -> None:
    d = run(State(P), depth=11, workers=1, now=0)
    d = run(d.state, depth=10, workers=1, now=20)  # not above 10: inside the band
    assert d.action == "hold" and d.state.above_since is None and "within 2..10" in d.reason
    d = run(d.state, depth=11, workers=1, now=25)
    d = run(d.state, depth=11, workers=1, now=50)
    assert d.action == "hold"  # 25 s of deep queue since it came back, not 50
    d = run(d.state, depth=11, workers=1, now=55)
    assert d.action == "up"


def test_a_shallow_queue_scales_down_step_by_step_never_below_min() -> None:
    p = Policy(region="rs", min=1, max=8, scale_up_depth=10, scale_up_after=0,
               scale_down_depth=2, scale_down_after=60, step=2)
    d = run(State(p), depth=1, workers=4, now=0)
    d = run(d.state, depth=0, workers=4, now=59)
    assert d.action == "hold"
    d = run(d.state, depth=0, workers=4, now=60)
    assert (d.action, d.target) == ("down", 2)
    d = run(d.state, depth=0, workers=2, now=119)
    assert d.action == "hold"
    d = run(d.state, depth=0, workers=2, now=120)
    assert (d.action, d.target) == ("down", 1)  # the step stops at min
    d = run(d.state, depth=0, workers=1, now=500)
    assert d.action == "hold" and "at min 1" in d.reason
    # With no period, a deep queue scales up at the first look, by step, up to max.
    d = run(State(p), depth=11, workers=7, now=0)
    assert (d.action, d.target) == ("up", 8)
    d = run(d.state, depth=11, workers=8, now=1)
    assert d.action == "hold" and "at max 8" in d.reason


def test_policies_are_checked() -> None:
    for values, says in (({"min": 3, "max": 2}, "max (2) must be at least min (3)"),
                         ({"scaleDownQueueDepth": 20, "scaleUpQueueDepth": 10},
                          "must not exceed scaleUpQueueDepth"),
                         ({"scaleUpAfter": "soon"}, "not a duration"),
                         ({"step": 0}, "step must be 1 or more"),
                         ({"max": "many"}, "whole number"),
                         ({"tags": ["GPU"]}, "invalid worker tag"),
                         ({"maxWorkers": 3}, "unknown setting")):
        with pytest.raises(ConfigError, match=re.escape(says)):
            policy_from("rs", values)
    with pytest.raises(ConfigError, match="invalid region"):
        policy_from("Bad Region", {})
    p = policy_from("rs", {"scaleUpAfter": "1m30s", "tags": "pci,gpu", "concurrency": 4})
    assert (p.scale_up_after, p.tags, p.concurrency) == (90.0, ("gpu", "pci"), 4)
    assert p.queues() == ["vmfarm.rs", "vmfarm.rs[gpu,pci]", "vmfarm.rs[gpu]", "vmfarm.rs[pci]"]


def test_the_example_file_and_a_file_of_ours_load(tmp_path: Path) -> None:
    example = load_config(REPO / "configs" / "autoscale.yaml")
    assert {p.region for p in example.policies} == {"us-east-1", "eu-west-1"}
    f = tmp_path / "as.yaml"
    f.write_text("interval: 2s\nregions:\n  rs:\n    min: 2\n    max: 3\n"
                 "    scaleDownAfter: 1m\n")
    cfg = load_config(f)
    assert cfg.interval == 2.0
    [p] = cfg.policies
    assert (p.region, p.min, p.max, p.scale_down_after, p.scale_up_depth) == ("rs", 2, 3, 60, 50)
    f.write_text("regions:\n  rs:\n    min: -1\n")
    with pytest.raises(ConfigError, match=re.escape(f"{f}: regions.rs: min must be 0 or more")):
        load_config(f)
    with pytest.raises(ConfigError, match="no such autoscale file"):
        load_config(tmp_path / "missing.yaml")


# --- the loop with a fake executor ---------------------------------------------------------------


@dataclass
class FakeExecutor:
    started: list[str] = field(default_factory=list)
    stopped: list[str] = field(default_factory=list)
    mine: dict[str, str] = field(default_factory=dict)  # name -> region
    halting: set[str] = field(default_factory=set)

    def refresh(self, fleet: Fleet) -> None:
        pass

    def running(self, region: str) -> list[str]:
        return [n for n, r in self.mine.items() if r == region and n not in self.halting]

    def stopping(self, region: str) -> list[str]:
        return [n for n, r in self.mine.items() if r == region and n in self.halting]

    def start(self, policy: Policy, count: int, taken: Iterable[str] = ()) -> list[str]:
        names = [f"w{len(self.mine) + i}" for i in range(count)]
        self.mine.update(dict.fromkeys(names, policy.region))
        self.started += names
        return names

    def stop(self, region: str, count: int, fleet: Fleet) -> list[str]:
        names = self.running(region)[:count]
        self.halting.update(names)
        self.stopped += names
        return names

    def shutdown(self, timeout: float) -> None:
        pass


def test_workers_starting_or_stopping_are_counted_as_such() -> None:
    clock = [0.0]
    registered: dict[str, dict[str, Any]] = {"static@h": {"in_flight": 0}}
    depth = [0]

    def observe(policies: Sequence[Policy]) -> Fleet:
        return Fleet(workers={"rs": dict(registered)}, depths={"vmfarm.rs": depth[0]})

    ex = FakeExecutor()
    p = Policy(region="rs", min=2, max=3, scale_up_depth=5, scale_up_after=0,
               scale_down_depth=1, scale_down_after=0)
    scaler = Autoscaler(policies=[p], executor=ex, observe=observe, clock=lambda: clock[0])
    [d] = scaler.step()
    assert (d.current, d.target, ex.started) == (1, 2, ["w0"])
    # w0 has not registered yet: it counts, nothing more is started.
    [d] = scaler.step()
    assert (d.current, d.action, ex.started) == (2, "hold", ["w0"])
    depth[0] = 9
    [d] = scaler.step()
    assert (d.current, d.target, ex.started) == (2, 3, ["w0", "w1"])
    registered.update({"w0": {}, "w1": {}})
    depth[0] = 0
    [d] = scaler.step()
    assert (d.current, d.target, ex.stopped) == (3, 2, ["w0"])
    # w0 is stopping but still registered: not counted, not stopped twice.
    [d] = scaler.step()
    assert (d.current, d.action) == (2, "hold") and ex.stopped == ["w0"]
    # Dry run: no executor, decisions only.
    dry = Autoscaler(policies=[p], executor=None, observe=observe)
    [d] = dry.step()
    assert (d.current, d.target) == (3, 2)


# --- the local process executor ------------------------------------------------------------------


def test_the_executor_adopts_and_stops_only_its_own_workers_by_name_and_pid(
        tmp_path: Path) -> None:
    ex = LocalProcessExecutor(log_dir=tmp_path, hostname="hostx")
    # Stand-ins for worker processes: they only need to exist, with these command lines.
    sleeper = [sys.executable, "-c", "import time; time.sleep(120)", "worker"]
    mine = subprocess.Popen([*sleeper, "autoscale-rs-7@hostx"])
    other = subprocess.Popen([*sleeper, "w-rs@hostx"])
    try:
        assert _is_our_worker(mine.pid, "autoscale-rs-7@hostx")
        assert not _is_our_worker(mine.pid, "autoscale-rs-8@hostx")
        fleet = Fleet(workers={"rs": {
            "autoscale-rs-7@hostx": {"pid": mine.pid, "in_flight": 0},
            "autoscale-rs-9@hostx": {"pid": other.pid, "in_flight": 0},  # pid not that worker
            "autoscale-rs-2@elsewhere": {"pid": other.pid, "in_flight": 0},
            "w-rs@hostx": {"pid": other.pid, "in_flight": 0}}}, depths={})
        ex.refresh(fleet)
        assert ex.running("rs") == ["autoscale-rs-7@hostx"]
        assert ex.stop("rs", 5, fleet) == ["autoscale-rs-7@hostx"]
        assert ex.stopping("rs") == ["autoscale-rs-7@hostx"] and ex.running("rs") == []
        assert mine.wait(timeout=30) == -signal.SIGTERM
        ex.refresh(fleet)
        assert ex.stopping("rs") == [] and other.poll() is None
    finally:
        for p in (mine, other):
            if p.poll() is None:
                p.kill()
            p.wait()


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
        body = (b'<?xml version="1.0" encoding="UTF-8"?><DescribeInstancesResponse '
                b'xmlns="http://ec2.amazonaws.com/doc/2016-11-15/"><requestId>1</requestId>'
                b"<reservationSet/></DescribeInstancesResponse>")
        self.send_response(200)
        self.send_header("Content-Type", "text/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


SLOW_INFRA = {"identifier": "slow", "name": "slow", "provider": "aws", "source": "test:1",
              "spec": {"region": "eu-west-1", "hostConnectionType": "PrivateIP",
                       "tags": {"Fleet": "none"}, "connection": {"user": "ec2-user"}}}


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
def as_env(pg_url: str, slow_ec2: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
           redis_db: Callable[[], str]) -> Iterator[dict[str, str]]:
    """The environment of the autoscaler and its workers; this process's app and ledger point
    at the same Redis databases and PostgreSQL."""
    from app.celery import reconfigure
    from app.db import reset_engines

    broker, results = redis_db(), redis_db()
    empty = tmp_path / "empty"
    empty.write_text("")
    env = base_env(VMFARM_BROKER_URL=broker, VMFARM_RESULT_BACKEND=results,
                   VMFARM_DATABASE_URL=pg_url, VMFARM_HOME=str(tmp_path / "home"),
                   VMFARM_HEARTBEAT_INTERVAL="0.5", AWS_ENDPOINT_URL_EC2=slow_ec2,
                   AWS_ACCESS_KEY_ID="AKIATESTTESTTEST0000", AWS_SECRET_ACCESS_KEY="x",
                   AWS_CONFIG_FILE=str(empty), AWS_SHARED_CREDENTIALS_FILE=str(empty),
                   AWS_EC2_METADATA_DISABLED="true", NO_PROXY="127.0.0.1")
    for k in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN", "HTTP_PROXY",
              "HTTPS_PROXY", "http_proxy", "https_proxy"):
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
        as_env: dict[str, str], tmp_path: Path) -> None:
    from app.celery import app
    from app.delegates import queue_depths
    from tasks.discovery import discover_hosts

    out, errf = tmp_path / "autoscale.out", tmp_path / "autoscale.err"
    log_dir = tmp_path / "workers"
    pids: set[int] = set()

    def logs() -> str:
        text = [f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                for p in (out, errf, *sorted(log_dir.glob("*.log"))) if p.exists()]
        return "\n".join(text)

    with out.open("wb") as o, errf.open("wb") as e:
        scaler = subprocess.Popen(
            [*VMFARM, "autoscale", "--region", "rs", "--min", "1", "--max", "4",
             "--scale-up-depth", "3", "--scale-up-after", "1s", "--scale-down-depth", "1",
             "--scale-down-after", "2s", "--interval", "0.5", "-c", "1",
             "--log-dir", str(log_dir), "--stop-timeout", "60s"],
            env=as_env, cwd=REPO, stdout=o, stderr=e, start_new_session=True)
    try:
        _wait("one autoscaled worker of rs registered",
              lambda: len(_rs_workers()) == 1, 90, logs)
        [first] = _rs_workers()
        assert first.startswith("autoscale-rs-1@")

        results = [discover_hosts.apply_async(kwargs={"infra": SLOW_INFRA, "region": "rs"},
                                              expires=600) for _ in range(120)]
        most = [1]

        def more_than_one() -> bool:
            live = _rs_workers()
            pids.update(int(w["pid"]) for w in live.values())
            most[0] = max(most[0], len(live))
            return len(live) > 1

        _wait("the region scaled up while its queue was deep", more_than_one, 120, logs)
        done = [r.get(timeout=300) for r in results]
        assert all(d == {"hosts": [], "worker": d["worker"], "queue": "vmfarm.rs"}
                   for d in done), done[:3]
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
            if w["name"].startswith("autoscale-rs-") and _is_our_worker(int(w["pid"]),
                                                                        w["name"]):
                os.kill(int(w["pid"]), signal.SIGKILL)
        with app.connection_for_write() as conn:
            conn.default_channel.queue_purge("vmfarm.rs")


def test_autoscale_once_in_dry_run_prints_decisions_and_starts_nothing(
        as_env: dict[str, str]) -> None:
    res = subprocess.run([*VMFARM, "autoscale", "--region", "rs", "--min", "2", "--max", "3",
                          "--once", "--dry-run", "-o", "json"],
                         env=as_env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    [line] = res.stdout.strip().splitlines()
    assert json.loads(line) == {"region": "rs", "current": 0, "target": 2, "action": "up",
                                "reason": "0 below min 2", "depth": 0, "dry_run": True}
    assert _rs_workers() == {}
    bad = subprocess.run([*VMFARM, "autoscale", "--region", "rs", "--min", "3", "--max", "2",
                          "--once"], env=as_env, cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and "max (2) must be at least min (3)" in bad.stderr
    embedded = subprocess.run([*VMFARM, "autoscale", "--region", "rs", "--once"],
                              env=base_env(VMFARM_HOME=as_env["VMFARM_HOME"]), cwd=REPO,
                              capture_output=True, text=True, timeout=120)
    assert embedded.returncode == 2 and "needs a broker" in embedded.stderr
