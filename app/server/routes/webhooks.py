"""Webhook triggers: a CI system starts a stored pipeline without anyone's credentials.
::
    POST /api/v1/webhooks/{trigger}   the trigger's own secret (X-Hub-Signature-256): no bearer
                                      201 {"outcome": "started", "execution": ID}
                                      200 {"outcome": "duplicate" | "skipped" | "disabled", ...}
                                      401 unsigned or wrongly signed (audited), 404 unknown
    GET  /api/v1/triggers             registry:view   the triggers and their last deliveries
                                      (an artifact trigger: its last poll and builds)

The trigger is the registry's latest version (``kind: Trigger``); its pipeline is the
registry's stored pipeline, run as the subject ``trigger:ID`` (``app.operations`` checks that
subject's permissions on the resolved plan, as for anyone). One row per delivery id
(``WebhookDelivery``, unique per trigger): a repeated delivery finds it and starts nothing.
Nothing of the payload is stored or logged but the values its inputs read (in the execution,
as runtime inputs are).
"""

from __future__ import annotations

import logging
import re
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Request, status
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from app.auth.identity import Identity
from app.rbac import RbacConfig
from app.server.deps import needs, rbac, require

log = logging.getLogger("vmfarm.server")

router = APIRouter(tags=["webhooks"])
# How many deliveries GET /api/v1/triggers shows per trigger.
LAST_DELIVERIES = 5


def _audit(trigger: str, outcome: str, **detail: Any) -> None:
    from app.audit import record_quietly

    record_quietly("webhook", user=f"trigger:{trigger}", outcome=outcome, detail=detail)


def _trigger(trigger_id: str) -> Any:
    """The registry's latest version of the trigger (None when there is none)."""
    from app.registry import stored_trigger

    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,127}", trigger_id):
        return None
    return stored_trigger(trigger_id)


def _claim(trigger_id: str, delivery: str) -> dict[str, Any] | None:
    """Record the delivery as pending; its earlier row (as an answer) when it is a repeat."""
    from sqlalchemy.exc import IntegrityError
    from sqlmodel import select

    from app.db import session_scope
    from app.models import WebhookDelivery

    try:
        with session_scope() as s:
            s.add(WebhookDelivery(trigger_id=trigger_id, delivery_id=delivery, outcome="pending"))
        return None
    except IntegrityError:
        with session_scope() as s:
            row = s.exec(
                select(WebhookDelivery).where(
                    WebhookDelivery.trigger_id == trigger_id,
                    WebhookDelivery.delivery_id == delivery,
                )
            ).one()
            return {
                "outcome": "duplicate",
                "delivery": delivery,
                "first": row.outcome,
                "execution": row.execution_id,
            }


def _settle(trigger_id: str, delivery: str, outcome: str | None, **fields: Any) -> None:
    """Record what came of a claimed delivery (None: forget it, so that it may be retried)."""
    from sqlmodel import select

    from app.db import session_scope
    from app.models import WebhookDelivery

    with session_scope() as s:
        row = s.exec(
            select(WebhookDelivery).where(
                WebhookDelivery.trigger_id == trigger_id,
                WebhookDelivery.delivery_id == delivery,
            )
        ).one_or_none()
        if row is None:
            return
        if outcome is None:
            s.delete(row)
            return
        row.outcome = outcome
        for k, v in fields.items():
            setattr(row, k, v)
        s.add(row)


@router.post(
    "/api/v1/webhooks/{trigger_id}",
    responses={
        201: {"description": "The pipeline started: {outcome, execution}"},
        401: {"description": "No valid X-Hub-Signature-256 for the trigger's secret"},
    },
    openapi_extra={"x-vmfarm-auth": "the trigger's secret (X-Hub-Signature-256), no bearer"},
)
async def deliver(trigger_id: str, request: Request) -> JSONResponse:
    """A delivery: checked against the trigger's secret and conditions, then the trigger's
    pipeline runs once for its delivery id."""
    from starlette.concurrency import run_in_threadpool

    from app.triggers import webhook

    body = await request.body()
    if len(body) > webhook.MAX_BODY:
        raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, detail="payload over 1 MiB")
    headers = {k.lower(): v for k, v in request.headers.items()}
    return await run_in_threadpool(_deliver, trigger_id, body, headers, request)


