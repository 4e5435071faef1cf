"""Pipeline chaining on the lab, as a user runs it (embedded mode, the `vmfarm` command in a
subprocess, real sshd hosts): a parent's Pipeline stage runs the child pipeline's deployment
as an execution of its own, waits for it, takes its outputs and goes on when it SUCCEEDED (a
later stage reads them); a failing child fails the parent's stage, naming the child's
execution, and a retry runs the child again."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import DATA, base_env, run_vmfarm

FILES = [str(DATA / "chain")]


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return base_env(VMFARM_HOME=str(tmp_path / "home"))


def _environment(tmp_path: Path) -> str:
    path = tmp_path / "env.yaml"
    path.write_text(
        "apiVersion: v1\nkind: Environment\nmetadata:\n  name: lab\nspec:\n  type: PreProduction\n"
    )
    return str(path)


def _run(env: dict[str, str], lab: Any, tmp_path: Path, *extra: str) -> tuple[int, Any]:
    res = run_vmfarm(
        "run",
        *FILES,
        _environment(tmp_path),
        str(lab.infrastructure_file),
        *extra,
        "-o",
        "json",
        env=env,
    )
    assert res.stdout.strip(), res.stderr
    return res.returncode, json.loads(res.stdout)


def _status(env: dict[str, str], ex_id: str) -> dict[str, Any]:
    res = run_vmfarm("status", ex_id, "-o", "json", env=env)
    assert res.returncode == 0, res.stderr
    return dict(json.loads(res.stdout))


def _runs(lab: Any, ex_id: str) -> list[str]:
    """The lines the child's install step wrote on each host for execution ``ex_id``."""
    out = []
    for h in lab.hosts:
        path = Path(h.host_dir) / "opt" / "chain" / "runs"
        if path.exists():
            out += [ln for ln in path.read_text().splitlines() if ln.endswith(ex_id)]
    return out


def test_a_pipeline_stage_runs_the_child_deployment_then_the_parent_goes_on(
    env: dict[str, str], lab: Any, tmp_path: Path
) -> None:
    # Given a parent whose first stage chains child_deploy with release 2.0
    code, report = _run(env, lab, tmp_path)
    # Then the parent succeeds: its Pipeline stage, then the stage after it
    assert code == 0, report
    assert report["status"] == "SUCCEEDED" and report["pipeline"] == "release_train"
    child_stage, after = report["stages"]
    assert child_stage["status"] == "SUCCEEDED" and after["status"] == "SUCCEEDED"
    # and the stage names its child, an execution of its own that deployed to every host
    child_id = child_stage["child_execution"]["id"]
    assert child_stage["child_execution"]["status"] == "SUCCEEDED"
    child = _status(env, child_id)
    assert child["status"] == "SUCCEEDED" and child["pipeline"] == "child_deploy"
    assert child["parent"] == {"id": report["id"], "stage": "child"}
    assert [h["status"] for h in child["stages"][0]["hosts"]] == ["SUCCEEDED"] * len(lab.hosts)
    # with the release the parent gave, and its own execution id
    assert sorted(_runs(lab, child_id)) == [f"2.0 {child_id}"] * len(lab.hosts)
    # and the stage took the child's install output, which the stage after it read: one
    # value (every host recorded the same) and the list of every host's
    assert child_stage["outputs"] == {
        "installed": "2.0",
        "hosts": json.dumps(["2.0"] * len(lab.hosts)),
    }
    (announce,) = after["hosts"][0]["steps"]
    assert announce["outputs"] == {"got": "2.0", "all": json.dumps(["2.0"] * len(lab.hosts))}
    # and rolling the parent back asks for its child to be rolled back first
    res = run_vmfarm("rollback", report["id"], "--plan", env=env)
    assert res.returncode != 0
    assert f"roll that one back first (vmfarm rollback {child_id})" in res.stderr, res.stderr


def test_a_failing_child_fails_the_parent_naming_the_child(
    env: dict[str, str], lab: Any, tmp_path: Path
) -> None:
    # Given the parent passes fail=yes to its child
    code, report = _run(env, lab, tmp_path, "--set", "fail=yes")
    # Then the child fails, and so does the parent's stage, naming the child's execution
    assert code == 1, report
    child_stage, after = report["stages"]
    child_id = child_stage["child_execution"]["id"]
    assert child_stage["status"] == "FAILED"
    assert f"child execution {child_id} (pipeline child_deploy) FAILED" in child_stage["error"]
    assert (
        "install failed on purpose" in child_stage["error"]
        or "stage 'deploy'" in (child_stage["error"])
    )
    assert report["status"] == "FAILED" and child_id in report["error"]
    # and the stage after it did not run
    assert after["status"] == "SKIPPED"
    assert _status(env, child_id)["status"] == "FAILED"
    # When the parent is retried, its Pipeline stage runs the child again: a new execution
    res = run_vmfarm("retry", report["id"], "--only-failed", "-o", "json", env=env)
    again = json.loads(res.stdout)
    assert again["id"] != report["id"]
    second = again["stages"][0]["child_execution"]["id"]
    assert second != child_id
    assert _status(env, second)["parent"] == {"id": again["id"], "stage": "child"}
    assert len(_runs(lab, second)) == len(lab.hosts)  # (and fails again: the same plan)
    assert res.returncode == 1 and again["status"] == "FAILED"
