"""The execution page's summary of a large stage: what a person reads first at 500 hosts."""

from __future__ import annotations

from typing import Any

from app.server.console.data import HOSTS_PER_PAGE, approval_of, summarise


def _host(
    i: int, status: str, *, error: str | None = None, exit_code: int | None = None
) -> dict[str, Any]:
    failed = status == "FAILED"
    return {
        "host": f"h{i:03d}",
        "region": "r1" if i % 2 else "r2",
        "status": status,
        "verification": None,
        "version": "2.0" if status == "SUCCEEDED" else "1.0",
        "steps": [
            {"step": "install", "status": "SUCCEEDED", "error": None, "exit_code": 0},
            {
                "step": "check",
                "status": status,
                "error": error,
                "error_class": "CommandFailed" if failed else None,
                "exit_code": exit_code,
            },
        ],
        "rollback": None,
    }


def _stage(hosts: list[dict[str, Any]]) -> dict[str, Any]:
    return {"steps": ["install", "check"], "hosts": hosts}


def test_500_hosts_become_counts_failure_groups_and_one_page_failed_first() -> None:
    hosts = [_host(i, "SUCCEEDED", exit_code=0) for i in range(470)]
    hosts += [_host(470 + i, "FAILED", error="disk full\nmore", exit_code=1) for i in range(20)]
    hosts += [_host(490 + i, "FAILED", exit_code=7) for i in range(7)]
    hosts += [_host(497 + i, "RUNNING") for i in range(3)]
    s = summarise(_stage(hosts))
    assert s["total"] == 500
    assert s["by_status"] == {"FAILED": 27, "RUNNING": 3, "SUCCEEDED": 470}
    assert s["by_step"]["install"] == {"SUCCEEDED": 500}
    assert s["by_step"]["check"] == {"FAILED": 27, "RUNNING": 3, "SUCCEEDED": 470}
    assert [(f["error"], f["count"]) for f in s["failures"]] == [
        ("check: CommandFailed: disk full", 20),
        ("check: CommandFailed: exit code 7", 7),
    ]
    assert s["failures"][0]["hosts"] == ["h470", "h471", "h472", "h473", "h474"]
    assert s["versions"] == {"2.0": 470, "1.0": 30}
    assert len(s["hosts"]) == HOSTS_PER_PAGE and s["pages"] == 5
    assert [h["status"] for h in s["hosts"][:30]] == ["FAILED"] * 27 + ["RUNNING"] * 3
    assert s["hosts"][0]["step"] == "check" and s["hosts"][0]["failure"].endswith("disk full")


def test_a_host_is_found_by_name_or_status_on_any_page() -> None:
    hosts = [_host(i, "SUCCEEDED", exit_code=0) for i in range(500)]
    found = summarise(_stage(hosts), search="h42")["hosts"]
    assert [h["host"] for h in found] == [f"h42{i}" for i in range(10)]
    last = summarise(_stage(hosts), page=99)
    assert last["page"] == 5 and last["hosts"][-1]["host"] == "h499"
    assert summarise(_stage(hosts), status="FAILED")["matching"] == 0


def test_the_approval_shows_its_message_and_votes_only_while_waiting() -> None:
    phase = {
        "kind": "approval",
        "status": "RUNNING",
        "verdict": {
            "message": "Ship 2.0?",
            "groups": ["ops"],
            "required": 2,
            "approvals": [{"user": "erin", "comment": "ok"}],
        },
    }
    report = {"status": "WAITING", "stages": [{"name": "Gate", "phases": [phase]}]}
    found = approval_of(report)
    assert found is not None
    assert (found["message"], found["required"], found["votes"][0]["user"]) == (
        "Ship 2.0?",
        2,
        "erin",
    )
    assert approval_of({**report, "status": "RUNNING"}) is None


def test_the_execution_page_shows_counts_failures_phases_and_the_watch() -> None:
    from app.server.console.pages import templates

    hosts = [_host(i, "SUCCEEDED", exit_code=0) for i in range(495)]
    hosts += [_host(495 + i, "FAILED", error="disk full", exit_code=1) for i in range(5)]
    stage = {
        **_stage(hosts),
        "index": 0,
        "name": "Deploy",
        "status": "RUNNING",
        "type": "Deployment",
        "environment": "prod",
        "version": "2.0",
        "strategy": "Rolling",
        "error": None,
        "phases": [
            {
                "phase": 0,
                "kind": "deploy",
                "status": "SUCCEEDED",
                "hosts": ["h000"],
                "verdict": {"passed": True, "canary": {"error_rate": 0.0123456, "baseline": 0.01}},
                "gate_at": None,
            }
        ],
        "watch": {"status": "RUNNING", "state": "watching", "window": "10m", "reasons": []},
    }
    report = {"id": "e1", "status": "RUNNING", "stages": [stage], "intervention": None}
    html = templates.get_template("execution_live.html").render(
        ex=report,
        stage=stage,
        summary=summarise(stage),
        approval=None,
        filters={"status": "", "q": "", "stage": 0},
        pinned=None,
        interventions=(),
        live=True,
        can={"pipeline:abort": False},
    )
    assert "500 hosts" in html and "FAILED 5" in html and "SUCCEEDED 495" in html
    assert "check: CommandFailed: disk full" in html
    assert "error_rate: 0.01235" in html  # a gate's numbers, one level deep
    assert "Watch after deployment" in html and "window 10m" in html
    assert html.count('href="/console/executions/e1/hosts/') == 100 + 5  # a page + failure links
    assert "Abort" not in html  # not permitted: not offered
