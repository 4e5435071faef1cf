"""``when`` on the lab: a diagnostics step runs only on the hosts that failed (and the stage
still fails, by its failure strategy), and a stage with ``pipelineStatus: Failure`` runs after
it; a stage whose condition reads the environment type is skipped in PreProduction, shown
SKIPPED with the reason, and runs in Production."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import DATA, base_env, run_vmfarm

FILES = [str(DATA / "when")]


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return base_env(VMFARM_HOME=str(tmp_path / "home"))


def _environment(tmp_path: Path, kind: str) -> str:
    path = tmp_path / f"env-{kind}.yaml"
    path.write_text(
        f"apiVersion: v1\nkind: Environment\nmetadata:\n  name: lab\nspec:\n  type: {kind}\n"
    )
    return str(path)


def _run(env: dict[str, str], lab: Any, env_file: str, *extra: str) -> tuple[int, Any]:
    res = run_vmfarm(
        "run", *FILES, env_file, str(lab.infrastructure_file), *extra, "-o", "json", env=env
    )
    return res.returncode, json.loads(res.stdout) if res.stdout.strip() else res.stderr


def _log(lab: Any, ex_id: str, host: int) -> list[str]:
    path = Path(lab.hosts[host].host_dir) / "opt" / "fs" / f"{ex_id}.log"
    return path.read_text().split() if path.exists() else []


def _rows(env: dict[str, str], ex_id: str, step: str) -> dict[str, tuple[str, str | None]]:
    with sqlite3.connect(Path(env["VMFARM_HOME"]) / "vmfarm.db") as db:
        rows = db.execute(
            "select host, status, error from hoststeprun where execution_id=? and step_id=?",
            (ex_id, step),
        ).fetchall()
    return {h: (s, e) for h, s, e in rows}


def test_a_failure_only_step_runs_on_the_hosts_that_failed_and_the_stage_still_fails(
    env: dict[str, str], lab: Any, tmp_path: Path
) -> None:
    # Given a host where the work step fails, and a stage that says MarkAsFailure
    bad = lab.hosts[1].address
    code, report = _run(env, lab, _environment(tmp_path, "Production"), "--set", f"bad_host={bad}")
    # Then the run fails, in the first stage; the second (Success only) does not run, the
    # third (pipelineStatus: Failure) does
    assert code == 1, report
    assert report["status"] == "FAILED" and "stage 'deploy'" in report["error"]
    deploy, smoke, cleanup = report["stages"]
    assert deploy["status"] == "FAILED"
    assert smoke["status"] == "SKIPPED" and "an earlier stage failed" in smoke["error"]
    assert cleanup["status"] == "SUCCEEDED"
    failed = [h["host"] for h in deploy["hosts"] if h["status"] == "FAILED"]
    assert failed == [bad]
    # and the diagnostics ran on that host only, after its failed step (and nothing else did)
    assert _log(lab, report["id"], 1) == ["work", "diagnostics", "cleanup"]
    for i in range(len(lab.hosts)):
        if i != 1:
            assert _log(lab, report["id"], i) == ["work", "after", "cleanup"], i
    # and every host has a ledger row for it: SKIPPED with the reason where it did not run
    diag = _rows(env, report["id"], "diagnostics")
    assert diag[bad][0] == "SUCCEEDED"
    others = {h: r for h, r in diag.items() if h != bad}
    assert len(others) == len(lab.hosts) - 1
    assert all(s == "SKIPPED" and "stageStatus Failure" in (e or "") for s, e in others.values())
    # the failed host's later step is skipped as before (an earlier step failed)
    assert _rows(env, report["id"], "after")[bad] == (
        "SKIPPED",
        "skipped: an earlier step failed on this host",
    )


def test_a_stage_conditioned_on_the_environment_type_is_skipped_in_preproduction(
    env: dict[str, str], lab: Any, tmp_path: Path
) -> None:
    pre = _environment(tmp_path, "PreProduction")
    # vmfarm plan says so before anything runs
    plan = run_vmfarm("plan", *FILES, pre, str(lab.infrastructure_file), env=env)
    assert plan.returncode == 0, plan.stderr
    assert (
        'stage smoke: SKIPPED by its when: condition "PreProduction" == "Production"' in plan.stdout
    )
    assert "runs only on hosts where an earlier step failed" in plan.stdout
    assert (
        "stage cleanup: SKIPPED by its when: pipelineStatus Failure, and no earlier stage "
        "failed; it runs only if an earlier stage fails" in plan.stdout
    )
    # When it runs in PreProduction
    code, report = _run(env, lab, pre)
    # Then it succeeds, and the smoke stage is SKIPPED with the reason, nothing run on a host
    assert code == 0, report
    deploy, smoke, cleanup = report["stages"]
    assert deploy["status"] == "SUCCEEDED"
    assert smoke["status"] == "SKIPPED" and "is false" in smoke["error"]
    assert cleanup["status"] == "SKIPPED" and "no earlier stage failed" in cleanup["error"]
    assert all(_log(lab, report["id"], i) == ["work", "after"] for i in range(len(lab.hosts)))
    # and vmfarm status shows it
    status = run_vmfarm("status", report["id"], env=env)
    assert status.returncode == 0, status.stderr
    assert "stage smoke: SKIPPED (skipped by when: condition" in status.stdout
    # In Production the stage runs (its step's host condition holds on every host)
    code, report = _run(env, lab, _environment(tmp_path, "Production"))
    assert code == 0, report
    assert [s["status"] for s in report["stages"]] == ["SUCCEEDED", "SUCCEEDED", "SKIPPED"]
    assert all(
        _log(lab, report["id"], i) == ["work", "after", "smoke"] for i in range(len(lab.hosts))
    )


def test_after_a_stage_rollback_the_stage_that_runs_on_failure_still_runs(
    env: dict[str, str], lab: Any, tmp_path: Path
) -> None:
    # Given the first stage rolls back when a host fails
    bad = lab.hosts[2].address
    code, report = _run(
        env,
        lab,
        _environment(tmp_path, "Production"),
        "--set",
        f"bad_host={bad}",
        "--set",
        "type=StageRollback",
    )
    # Then it is rolled back, the clean-up stage runs after it, and the run ends FAILED
    assert code == 1, report
    assert report["status"] == "FAILED"
    assert [s["status"] for s in report["stages"]] == ["ROLLED_BACK", "SKIPPED", "SUCCEEDED"]
    assert _log(lab, report["id"], 2)[-1] == "cleanup"
