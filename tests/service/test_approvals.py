"""HarnessApproval in an Approval stage: the execution waits (no work in flight) for people."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.conftest import DATA, Cluster, run_vmfarm
from tests.waiting import wait_for

FILES = [str(DATA / "approval")]
USERS = str(DATA / "approval-users.yaml")


def _as(cluster: Cluster, user: str) -> dict[str, str]:
    return {**cluster.env, "VMFARM_USER": user, "VMFARM_USERS_FILE": USERS}


def _status(cluster: Cluster, ex_id: str) -> dict[str, Any]:
    return dict(json.loads(cluster.vmfarm("status", ex_id, "-o", "json").stdout))


def _wait_for(cluster: Cluster, ex_id: str, statuses: set[str]) -> dict[str, Any]:
    last: dict[str, Any] = {}

    def reached() -> dict[str, Any] | None:
        last.update(_status(cluster, ex_id))
        return dict(last) if last["status"] in statuses else None

    report: dict[str, Any] = wait_for(
        reached,
        60,
        f"{ex_id} to reach {statuses}",
        interval=0.3,
        explain=lambda: f"status: {last['status']}",
    )
    return report


def _runs_on(lab: Any, ex_id: str) -> int:
    total = 0
    for h in lab.hosts:
        path = Path(h.host_dir) / "opt" / "approved" / "runs"
        if path.exists():
            total += path.read_text().split().count(ex_id)
    return total


def _start(cluster: Cluster, lab: Any, *extra: str) -> str:
    res = run_vmfarm(
        "run", *FILES, str(lab.infrastructure_file), *extra, "--detach", env=_as(cluster, "alice")
    )
    assert res.returncode == 0, res.stderr
    ex_id = res.stdout.strip().splitlines()[-1]
    _wait_for(cluster, ex_id, {"WAITING"})
    return ex_id


def test_two_approvers_other_than_the_executor_let_the_run_continue(
    cluster: Cluster, lab: Any
) -> None:
    # Given alice started a pipeline whose approval needs 2 approvers, not the executor
    ex_id = _start(cluster, lab)
    assert _runs_on(lab, ex_id) == 0  # nothing runs while it waits
    waiting = cluster.vmfarm("status", ex_id)
    assert "waiting for approval: Release " + ex_id + " to the lab?" in waiting.stdout
    assert "0 of 2 approvals" in waiting.stdout

    # When alice approves her own run, it is refused with the reason
    own = run_vmfarm("approve", ex_id, env=_as(cluster, "alice"))
    assert own.returncode == 3
    assert "alice started this execution" in own.stderr
    # and someone outside the groups is refused too
    outsider = run_vmfarm("approve", ex_id, env=_as(cluster, "dave"))
    assert outsider.returncode == 3 and "not in the approver groups" in outsider.stderr

    # When bob approves, it still waits for a second approver
    bob = run_vmfarm("approve", ex_id, "-m", "looks good", env=_as(cluster, "bob"))
    assert bob.returncode == 0 and "approved by bob (1 of 2)" in bob.stdout
    assert _status(cluster, ex_id)["status"] == "WAITING"
    twice = run_vmfarm("approve", ex_id, env=_as(cluster, "bob"))
    assert twice.returncode == 3 and "already approved" in twice.stderr

    # Then carol's approval lets the deployment stage run, to success
    carol = run_vmfarm("approve", ex_id, env=_as(cluster, "carol"))
    assert carol.returncode == 0 and "approved by carol (2 of 2)" in carol.stdout
    report = _wait_for(cluster, ex_id, {"SUCCEEDED", "FAILED"})
    assert report["status"] == "SUCCEEDED"
    approval = report["stages"][0]["phases"][0]["verdict"]
    assert [a["user"] for a in approval["approvals"]] == ["bob", "carol"]
    assert approval["approvals"][0]["comment"] == "looks good"
    assert _runs_on(lab, ex_id) == len(lab.hosts)


def test_a_rejection_fails_the_run_and_nothing_is_deployed(cluster: Cluster, lab: Any) -> None:
    ex_id = _start(cluster, lab)
    res = run_vmfarm("reject", ex_id, "-m", "not today", env=_as(cluster, "carol"))
    assert res.returncode == 0 and "rejected by carol" in res.stdout
    report = _wait_for(cluster, ex_id, {"SUCCEEDED", "FAILED"})
    assert report["status"] == "FAILED"
    assert "approval rejected by carol: not today" in report["error"]
    assert report["stages"][1]["status"] == "SKIPPED"
    assert _runs_on(lab, ex_id) == 0
    late = run_vmfarm("approve", ex_id, env=_as(cluster, "bob"))
    assert late.returncode == 2 and "not waiting for an approval" in late.stderr


def test_an_approval_that_times_out_fails_the_run(cluster: Cluster, lab: Any) -> None:
    ex_id = _start(cluster, lab, "--set", "timeout=2s")

    # The reconciler does nothing until the 2 s have passed, then times the approval out.
    def reconciled() -> bool:
        rec = run_vmfarm("reconcile", "-o", "json", env=_as(cluster, "alice"))
        assert rec.returncode == 0, rec.stderr
        return f"{ex_id}: approval timed out" in json.loads(rec.stdout)["actions"]

    wait_for(reconciled, 60, "reconcile to time the approval out", interval=0.5)
    report = _wait_for(cluster, ex_id, {"SUCCEEDED", "FAILED"})
    assert report["status"] == "FAILED" and "approval timed out after 2s" in report["error"]
    assert _runs_on(lab, ex_id) == 0
