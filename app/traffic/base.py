"""The TrafficSwitch interface: which backends a blue-green service's clients reach.

A blue-green stage deploys green next to blue, verifies green, then asks a switch to make green
the live set; blue stays deployed so a rollback is one more ``switch(blue)``. The coordinator
calls a switch from a task on the control worker with backends as ``"address:port"`` strings
and records the returned ``SwitchResult`` (``previous`` is what a rollback switches back to).

Implementations:

- ``HAProxySwitch`` (``type: Local``): an HAProxy on the control machine, for the lab and
  on-prem hosts;
- ``ElbV2Switch`` (``type: AwsElbV2``): an AWS ALB/NLB target group;
- ``AwsLoadBalancersSwitch`` (``type: AwsLoadBalancers``, the reference's
  ``AWS_AMI_SWITCH_ROUTES``): ELBv2 target groups and classic load balancers together.

Switch specs are YAML-ish dicts, for example::

    traffic:
      type: Local
      name: web
      listen: 127.0.0.1:18080
      healthCheckPath: /health      # optional: HTTP checks instead of TCP connects
      mode: http                    # optional: http (default) or tcp

    traffic:
      type: AwsElbV2
      region: us-east-1
      targetGroupArn: arn:aws:elasticloadbalancing:us-east-1:123456789012:targetgroup/web/0123
      endpointUrl: http://127.0.0.1:5000   # optional (moto in tests)
      timeout: 600                         # optional: seconds green may take to be healthy

    traffic:
      type: AwsLoadBalancers
      region: us-east-1
      targetGroupArns: [arn:aws:elasticloadbalancing:us-east-1:123456789012:targetgroup/web/0123]
      classicLoadBalancers: [web-clb]
"""

from __future__ import annotations

import ipaddress
import logging
import re
import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from app.errors import SpecError, TrafficError

log = logging.getLogger("vmfarm.traffic")


@dataclass(frozen=True)
class SwitchResult:
    """What one ``switch`` call changed. Plain data: it is returned from a Celery task as JSON."""

    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    # The live set before the call, as the switch had configured it: a rollback switches to it.
    previous: list[str] = field(default_factory=list)
    live: list[str] = field(default_factory=list)
    duration_s: float = 0.0
    # Several load balancers switched together (AwsLoadBalancers): each one's live ids.
    balancers: dict[str, list[str]] = field(default_factory=dict)

    @property
    def changed(self) -> bool:
        """Whether the call moved any traffic (False for a repeated, idempotent call)."""
        return bool(self.added or self.removed)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict, for a task's return value or an audit event."""
        return {**asdict(self), "changed": self.changed}

    @classmethod
    def finish(
        cls,
        *,
        label: str,
        added: list[str],
        removed: list[str],
        previous: list[str],
        live: list[str],
        started: float,
        balancers: dict[str, list[str]] | None = None,
    ) -> SwitchResult:
        """The result of a switch that began at ``started`` (monotonic); logged when it moved
        traffic."""
        result = cls(
            added=added,
            removed=removed,
            previous=previous,
            live=live,
            duration_s=round(time.monotonic() - started, 3),
            balancers=dict(balancers or {}),
        )
        if result.changed:
            log.info("%s: +%s -%s in %.2f s", label, added, removed, result.duration_s)
        return result


@dataclass(frozen=True)
class HostIds:
    """What a load balancer may know a host by: its EC2 instance id, its private IP."""

    name: str
    instance_id: str | None = None
    private_ip: str | None = None


class TrafficSwitch(ABC):
    """Moves a service's traffic from one set of backends to another."""

    #: Names the load balancer in errors and logs (HAProxy name, target group ARN).
    label: str = ""

    @abstractmethod
    def live(self) -> list[str]:
        """Backends (``"address:port"``) receiving new traffic now, in a stable order."""

    @abstractmethod
    def switch(self, backends: list[str]) -> SwitchResult:
        """Make exactly ``backends`` live without failing a request; idempotent."""

    @abstractmethod
    def close(self) -> None:
        """Release client resources; the load balancer itself keeps serving."""

    def __enter__(self) -> TrafficSwitch:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def split_backend(backend: str, *, label: str = "") -> tuple[str, int | None]:
    """``"10.0.0.5:8080"`` -> ``("10.0.0.5", 8080)``; ``"[::1]:80"`` and a bare ``"i-0abc"`` too."""
    text = backend.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise TrafficError(f"backend {backend!r} is not [address]:port", switch=label)
        port_text = rest[1:]
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    else:
        # No colon (a bare address or instance id), or an unbracketed IPv6 address.
        host, port_text = text, ""
    if not host:
        raise TrafficError(f"backend {backend!r} has no address", switch=label)
    if not port_text:
        return host, None
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise TrafficError(f"backend {backend!r} has an invalid port {port_text!r}", switch=label)
    return host, int(port_text)


