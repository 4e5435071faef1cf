"""Notifications delivered to a real HTTP receiver and a real SMTP server on 127.0.0.1.

Nothing is mocked: webhooks are POSTed over HTTP to a ThreadingHTTPServer, email goes over SMTP
to an aiosmtpd server (the ``receiver`` and ``mailbox`` fixtures of this lane's conftest.py).
Back-off waits are skipped by passing a ``sleep`` that only records. The pure parts (rules,
messages, events) are tested in tests/unit/test_notify.py.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

from app.models import Status
from app.notify import (
    InProcessClaims,
    NotifySettings,
    claim_key,
    notify,
    notify_once,
    snapshot,
)
from tests.notify_report import EX, SECRET, failed_report
from tests.service.conftest import Mailbox, Receiver


@pytest.fixture
def settings(mailbox: Mailbox) -> NotifySettings:
    return NotifySettings(
        smtp_host="127.0.0.1",
        smtp_port=mailbox.port,
        smtp_from="vmfarm@ci.example",
        webhook_retries=2,
        webhook_backoff=0.25,
        webhook_timeout=10,
        smtp_timeout=10,
    )


class Sleeps(list[float]):
    def __call__(self, seconds: float) -> None:
        self.append(seconds)


# --- a failed run -------------------------------------------------------------------------------


def rules(
    receiver: Receiver, *, events: list[str] | None = None, slack: str = "Slack"
) -> list[dict[str, Any]]:
    return [
        {
            "name": "team channel",
            "events": events or ["PipelineFailed", "StageFailed"],
            "channel": {"type": slack, "spec": {"webhookUrl": receiver.url()}},
        },
        {
            "name": "release managers",
            "events": ["AllEvents"],
            "channel": {
                "type": "Email",
                "spec": {
                    "to": ["rm@example.com", "ops@example.com"],
                    "subject": "{event}: {pipeline} {execution}",
                },
            },
        },
    ]


def mask(text: str) -> str:
    return text.replace(SECRET, "***")


def test_a_failed_run_sends_one_webhook_and_one_email_once(
    receiver: Receiver, mailbox: Mailbox, settings: NotifySettings
) -> None:
    claims = InProcessClaims()
    sleeps = Sleeps()
    out = notify_once(
        "PipelineFailed",
        EX,
        rules(receiver),
        report=failed_report(),
        claim=claims,
        settings=settings,
        mask=mask,
        sleep=sleeps,
    )

    assert [(d.channel, d.ok, d.attempts) for d in out] == [
        ("Slack", True, 1),
        ("Email", True, 1),
    ], out
    assert sleeps == []
    # Exactly one POST: Slack's text and blocks.
    assert len(receiver.requests) == 1
    req = receiver.requests[0]
    assert req["path"] == "/hooks/T000/B000/token"
    assert req["headers"]["Content-Type"].startswith("application/json")
    body = receiver.bodies[0]
    assert set(body) == {"text", "blocks"}
    text = body["text"]
    for expected in (
        EX,
        "deploy_prod",
        "Production",
        "FAILED",
        f"vmfarm status {EX}",
        "web-01",
        "web-10",
        "and 2 more",
        "db-1",
        "db-2",
        "api-1",
        "verification failed",
        "No space left on device",
        "Failed hosts (16)",
    ):
        assert expected in text, expected
    assert "web-11" not in text  # ten hosts per error are named, the rest counted
    assert "web-99" not in text and "stg-1" not in text
    assert SECRET not in req["body"] and "bad token ***" in text
    # One error naming each host is one group: "connection to <host> refused".
    assert "connection to &lt;host&gt; refused [2]: db-1, db-2" in text
    blocks = body["blocks"]
    assert blocks[0]["type"] == "header" and EX in blocks[0]["text"]["text"]
    assert any(f"`vmfarm status {EX}`" in e["text"] for e in blocks[-1]["elements"])

    # Exactly one email, to both recipients.
    assert len(mailbox.messages) == 1
    sender, rcpts, em = mailbox.messages[0]
    assert sender == "vmfarm@ci.example"
    assert rcpts == ["rm@example.com", "ops@example.com"]
    assert em["Subject"] == f"PipelineFailed: web_app {EX}"
    assert em["X-Vmfarm-Execution"] == EX
    mail = em.get_content()
    for expected in (
        EX,
        "Stage: deploy_prod (Production): FAILED",
        f"vmfarm status {EX}",
        "web-01",
        "db-2",
        "api-1",
        "connection to <host> refused",
    ):
        assert expected in mail, expected
    assert SECRET not in mail

    # The same event again: nothing is sent.
    again = notify_once(
        "PipelineFailed",
        EX,
        rules(receiver),
        report=failed_report(),
        claim=claims,
        settings=settings,
        mask=mask,
        sleep=sleeps,
    )
    assert again == []
    assert len(receiver.requests) == 1 and len(mailbox.messages) == 1
    assert not claims(claim_key("PipelineFailed", EX))

    # Another event of the same execution is its own key.
    stage = notify_once(
        "StageFailed",
        EX,
        rules(receiver),
        stage="deploy_prod",
        report=failed_report(),
        claim=claims,
        settings=settings,
        mask=mask,
    )
    assert [d.ok for d in stage] == [True, True]
    assert len(receiver.requests) == 2 and len(mailbox.messages) == 2
    assert not claims(claim_key("StageFailed", EX, 1))  # claimed by stage index


def test_the_default_claim_is_per_process(receiver: Receiver, settings: NotifySettings) -> None:
    only_slack = rules(receiver)[:1]
    first = notify_once(
        "PipelineFailed", "default-claim-1", only_slack, report=failed_report(), settings=settings
    )
    second = notify_once(
        "PipelineFailed", "default-claim-1", only_slack, report=failed_report(), settings=settings
    )
    assert [d.ok for d in first] == [True] and second == []
    assert len(receiver.requests) == 1


def test_a_webhook_that_fails_is_retried_then_reported(
    receiver: Receiver, settings: NotifySettings, caplog: pytest.LogCaptureFixture
) -> None:
    receiver.statuses = [500]
    sleeps = Sleeps()
    out = notify(
        "PipelineFailed", failed_report(), rules(receiver)[:1], settings=settings, sleep=sleeps
    )
    assert len(out) == 1
    d = out[0]
    assert (d.ok, d.attempts, d.status, d.channel) == (False, 3, 500, "Slack")
    assert d.error is not None and "500" in d.error
    # The target shows no token, and neither do the logs.
    assert d.target == f"http://127.0.0.1:{receiver.server.server_address[1]}/…"
    assert "token" not in caplog.text and "could not notify" in caplog.text
    assert len(receiver.requests) == 3
    assert sleeps == [0.25, 0.5]  # doubled each retry

    # A 5xx then a 2xx: delivered on the second attempt.
    receiver.requests.clear()
    receiver.statuses = [503, 200]
    out = notify(
        "PipelineFailed", failed_report(), rules(receiver)[:1], settings=settings, sleep=Sleeps()
    )
    assert [(x.ok, x.attempts, x.status) for x in out] == [(True, 2, 200)]


def test_a_client_error_is_not_retried(receiver: Receiver, settings: NotifySettings) -> None:
    receiver.statuses = [404]
    out = notify(
        "PipelineFailed", failed_report(), rules(receiver)[:1], settings=settings, sleep=Sleeps()
    )
    assert [(d.ok, d.attempts, d.status) for d in out] == [(False, 1, 404)]


def test_unreachable_receivers_are_reported_not_raised(
    settings: NotifySettings, free_port: Callable[[], int]
) -> None:
    closed = free_port()  # nothing listens there
    cfg = settings.model_copy(update={"smtp_port": closed})
    sleeps = Sleeps()
    out = notify(
        "PipelineFailed",
        failed_report(),
        [
            {
                "name": "hook",
                "events": ["PipelineFailed"],
                "channel": {
                    "type": "Webhook",
                    "spec": {"webhookUrl": f"http://127.0.0.1:{closed}/x"},
                },
            },
            {
                "name": "mail",
                "events": ["PipelineFailed"],
                "channel": {"type": "Email", "spec": {"to": ["a@example.com"]}},
            },
        ],
        settings=cfg,
        sleep=sleeps,
    )
    assert [(d.channel, d.ok, d.attempts) for d in out] == [
        ("Webhook", False, 3),
        ("Email", False, 3),
    ]
    assert all(d.error for d in out)
    no_host = notify(
        "PipelineFailed",
        failed_report(),
        [
            {
                "name": "mail",
                "events": ["PipelineFailed"],
                "channel": {"type": "Email", "spec": {"to": ["a@example.com"]}},
            }
        ],
        settings=NotifySettings(smtp_host=None),
        sleep=sleeps,
    )
    assert [(d.ok, d.error) for d in no_host] == [(False, "VMFARM_SMTP_HOST is not set")]


def test_a_generic_webhook_gets_structured_fields(
    receiver: Receiver, settings: NotifySettings
) -> None:
    out = notify(
        "StageFailed",
        failed_report(),
        rules(receiver, slack="Webhook")[:1],
        stage=1,
        settings=settings,
        mask=mask,
        sleep=Sleeps(),
    )
    assert [d.ok for d in out] == [True]
    body = receiver.bodies[0]
    assert body["event"] == "StageFailed" and body["execution"] == EX
    assert body["stage"] == "deploy_prod" and body["status"] == Status.FAILED
    assert body["command"] == f"vmfarm status {EX}"
    assert f"vmfarm logs {EX} --host web-01" in body["commands"]
    groups = body["failed_hosts"]
    assert groups[0]["count"] == 12 and len(groups[0]["hosts"]) == 10
    assert groups[0]["reason"] == "step install: CommandFailed (exit 1): No space left on device"
    assert {g["reason"] for g in groups} >= {
        "verification failed",
        "step install: Connectivity: connection to <host> refused",
    }
    assert SECRET not in receiver.requests[0]["body"]
    assert "<host>" in body["text"]  # no Slack escaping outside Slack


def test_a_webhook_url_from_the_environment(
    receiver: Receiver, settings: NotifySettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    rule = {
        "name": "env",
        "events": ["PipelineFailed"],
        "channel": {"type": "Slack", "spec": {"webhookUrlEnv": "VMFARM_TEST_HOOK"}},
    }
    monkeypatch.delenv("VMFARM_TEST_HOOK", raising=False)
    out = notify("PipelineFailed", failed_report(), [rule], settings=settings, sleep=Sleeps())
    assert [(d.ok, d.target) for d in out] == [(False, "$VMFARM_TEST_HOOK")]
    assert out[0].error == "environment variable VMFARM_TEST_HOOK is not set"
    monkeypatch.setenv("VMFARM_TEST_HOOK", receiver.url())
    out = notify("PipelineFailed", failed_report(), [rule], settings=settings, sleep=Sleeps())
    assert [d.ok for d in out] == [True] and len(receiver.requests) == 1


def test_rules_choose_events_stages_and_send_a_channel_once(
    receiver: Receiver, settings: NotifySettings
) -> None:
    slack = {"type": "Slack", "spec": {"webhookUrl": receiver.url()}}
    rs = [
        {
            "name": "prod only",
            "events": ["StageFailed"],
            "stages": ["deploy_prod"],
            "channel": slack,
        },
        {"name": "same channel", "events": ["AllEvents"], "channel": slack},
        {
            "name": "off",
            "events": ["AllEvents"],
            "enabled": False,
            "channel": {"type": "Webhook", "spec": {"webhookUrl": receiver.url("/off")}},
        },
        {
            "name": "staging",
            "events": ["StageFailed"],
            "stages": ["deploy_staging"],
            "channel": {"type": "Webhook", "spec": {"webhookUrl": receiver.url("/stg")}},
        },
    ]
    out = notify(
        "StageFailed", failed_report(), rs, stage="deploy_prod", settings=settings, sleep=Sleeps()
    )
    assert [(d.rule, d.ok) for d in out] == [("prod only", True)]
    assert [r["path"] for r in receiver.requests] == ["/hooks/T000/B000/token"]
    assert notify("PipelineSuccess", failed_report(), rs[:1], settings=settings) == []


def test_an_invalid_rule_is_a_failed_delivery_not_an_error(settings: NotifySettings) -> None:
    out = notify(
        "PipelineFailed",
        failed_report(),
        [{"name": "typo", "events": ["Nope"], "channel": {"type": "Slack"}}],
        settings=settings,
    )
    assert len(out) == 1 and not out[0].ok
    assert out[0].error is not None and "typo" in out[0].error
    with pytest.raises(ValueError, match="unknown notification event"):
        notify("Whatever", failed_report(), [], settings=settings)


# --- the rule schema ------------------------------------------------------------------------------


# --- messages -------------------------------------------------------------------------------------


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


# --- from the ledger ------------------------------------------------------------------------------


@pytest.fixture
def ledger(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    from app.db import reset_engines
    from app.settings import get_settings

    for key in list(os.environ):
        if key.startswith("VMFARM_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("VMFARM_HOME", str(tmp_path))
    get_settings.cache_clear()
    reset_engines()
    yield
    reset_engines()
    get_settings.cache_clear()


def _record_failed_run(ex_id: str, notification_rules: list[dict[str, Any]]) -> None:
    from app.db import session_scope
    from app.models import Execution, HostStepRun, StageRun

    step = {
        "type": "Command",
        "name": "Install",
        "identifier": "install",
        "spec": {
            "commandUnits": [
                {
                    "identifier": "run",
                    "type": "Script",
                    "spec": {"source": {"spec": {"script": "./install.sh"}}},
                }
            ]
        },
    }
    plan = {
        "identifier": "web_app",
        "name": "Web App",
        "notificationRules": notification_rules,
        "stages": [
            {
                "identifier": "deploy",
                "name": "Deploy",
                "type": "Deployment",
                "index": 0,
                "service": {"identifier": "web_app", "name": "web-app"},
                "environment": {"identifier": "prod", "name": "prod", "type": "Production"},
                "infrastructures": [],
                "steps": [step],
                "strategy": {"type": "Basic"},
            }
        ],
    }
    with session_scope() as s:
        s.add(
            Execution(
                id=ex_id,
                pipeline="web_app",
                pipeline_name="Web App",
                plan=plan,
                status=Status.FAILED,
                error="stage 'deploy': 1 host(s) failed",
            )
        )
        s.flush()
        s.add(
            StageRun(
                execution_id=ex_id,
                stage_index=0,
                identifier="deploy",
                name="Deploy",
                status=Status.FAILED,
                error="1 host(s) failed in phase 1",
                hosts=[{"name": "127.0.1.9", "region": "r1", "infrastructure": "lab"}],
            )
        )
        s.add(
            HostStepRun(
                idem_key=f"{ex_id}/h/0",
                execution_id=ex_id,
                stage_index=0,
                phase=0,
                step_index=0,
                step_id="install",
                host="127.0.1.9",
                region="r1",
                status=Status.FAILED,
                error_class="CommandFailed",
                exit_code=3,
                error="install.sh exited 3",
            )
        )


def test_notify_once_reads_rules_and_report_from_the_ledger(
    ledger: None, receiver: Receiver, mailbox: Mailbox, settings: NotifySettings
) -> None:
    _record_failed_run("ledgerrun001", rules(receiver))
    claims = InProcessClaims()
    out = notify_once("StageFailed", "ledgerrun001", stage=0, claim=claims, settings=settings)
    assert [(d.channel, d.ok) for d in out] == [("Slack", True), ("Email", True)]
    text = receiver.bodies[0]["text"]
    assert "stage deploy failed" in text and "127.0.1.9" in text
    assert "step install: CommandFailed (exit 3): install.sh exited 3" in text
    assert "vmfarm status ledgerrun001" in text
    assert "127.0.1.9" in mailbox.messages[0][2].get_content()
    assert (
        notify_once("StageFailed", "ledgerrun001", stage=0, claim=claims, settings=settings) == []
    )
    # No rule wants it: no claim is taken, nothing is read.
    assert notify_once("PipelineStart", "ledgerrun001", rules=[], claim=claims) == []
    assert notify_once("PipelineFailed", "no-such-execution", rules(receiver), claim=claims) == []
    assert len(receiver.requests) == 1 and len(mailbox.messages) == 1


def test_notify_transition_sends_each_event_of_a_change_once(
    ledger: None, receiver: Receiver, mailbox: Mailbox, settings: NotifySettings
) -> None:
    from app.notify import notify_transition

    _record_failed_run("transition01", rules(receiver))
    before = snapshot(
        Ex(Status.RUNNING, plan={"stages": [{"identifier": "deploy"}]}), [Run(0, Status.RUNNING)]
    )
    after = snapshot(
        Ex(Status.FAILED, plan={"stages": [{"identifier": "deploy"}]}), [Run(0, Status.FAILED)]
    )
    claims = InProcessClaims()
    out = notify_transition("transition01", before, after, claim=claims, settings=settings)
    assert [(d.event, d.channel, d.ok) for d in out] == [
        ("StageFailed", "Slack", True),
        ("StageFailed", "Email", True),
        ("PipelineFailed", "Slack", True),
        ("PipelineFailed", "Email", True),
    ]
    assert [b["text"].split("\n")[0] for b in receiver.bodies] == [
        "[vmfarm] StageFailed: pipeline web_app stage deploy failed (FAILED) "
        "(execution transition01)",
        "[vmfarm] PipelineFailed: pipeline web_app ended FAILED (execution transition01)",
    ]
    # A second coordinator seeing the same change sends nothing.
    assert notify_transition("transition01", before, after, claim=claims, settings=settings) == []
    assert notify_transition("transition01", after, after, claim=claims) == []
    assert len(receiver.requests) == 2 and len(mailbox.messages) == 2


def test_a_claim_that_fails_sends_nothing_and_raises_nothing(
    ledger: None, receiver: Receiver, settings: NotifySettings
) -> None:
    def broken(key: str) -> bool:
        raise RuntimeError("database is down")

    _record_failed_run("claimbroken1", rules(receiver)[:1])
    assert notify_once("PipelineFailed", "claimbroken1", claim=broken, settings=settings) == []
    assert receiver.requests == []


def _cli() -> click.Group:
    from cli.commands.ops import register

    @click.group()
    def main() -> None:
        pass

    register(main)
    return main


def test_notify_test_shows_and_sends(
    ledger: None,
    receiver: Receiver,
    mailbox: Mailbox,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    free_port: Callable[[], int],
) -> None:
    _record_failed_run("clirun000001", rules(receiver)[:1])
    runner = CliRunner()
    res = runner.invoke(_cli(), ["notify", "test", "clirun000001"])
    assert res.exit_code == 0, res.output
    assert "vmfarm status clirun000001" in res.output and "team channel" in res.output
    assert receiver.requests == []  # shown, not sent

    res = runner.invoke(_cli(), ["notify", "test", "clirun000001", "--send", "-o", "json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert [d["ok"] for d in data["deliveries"]] == [True] and len(receiver.requests) == 1

    # Rules from a pipeline file instead of the plan; a failed delivery exits 1.
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(
        "apiVersion: v1\nkind: Pipeline\nmetadata: {name: web, identifier: web}\n"
        "spec:\n  stages: []\n  notificationRules:\n"
        "    - name: mail\n      events: [StageFailed]\n"
        "      channel: {type: Email, spec: {to: [x@example.com]}}\n"
    )
    monkeypatch.setenv("VMFARM_SMTP_HOST", "127.0.0.1")
    monkeypatch.setenv("VMFARM_SMTP_PORT", str(mailbox.port))
    res = runner.invoke(
        _cli(),
        [
            "notify",
            "test",
            "clirun000001",
            "-e",
            "StageFailed",
            "--stage",
            "deploy",
            "-f",
            str(pipeline),
            "--send",
        ],
    )
    assert res.exit_code == 0, res.output
    assert len(mailbox.messages) == 1 and mailbox.messages[0][1] == ["x@example.com"]
    monkeypatch.setenv("VMFARM_SMTP_PORT", str(free_port()))
    monkeypatch.setenv("VMFARM_WEBHOOK_RETRIES", "0")
    res = runner.invoke(
        _cli(),
        ["notify", "test", "clirun000001", "-e", "StageFailed", "-f", str(pipeline), "--send"],
    )
    assert res.exit_code == 1, res.output
    assert "failed after 1 attempt(s)" in res.output

    res = runner.invoke(_cli(), ["notify", "test", "nope"])
    assert res.exit_code == 2
