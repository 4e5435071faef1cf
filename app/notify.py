"""Notifications: tell people when an execution starts, fails, waits for them or rolls back.

Rules live in the pipeline file, in the shape of Harness's ``notificationRules``::

    kind: Pipeline
    metadata: {name: web, identifier: web}
    spec:
      stages: [...]
      notificationRules:
        - name: team channel
          events: [PipelineFailed, StageFailed, ApprovalNeeded, RollbackDone]
          channel:
            type: Slack                      # Slack | Webhook | Email
            spec:
              webhookUrlEnv: SLACK_DEPLOYS   # or webhookUrl: https://hooks.slack.com/...
        - name: release managers
          events: [AllEvents]
          stages: [deploy_prod]              # stage events of these stages only
          enabled: true
          channel:
            type: Email
            spec:
              to: [releases@example.com]
              subject: "{event}: {pipeline} {status}"   # optional

Events: ``PipelineStart``, ``PipelineSuccess``, ``PipelineFailed`` (FAILED, ABORTED or
ROLLBACK_FAILED), ``StageFailed``, ``ApprovalNeeded`` (an Approval stage waits),
``InterventionNeeded`` (a ManualIntervention failure strategy waits), ``RollbackDone`` (a
rollback ended, whatever its outcome); ``AllEvents`` in a rule means every one of them.

A message names the execution, the pipeline, the stage, the status, the error, the failed hosts
grouped by error (capped) and the command to run (``vmfarm status <id>``). Every string in it goes
through the caller's ``mask`` before it leaves the process. Webhooks (``Slack``: ``{"text",
"blocks"}``; ``Webhook``: ``{"text", ...structured fields}``) are POSTed with a timeout and
retried on connection errors, 429 and 5xx; email goes over SMTP (``VMFARM_SMTP_*``). A delivery
that fails is logged and returned as a ``Delivery`` with ``ok=False``: nothing here raises
because a receiver is down.

Once only: ``notify_once`` sends each (event, execution, stage) at most once. It asks a
``claim(key) -> bool`` callable whether it is the first to send ``key``; the default claims in
this process only (a set), so a coordinator running on several workers should pass a claim
backed by a unique SQL row (insert; a unique violation means "already sent"). A claim is taken
before sending: a delivery that fails is not retried by a later call (at most once).

Webhook URLs are secrets (the token is in the path): give them with ``webhookUrlEnv`` (read from
the coordinator's environment when sending, never stored in the ledger) rather than
``webhookUrl``; deliveries and logs show only the scheme and host.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import smtplib
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from typing import Any, Protocol

from pydantic import SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.definitions.notifications import (  # the rule schema lives with the file format
    ALL_EVENTS,
    EVENTS,
    STAGE_EVENTS,
    EmailChannel,
    NotificationRule,
    SlackChannel,
    check_url,
)
from app.models import Status

log = logging.getLogger("vmfarm.notify")

Mask = Callable[[str], str]
Claim = Callable[[str], bool]


# --- settings -----------------------------------------------------------------------------------


class NotifySettings(BaseSettings):
    """How to send (``VMFARM_*`` environment variables of the process that sends)."""

    model_config = SettingsConfigDict(env_prefix="VMFARM_", extra="ignore")

    smtp_host: str | None = None
    smtp_port: int = 25
    smtp_from: str = "vmfarm@localhost"
    smtp_user: str | None = None
    smtp_password: SecretStr | None = None
    smtp_starttls: bool = False
    smtp_ssl: bool = False  # implicit TLS (usually port 465)
    smtp_timeout: float = 10.0
    # A webhook POST: timeout per attempt, retries after the first one, first back-off (doubled
    # after each retry).
    webhook_timeout: float = 5.0
    webhook_retries: int = 2
    webhook_backoff: float = 1.0
    # Failed hosts in a message: at most this many error groups, and hosts named per group.
    notify_max_groups: int = 5
    notify_max_hosts: int = 10


def rules_of(plan: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """The rules an execution's plan carries (``plan["notificationRules"]``)."""
    rules = (plan or {}).get("notificationRules") or []
    return [dict(r) for r in rules if isinstance(r, Mapping)]


