"""Operations against real worker processes (the `cluster` fixture: Redis, PostgreSQL, region
and control workers): the container healthchecks ping them, and Flower's task events are
turned off in them when the last Flower watching exits."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import redis

from app.flower import KEY, FlowerWatch
from tests.conftest import REPO, Cluster


def _health(cluster: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app.health", *args],
        env=cluster.env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_healthchecks_find_this_host_s_workers_alive(cluster: Cluster) -> None:
    # The cluster's workers run on this host, as a container's worker runs in its container
    # (other tests of the session may have left workers of this host too: name ours).
    res = _health(cluster, "worker", "w-r1@test", "w-r2@test")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "w-r1@test" in res.stdout and "w-r2@test" in res.stdout
    res = _health(cluster, "worker", "w-control@test")  # a control worker is no region worker
    assert res.returncode == 1 and "no region worker of" in res.stderr
    res = _health(cluster, "control", "w-control@test")
    assert res.returncode == 0 and "w-control@test: live" in res.stdout, res.stderr
    res = _health(cluster, "autoscaler")  # no autoscaler runs here
    assert res.returncode == 1 and "no autoscale round recorded" in res.stderr


def _events(app: Any, command: str) -> set[str]:
    """The workers' answers to enable_events or disable_events (what the state was)."""
    replies = app.control.broadcast(command, reply=True, timeout=3.0) or []
    return {str(r.get("ok", r)) for reply in replies for r in reply.values()}


def test_task_events_go_off_when_the_last_flower_exits(
    cluster: Cluster, in_process_app: Any
) -> None:
    app = in_process_app
    url = cluster.env["VMFARM_BROKER_URL"]
    redis.Redis.from_url(url).delete(KEY)
    # Given two Flowers watching, which turned task events on (as Flower does)
    first, second = FlowerWatch(app, url=url), FlowerWatch(app, url=url)
    with first:
        with second:
            assert _events(app, "enable_events") <= {
                "task events enabled",
                "task events already enabled",
            }
        # When one exits, the other still watches: events stay on
        assert second.disabled is None
        assert _events(app, "enable_events") == {"task events already enabled"}
    # When the last one exits, they are off in every worker
    assert first.disabled is not None and len(first.disabled) == 3, first.disabled
    assert _events(app, "disable_events") == {"task events already disabled"}
    assert redis.Redis.from_url(url).zcard(KEY) == 0