def _deliver(
    trigger_id: str, body: bytes, headers: dict[str, str], request: Request
) -> JSONResponse:
    from app.errors import SpecError, SpecErrors
    from app.operations import Actor
    from app.secrets import SecretError, get_secret
    from app.triggers import webhook

    trig = _trigger(trigger_id)
    if trig is None or trig.kind != "webhook":  # an artifact trigger takes no delivery
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"no webhook trigger {trigger_id!r}")
    try:
        secret = get_secret(trig.secret_ref)
    except SecretError as exc:
        log.error("webhook %s: its secret cannot be read: %s", trigger_id, exc)
        _audit(trigger_id, "error", reason="the trigger's secret cannot be read")
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE, detail="the trigger's secret cannot be read"
        ) from None
    source = request.client.host if request.client else "?"
    if not webhook.signed(secret, body, headers.get(webhook.SIGNATURE_HEADER)):
        why = "no signature" if webhook.SIGNATURE_HEADER not in headers else "wrong signature"
        log.warning("webhook %s: %s from %s", trigger_id, why, source)
        _audit(trigger_id, "refused", reason=why, source=source)
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            detail=f"{why}: sign the raw body with the trigger's secret (X-Hub-Signature-256)",
        )
    if not trig.body.enabled:
        return JSONResponse({"outcome": "disabled", "trigger": trigger_id})
    delivery = webhook.delivery_id(headers, body)
    try:
        payload = webhook.parse_payload(body)
    except webhook.DeliveryError as exc:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, detail=str(exc)) from None
    earlier = _claim(trigger_id, delivery)
    if earlier is not None:
        return JSONResponse(earlier)
    try:
        reason = webhook.unmet(trig, payload, headers)
        if reason is not None:
            _settle(trigger_id, delivery, "skipped", detail=reason[:1000])
            return JSONResponse({"outcome": "skipped", "delivery": delivery, "reason": reason})
        inputs = webhook.inputs_of(trig.body.input_yaml, payload, headers, source=trig.source)
        from app.server.routes.executions import start_run

        actor = Actor(name=f"trigger:{trigger_id}", kind="trigger")
        cfg: RbacConfig = request.app.state.rbac.get()
        execution = start_run(actor, {}, trig.pipeline, inputs, cfg)
    except webhook.DeliveryError as exc:
        _settle(trigger_id, delivery, None)
        _audit(trigger_id, "refused", reason=str(exc), delivery=delivery)
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=str(exc)) from None
    except HTTPException as exc:
        _settle(trigger_id, delivery, None)
        _audit(trigger_id, "refused", reason=str(exc.detail)[:500], delivery=delivery)
        raise
    except (SpecError, SpecErrors) as exc:
        _settle(trigger_id, delivery, None)
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=str(exc)) from None
    _settle(trigger_id, delivery, "started", execution_id=execution)
    return JSONResponse(
        {"outcome": "started", "delivery": delivery, "execution": execution},
        status_code=status.HTTP_201_CREATED,
    )


class Delivery(BaseModel):
    delivery: str
    received_at: datetime
    outcome: str
    execution: str | None
    detail: str


class PollInfo(BaseModel):
    polled_at: datetime
    ok_at: datetime | None
    error: str


class BuildInfo(BaseModel):
    build: str
    seen_at: datetime
    outcome: str
    execution: str | None
    detail: str


class TriggerInfo(BaseModel):
    id: str
    name: str
    pipeline: str
    enabled: bool
    version: int | None
    kind: str = "webhook"
    deliveries: list[Delivery]
    source: str | None = None  # an artifact trigger's repository, for people
    poll: PollInfo | None = None
    builds: list[BuildInfo] = []


def _polled(s: Any, trig: Any) -> dict[str, Any]:
    """An artifact trigger's source, last poll and last builds (newest first)."""
    from sqlmodel import col, select

    from app.models import ArtifactBuild, ArtifactPoll

    art = trig.artifact
    spec = art.spec
    where = (
        f"s3://{spec.bucket_name}/ ~ {spec.file_path_regex}"
        if art.type == "AmazonS3"
        else f"{spec.repository}/{spec.artifact_directory.strip('/')}"
        if art.type == "ArtifactoryRegistry"
        else f"{spec.repository} {spec.group_id}:{spec.artifact_id}"
        if spec.repository_format == "maven"
        else f"{spec.repository} {spec.group}"
    )
    state = s.get(ArtifactPoll, trig.id)
    rows = s.exec(
        select(ArtifactBuild)
        .where(ArtifactBuild.trigger_id == trig.id, ArtifactBuild.outcome != "seen")
        .order_by(col(ArtifactBuild.seen_at).desc(), col(ArtifactBuild.id).desc())
        .limit(LAST_DELIVERIES)
    ).all()
    return {
        "kind": "artifact",
        "source": f"{art.type} {where}",
        "poll": PollInfo(polled_at=state.polled_at, ok_at=state.ok_at, error=state.error)
        if state is not None
        else None,
        "builds": [
            BuildInfo(
                build=r.build,
                seen_at=r.seen_at,
                outcome=r.outcome,
                execution=r.execution_id,
                detail=r.detail,
            )
            for r in rows
        ],
    }


@router.get(
    "/api/v1/triggers", response_model=list[TriggerInfo], openapi_extra=needs("registry:view")
)
def list_triggers(
    who: Annotated[Identity, Depends(require("registry:view"))],
    cfg: Annotated[RbacConfig, Depends(rbac)],
) -> list[TriggerInfo]:
    """Every stored trigger (its latest version) with its last deliveries, newest first; an
    artifact trigger with its last poll (and its error) and the last builds it found."""
    from sqlmodel import col, select

    from app.db import session_scope
    from app.models import WebhookDelivery
    from app.registry import stored_triggers

    out: list[TriggerInfo] = []
    with session_scope() as s:
        for version, trig in stored_triggers():
            rows = s.exec(
                select(WebhookDelivery)
                .where(WebhookDelivery.trigger_id == trig.id)
                .order_by(col(WebhookDelivery.received_at).desc())
                .limit(LAST_DELIVERIES)
            ).all()
            extra = _polled(s, trig) if trig.kind == "artifact" else {}
            out.append(
                TriggerInfo(
                    id=trig.id,
                    name=trig.body.name,
                    pipeline=trig.pipeline,
                    enabled=trig.body.enabled,
                    version=version,
                    **extra,
                    deliveries=[
                        Delivery(
                            delivery=r.delivery_id,
                            received_at=r.received_at,
                            outcome=r.outcome,
                            execution=r.execution_id,
                            detail=r.detail,
                        )
                        for r in rows
                    ],
                )
            )
    return out