def parse_rules(
    rules: Iterable[Mapping[str, Any] | NotificationRule],
) -> tuple[list[NotificationRule], list[str]]:
    """Rules as models, and one message per invalid rule (which is left out)."""
    good: list[NotificationRule] = []
    bad: list[str] = []
    for i, r in enumerate(rules):
        if isinstance(r, NotificationRule):
            good.append(r)
            continue
        try:
            good.append(NotificationRule.model_validate(r))
        except ValidationError as exc:
            name = r.get("name") if isinstance(r, Mapping) else None
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
            )
            bad.append(f"notification rule {name or i}: {problems}")
    return good, bad


# --- deliveries -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Delivery:
    """What happened to one message on one channel (``target`` never holds a secret)."""

    rule: str
    channel: str
    target: str
    event: str
    ok: bool
    attempts: int = 0
    status: int | None = None  # HTTP status or SMTP reply code, when there was one
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- messages -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Message:
    event: str
    execution_id: str
    pipeline: str
    status: str
    stage: str | None
    title: str
    text: str
    commands: list[str]
    failed_hosts: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None

    @property
    def command(self) -> str:
        return self.commands[0]

    def data(self) -> dict[str, Any]:
        """The structured fields of a generic webhook."""
        return {
            "event": self.event,
            "execution": self.execution_id,
            "pipeline": self.pipeline,
            "status": self.status,
            "stage": self.stage,
            "error": self.error,
            "failed_hosts": self.failed_hosts,
            "command": self.command,
            "commands": self.commands,
        }


_HEADLINE = {
    "PipelineStart": "started",
    "PipelineSuccess": "succeeded",
    "PipelineFailed": "ended {status}",
    "StageFailed": "stage {stage} failed ({stage_status})",
    "ApprovalNeeded": "stage {stage} waits for approval",
    "InterventionNeeded": "stage {stage} waits for a manual intervention",
    "RollbackDone": "rollback ended: {status}",
}

_FAILED_STAGE = (
    Status.FAILED,
    Status.ABORTED,
    Status.ROLLBACK_FAILED,
    Status.ROLLED_BACK,
    Status.ROLLING_BACK,
)


def _first_line(text: str | None, limit: int = 160) -> str:
    line = next((x.strip() for x in (text or "").splitlines() if x.strip()), "")
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _find_stage(report: Mapping[str, Any], stage: int | str | None) -> dict[str, Any] | None:
    stages: list[dict[str, Any]] = list(report.get("stages") or [])
    if stage is None:
        return None
    for st in stages:
        if st.get("index") == stage or st.get("identifier") == stage:
            return st
    return None


def _stage_of_interest(
    report: Mapping[str, Any], event: str, stage: int | str | None
) -> dict[str, Any] | None:
    """The stage a message is about: the given one, else the one that failed (or waits)."""
    found = _find_stage(report, stage)
    if found is not None or event in ("PipelineStart", "PipelineSuccess"):
        return found
    stages: list[dict[str, Any]] = list(report.get("stages") or [])
    for st in stages:
        if st.get("status") in (Status.FAILED, Status.ABORTED, Status.ROLLBACK_FAILED):
            return st
    for st in stages:
        if st.get("status") in (Status.RUNNING, Status.ROLLING_BACK):
            return st
    return None


def _host_reason(host: Mapping[str, Any]) -> str:
    name = str(host.get("host") or "")
    reason = ""
    for step in host.get("steps") or []:
        if step.get("status") == Status.FAILED:
            what = step.get("error_class") or "failed"
            if step.get("exit_code") is not None:
                what += f" (exit {step['exit_code']})"
            err = _first_line(step.get("error"))
            reason = f"step {step.get('step')}: {what}" + (f": {err}" if err else "")
            break
    if not reason:
        reason = (
            "verification failed"
            if host.get("verification") == "FAILED"
            else str(host.get("status") or "failed").lower()
        )
    # One error on many hosts often names each host: group them anyway.
    return reason.replace(name, "<host>") if len(name) >= 3 else reason


