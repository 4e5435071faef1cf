"""Canary analysis on 8 real sshd lab hosts with a real Prometheus: the reference's VERIFICATION
step (analysisType Prometheus, COMPARE_WITH_CURRENT) compares the canary hosts with the hosts
still on the current version.

The lab hosts run tests/data/canary/*-app: a small HTTP app exposing Prometheus metrics (a
request counter by status code, a latency histogram) on ``<host>:8080/metrics``; the bad build
answers one request in five with a 500 and 150 ms slower. The Debian ``prometheus`` binary
scrapes every host; client threads send requests to every host all along, as users would
(tests/prometheus.py). Embedded mode here; tests/service/test_canary_analysis_run.py runs a
canary with Redis, PostgreSQL and worker processes.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.alloc import Allocator
from tests.conftest import DATA, base_env, run_vmfarm
from tests.prometheus import HAVE_PROMETHEUS, Users, scraping, version_on

CANARY = DATA / "canary"
STRAT = DATA / "strategies"

# Skipped only on a developer's machine without Prometheus; in CI (CI=true) it fails instead.
pytestmark = pytest.mark.skipif(
    not HAVE_PROMETHEUS and not os.environ.get("CI"),
    reason="needs the prometheus binary (apt-get install prometheus)",
)


@pytest.fixture(scope="module")
def prometheus(
    lab8: Any, tmp_path_factory: pytest.TempPathFactory, alloc: Allocator
) -> Iterator[str]:
    """The Debian prometheus binary scraping every lab host's app (tests/prometheus.py)."""
    with scraping(
        [h.address for h in lab8.hosts], alloc, tmp_path_factory.mktemp("prometheus")
    ) as url:
        yield url


def run(
    env: dict[str, str], pipeline: Path, app: str, tag: str, lab8: Any, *extra: str
) -> subprocess.CompletedProcess[str]:
    return run_vmfarm(
        "run",
        str(STRAT / "service.yaml"),
        str(pipeline),
        str(lab8.infrastructure_file),
        "--set",
        f"tag={tag}",
        "--set",
        f"path={CANARY / app}",
        *extra,
        env=env,
        timeout=300,
    )


def _exec_id(stderr: str) -> str:
    return next(line.split()[1] for line in stderr.splitlines() if line.startswith("execution "))


def _analysis(report: dict[str, Any]) -> dict[str, Any]:
    verify = next(p for p in report["stages"][0]["phases"] if p["kind"] == "verify")
    analysis: dict[str, Any] = verify["verdict"]["analysis"]
    return analysis


def test_a_worse_canary_is_stopped_and_rolled_back_and_a_good_one_goes_on(
    lab8: Any, prometheus: str, tmp_path: Path
) -> None:
    env = base_env(VMFARM_HOME=str(tmp_path / "home"), VMFARM_PROMETHEUS_URL=prometheus)
    addresses = [h.address for h in lab8.hosts]
    canary, rest = addresses[:2], addresses[2:]  # 25% of 8, inventory order
    users = Users(addresses)
    try:
        # Given version 1.0.0 of the good build on every host, with users on it
        first = run(env, STRAT / "rolling.yaml", "good-app", "1.0.0", lab8)
        assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
        assert {version_on(a) for a in addresses} == {"1.0.0"}

        # When 2.0.0, as good, goes out as a canary with analysis
        good = run(env, CANARY / "pipeline.yaml", "good-app", "2.0.0", lab8, "-o", "json")
        # Then the analysis passes with both sides' numbers and 2.0.0 reaches every host
        assert good.returncode == 0, good.stdout[-3000:] + good.stderr[-3000:]
        analysis = _analysis(json.loads(good.stdout))
        assert analysis["passed"] is True, analysis
        assert analysis["canary"]["hosts"] == canary and analysis["baseline"]["hosts"] == rest
        for m in analysis["metrics"]:
            assert m["canary"] is not None and m["baseline"] is not None, m
        assert {version_on(a) for a in addresses} == {"2.0.0"}

        # When 3.0.0, which errs on one request in five and is 150 ms slower, goes out
        bad = run(env, CANARY / "pipeline.yaml", "bad-app", "3.0.0", lab8)
        # Then the run fails at the canary, saying both sides' numbers
        assert bad.returncode == 1, bad.stdout[-3000:] + bad.stderr[-3000:]
        out = bad.stdout
        assert "canary analysis (Prometheus, COMPARE_WITH_CURRENT, 20 s): FAILED" in out, out
        error_line = next(x for x in out.splitlines() if "error rate: canary" in x)
        assert "baseline 0.00%" in error_line and "worse by more than" in error_line
        assert any(
            "p95 latency: canary" in x and "worse by more than" in x for x in out.splitlines()
        ), out
        # and the primary phase never started, and the canary hosts are back on 2.0.0
        with sqlite3.connect(Path(env["VMFARM_HOME"]) / "vmfarm.db") as db:
            ex = _exec_id(bad.stderr)
            phases = {
                r[0]
                for r in db.execute(
                    "select distinct phase from hoststeprun where execution_id = ? and "
                    "kind = 'deploy'",
                    (ex,),
                )
            }
        assert phases == {0}
        assert {a: version_on(a) for a in addresses} == dict.fromkeys(addresses, "2.0.0")

        # and `status` shows the verdict with both sides' numbers, in text and in JSON
        st = run_vmfarm("status", ex, env=env)
        assert "canary analysis (Prometheus, COMPARE_WITH_CURRENT, 20 s): FAILED" in st.stdout
        assert error_line.strip() in st.stdout
        js = run_vmfarm("status", ex, "-o", "json", env=env)
        analysis = _analysis(json.loads(js.stdout))
        numbers = {
            m["name"]: (m["canary"], m["baseline"], m["passed"]) for m in analysis["metrics"]
        }
        rate, base_rate, ok = numbers["error rate"]
        assert not ok and rate > 0.1 and base_rate == 0.0
        p95, base_p95, ok = numbers["p95 latency"]
        assert not ok and p95 > 0.1 > base_p95
        assert analysis["window"]["seconds"] == 20
    finally:
        users.close()
    # Users were answered by every host throughout (the bad canary's 500s included)
    assert all(n > 0 for n in users.answers.values()), users.answers
