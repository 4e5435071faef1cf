"""Canary analysis run by worker processes (Redis broker, PostgreSQL ledger, region and control
workers): the checks wait the analysis window in the broker, the control worker asks a real
Prometheus, and a worse canary is rolled back. (The full good/bad story in embedded mode is
tests/lab/test_canary_analysis_lab.py.)"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from tests.alloc import Allocator
from tests.conftest import DATA, Cluster
from tests.prometheus import HAVE_PROMETHEUS, Users, scraping, version_on

CANARY = DATA / "canary"
STRAT = DATA / "strategies"

# Skipped only on a developer's machine without Prometheus; in CI (CI=true) it fails instead.
pytestmark = pytest.mark.skipif(
    not HAVE_PROMETHEUS and not os.environ.get("CI"),
    reason="needs the prometheus binary (apt-get install prometheus)",
)


def test_workers_roll_back_a_canary_that_is_worse_than_the_current_version(
    cluster: Cluster, lab: Any, alloc: Allocator, tmp_path: Path
) -> None:
    addresses = [h.address for h in lab.hosts]
    canary = addresses[:2]  # 25% of 6, rounded up, inventory order
    work = tmp_path / "prometheus"
    work.mkdir()
    with scraping(addresses, alloc, work) as url:
        users = Users(addresses)
        try:
            # Given 1.0.0 of the good build on every host, and the canary pipeline naming the
            # Prometheus in the file (the workers have no VMFARM_PROMETHEUS_URL)
            files = [str(STRAT / "service.yaml"), str(lab.infrastructure_file)]
            first = cluster.vmfarm(
                "run",
                files[0],
                str(STRAT / "rolling.yaml"),
                files[1],
                "--set",
                "tag=1.0.0",
                "--set",
                f"path={CANARY / 'good-app'}",
                timeout=300,
            )
            assert first.returncode == 0, first.stdout[-3000:] + cluster.worker_logs()
            pipeline = tmp_path / "pipeline.yaml"
            window = "timeDuration: 20s\n"
            text = (CANARY / "pipeline.yaml").read_text()
            assert text.count(window) == 1
            pipeline.write_text(
                text.replace(window, f"{window}                        prometheusUrl: {url}\n")
            )

            # When the bad build (errors, slower) goes out as a canary
            bad = cluster.vmfarm(
                "run",
                files[0],
                str(pipeline),
                files[1],
                "--set",
                "tag=3.0.0",
                "--set",
                f"path={CANARY / 'bad-app'}",
                "-o",
                "json",
                timeout=300,
            )
        finally:
            users.close()
    # Then the run fails at the canary, which is back on 1.0.0; no other host saw 3.0.0
    assert bad.returncode == 1, bad.stdout[-3000:] + cluster.worker_logs()
    assert {a: version_on(a) for a in addresses} == dict.fromkeys(addresses, "1.0.0")
    stage = json.loads(bad.stdout)["stages"][0]
    verify = next(p for p in stage["phases"] if p["kind"] == "verify")
    analysis = verify["verdict"]["analysis"]
    # and the verdict holds both sides' numbers, judged worse
    assert analysis["canary"]["hosts"] == canary and analysis["passed"] is False
    numbers = {m["name"]: (m["canary"], m["baseline"]) for m in analysis["metrics"]}
    assert numbers["error rate"][0] > 0.1 and numbers["error rate"][1] == 0.0
    assert numbers["p95 latency"][0] > 0.1 > numbers["p95 latency"][1]
    assert not any(p["phase"] > 0 for p in stage["phases"] if p["kind"] == "deploy")