def _rollback_reason(host: Mapping[str, Any]) -> str:
    rb = host.get("rollback") or {}
    err = _first_line(rb.get("error"))
    return f"rollback step {rb.get('step')}" + (f": {err}" if err else "")


def failed_hosts(
    report: Mapping[str, Any], stage: Mapping[str, Any] | None = None, *, rollback: bool = False
) -> list[tuple[str, list[str]]]:
    """Failed hosts grouped by error, biggest group first: [(reason, [host, ...]), ...].

    Hosts of ``stage`` (default: every stage) whose status is FAILED; with ``rollback``, also
    hosts whose rollback failed."""
    groups: dict[str, list[str]] = {}
    stages = [stage] if stage is not None else list(report.get("stages") or [])
    for st in stages:
        for h in st.get("hosts") or []:
            if h.get("status") == Status.FAILED:
                groups.setdefault(_host_reason(h), []).append(str(h.get("host")))
            if rollback and (h.get("rollback") or {}).get("status") == Status.ROLLBACK_FAILED:
                groups.setdefault(_rollback_reason(h), []).append(str(h.get("host")))
    return sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))


def _deep_mask(value: Any, mask: Mask) -> Any:
    if isinstance(value, str):
        return mask(value)
    if isinstance(value, Mapping):
        return {k: _deep_mask(v, mask) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_deep_mask(v, mask) for v in value]
    return value


def build_message(
    event: str,
    report: Mapping[str, Any],
    *,
    stage: int | str | None = None,
    mask: Mask | None = None,
    max_groups: int = 5,
    max_hosts: int = 10,
) -> Message:
    """The message for ``event`` about an execution (``app.report.execution_report``)."""
    if event not in EVENTS:
        raise ValueError(f"unknown notification event {event!r} (one of {', '.join(EVENTS)})")
    ex_id = str(report.get("id"))
    pipeline = str(report.get("pipeline") or "")
    pipeline_name = str(report.get("pipeline_name") or "")
    status = str(report.get("status") or "")
    st = _stage_of_interest(report, event, stage)
    st_name = str(st.get("identifier")) if st else None
    headline = _HEADLINE[event].format(
        status=status, stage=st_name or "?", stage_status=(st or {}).get("status") or "?"
    )
    shown = (
        f"{pipeline_name} ({pipeline})" if pipeline_name and pipeline_name != pipeline else pipeline
    )
    title = f"[vmfarm] {event}: pipeline {pipeline} {headline} (execution {ex_id})"
    lines = [f"Pipeline: {shown}", f"Execution: {ex_id}", f"Event: {event}", f"Status: {status}"]
    if st is not None:
        label = f"{st.get('identifier')}" + (
            f" ({st['name']})" if st.get("name") and st.get("name") != st.get("identifier") else ""
        )
        lines.append(f"Stage: {label}: {st.get('status')}")
    error: Any = None
    if event not in ("PipelineStart", "PipelineSuccess", "ApprovalNeeded"):
        error = ((st or {}).get("error") if event in STAGE_EVENTS else None) or report.get("error")
    if error:
        lines.append(f"Error: {_first_line(str(error), 500)}")
    commands = [f"vmfarm status {ex_id}"]
    if event == "ApprovalNeeded" and st is not None:
        approval = next((p for p in st.get("phases") or [] if p.get("kind") == "approval"), None)
        verdict = (approval or {}).get("verdict") or {}
        if verdict.get("message"):
            lines.append(f"Approval: {_first_line(str(verdict['message']), 300)}")
        if verdict.get("groups"):
            lines.append(
                f"Approvers: {', '.join(map(str, verdict['groups']))} "
                f"({verdict.get('required', 1)} needed)"
            )
        commands += [f"vmfarm approve {ex_id}", f"vmfarm reject {ex_id}"]
    if event == "InterventionNeeded":
        mi = report.get("intervention") or {}
        choices = mi.get("choices") or []
        if mi.get("timeout"):
            lines.append(f"Timeout: {mi['timeout']}, then {mi.get('on_timeout')}")
        commands.append(f"vmfarm intervene {ex_id} {'|'.join(map(str, choices)) or 'ACTION'}")
    groups: list[dict[str, Any]] = []
    if event in ("PipelineFailed", "StageFailed", "RollbackDone", "InterventionNeeded"):
        scope = st if event in STAGE_EVENTS else None
        grouped = failed_hosts(report, scope, rollback=event in ("RollbackDone", "PipelineFailed"))
        total = len({h for _, hs in grouped for h in hs})
        if grouped:
            lines.append(f"Failed hosts ({total}):")
        for reason, hosts in grouped[:max_groups]:
            more = len(hosts) - max_hosts
            named = ", ".join(hosts[:max_hosts]) + (f" and {more} more" if more > 0 else "")
            lines.append(f"  - {reason} [{len(hosts)}]: {named}")
            groups.append({"reason": reason, "count": len(hosts), "hosts": hosts[:max_hosts]})
        if len(grouped) > max_groups:
            rest = grouped[max_groups:]
            lines.append(
                f"  - and {len(rest)} more error(s) on {sum(len(h) for _, h in rest)} host(s)"
            )
        if grouped:
            first = grouped[0][1][0]
            commands.append(f"vmfarm logs {ex_id} --host {first}")
    lines.append("Details: " + commands[0])
    lines += [f"Then: {c}" for c in commands[1:]]
    msg = Message(
        event=event,
        execution_id=ex_id,
        pipeline=pipeline,
        status=status,
        stage=st_name,
        title=title,
        text="\n".join(lines),
        commands=commands,
        failed_hosts=groups,
        error=_first_line(str(error), 500) if error else None,
    )
    if mask is None:
        return msg
    return Message(**_deep_mask(asdict(msg), mask))


