"""Failure strategies on the lab: Retry as new attempts, then what onRetryFailure says;
a step's own strategy comes before its stage's."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import DATA, base_env, run_vmfarm

FILES = [str(DATA / "failure")]


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return base_env(VMFARM_HOME=str(tmp_path / "home"))


def _run(env: dict[str, str], lab: Any, failures: int, *extra: str) -> tuple[int, Any]:
    res = run_vmfarm(
        "run",
        *FILES,
        str(lab.infrastructure_file),
        "--set",
        f"flaky_host={lab.hosts[0].address}",
        "--set",
        f"failures={failures}",
        *extra,
        "-o",
        "json",
        env=env,
    )
    return res.returncode, json.loads(res.stdout) if res.stdout.strip() else res.stderr


def _log(lab: Any, ex_id: str, host: int = 0) -> list[str]:
    path = Path(lab.hosts[host].host_dir) / "opt" / "fs" / f"{ex_id}.log"
    return path.read_text().split() if path.exists() else []


def _attempts(report: dict[str, Any], env: dict[str, str], host: str) -> list[str]:
    import sqlite3

    with sqlite3.connect(Path(env["VMFARM_HOME"]) / "vmfarm.db") as db:
        rows = db.execute(
            "select attempt, status from hoststeprun where execution_id=? and "
            "host=? and step_id='flaky' order by attempt",
            (report["id"], host),
        ).fetchall()
    return [f"{a}:{s}" for a, s in rows]


def test_retry_runs_new_attempts_until_the_step_passes(env: dict[str, str], lab: Any) -> None:
    code, report = _run(env, lab, 2)
    assert code == 0, report
    flaky = lab.hosts[0].address
    # two failed attempts, then a third that passed; each attempt ran once on the host
    assert _attempts(report, env, flaky) == ["1:FAILED", "2:FAILED", "3:SUCCEEDED"]
    assert _log(lab, report["id"]) == ["try", "try", "try", "after"]
    assert _log(lab, report["id"], 1) == ["try", "after"]
    # status shows each attempt, in text and in JSON (not only the last one)
    step = next(h for h in report["stages"][0]["hosts"] if h["host"] == flaky)["steps"][0]
    assert [(a["attempt"], a["status"], a["exit_code"]) for a in step["attempts"]] == [
        (1, "FAILED", 1),
        (2, "FAILED", 1),
        (3, "SUCCEEDED", 0),
    ]
    shown = run_vmfarm("status", report["id"], env=env)
    assert (
        f"{flaky} (r1): step flaky SUCCEEDED on attempt 3; attempt 1 FAILED (exit 1); "
        "attempt 2 FAILED (exit 1)"
    ) in shown.stdout, shown.stdout


def test_after_the_retries_on_retry_failure_decides(env: dict[str, str], lab: Any) -> None:
    flaky = lab.hosts[0].address
    # Ignore: the host goes on to its next step and the run succeeds
    code, report = _run(env, lab, 9, "--set", "type=Ignore")
    assert code == 0, report
    assert _attempts(report, env, flaky) == ["1:FAILED", "2:FAILED", "3:IGNORED"]
    assert _log(lab, report["id"]) == ["try", "try", "try", "after"]
    # MarkAsFailure (the default): the host fails after 3 attempts and the run fails
    code, report = _run(env, lab, 9)
    assert code == 1
    host = next(h for h in report["stages"][0]["hosts"] if h["host"] == flaky)
    assert host["status"] == "FAILED" and host["steps"][0]["attempt"] == 3
    assert "flaky failure 3" in host["steps"][0]["stderr_tail"]
    # Abort: the execution is aborted
    code, report = _run(env, lab, 9, "--set", "type=Abort")
    assert code == 1 and report["status"] == "ABORTED"


def test_a_step_strategy_comes_before_its_stage_strategy(env: dict[str, str], lab: Any) -> None:
    """The stage says Abort on AllErrors; the step's own Retry matched first (above). An error
    the step's strategy does not name falls through to the stage's."""
    from app.coordinator.precedence import failure_action
    from app.definitions.models import FailureAction, FailureStrategy
    from app.definitions.plan import CommandStepPlan, DeploymentStagePlan

    def on(errors: list[str], action: dict[str, Any]) -> FailureStrategy:
        return FailureStrategy.model_validate({"onFailure": {"errors": errors, "action": action}})

    retry = {"type": "Retry", "spec": {"retryCount": 1, "retryIntervals": ["1s"]}}
    step = CommandStepPlan.model_construct(
        failure_strategies=[on(["Unknown"], retry)], group_failure_strategies=[]
    )
    stage = DeploymentStagePlan.model_construct(
        failure_strategies=[on(["AllErrors"], {"type": "Abort"})]
    )
    assert failure_action(step, stage, "Unknown") == FailureAction.model_validate(retry)
    assert failure_action(step, stage, "Connectivity") == FailureAction(type="Abort")
    assert (
        failure_action(None, DeploymentStagePlan.model_construct(failure_strategies=[]), "Unknown")
        is None
    )


def test_retry_only_failed_reruns_just_the_hosts_that_failed(env: dict[str, str], lab: Any) -> None:
    # Given a host that is broken, so the run fails there (after its retries)
    broken = Path(lab.hosts[2].host_dir) / "opt" / "fs" / "broken"
    broken.parent.mkdir(parents=True, exist_ok=True)
    broken.write_text("")
    try:
        code, first = _run(env, lab, 0)
    finally:
        broken.unlink()
    assert code == 1, first
    bad = lab.hosts[2].address
    assert [h["host"] for h in first["stages"][0]["hosts"] if h["status"] == "FAILED"] == [bad]
    # When it is fixed and the run is retried for the failed hosts only
    res = run_vmfarm("retry", first["id"], "--only-failed", "-o", "json", env=env)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr
    second = json.loads(res.stdout)
    # Then a new execution ran on that host alone, and it succeeded
    assert second["id"] != first["id"] and second["inputs"]["retry_of"] == first["id"]
    assert [h["host"] for h in second["stages"][0]["hosts"]] == [bad]
    assert second["stages"][0]["hosts"][0]["status"] == "SUCCEEDED"
    assert _log(lab, second["id"], 2) == ["try", "after"]
    assert all(_log(lab, second["id"], i) == [] for i in (0, 1, 3, 4, 5))
    # and a run with nothing left to retry is refused
    again = run_vmfarm("retry", second["id"], "--only-failed", env=env)
    assert again.returncode == 2 and "no failed host to retry" in again.stderr
