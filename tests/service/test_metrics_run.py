"""The metrics endpoint scraped during a real run on Redis, PostgreSQL and region workers:
the running execution, the queues' depth and live workers per region show up while it runs,
and the run's host-step durations once its steps are done."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from typing import Any

from tests.conftest import DATA, REPO, Cluster
from tests.waiting import wait_for

PIPELINE = str(DATA / "liveness" / "pipeline.yaml")


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return str(resp.read().decode())


def _value(text: str, name: str, **labels: str) -> float | None:
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_metrics_during_a_run(cluster: Cluster, lab: Any, free_port: Callable[[], int]) -> None:
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "cli.main", "metrics", "serve",
                               "--port", str(port)], env=cluster.env, cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              start_new_session=True)
    url = f"http://127.0.0.1:{port}/metrics"
    def up() -> bool:
        try:
            _scrape(url)
        except OSError:
            return False
        return True

    try:
        wait_for(up, 30, "the metrics endpoint to come up", interval=0.2)
        sub = cluster.vmfarm("run", PIPELINE, str(lab.infrastructure_file), "--set",
                             "slow_host=all", "--set", "slow_seconds=3", "--detach")
        assert sub.returncode == 0, sub.stderr
        ex_id = sub.stdout.strip().splitlines()[-1]
        def running() -> str | None:
            text = _scrape(url)
            active = _value(text, "vmfarm_executions_active", status="RUNNING") or 0
            return text if active >= 1 else None

        during: str = wait_for(running, 60, "a RUNNING execution in the metrics", interval=0.3)
        # while it runs: the execution, the region queues and their live workers
        assert (_value(during, "vmfarm_executions_active", status="RUNNING") or 0) >= 1
        assert _value(during, "vmfarm_queue_depth", queue="vmfarm.r1") is not None, during
        assert (_value(during, "vmfarm_workers_live", region="r1") or 0) >= 1
        # once it is done: its host-step durations (6 hosts x 2 steps, each >= 3 s for the
        # first step)
        wait_for(lambda: re.search(r'"status": "(SUCCEEDED|FAILED)"',
                                   cluster.vmfarm("status", ex_id, "-o", "json").stdout[:400]),
                 90, "the execution to end", interval=0.5)
        after = _scrape(url)
        count = _value(after, "vmfarm_host_step_duration_seconds_gcount", kind="deploy",
                       status="SUCCEEDED")
        assert count is not None and count >= 12, after
        total = _value(after, "vmfarm_host_step_duration_seconds_gsum", kind="deploy",
                       status="SUCCEEDED")
        assert total is not None and total >= 6 * 3
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
