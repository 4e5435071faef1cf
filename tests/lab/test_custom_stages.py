"""Custom stages (ShellScript, Http, Wait on the delegate) and a HarnessApproval step inside a
Deployment stage, run as a user runs them: embedded mode (no broker), the `vmfarm` command in
subprocesses, real sshd lab hosts, a local HTTP server for the Http step.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.alloc import Allocator
from tests.conftest import DATA, REPO, base_env, run_vmfarm
from tests.fakes.status_server import StatusServer
from tests.waiting import wait_for

FILES = [str(DATA / "custom")]
USERS = str(DATA / "approval-users.yaml")


@pytest.fixture
def health(alloc: Allocator) -> Iterator[StatusServer]:
    """A local HTTP server answering 200 'status: UP' on a leased port."""
    with alloc.port() as lease, StatusServer(lease.port) as server:
        yield server


def _env(tmp_path: Path, user: str) -> dict[str, str]:
    return base_env(VMFARM_HOME=str(tmp_path / "home"), VMFARM_USER=user, VMFARM_USERS_FILE=USERS)


def _status(env: dict[str, str], ex_id: str) -> dict[str, Any]:
    res = run_vmfarm("status", ex_id, "-o", "json", env=env)
    assert res.returncode == 0, res.stderr
    return dict(json.loads(res.stdout))


def _runs_on(lab: Any, ex_id: str) -> int:
    total = 0
    for h in lab.hosts:
        path = Path(h.host_dir) / "opt" / "custom" / "runs"
        if path.exists():
            total += path.read_text().split().count(ex_id)
    return total


def test_custom_stage_then_an_approval_step_in_the_deployment_runs_to_success(
    tmp_path: Path, lab: Any, health: StatusServer
) -> None:
    # Given alice runs a pipeline: a Custom stage (script with an output, Http check, Wait 2s),
    # then a Deployment stage whose first step is a HarnessApproval
    alice = _env(tmp_path, "alice")
    run = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cli.main",
            "run",
            *FILES,
            str(lab.infrastructure_file),
            "--set",
            f"check_url={health.url}",
            "-o",
            "json",
        ],
        env=alice,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        ex_id = wait_for(
            lambda: _waiting_execution(alice), 120, "the run to wait for approval", interval=0.3
        )
        # Then the Custom stage ran on the delegate: its output reached the Http step
        report = _status(alice, ex_id)
        checks = report["stages"][0]
        assert checks["status"] == "SUCCEEDED"
        (delegate,) = checks["hosts"]
        assert delegate["host"] == "delegate"
        steps = {s["step"]: s for s in delegate["steps"]}
        assert [steps[k]["status"] for k in ("prepare", "smoke", "soak")] == ["SUCCEEDED"] * 3
        assert steps["prepare"]["outputs"] == {"build": f"build-{ex_id}"}
        assert health.seen == [f"/health?build=build-{ex_id}"]
        # and nothing was deployed while the approval waits
        assert _runs_on(lab, ex_id) == 0
        text = run_vmfarm("status", ex_id, env=alice)
        assert f"Please approve the deployment of {ex_id}" in text.stdout

        # When alice approves her own run, it is refused (disallowPipelineExecutor)
        own = run_vmfarm("approve", ex_id, env=alice)
        assert own.returncode == 3 and "alice started this execution" in own.stderr
        # and bob approves
        bob = run_vmfarm("approve", ex_id, "-m", "ship it", env=_env(tmp_path, "bob"))
        assert bob.returncode == 0, bob.stderr
        assert "approved by bob (1 of 1)" in bob.stdout
        out, err = run.communicate(timeout=180)
    finally:
        if run.poll() is None:
            run.kill()
            run.communicate()
    # Then the run succeeds and every host got the deployment
    assert run.returncode == 0, out + err
    final = json.loads(out)
    assert final["status"] == "SUCCEEDED"
    assert _runs_on(lab, ex_id) == len(lab.hosts)
    logs = run_vmfarm("logs", ex_id, "--host", "delegate", env=alice)
    assert f"prepared build-{ex_id} on the delegate" in logs.stdout
    assert "assertion holds" in logs.stdout


def _waiting_execution(env: dict[str, str]) -> str | None:
    res = run_vmfarm("executions", "-o", "json", env=env)
    if res.returncode != 0:
        return None
    rows = json.loads(res.stdout)
    rows = rows.get("executions", rows) if isinstance(rows, dict) else rows
    waiting = [r["id"] for r in rows if r.get("status") == "WAITING"]
    return waiting[0] if waiting else None


def test_a_failing_http_assertion_fails_the_custom_stage(
    tmp_path: Path, lab: Any, health: StatusServer
) -> None:
    # Given the health endpoint says UP, and the pipeline expects READY
    alice = _env(tmp_path, "alice")
    res = run_vmfarm(
        "run",
        *FILES,
        str(lab.infrastructure_file),
        "--set",
        f"check_url={health.url}",
        "--set",
        "expect=READY",
        "-o",
        "json",
        env=alice,
    )
    # Then the Custom stage fails at the Http step, saying why, and nothing is deployed
    assert res.returncode == 1, res.stdout + res.stderr
    report = json.loads(res.stdout)
    assert report["status"] == "FAILED"
    checks, deploy = report["stages"]
    assert checks["status"] == "FAILED" and deploy["status"] == "SKIPPED"
    steps = {s["step"]: s for s in checks["hosts"][0]["steps"]}
    assert steps["smoke"]["status"] == "FAILED"
    assert (
        "assertion failed: <+httpResponseCode> == 200 && <+httpResponseBody>.contains("
        '"READY")' in steps["smoke"]["error"]
    )
    assert "soak" not in steps or steps["soak"]["status"] == "SKIPPED"
    assert _runs_on(lab, report["id"]) == 0