def format_backend(host: str, port: int) -> str:
    """The canonical ``"address:port"`` string (IPv6 in brackets), as ``live()`` returns it."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def canonical_ip_backend(backend: str, *, label: str = "") -> str:
    """Validate an ``ip:port`` backend and return it canonical (``127.000.1.3`` is refused)."""
    host, port = split_backend(backend, label=label)
    if port is None:
        raise TrafficError(f"backend {backend!r} needs a port (address:port)", switch=label)
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise TrafficError(
            f"backend {backend!r} is not an IP address and port; give hosts by IP "
            "(their privateIp or publicIp), as host discovery returns them",
            switch=label,
        ) from None
    return format_backend(ip.compressed, port)


def unique(items: list[str]) -> list[str]:
    """``items`` without repeats, first occurrence kept (callers' order is meaningful in logs)."""
    return list(dict.fromkeys(items))


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_LOCAL_KEYS = {"type", "name", "listen", "healthCheckPath", "mode"}
_ELB_KEYS = {"type", "region", "targetGroupArn", "endpointUrl", "timeout"}
_AWS_LB_KEYS = {
    "type",
    "region",
    "targetGroupArns",
    "classicLoadBalancers",
    "endpointUrl",
    "timeout",
}


def _timeout(spec: dict[str, Any]) -> float:
    timeout = spec.get("timeout", 600)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
        raise SpecError(
            f"traffic timeout {timeout!r} must be a positive number of seconds",
            field="traffic.timeout",
        )
    return float(timeout)


def _str_list(spec: dict[str, Any], key: str) -> list[str]:
    value = spec.get(key) or []
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise SpecError(f"traffic {key} must be a list of names", field=f"traffic.{key}")
    return [v.strip() for v in value]


def traffic_switch_from_spec(
    spec: dict[str, Any], *, state_dir: Path, hosts: dict[str, HostIds] | None = None
) -> TrafficSwitch:
    """Build the switch a spec describes; ``state_dir`` holds local state (HAProxy's files);
    ``hosts`` tells an AwsLoadBalancers switch each host's instance id and private IP."""
    kind = spec.get("type")
    if kind == "AwsLoadBalancers":
        _check_keys(spec, _AWS_LB_KEYS, required={"region"})
        arns = _str_list(spec, "targetGroupArns")
        classic = _str_list(spec, "classicLoadBalancers")
        if not arns and not classic:
            raise SpecError(
                "traffic type AwsLoadBalancers needs targetGroupArns or classicLoadBalancers",
                field="traffic.targetGroupArns",
            )
        from app.traffic.aws import AwsLoadBalancersSwitch

        endpoint = spec.get("endpointUrl")
        return AwsLoadBalancersSwitch(
            region=_str(spec, "region"),
            target_group_arns=arns,
            classic_load_balancers=classic,
            endpoint_url=_str(spec, "endpointUrl") if endpoint is not None else None,
            timeout=_timeout(spec),
            hosts=hosts or {},
        )
    if kind == "Local":
        _check_keys(spec, _LOCAL_KEYS, required={"listen"})
        name = spec.get("name", "default")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise SpecError(
                f"traffic name {name!r} must be letters, digits, '_', '.' or '-' (at most 64)",
                field="traffic.name",
            )
        mode = spec.get("mode", "http")
        if mode not in ("http", "tcp"):
            raise SpecError(f"traffic mode {mode!r} must be http or tcp", field="traffic.mode")
        health_path = spec.get("healthCheckPath")
        if health_path is not None and (
            not isinstance(health_path, str)
            or not health_path.startswith("/")
            or any(c.isspace() for c in health_path)
        ):
            raise SpecError(
                f"traffic healthCheckPath {health_path!r} must be a path such as /health",
                field="traffic.healthCheckPath",
            )
        from app.traffic.haproxy import HAProxySwitch

        # One directory per name: several services can each have their own HAProxy.
        return HAProxySwitch(
            name=name,
            listen=_str(spec, "listen"),
            state_dir=Path(state_dir) / f"haproxy-{name}",
            mode=mode,
            health_check_path=health_path,
        )
    if kind == "AwsElbV2":
        _check_keys(spec, _ELB_KEYS, required={"region", "targetGroupArn"})
        timeout = _timeout(spec)
        from app.traffic.elbv2 import ElbV2Switch

        endpoint = spec.get("endpointUrl")
        return ElbV2Switch(
            region=_str(spec, "region"),
            target_group_arn=_str(spec, "targetGroupArn"),
            endpoint_url=_str(spec, "endpointUrl") if endpoint is not None else None,
            timeout=timeout,
        )
    raise SpecError(
        f"traffic type {kind!r} is not known; use Local (HAProxy on the control machine), "
        "AwsElbV2 (an AWS target group) or AwsLoadBalancers (target groups and classic load "
        "balancers)",
        field="traffic.type",
    )


def _check_keys(spec: dict[str, Any], allowed: set[str], *, required: set[str]) -> None:
    # Unknown keys are refused: a typo (targetGroupARN) must not silently fall back to a default.
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise SpecError(
            f"traffic type {spec['type']} does not take {', '.join(unknown)}; "
            f"it takes {', '.join(sorted(allowed))}",
            field=f"traffic.{unknown[0]}",
        )
    missing = sorted(required - set(spec))
    if missing:
        raise SpecError(
            f"traffic type {spec['type']} needs {', '.join(missing)}",
            field=f"traffic.{missing[0]}",
        )


def _str(spec: dict[str, Any], key: str) -> str:
    value = spec[key]
    if not isinstance(value, str) or not value.strip():
        raise SpecError(f"traffic {key} must be a non-empty string", field=f"traffic.{key}")
    return value.strip()
