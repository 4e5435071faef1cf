"""A Custom stage and an approval step in a Deployment stage with a broker: the Custom stage's
steps run on the control worker (its delegate, a separate process), the Wait is a countdown in
Redis, and the approval step stops the region workers' hosts until `vmfarm approve`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.alloc import Allocator
from tests.conftest import DATA, Cluster, run_vmfarm
from tests.fakes.status_server import StatusServer
from tests.waiting import wait_for

FILES = [str(DATA / "custom")]
USERS = str(DATA / "approval-users.yaml")


@pytest.fixture
def health(alloc: Allocator) -> Iterator[StatusServer]:
    with alloc.port() as lease, StatusServer(lease.port) as server:
        yield server


def _as(cluster: Cluster, user: str) -> dict[str, str]:
    return {**cluster.env, "VMFARM_USER": user, "VMFARM_USERS_FILE": USERS}


def _wait_for(cluster: Cluster, ex_id: str, statuses: set[str]) -> dict[str, Any]:
    last: dict[str, Any] = {}

    def reached() -> dict[str, Any] | None:
        res = cluster.vmfarm("status", ex_id, "-o", "json")
        last.update(json.loads(res.stdout))
        return dict(last) if last["status"] in statuses else None

    report: dict[str, Any] = wait_for(
        reached,
        90,
        f"{ex_id} to reach {statuses}",
        interval=0.3,
        explain=lambda: f"status: {last.get('status')}\n{cluster.worker_logs()}",
    )
    return report


def _runs_on(lab: Any, ex_id: str) -> int:
    return sum(
        path.read_text().split().count(ex_id)
        for h in lab.hosts
        if (path := Path(h.host_dir) / "opt" / "custom" / "runs").exists()
    )


def test_custom_stage_on_the_control_worker_then_an_approved_deployment(
    cluster: Cluster, lab: Any, health: StatusServer
) -> None:
    # Given alice starts the pipeline with a broker (detached)
    res = run_vmfarm(
        "run",
        *FILES,
        str(lab.infrastructure_file),
        "--set",
        f"check_url={health.url}",
        "--detach",
        env=_as(cluster, "alice"),
    )
    assert res.returncode == 0, res.stderr
    ex_id = res.stdout.strip().splitlines()[-1]

    # Then the Custom stage runs on the control worker and the deployment waits for approval
    waiting = _wait_for(cluster, ex_id, {"WAITING", "FAILED", "SUCCEEDED"})
    assert waiting["status"] == "WAITING", waiting.get("error")
    checks, deploy = waiting["stages"]
    steps = {s["step"]: s for s in checks["hosts"][0]["steps"]}
    assert {s["status"] for s in steps.values()} == {"SUCCEEDED"}
    assert {s["worker"] for s in steps.values()} == {"w-control@test"}
    assert health.seen == [f"/health?build=build-{ex_id}"]
    assert {h["status"] for h in deploy["hosts"]} == {"WAITING"}
    assert _runs_on(lab, ex_id) == 0

    # When carol approves, the hosts go on
    ok = run_vmfarm("approve", ex_id, env=_as(cluster, "carol"))
    assert ok.returncode == 0, ok.stderr
    done = _wait_for(cluster, ex_id, {"SUCCEEDED", "FAILED"})
    assert done["status"] == "SUCCEEDED", done.get("error")
    assert _runs_on(lab, ex_id) == len(lab.hosts)
    approval = next(p for p in done["stages"][1]["phases"] if p["kind"] == "approval")
    assert [a["user"] for a in approval["verdict"]["approvals"]] == ["carol"]


def test_a_rejected_approval_step_fails_the_stage_with_its_failure_strategy(
    cluster: Cluster, lab: Any, health: StatusServer
) -> None:
    res = run_vmfarm(
        "run",
        *FILES,
        str(lab.infrastructure_file),
        "--set",
        f"check_url={health.url}",
        "--detach",
        env=_as(cluster, "alice"),
    )
    assert res.returncode == 0, res.stderr
    ex_id = res.stdout.strip().splitlines()[-1]
    assert _wait_for(cluster, ex_id, {"WAITING", "FAILED"})["status"] == "WAITING"

    no = run_vmfarm("reject", ex_id, "-m", "not today", env=_as(cluster, "bob"))
    assert no.returncode == 0 and "rejected by bob" in no.stdout

    # Then every host fails at the approval step (ApprovalRejection), nothing is deployed,
    # and the stage's default failure strategy found nothing to roll back
    done = _wait_for(cluster, ex_id, {"FAILED", "ROLLED_BACK", "SUCCEEDED", "ROLLBACK_FAILED"})
    assert done["status"] != "SUCCEEDED"
    assert "step 'prod_approval': approval rejected by bob: not today" in done["error"]
    assert "nothing was rolled back" in done["error"]
    for h in done["stages"][1]["hosts"]:
        first = h["steps"][0]
        assert (first["status"], first["error_class"]) == ("FAILED", "ApprovalRejection")
    assert _runs_on(lab, ex_id) == 0


def test_an_approval_step_that_times_out_fails_its_hosts(
    cluster: Cluster, lab: Any, health: StatusServer
) -> None:
    res = run_vmfarm(
        "run",
        *FILES,
        str(lab.infrastructure_file),
        "--set",
        f"check_url={health.url}",
        "--set",
        "timeout=2s",
        "--detach",
        env=_as(cluster, "alice"),
    )
    assert res.returncode == 0, res.stderr
    ex_id = res.stdout.strip().splitlines()[-1]
    assert _wait_for(cluster, ex_id, {"WAITING", "FAILED"})["status"] == "WAITING"

    # The reconciler times the approval step out once its 2 s have passed
    def reconciled() -> bool:
        rec = run_vmfarm("reconcile", "-o", "json", env=_as(cluster, "alice"))
        assert rec.returncode == 0, rec.stderr
        return f"{ex_id}: approval timed out" in json.loads(rec.stdout)["actions"]

    wait_for(reconciled, 60, "reconcile to time the approval step out", interval=0.5)
    done = _wait_for(cluster, ex_id, {"FAILED", "SUCCEEDED"})
    assert done["status"] == "FAILED"
    assert "approval timed out after 2s" in done["error"]
    assert {h["steps"][0]["error_class"] for h in done["stages"][1]["hosts"]} == {"Timeout"}
    assert _runs_on(lab, ex_id) == 0


def test_aborting_a_run_stopped_at_an_approval_step_ends_it(
    cluster: Cluster, lab: Any, health: StatusServer
) -> None:
    res = run_vmfarm(
        "run",
        *FILES,
        str(lab.infrastructure_file),
        "--set",
        f"check_url={health.url}",
        "--detach",
        env=_as(cluster, "alice"),
    )
    assert res.returncode == 0, res.stderr
    ex_id = res.stdout.strip().splitlines()[-1]
    assert _wait_for(cluster, ex_id, {"WAITING", "FAILED"})["status"] == "WAITING"

    stop = run_vmfarm("abort", ex_id, env=_as(cluster, "alice"))
    assert stop.returncode == 0, stop.stderr
    done = _wait_for(cluster, ex_id, {"ABORTED", "FAILED", "SUCCEEDED"})
    assert done["status"] == "ABORTED"
    assert {h["steps"][0]["status"] for h in done["stages"][1]["hosts"]} == {"SKIPPED"}
    late = run_vmfarm("approve", ex_id, env=_as(cluster, "bob"))
    assert late.returncode == 2 and "not waiting for an approval" in late.stderr
    assert _runs_on(lab, ex_id) == 0


def test_an_approval_step_in_a_custom_stage_holds_its_later_steps(cluster: Cluster) -> None:
    res = run_vmfarm("run", str(DATA / "custom_approval"), "--detach", env=_as(cluster, "alice"))
    assert res.returncode == 0, res.stderr
    ex_id = res.stdout.strip().splitlines()[-1]
    waiting = _wait_for(cluster, ex_id, {"WAITING", "FAILED"})
    assert waiting["status"] == "WAITING"
    steps = {s["step"]: s["status"] for s in waiting["stages"][0]["hosts"][0]["steps"]}
    assert steps == {"draft": "SUCCEEDED", "sign_off": "WAITING", "publish": "PENDING"}

    ok = run_vmfarm("approve", ex_id, env=_as(cluster, "bob"))
    assert ok.returncode == 0, ok.stderr
    done = _wait_for(cluster, ex_id, {"SUCCEEDED", "FAILED"})
    assert done["status"] == "SUCCEEDED", done.get("error")
    publish = done["stages"][0]["hosts"][0]["steps"][2]
    assert publish["outputs"] == {"published": f"published draft-{ex_id}"}