# --- channels -------------------------------------------------------------------------------------


def _slack_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def slack_payload(msg: Message) -> dict[str, Any]:
    """Slack incoming-webhook body: ``text`` (the notification) and Block Kit ``blocks``."""
    body = msg.text.split("\n")
    details = "\n".join(_slack_escape(x) for x in body if not x.startswith(("Details:", "Then:")))
    return {
        "text": _slack_escape(f"{msg.title}\n{msg.text}")[:3900],
        "blocks": [
            {"type": "header", "text": {"type": "plain_text", "text": msg.title[:150]}},
            {"type": "section", "text": {"type": "mrkdwn", "text": details[:2900]}},
            {
                "type": "context",
                "elements": [
                    {
                        "type": "mrkdwn",
                        "text": " · ".join(f"`{_slack_escape(c)}`" for c in msg.commands)[:2900],
                    }
                ],
            },
        ],
    }


def webhook_payload(msg: Message) -> dict[str, Any]:
    """A generic webhook body: Slack-compatible ``text`` plus the structured fields."""
    return {"text": f"{msg.title}\n{msg.text}", **msg.data()}


def redact_url(url: str) -> str:
    """``https://hooks.example.com/T0/B0/secret`` -> ``https://hooks.example.com/…``."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or "?"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}/…"


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # a webhook that redirects is misconfigured: report its 3xx


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def post_json(
    url: str,
    payload: Mapping[str, Any],
    *,
    timeout: float,
    retries: int,
    backoff: float,
    sleep: Callable[[float], None] = time.sleep,
) -> tuple[bool, int, int | None, str | None]:
    """POST ``payload`` as JSON: (ok, attempts, last HTTP status, error). Retries connection
    errors, timeouts, 429 and 5xx up to ``retries`` times, waiting ``backoff`` (doubled each
    time; a 429's Retry-After up to 30 s). Never raises; errors never contain the URL."""
    data = json.dumps(payload).encode()
    handlers: list[urllib.request.BaseHandler] = [_NoRedirect()]
    if _is_loopback(urllib.parse.urlsplit(url).hostname or ""):
        handlers.append(urllib.request.ProxyHandler({}))  # never send 127.0.0.1 to a proxy
    opener = urllib.request.build_opener(*handlers)
    attempts, status, error = 0, None, None
    wait = backoff
    while True:
        attempts += 1
        retry_after: float | None = None
        req = urllib.request.Request(
            url,
            data=data,
            method="POST",
            headers={
                "Content-Type": "application/json; charset=utf-8",
                "User-Agent": "vmfarm-notify",
            },
        )
        try:
            with opener.open(req, timeout=timeout) as resp:
                status = int(resp.status)
                resp.read(65536)
            return True, attempts, status, None
        except urllib.error.HTTPError as exc:
            status = int(exc.code)
            error = f"HTTP {exc.code} {exc.reason}"
            retriable = status == 429 or status >= 500
            ra = exc.headers.get("Retry-After") if exc.headers else None
            if ra and ra.strip().isdigit():
                retry_after = min(30.0, float(ra.strip()))
            exc.close()
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            error = f"{type(reason).__name__}: {reason}".replace(url, redact_url(url))
            status, retriable = None, True
        except Exception as exc:  # a bug in a handler: report it, do not raise
            error, retriable = f"{type(exc).__name__}: {exc}".replace(url, redact_url(url)), False
        if not retriable or attempts > retries:
            return False, attempts, status, error
        sleep(max(wait, retry_after or 0.0))
        wait *= 2


def _format_subject(template: str, msg: Message) -> str:
    values = {
        "event": msg.event,
        "pipeline": msg.pipeline,
        "execution": msg.execution_id,
        "status": msg.status,
        "stage": msg.stage or "",
    }
    out = template
    for k, v in values.items():
        out = out.replace("{" + k + "}", v)
    return " ".join(out.split())[:200]


def email_message(
    msg: Message, to: Sequence[str], sender: str, subject: str | None = None
) -> EmailMessage:
    em = EmailMessage()
    em["Subject"] = _format_subject(subject, msg) if subject else msg.title
    em["From"] = sender
    em["To"] = ", ".join(to)
    em["Date"] = formatdate(localtime=False, usegmt=True)
    em["Message-ID"] = make_msgid(domain=sender.rpartition("@")[2] or "vmfarm")
    em["X-Vmfarm-Execution"] = msg.execution_id
    em["X-Vmfarm-Event"] = msg.event
    em.set_content(msg.text + "\n")
    return em


_TRANSIENT_SMTP = (smtplib.SMTPConnectError, smtplib.SMTPServerDisconnected, ConnectionRefusedError)


def send_email(
    em: EmailMessage, settings: NotifySettings, *, sleep: Callable[[float], None] = time.sleep
) -> tuple[bool, int, int | None, str | None]:
    """Send over SMTP: (ok, attempts, SMTP code, error). Retries (like webhooks) only what
    cannot have delivered the message: connection failures and 4xx (temporary) replies."""
    if not settings.smtp_host:
        return False, 0, None, "VMFARM_SMTP_HOST is not set"
    attempts, wait = 0, settings.webhook_backoff
    while True:
        attempts += 1
        code: int | None = None
        try:
            cls = smtplib.SMTP_SSL if settings.smtp_ssl else smtplib.SMTP
            with cls(settings.smtp_host, settings.smtp_port, timeout=settings.smtp_timeout) as smtp:
                if settings.smtp_starttls and not settings.smtp_ssl:
                    smtp.starttls(context=ssl.create_default_context())
                if settings.smtp_user:
                    password = (
                        settings.smtp_password.get_secret_value() if settings.smtp_password else ""
                    )
                    smtp.login(settings.smtp_user, password)
                refused = smtp.send_message(em)
            if refused:
                return True, attempts, 250, "refused recipients: " + ", ".join(sorted(refused))
            return True, attempts, 250, None
        except smtplib.SMTPRecipientsRefused as exc:
            return False, attempts, None, "refused recipients: " + ", ".join(sorted(exc.recipients))
        except smtplib.SMTPResponseException as exc:
            code = int(exc.smtp_code)
            msg = (
                exc.smtp_error.decode(errors="replace")
                if isinstance(exc.smtp_error, bytes)
                else str(exc.smtp_error)
            )
            error = f"SMTP {code}: {_first_line(msg, 200)}"
            retriable = 400 <= code < 500
        except _TRANSIENT_SMTP as exc:
            error, retriable = f"{type(exc).__name__}: {exc}", True
        except (OSError, smtplib.SMTPException) as exc:
            error, retriable = f"{type(exc).__name__}: {exc}", isinstance(exc, TimeoutError)
        except Exception as exc:
            error, retriable = f"{type(exc).__name__}: {exc}", False
        if not retriable or attempts > settings.webhook_retries:
            return False, attempts, code, error
        sleep(wait)
        wait *= 2


# --- sending ----------------------------------------------------------------------------------


def _deliver(
    rule: NotificationRule, msg: Message, settings: NotifySettings, sleep: Callable[[float], None]
) -> Delivery:
    ch = rule.channel
    if isinstance(ch, EmailChannel):
        target = ", ".join(ch.spec.to)
        em = email_message(msg, ch.spec.to, settings.smtp_from, ch.spec.subject)
        ok, attempts, code, error = send_email(em, settings, sleep=sleep)
        return Delivery(rule.name, ch.type, target, msg.event, ok, attempts, code, error)
    spec = ch.spec
    if spec.webhook_url_env:
        url = os.environ.get(spec.webhook_url_env, "").strip()
        if not url:
            return Delivery(
                rule.name,
                ch.type,
                f"${spec.webhook_url_env}",
                msg.event,
                False,
                0,
                None,
                f"environment variable {spec.webhook_url_env} is not set",
            )
        try:
            check_url(url)
        except ValueError as exc:
            return Delivery(
                rule.name, ch.type, f"${spec.webhook_url_env}", msg.event, False, 0, None, str(exc)
            )
    else:
        url = str(spec.webhook_url)
    payload = slack_payload(msg) if isinstance(ch, SlackChannel) else webhook_payload(msg)
    ok, attempts, status, error = post_json(
        url,
        payload,
        timeout=settings.webhook_timeout,
        retries=settings.webhook_retries,
        backoff=settings.webhook_backoff,
        sleep=sleep,
    )
    return Delivery(rule.name, ch.type, redact_url(url), msg.event, ok, attempts, status, error)


def _stage_ident(report: Mapping[str, Any], stage: int | str | None) -> str | None:
    st = _find_stage(report, stage)
    if st is not None:
        return str(st.get("identifier"))
    return stage if isinstance(stage, str) else None


def notify(
    event: str,
    report: Mapping[str, Any],
    rules: Iterable[Mapping[str, Any] | NotificationRule],
    *,
    stage: int | str | None = None,
    settings: NotifySettings | None = None,
    mask: Mask | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> list[Delivery]:
    """Send ``event`` about the execution in ``report`` on every rule that wants it.

    ``stage`` (index or identifier) is the stage a stage event is about. Returns one Delivery
    per channel (a channel named by several rules is sent to once) and one failed Delivery per
    invalid rule. Raises ValueError only for an unknown event (a caller's bug)."""
    if event not in EVENTS:
        raise ValueError(f"unknown notification event {event!r} (one of {', '.join(EVENTS)})")
    parsed, invalid = parse_rules(rules)
    out = [
        Delivery(rule="?", channel="?", target="", event=event, ok=False, error=why)
        for why in invalid
    ]
    for why in invalid:
        log.warning("%s", why)
    ident = _stage_ident(report, stage)
    wanted: dict[str, NotificationRule] = {}
    for rule in parsed:
        if rule.wants(event, ident):
            wanted.setdefault(rule.channel.model_dump_json(), rule)
    if not wanted:
        return out
    cfg = settings or NotifySettings()
    msg = build_message(
        event,
        report,
        stage=stage,
        mask=mask,
        max_groups=cfg.notify_max_groups,
        max_hosts=cfg.notify_max_hosts,
    )
    for rule in wanted.values():
        try:
            d = _deliver(rule, msg, cfg, sleep)
        except Exception as exc:  # never let a notification break the caller
            log.exception("notification rule %r failed", rule.name)
            d = Delivery(
                rule.name,
                rule.channel.type,
                "",
                event,
                False,
                0,
                None,
                f"{type(exc).__name__}: {exc}",
            )
        if d.ok:
            log.info(
                "notified %s for execution %s via %s %s (rule %r)",
                event,
                msg.execution_id,
                d.channel,
                d.target,
                d.rule,
            )
        else:
            log.warning(
                "could not notify %s for execution %s via %s %s (rule %r) after %d attempt(s): %s",
                event,
                msg.execution_id,
                d.channel,
                d.target,
                d.rule,
                d.attempts,
                d.error,
            )
        out.append(d)
    return out


# --- once only ----------------------------------------------------------------------------------


class InProcessClaims:
    """The default claim: remembers keys in this process (bounded, oldest forgotten first)."""

    def __init__(self, limit: int = 100_000) -> None:
        self._keys: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()
        self._limit = limit

    def __call__(self, key: str) -> bool:
        with self._lock:
            if key in self._keys:
                return False
            self._keys[key] = None
            while len(self._keys) > self._limit:
                self._keys.popitem(last=False)
            return True

    def clear(self) -> None:
        with self._lock:
            self._keys.clear()


in_process_claim = InProcessClaims()


def claim_key(event: str, execution_id: str, stage: int | str | None = None) -> str:
    """``notify:<execution>:<event>:<stage index or identifier, or ->`` (at most 255 chars)."""
    return f"notify:{execution_id}:{event}:{'-' if stage is None else stage}"[:255]


def plan_rules(execution_id: str) -> list[dict[str, Any]]:
    """The notification rules in an execution's plan ([] when there is no such execution)."""
    from app.db import session_scope
    from app.models import Execution

    with session_scope() as s:
        ex = s.get(Execution, execution_id)
        return rules_of(ex.plan) if ex is not None else []


def notify_once(
    event: str,
    execution_id: str,
    rules: Iterable[Mapping[str, Any] | NotificationRule] | None = None,
    *,
    stage: int | str | None = None,
    report: Mapping[str, Any] | None = None,
    claim: Claim | None = None,
    settings: NotifySettings | None = None,
    mask: Mask | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> list[Delivery]:
    """``notify`` at most once per (event, execution, stage), whoever calls it how often.

    ``rules`` default to the execution's plan (``plan["notificationRules"]``), ``report`` to
    ``execution_report(execution_id)``. The claim (``claim_key(event, execution_id, stage)``;
    ``stage`` as an index when the report knows it) is asked only when a rule wants the event.
    Returns [] when nothing was (or needed to be) sent; never raises for a delivery, a claim or
    a ledger read that fails (logged)."""
    if event not in EVENTS:
        raise ValueError(f"unknown notification event {event!r} (one of {', '.join(EVENTS)})")
    try:
        rule_list = list(rules) if rules is not None else plan_rules(execution_id)
        parsed, _ = parse_rules(rule_list)
        if not any(r.enabled and (event in r.events or ALL_EVENTS in r.events) for r in parsed):
            return []
        if report is None:
            from app.report import execution_report

            report = execution_report(execution_id)
        if report is None:
            log.warning("no execution %s to notify %s about", execution_id, event)
            return []
        st = _find_stage(report, stage)
        ident = _stage_ident(report, stage)
        if not any(r.wants(event, ident) for r in parsed):
            return []
        key = claim_key(event, execution_id, st.get("index") if st is not None else stage)
        if not (claim or in_process_claim)(key):
            log.debug("%s already claimed: not sending it again", key)
            return []
    except Exception:
        log.exception("cannot notify %s for execution %s", event, execution_id)
        return []
    return notify(event, report, rule_list, stage=stage, settings=settings, mask=mask, sleep=sleep)


# --- transitions ----------------------------------------------------------------------------------


class _ExecutionLike(Protocol):
    status: str
    current_stage: int
    plan: dict[str, Any]
    rollback: dict[str, Any] | None


class _StageLike(Protocol):
    stage_index: int
    status: str


def snapshot(ex: _ExecutionLike, runs: Iterable[_StageLike]) -> dict[str, Any]:
    """What ``events_for`` compares: the execution's status, each stage's status, whether it
    waits for an approval or an intervention, and why it rolls back. Take one before a change
    (in the transaction) and one after it."""
    stages = ex.plan.get("stages") or []
    waiting = None
    if ex.status == Status.WAITING:
        current = stages[ex.current_stage] if 0 <= ex.current_stage < len(stages) else {}
        waiting = "approval" if current.get("type") == "Approval" else "intervention"
    return {
        "status": ex.status,
        "stage": ex.current_stage,
        "waiting": waiting,
        "cause": (ex.rollback or {}).get("cause"),
        "stages": {int(r.stage_index): r.status for r in runs},
    }


_ACTIVE_STAGE = (None, Status.PENDING, Status.RUNNING)
_PIPELINE_FAILED = (Status.FAILED, Status.ABORTED, Status.ROLLBACK_FAILED)


def events_for(
    before: Mapping[str, Any] | None, after: Mapping[str, Any]
) -> list[tuple[str, int | None]]:
    """The events between two snapshots, as (event, stage index or None), in order."""
    b: Mapping[str, Any] = before or {"status": Status.QUEUED, "stages": {}, "waiting": None}
    out: list[tuple[str, int | None]] = []
    status, was = after["status"], b["status"]
    if was == Status.QUEUED and status != Status.QUEUED:
        out.append(("PipelineStart", None))
    requested = after.get("cause") == "requested"
    for idx, st in sorted(after.get("stages", {}).items()):
        prev = b.get("stages", {}).get(idx)
        if st != prev and prev in _ACTIVE_STAGE and st in _FAILED_STAGE and not requested:
            out.append(("StageFailed", int(idx)))
    waiting = after.get("waiting")
    if waiting and (waiting != b.get("waiting") or after.get("stage") != b.get("stage")):
        out.append(
            (
                "ApprovalNeeded" if waiting == "approval" else "InterventionNeeded",
                after.get("stage"),
            )
        )
    if was != status:
        if status in Status.TERMINAL and was not in Status.TERMINAL and after.get("cause"):
            out.append(("RollbackDone", None))
        if status == Status.SUCCEEDED:
            out.append(("PipelineSuccess", None))
        elif status in _PIPELINE_FAILED:
            out.append(("PipelineFailed", None))
    return out


def notify_transition(
    execution_id: str,
    before: Mapping[str, Any] | None,
    after: Mapping[str, Any],
    *,
    rules: Iterable[Mapping[str, Any] | NotificationRule] | None = None,
    claim: Claim | None = None,
    settings: NotifySettings | None = None,
    mask: Mask | None = None,
) -> list[Delivery]:
    """Send every event between two snapshots (each once: ``notify_once``). Call it after the
    transaction that made the change has committed, outside any lock. Never raises."""
    try:
        events = events_for(before, after)
        if not events:
            return []
        rule_list = list(rules) if rules is not None else plan_rules(execution_id)
        if not rule_list:
            return []
        from app.report import execution_report

        report = execution_report(execution_id)
    except Exception:
        log.exception("cannot notify the events of execution %s", execution_id)
        return []
    if report is None:
        return []
    out: list[Delivery] = []
    for event, stage in events:
        out += notify_once(
            event,
            execution_id,
            rule_list,
            stage=stage,
            report=report,
            claim=claim,
            settings=settings,
            mask=mask,
        )
    return out
