"""ElbV2Switch: blue-green traffic through an AWS ALB/NLB target group (spec ``type: AwsElbV2``).

The load balancer's listener forwards to one target group; the live set is that group's
registered targets. Backends are ``"id:port"`` strings whose id depends on the group's target
type:

- ``ip``: an IP address inside the group's VPC, ``"10.0.1.5:8080"`` (the host's privateIp);
- ``instance``: an EC2 instance id, ``"i-0123456789abcdef0:8080"``.

A missing port means the group's port; ``live()`` always returns ``id:port``. Other target types
(``lambda``, ``alb``) are refused.

A switch registers green, waits until every green target is ``healthy`` (or, when no health
check can run, registered: ``unused`` with ``Target.NotInUse`` means the group is not attached
to a load balancer yet, ``unavailable`` with ``Target.HealthCheckDisabled`` that its checks are
off), and only then deregisters blue. Deregistration drains: requests running on blue finish
(the group's deregistration delay); new ones go to green. In between, both sets receive
traffic, never a third. A green target that the load balancer reports ``unhealthy`` (its checks
ran and failed), or ``unused`` with ``Target.InvalidState`` (a stopped instance), or that is not
healthy within ``timeout``, fails the switch: green is deregistered again and blue keeps
everything.

``switch()`` returns once blue is draining (it gets no new requests), not when draining ends:
tear blue down only after the group's deregistration delay (300 s by default). Unlike the
HAProxy switch there is no lock: the state lives in AWS, and the coordinator runs one switch
per service at a time.

Credentials are boto3's usual chain on the worker that runs the switch (the delegate's),
needing ``elasticloadbalancing:DescribeTargetGroups``, ``DescribeTargetHealth``,
``RegisterTargets`` and ``DeregisterTargets``. botocore retries throttled calls (standard
mode); what still fails becomes ``TrafficError`` naming the target group ARN.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    PartialCredentialsError,
    ReadTimeoutError,
)

from app.errors import TrafficError
from app.traffic.base import SwitchResult, TrafficSwitch, format_backend, split_backend, unique

log = logging.getLogger(__name__)

_INSTANCE_ID = re.compile(r"i-[0-9a-f]{8,17}")
_NOT_FOUND = {"TargetGroupNotFound", "TargetGroupNotFoundException"}
_THROTTLED = {"Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests"}
_AUTH = {
    "AccessDenied",
    "AccessDeniedException",
    "AuthFailure",
    "ExpiredToken",
    "ExpiredTokenException",
    "InvalidClientTokenId",
    "SignatureDoesNotMatch",
    "UnrecognizedClientException",
    "UnauthorizedOperation",
}
# Reasons that mean a target will not become healthy by waiting.
_FAILED_REASONS = {
    "Target.ResponseCodeMismatch",
    "Target.Timeout",
    "Target.FailedHealthChecks",
    "Target.InvalidState",
}


@dataclass(frozen=True)
class _Health:
    """One row of ``describe_target_health``."""

    backend: str
    state: str
    reason: str
    description: str

    @property
    def registered(self) -> bool:
        """In the group and not leaving it: what a switch diffs against."""
        return self.state != "draining" and self.reason != "Target.NotRegistered"

    @property
    def serving(self) -> bool:
        """Registered and passing (or not subject to) health checks."""
        return (
            self.state in ("healthy", "initial")
            or (self.state == "unused" and self.reason == "Target.NotInUse")
            or (self.state == "unavailable" and self.reason == "Target.HealthCheckDisabled")
        )

    @property
    def ready(self) -> bool:
        """Safe to take traffic: like ``serving``, but ``initial`` is not enough."""
        return self.serving and self.state != "initial"

    @property
    def failed(self) -> bool:
        """Checks ran and failed, or the instance is stopped: waiting will not help."""
        return self.reason in _FAILED_REASONS and self.state in ("unhealthy", "unused")

    def describe(self) -> str:
        text = f"{self.backend} {self.state}"
        if self.reason:
            text += f" ({self.reason}{': ' + self.description if self.description else ''})"
        return text


class ElbV2Switch(TrafficSwitch):
    """An ELBv2 target group whose registered targets are the live set."""

    def __init__(
        self,
        *,
        region: str,
        target_group_arn: str,
        endpoint_url: str | None = None,
        timeout: float = 600.0,
        poll_interval: float = 5.0,
        max_attempts: int = 5,
        client: Any = None,
    ) -> None:
        self.region = region
        self.arn = target_group_arn
        self.label = target_group_arn
        self.endpoint_url = endpoint_url
        self.timeout = timeout
        self.poll_interval = poll_interval
        self._group_info: dict[str, Any] | None = None
        self._client: Any = client or boto3.session.Session().client(
            "elbv2",
            region_name=region,
            endpoint_url=endpoint_url,
            config=Config(
                retries={"mode": "standard", "total_max_attempts": max_attempts},
                connect_timeout=5,
                read_timeout=30,
            ),
        )

    # -- the interface ------------------------------------------------------------------------

    def live(self) -> list[str]:
        """Registered targets that are healthy, initial, or registered where no check runs."""
        return [h.backend for h in self._health() if h.serving]

    def switch(self, backends: list[str]) -> SwitchResult:
        """Register green, wait until it is healthy, then deregister blue."""
        started = time.monotonic()
        target = unique([self._canonical(b) for b in backends])
        if not target:
            raise TrafficError(
                f"refusing to switch target group {self.arn} to an empty set: every request "
                "would fail",
                switch=self.label,
            )
        previous = self.registered()
        added = [b for b in target if b not in previous]
        removed = [b for b in previous if b not in target]
        if added:
            self.register(added)
            try:
                self.wait_ready(added)
            except TrafficError:
                # Best effort: green must not keep receiving traffic after a failed switch.
                with contextlib.suppress(TrafficError):
                    self.deregister(added)
                raise
        if removed:
            self.deregister(removed)
            self.wait_leaving(removed)
        return SwitchResult.finish(
            label=f"target group {self.arn}",
            added=added,
            removed=removed,
            previous=previous,
            live=self.live(),
            started=started,
        )

    def close(self) -> None:
        """Close the boto3 client's HTTP connections."""
        close = getattr(self._client, "close", None)
        if callable(close):
            close()

    # -- steps (app.traffic.aws switches several load balancers with them) ---------------------

    @property
    def target_type(self) -> str:
        """``ip`` or ``instance``: what a target's id is."""
        return str(self._group().get("TargetType", "instance"))

    def canonical(self, backend: str) -> str:
        """``id:port`` as ``live()`` returns it (the group's port when none is given)."""
        return self._canonical(backend)

    def registered(self) -> list[str]:
        """Targets in the group and not leaving it."""
        return [h.backend for h in self._health() if h.registered]

    def register(self, backends: list[str]) -> None:
        """Add targets to the group (they take traffic once healthy)."""
        self._call("register_targets", Targets=self._targets(backends))

    def deregister(self, backends: list[str]) -> None:
        """Take targets out of the group (they drain)."""
        self._call("deregister_targets", Targets=self._targets(backends))

    def wait_ready(self, backends: list[str]) -> None:
        """Wait until every target is healthy; TrafficError when one fails or time is up."""
        self._wait_ready(backends)

    def wait_leaving(self, backends: list[str]) -> None:
        """Wait until deregistered targets get no new requests (not until drained)."""
        self._wait_leaving(backends)

    def _wait_ready(self, backends: list[str]) -> None:
        deadline = time.monotonic() + self.timeout
        while True:
            rows = self._health(backends)
            pending = [h for h in rows if not h.ready]
            if not pending:
                return
            failed = [h for h in pending if h.failed]
            if failed or time.monotonic() >= deadline:
                waited = "" if failed else f" within {self.timeout:.0f} s"
                raise TrafficError(
                    f"green targets did not become healthy{waited} in target group "
                    f"{self.arn}; blue keeps the traffic: "
                    + "; ".join(h.describe() for h in (failed or pending)),
                    switch=self.label,
                )
            time.sleep(self.poll_interval)

    def _wait_leaving(self, backends: list[str]) -> None:
        # Deregistration is asynchronous; once a target is draining it gets no new requests.
        # Draining itself (the deregistration delay, 300 s by default) is not waited for.
        deadline = time.monotonic() + min(self.timeout, 120.0)
        while True:
            still = [h for h in self._health(backends) if h.registered]
            if not still:
                return
            if time.monotonic() >= deadline:
                log.warning(
                    "target group %s: %s still registered after deregistration",
                    self.arn,
                    ", ".join(h.describe() for h in still),
                )
                return
            time.sleep(self.poll_interval)

    # -- AWS calls ----------------------------------------------------------------------------

    def _group(self) -> dict[str, Any]:
        """The target group's description (target type, port), fetched once."""
        if self._group_info is None:
            groups = self._call(
                "describe_target_groups", with_arn=False, TargetGroupArns=[self.arn]
            )["TargetGroups"]
            if not groups:
                raise TrafficError(f"target group {self.arn} not found", switch=self.label)
            group: dict[str, Any] = groups[0]
            if group.get("TargetType", "instance") not in ("ip", "instance"):
                raise TrafficError(
                    f"target group {self.arn} has target type {group.get('TargetType')}; the "
                    "AwsElbV2 switch handles ip and instance target groups",
                    switch=self.label,
                )
            self._group_info = group
        return self._group_info

    def _health(self, backends: list[str] | None = None) -> list[_Health]:
        kwargs: dict[str, Any] = {}
        if backends is not None:
            kwargs["Targets"] = self._targets(backends)
        rows = self._call("describe_target_health", **kwargs)["TargetHealthDescriptions"]
        out = []
        for row in rows:
            health = row.get("TargetHealth", {})
            out.append(
                _Health(
                    backend=format_backend(row["Target"]["Id"], int(row["Target"]["Port"])),
                    state=health.get("State", ""),
                    reason=health.get("Reason", ""),
                    description=health.get("Description", ""),
                )
            )
        return out

    def _call(self, operation: str, *, with_arn: bool = True, **kwargs: Any) -> Any:
        """One boto3 call; every botocore failure becomes a TrafficError naming the ARN."""
        if with_arn:
            kwargs["TargetGroupArn"] = self.arn
        return aws_call(
            self._client,
            operation,
            kwargs,
            service="ELBv2",
            what=f"target group {self.arn}",
            label=self.label,
            where=self.endpoint_url or f"the ELBv2 endpoint of {self.region}",
            hint=_hint,
        )

    # -- backends -----------------------------------------------------------------------------

    def _canonical(self, backend: str) -> str:
        group = self._group()
        target_id, port = split_backend(backend, label=self.label)
        if group.get("TargetType") == "ip":
            try:
                target_id = ipaddress.ip_address(target_id).compressed
            except ValueError:
                raise TrafficError(
                    f"target group {self.arn} has target type ip: {backend!r} is not an IP "
                    "address; give the host's privateIp and port",
                    switch=self.label,
                ) from None
        elif not _INSTANCE_ID.fullmatch(target_id):
            raise TrafficError(
                f"target group {self.arn} has target type instance: {backend!r} is not an "
                "instance id (i-0123456789abcdef0:port)",
                switch=self.label,
            )
        return format_backend(target_id, port if port is not None else int(group["Port"]))

    def _targets(self, backends: list[str]) -> list[dict[str, Any]]:
        out = []
        for backend in backends:
            target_id, port = split_backend(backend, label=self.label)
            out.append({"Id": target_id, "Port": port})
        return out


