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

from app.definitions.notifications import (
    ALL_EVENTS,
    EVENTS,
    STAGE_EVENTS,
    EmailChannel,
    NotificationRule,
    SlackChannel,
    check_url,
)
from app.notify.channels import (
    email_message,
    post_json,
    redact_url,
    send_email,
    slack_payload,
    webhook_payload,
)
from app.notify.messages import (
    Claim,
    Delivery,
    Mask,
    Message,
    NotifySettings,
    build_message,
    failed_hosts,
    log,
    parse_rules,
    rules_of,
)
from app.notify.sending import (
    InProcessClaims,
    claim_key,
    events_for,
    in_process_claim,
    notify,
    notify_once,
    notify_transition,
    plan_rules,
    snapshot,
)

__all__ = [
    "ALL_EVENTS",
    "EVENTS",
    "STAGE_EVENTS",
    "Claim",
    "Delivery",
    "EmailChannel",
    "InProcessClaims",
    "Mask",
    "Message",
    "NotificationRule",
    "NotifySettings",
    "SlackChannel",
    "build_message",
    "check_url",
    "claim_key",
    "email_message",
    "events_for",
    "failed_hosts",
    "in_process_claim",
    "log",
    "notify",
    "notify_once",
    "notify_transition",
    "parse_rules",
    "plan_rules",
    "post_json",
    "redact_url",
    "rules_of",
    "send_email",
    "slack_payload",
    "snapshot",
    "webhook_payload",
]
