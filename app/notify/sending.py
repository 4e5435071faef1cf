"""Sending: each rule's channels for an event, once only, and the events of a transition (app.notify)."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

from app.definitions.notifications import (  # the rule schema lives with the file format
    ALL_EVENTS,
    EVENTS,
    EmailChannel,
    NotificationRule,
    SlackChannel,
    check_url,
)
from app.models import Status
from app.notify.channels import (
    email_message,
    post_json,
    redact_url,
    send_email,
    slack_payload,
    webhook_payload,
)
from app.notify.messages import (
    _FAILED_STAGE,
    Delivery,
    Message,
    NotifySettings,
    _find_stage,
    build_message,
    parse_rules,
    rules_of,
)

log = logging.getLogger("vmfarm.notify")

Mask = Callable[[str], str]
Claim = Callable[[str], bool]


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
