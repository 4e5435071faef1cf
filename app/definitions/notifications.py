"""The schema of a pipeline's ``notificationRules`` (sending is app.notify's, at run time).

Part of the file format: loading a file validates the rules without importing anything that
sends or records (DESIGN §12: app/definitions imports nothing that runs).
"""

from __future__ import annotations

import re
import urllib.parse
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from app.definitions.base import Identifier, Model

EVENTS: tuple[str, ...] = (
    "PipelineStart",
    "PipelineSuccess",
    "PipelineFailed",
    "StageFailed",
    "ApprovalNeeded",
    "InterventionNeeded",
    "RollbackDone",
)
ALL_EVENTS = "AllEvents"
# Events about one stage: a rule's ``stages`` filter applies to them.
STAGE_EVENTS = frozenset({"StageFailed", "ApprovalNeeded", "InterventionNeeded"})

EventName = Literal[
    "AllEvents",
    "PipelineStart",
    "PipelineSuccess",
    "PipelineFailed",
    "StageFailed",
    "ApprovalNeeded",
    "InterventionNeeded",
    "RollbackDone",
]

_ENV_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_EMAIL_RE = re.compile(r"^[^@\s<>,;]+@[^@\s<>,;]+$")


# -----------------------------------------------------------------


def check_url(v: str) -> str:
    parts = urllib.parse.urlsplit(v)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("webhookUrl must be an http:// or https:// URL with a host")
    return v


def _check_env(v: str) -> str:
    if not _ENV_RE.match(v):
        raise ValueError(f"'{v}' is not an environment variable name")
    return v


WebhookUrl = Annotated[str, Field(min_length=8, max_length=2048)]


class WebhookChannelSpec(Model):
    """Where to POST: the URL itself, or the environment variable that holds it."""

    webhook_url: WebhookUrl | None = None
    webhook_url_env: str | None = None

    @field_validator("webhook_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        return check_url(v) if v is not None else None

    @field_validator("webhook_url_env")
    @classmethod
    def _env(cls, v: str | None) -> str | None:
        return _check_env(v) if v is not None else None

    @model_validator(mode="after")
    def _one(self) -> WebhookChannelSpec:
        if (self.webhook_url is None) == (self.webhook_url_env is None):
            raise ValueError("give exactly one of webhookUrl and webhookUrlEnv")
        return self


class EmailChannelSpec(Model):
    to: list[str] = Field(min_length=1, max_length=50)
    # Placeholders: {event} {pipeline} {execution} {status} {stage}.
    subject: str | None = Field(default=None, max_length=200)

    @field_validator("to")
    @classmethod
    def _addresses(cls, v: list[str]) -> list[str]:
        bad = [a for a in v if not _EMAIL_RE.match(a.strip())]
        if bad:
            raise ValueError(f"not an email address: {', '.join(bad)}")
        return [a.strip() for a in v]


class SlackChannel(Model):
    type: Literal["Slack"]
    spec: WebhookChannelSpec


class WebhookChannel(Model):
    type: Literal["Webhook"]
    spec: WebhookChannelSpec


class EmailChannel(Model):
    type: Literal["Email"]
    spec: EmailChannelSpec


Channel = Annotated[SlackChannel | WebhookChannel | EmailChannel, Field(discriminator="type")]


class NotificationRule(Model):
    """One ``spec.notificationRules`` entry of a pipeline."""

    name: str = Field(min_length=1, max_length=128)
    identifier: Identifier | None = None
    enabled: bool = True
    events: list[EventName] = Field(min_length=1)
    # Stage identifiers: stage events (StageFailed, ApprovalNeeded, InterventionNeeded) of other
    # stages are not sent. Empty: every stage.
    stages: list[str] = Field(default_factory=list)
    channel: Channel

    def wants(self, event: str, stage: str | None = None) -> bool:
        if not self.enabled or (event not in self.events and ALL_EVENTS not in self.events):
            return False
        return not (self.stages and event in STAGE_EVENTS and stage not in self.stages)
