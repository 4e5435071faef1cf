"""The metrics endpoint scraped after a real run on Redis, PostgreSQL, region and control worker
processes and sshd lab hosts: what it says passes `promtool check metrics` and matches the
run; a queue holding messages that no worker consumes shows its depth and 0 consumers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import DATA, REPO, Cluster
from tests.unit.metric_names import tool

PIPELINE = str(DATA / "liveness" / "pipeline.yaml")
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _scrape(url: str) -> str:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=30) as resp:
        return str(resp.read().decode())


def _samples(text: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }


def _get(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


@pytest.fixture
def exporter(cluster: Cluster, free_port: Callable[[], int]) -> Iterator[str]:
    """A metrics exporter process on the cluster's ledger and broker; its /metrics URL."""
    port = free_port()
    code = f"from app.metrics import serve; serve({port}, '127.0.0.1', block=True)"
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        env=cluster.env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                _scrape(url)
                break
            except OSError:
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                assert time.monotonic() < deadline, "the metrics endpoint never came up"
                time.sleep(0.2)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def test_metrics_of_a_real_run_pass_promtool_check_metrics(
    cluster: Cluster, lab: Any, exporter: str
) -> None:
    # Given a run of six hosts in regions r1 and r2 that has ended
    res = cluster.vmfarm("run", PIPELINE, str(lab.infrastructure_file), timeout=240)
    assert res.returncode == 0, res.stdout + res.stderr + cluster.worker_logs()
    # When Prometheus scrapes the exporter
    text = _scrape(exporter)
    # Then promtool finds nothing to say about names, types and units
    check = subprocess.run(
        [tool("promtool"), "check", "metrics"],
        input=text,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.returncode == 0 and not (check.stdout + check.stderr).strip(), (
        check.stdout + check.stderr
    )
    # and the numbers are the run's
    m = _samples(text)
    assert (
        _get(
            m,
            "vmfarm_executions_finished_total",
            pipeline="liveness",
            environment="lab",
            status="SUCCEEDED",
        )
        or 0
    ) >= 1, text
    hosts = {h.region for h in lab.hosts}
    for region in hosts:
        ended = sum(
            v
            for (n, lab_), v in m.items()
            if n == "vmfarm_host_steps_total"
            and dict(lab_)["region"] == region
            and dict(lab_)["status"] == "SUCCEEDED"
        )
        assert ended >= 3, region  # three hosts per region, at least one step each
        assert _get(m, "vmfarm_workers", region=region, state="live") == 1
        assert _get(m, "vmfarm_queue_consumers", queue=f"vmfarm.{region}") == 1
        assert _get(m, "vmfarm_queue_depth", queue=f"vmfarm.{region}") == 0
    count = sum(v for (n, _l), v in m.items() if n == "vmfarm_host_step_duration_seconds_count")
    assert count >= len(lab.hosts)
    assert _get(m, "vmfarm_control_workers", state="live") == 1
    assert _get(m, "vmfarm_queue_consumers", queue="vmfarm.control") == 1
    assert (_get(m, "vmfarm_gate_verdicts_total", kind="deploy", verdict="pass") or 0) >= 1
    for source in ("ledger", "workers", "broker"):
        assert _get(m, "vmfarm_metrics_source_up", source=source) == 1, source
    assert not any(v in ("none", "None") for _n, labels in m for _k, v in labels)


def test_a_queue_with_messages_and_no_consumer_shows_its_depth_and_0_consumers(
    cluster: Cluster, in_process_app: Any, exporter: str
) -> None:
    # Given region r9, which no worker serves, and a step sent to it (its worker died after
    # the work was dispatched, say)
    key = {"e": "deadbeef0000", "s": 0, "p": 0, "h": "h9", "i": 0, "a": 1, "region": "r9"}
    in_process_app.send_task("vmfarm.run_step", kwargs={"key": key})
    try:
        # When Prometheus scrapes
        m = _samples(_scrape(exporter))
        # Then the queue is there, with its message and nobody consuming it
        assert _get(m, "vmfarm_queue_depth", queue="vmfarm.r9") == 1
        assert _get(m, "vmfarm_queue_consumers", queue="vmfarm.r9") == 0
        assert _get(m, "vmfarm_queue_consumers", queue="vmfarm.r1") == 1
    finally:
        with in_process_app.connection_for_write() as conn:
            conn.default_channel.queue_purge("vmfarm.r9")