def aws_call(
    client: Any,
    operation: str,
    kwargs: dict[str, Any],
    *,
    service: str,
    what: str,
    label: str,
    where: str,
    hint: Callable[[str, str], str],
) -> Any:
    """One boto3 call of a load-balancer client; every botocore failure becomes a
    TrafficError naming ``what`` (the ELBv2 and classic ELB switches share it)."""
    try:
        return getattr(client, operation)(**kwargs)
    except ClientError as exc:
        error = exc.response.get("Error", {})
        code, message = error.get("Code", "Unknown"), error.get("Message", str(exc))
        raise TrafficError(
            f"{service} {exc.operation_name} on {what} failed: {code}: {message}; "
            f"{hint(code, message)}",
            switch=label,
        ) from None
    except (NoCredentialsError, PartialCredentialsError) as exc:
        raise TrafficError(
            f"no usable AWS credentials for {what} ({exc}); give the worker credentials "
            "(instance profile, environment or ~/.aws)",
            switch=label,
        ) from None
    except (EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError) as exc:
        raise TrafficError(f"cannot reach {where} for {what}: {exc}", switch=label) from None
    except BotoCoreError as exc:
        raise TrafficError(f"{service} {operation} on {what} failed: {exc}", switch=label) from None


def _hint(code: str, message: str) -> str:
    """What to do about an AWS error code."""
    if code in _NOT_FOUND or (code == "ValidationError" and "arn" in message.lower()):
        return "check targetGroupArn and region in the traffic spec"
    if code in _THROTTLED:
        return "AWS throttled the calls even after retries; retry the switch later"
    if code in _AUTH:
        return (
            "AWS refused the worker's credentials; check them and their permissions "
            "(elasticloadbalancing:DescribeTargetGroups, DescribeTargetHealth, "
            "RegisterTargets, DeregisterTargets)"
        )
    if code == "InvalidTarget":
        return "the targets must be in the target group's VPC (ip) or be running instances"
    return "see the AWS message"
