"""Notifications as data: the rule model, the message of each event, the events between two
snapshots, URL redaction and delivery records. Delivery to a real HTTP receiver and SMTP server
is in tests/service/test_notify.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
from pydantic import ValidationError

from app.models import Status
from app.notify import (
    Delivery,
    EmailChannel,
    NotificationRule,
    build_message,
    events_for,
    failed_hosts,
    redact_url,
    snapshot,
)
from tests.notify_report import EX, failed_report, host_row

# --- the rule schema ------------------------------------------------------------------------------


def test_the_rule_model_takes_the_file_shape() -> None:
    r = NotificationRule.model_validate(
        {
            "name": "n",
            "identifier": "n1",
            "events": ["PipelineStart", "RollbackDone"],
            "stages": ["deploy"],
            "channel": {"type": "Email", "spec": {"to": [" a@example.com "], "subject": "hi"}},
        }
    )
    assert isinstance(r.channel, EmailChannel) and r.channel.spec.to == ["a@example.com"]
    dumped = r.model_dump(by_alias=True, exclude_none=True)
    assert NotificationRule.model_validate(dumped) == r
    hook = NotificationRule.model_validate(
        {
            "name": "h",
            "events": ["AllEvents"],
            "channel": {"type": "Webhook", "spec": {"webhookUrl": "https://hooks.example.com/x"}},
        }
    )
    assert (
        hook.model_dump(by_alias=True)["channel"]["spec"]["webhookUrl"]
        == "https://hooks.example.com/x"
    )
    assert hook.wants("ApprovalNeeded", "any") and not r.wants("PipelineFailed")
    assert r.wants("PipelineStart", None) and r.wants("RollbackDone", "other")


@pytest.mark.parametrize(
    "bad, where",
    [
        ({"extra": 1}, "extra"),
        ({"events": []}, "events"),
        ({"events": ["PipelineExploded"]}, "events"),
        ({"channel": {"type": "Pager", "spec": {}}}, "channel"),
        ({"channel": {"type": "Slack", "spec": {}}}, "exactly one"),
        (
            {
                "channel": {
                    "type": "Slack",
                    "spec": {"webhookUrl": "https://h.example.com/x", "webhookUrlEnv": "X"},
                }
            },
            "exactly one",
        ),
        ({"channel": {"type": "Slack", "spec": {"webhookUrl": "ftp://h.example.com/x"}}}, "http"),
        ({"channel": {"type": "Slack", "spec": {"webhookUrlEnv": "not a name"}}}, "environment"),
        ({"channel": {"type": "Email", "spec": {"to": ["nobody"]}}}, "not an email"),
        ({"channel": {"type": "Email", "spec": {"to": []}}}, "to"),
        ({"channel": {"type": "Email", "spec": {"to": ["a@b.c"], "cc": ["x@y.z"]}}}, "cc"),
    ],
)
def test_the_rule_model_refuses_mistakes(bad: dict[str, Any], where: str) -> None:
    rule: dict[str, Any] = {
        "name": "r",
        "events": ["PipelineFailed"],
        "channel": {"type": "Slack", "spec": {"webhookUrl": "https://h.example.com/x"}},
    }
    rule.update(bad)
    with pytest.raises(ValidationError, match=where):
        NotificationRule.model_validate(rule)


# --- messages -------------------------------------------------------------------------------------


def test_messages_per_event() -> None:
    report = failed_report()
    start = build_message("PipelineStart", {**report, "status": Status.RUNNING})
    assert "started" in start.title and "Error" not in start.text
    assert start.commands == [f"vmfarm status {EX}"] and start.failed_hosts == []

    approval = {
        **report,
        "status": Status.WAITING,
        "stages": [
            {
                "index": 0,
                "identifier": "approve",
                "name": "Approve",
                "status": Status.RUNNING,
                "hosts": [],
                "error": None,
                "phases": [
                    {
                        "kind": "approval",
                        "verdict": {"message": "Ship it?", "groups": ["rm"], "required": 2},
                    }
                ],
            }
        ],
    }
    msg = build_message("ApprovalNeeded", approval, stage=0)
    assert "stage approve waits for approval" in msg.title
    assert "Approval: Ship it?" in msg.text and "Approvers: rm (2 needed)" in msg.text
    assert f"vmfarm approve {EX}" in msg.commands

    mi = {
        **report,
        "status": Status.WAITING,
        "intervention": {
            "error": "x",
            "timeout": "1h",
            "on_timeout": "StageRollback",
            "choices": ["Abort", "StageRollback"],
        },
    }
    msg = build_message("InterventionNeeded", mi, stage="deploy_prod")
    assert f"vmfarm intervene {EX} Abort|StageRollback" in msg.commands

    rolled = failed_report()
    rolled["stages"][1]["hosts"][0]["rollback"] = {
        "status": Status.ROLLBACK_FAILED,
        "step": "restore",
        "error": "disk gone",
    }
    msg = build_message("RollbackDone", rolled)
    assert "rollback step restore: disk gone [1]: web-01" in msg.text


def test_failed_host_groups_are_capped() -> None:
    report = failed_report()
    report["stages"][1]["hosts"] = [
        host_row(f"h{i}", Status.FAILED, step_error=f"error number {i}") for i in range(8)
    ]
    msg = build_message("PipelineFailed", report, max_groups=3, max_hosts=2)
    assert len(msg.failed_hosts) == 3
    assert "and 5 more error(s) on 5 host(s)" in msg.text
    groups = failed_hosts(report)
    assert len(groups) == 8 and all(len(h) == 1 for _, h in groups)


def test_redact_url_keeps_only_scheme_host_and_port() -> None:
    assert redact_url("https://hooks.slack.com/services/T0/B0/xyz") == "https://hooks.slack.com/…"
    assert redact_url("http://127.0.0.1:8080/a?token=1") == "http://127.0.0.1:8080/…"


# --- transitions ----------------------------------------------------------------------------------


@dataclass
class Ex:
    status: str
    current_stage: int = 0
    plan: dict[str, Any] = field(
        default_factory=lambda: {
            "stages": [{"identifier": "approve", "type": "Approval"}, {"identifier": "deploy"}]
        }
    )
    rollback: dict[str, Any] | None = None


@dataclass
class Run:
    stage_index: int
    status: str


def snap(
    status: str, stages: list[str], current: int = 0, cause: str | None = None
) -> dict[str, Any]:
    return snapshot(
        Ex(status, current, rollback={"cause": cause} if cause else None),
        [Run(i, s) for i, s in enumerate(stages)],
    )


def test_events_between_snapshots() -> None:
    P, R, S, F = Status.PENDING, Status.RUNNING, Status.SUCCEEDED, Status.FAILED
    queued = snap(Status.QUEUED, [P, P])
    waiting = snap(Status.WAITING, [R, P])
    assert events_for(queued, waiting) == [("PipelineStart", None), ("ApprovalNeeded", 0)]
    assert events_for(waiting, waiting) == []
    running = snap(R, [S, R], current=1)
    assert events_for(waiting, running) == []
    mi = snap(Status.WAITING, [S, R], current=1)
    assert events_for(running, mi) == [("InterventionNeeded", 1)]
    assert events_for(running, snap(S, [S, S], current=2)) == [("PipelineSuccess", None)]
    assert events_for(running, snap(F, [S, F], current=1)) == [
        ("StageFailed", 1),
        ("PipelineFailed", None),
    ]
    rolling = snap(Status.ROLLING_BACK, [S, Status.ROLLING_BACK], 1, cause="failure")
    assert events_for(running, rolling) == [("StageFailed", 1)]
    done = snap(F, [S, Status.ROLLED_BACK], 1, cause="failure")
    assert events_for(rolling, done) == [("RollbackDone", None), ("PipelineFailed", None)]
    # All in one step (nothing to roll back), and a requested rollback of a good execution.
    assert events_for(running, done) == [
        ("StageFailed", 1),
        ("RollbackDone", None),
        ("PipelineFailed", None),
    ]
    asked = snap(Status.ROLLING_BACK, [P, P], 2, cause="requested")
    asked_running = snap(Status.ROLLING_BACK, [Status.ROLLING_BACK, P], 2, cause="requested")
    assert events_for(asked, asked_running) == []
    assert events_for(
        asked_running, snap(S, [Status.ROLLED_BACK, Status.SKIPPED], 2, cause="requested")
    ) == [("RollbackDone", None), ("PipelineSuccess", None)]


# --- from the ledger ------------------------------------------------------------------------------


def test_delivery_to_dict() -> None:
    d = Delivery("r", "Slack", "https://h/…", "PipelineFailed", False, 3, 500, "HTTP 500")
    assert d.to_dict()["attempts"] == 3
