"""The metrics endpoint scraped during a real run on Redis, PostgreSQL and region workers:
the running execution, the queues' depth and live workers per region show up while it runs,
and the run's host-step durations once its steps are done."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from typing import Any

from tests.conftest import DATA, REPO, Cluster, free_port

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


def test_metrics_during_a_run(cluster: Cluster, lab: Any) -> None:
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "cli.main", "metrics", "serve",
                               "--port", str(port)], env=cluster.env, cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              start_new_session=True)
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                _scrape(url)
                break
            except OSError:
                assert time.monotonic() < deadline, "the metrics endpoint never came up"
                time.sleep(0.2)
        sub = cluster.vmfarm("run", PIPELINE, str(lab.infrastructure_file), "--set",
                             "slow_host=all", "--set", "slow_seconds=3", "--detach")
        assert sub.returncode == 0, sub.stderr
        ex_id = sub.stdout.strip().splitlines()[-1]
        during = ""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            during = _scrape(url)
            if (_value(during, "vmfarm_executions_active", status="RUNNING") or 0) >= 1:
                break
            time.sleep(0.3)
        # while it runs: the execution, the region queues and their live workers
        assert (_value(during, "vmfarm_executions_active", status="RUNNING") or 0) >= 1
        assert _value(during, "vmfarm_queue_depth", queue="vmfarm.r1") is not None, during
        assert (_value(during, "vmfarm_workers_live", region="r1") or 0) >= 1
        # once it is done: its host-step durations (6 hosts x 2 steps, each >= 3 s for the
        # first step)
        deadline = time.monotonic() + 90
        after = ""
        while time.monotonic() < deadline:
            status = cluster.vmfarm("status", ex_id, "-o", "json").stdout
            if re.search(r'"status": "(SUCCEEDED|FAILED)"', status[:400]):
                break
            time.sleep(0.5)
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
