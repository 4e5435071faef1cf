"""The watch after deployment in embedded mode (no broker: the worker lives in `vmfarm run`),
with health checks only (no Prometheus): the checks are countdown tasks on the embedded
worker, `run` waits for the window, and a watch whose health checks fail rolls the stage back.
(The Prometheus triggers with real workers: tests/service/test_watch_run.py.)"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import DATA, base_env, run_vmfarm, stop_listeners
from tests.prometheus import version_on

STRAT = DATA / "strategies"
WATCH = DATA / "watch"


@pytest.fixture
def env(tmp_path: Path, lab: Any) -> dict[str, str]:
    # The lab hosts are the session's: an app another test left on port 8080 would answer
    # the health checks and version_on() for this test's app.
    stop_listeners([h.address for h in lab.hosts], 8080)
    return base_env(VMFARM_HOME=str(tmp_path / "home"))


def health_watch(tmp_path: Path, port: int) -> Path:
    """The watch pipeline with one trigger: health checks to ``port`` on every host, 3 s."""
    text = (WATCH / "pipeline.yaml").read_text()
    start, end = text.index("          triggers:\n"), text.index("        spec:\n")
    trigger = (
        f"          healthCheck: {{url: 'http://<+instance.hostName>:{port}/health'}}\n"
        "          triggers:\n"
        "            - name: Health Check Failure\n"
        '              condition: "health_check_success_rate < 80%"\n'
        "              evaluation_window: 3s\n"
    )
    text = text[:start] + trigger + text[end:]
    text = text.replace("interval: 1s", "interval: 0.5s")
    path = tmp_path / "pipeline.yaml"
    path.write_text(text)
    return path


def run(env: dict[str, str], lab: Any, pipeline: Path, tag: str) -> tuple[int, dict[str, Any]]:
    res = run_vmfarm(
        "run",
        str(STRAT / "service.yaml"),
        str(pipeline),
        str(lab.infrastructure_file),
        "--set",
        f"tag={tag}",
        "--set",
        f"path={WATCH / 'app'}",
        "-o",
        "json",
        env=env,
        timeout=300,
    )
    assert res.stdout.strip(), res.stderr
    return res.returncode, json.loads(res.stdout)


def test_a_healthy_watch_ends_the_run_succeeded_after_its_window(
    env: dict[str, str], lab: Any, tmp_path: Path
) -> None:
    code, report = run(env, lab, health_watch(tmp_path, 8080), "5.0.0")
    assert code == 0, report.get("error")
    w = report["stages"][0]["watch"]
    assert w["status"] == "SUCCEEDED" and w["checks"] >= 5
    (trigger,) = w["triggers"]
    assert trigger["worst"] == 1.0 and trigger["state"] == "passed"
    assert w["last"]["health"] == {"passed": 6, "total": 6}


def test_a_watch_whose_health_checks_fail_rolls_the_stage_back(
    env: dict[str, str], lab: Any, tmp_path: Path
) -> None:
    addresses = [h.address for h in lab.hosts]
    code, _ = run(env, lab, STRAT / "rolling.yaml", "5.1.0")
    assert code == 0
    # When the watch checks a port nothing answers on
    code, report = run(env, lab, health_watch(tmp_path, 8081), "5.2.0")
    # Then the first check breaches and the stage goes back to 5.1.0 on every host
    assert code == 1
    assert report["status"] == "FAILED"
    stage = report["stages"][0]
    assert stage["status"] == "ROLLED_BACK"
    assert {a: version_on(a) for a in addresses} == dict.fromkeys(addresses, "5.1.0")
    w = stage["watch"]
    assert w["status"] == "FAILED" and w["checks"] == 1
    assert sorted(w["last"]["health"]["failed"]) == sorted(addresses)
    assert (
        "trigger 'Health Check Failure' (health_check_success_rate < 80%): 0.00% at"
        in report["error"]
    )
