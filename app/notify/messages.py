"""Notification settings, rules, deliveries and the message an event becomes (app.notify)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from pydantic import SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.definitions.notifications import (  # the rule schema lives with the file format
    EVENTS,
    STAGE_EVENTS,
    NotificationRule,
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
