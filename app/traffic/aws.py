"""AWS load balancers switched together: ELBv2 target groups and classic load balancers
(spec ``type: AwsLoadBalancers``, the reference's ``AWS_AMI_SWITCH_ROUTES`` step).

The live set is what the load balancers have registered. A switch names hosts; each load
balancer knows them by its own id: a classic load balancer and an ``instance`` target group by
the EC2 instance id (host discovery records it as the ``instanceId`` attribute), an ``ip``
target group by the private IP. Ports are the target group's port (classic load balancers
register instances, their listeners name the port).

A switch first works out every id of every host for every load balancer, so a host whose
instance id is unknown (a static host without ``attributes.instanceId``) fails it before
anything changes. Then, as ``ElbV2Switch`` does for one group, but across all of them:

1. register green everywhere;
2. wait until green is healthy everywhere (ELBv2: ``healthy``, or registered where no check
   runs; classic: ``InService``);
3. only then deregister blue everywhere (it drains; new requests go to green).

If green cannot be registered, or is not healthy within ``timeout`` in any load balancer, or
one reports it failed (an ELBv2 target ``unhealthy``, a classic instance ``OutOfService``
because it failed its checks or is stopped), green is deregistered again from every load
balancer and blue keeps all the traffic: a failed switch leaves things as they were.

Credentials are boto3's usual chain on the worker that runs the switch; ``AWS_ENDPOINT_URL``
(or ``endpointUrl``) points at another endpoint. A classic load balancer needs
``elasticloadbalancing:DescribeLoadBalancers``, ``DescribeInstanceHealth``,
``RegisterInstancesWithLoadBalancer`` and ``DeregisterInstancesFromLoadBalancer``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Mapping
from typing import Any, Protocol

import boto3
from botocore.config import Config

from app.errors import TrafficError
from app.traffic.base import HostIds, SwitchResult, TrafficSwitch, split_backend, unique
from app.traffic.elbv2 import ElbV2Switch, aws_call

log = logging.getLogger(__name__)

# A classic instance OutOfService for one of these will not come InService by waiting.
_CLASSIC_FAILED = (
    "failed at least the UnhealthyThreshold",
    "is in stopped state",
    "is in terminated state",
    "is in stopping state",
)


def _config(max_attempts: int) -> Config:
    return Config(
        retries={"mode": "standard", "total_max_attempts": max_attempts},
        connect_timeout=5,
        read_timeout=30,
    )


class _Member(Protocol):
    """One load balancer of a switch: the steps ``AwsLoadBalancersSwitch`` runs on each."""

    label: str

    def id_of(self, host: HostIds) -> str: ...
    def registered(self) -> list[str]: ...
    def live(self) -> list[str]: ...
    def register(self, ids: list[str]) -> None: ...
    def deregister(self, ids: list[str]) -> None: ...
    def wait_ready(self, ids: list[str]) -> None: ...
    def wait_leaving(self, ids: list[str]) -> None: ...


def _no_instance_id(host: HostIds, where: str) -> TrafficError:
    return TrafficError(
        f"host {host.name} has no EC2 instance id, and {where} registers instances: hosts of a "
        "static infrastructure have none; give the host attributes.instanceId, or use an AWS "
        "infrastructure (SshWinRmAws), whose discovered hosts carry it. Nothing was switched",
        switch=where,
    )


class ClassicElbSwitch:
    """A classic load balancer whose registered instances are the live set."""

    def __init__(
        self,
        *,
        name: str,
        region: str,
        endpoint_url: str | None = None,
        timeout: float = 600.0,
        poll_interval: float = 5.0,
        max_attempts: int = 5,
        client: Any = None,
    ) -> None:
        self.name = name
        self.region = region
        self.endpoint_url = endpoint_url
        self.timeout = timeout
        self.poll_interval = poll_interval
        self.label = f"classic load balancer {name}"
        self._client: Any = client or boto3.session.Session().client(
            "elb", region_name=region, endpoint_url=endpoint_url, config=_config(max_attempts)
        )

    def id_of(self, host: HostIds) -> str:
        """The host's instance id (a classic load balancer registers instances)."""
        if not host.instance_id:
            raise _no_instance_id(host, self.label)
        return host.instance_id

    def registered(self) -> list[str]:
        """Instances registered with the load balancer."""
        found = self._call("describe_load_balancers", LoadBalancerNames=[self.name])
        rows = found["LoadBalancerDescriptions"]
        if not rows:
            raise TrafficError(f"{self.label} not found in {self.region}", switch=self.label)
        return [str(i["InstanceId"]) for i in rows[0].get("Instances", [])]

    def live(self) -> list[str]:
        """Registered instances that are InService."""
        ids = self.registered()
        return [r["InstanceId"] for r in self._health(ids) if r.get("State") == "InService"]

    def register(self, ids: list[str]) -> None:
        """Register instances (they take traffic once InService)."""
        self._call(
            "register_instances_with_load_balancer",
            LoadBalancerName=self.name,
            Instances=[{"InstanceId": i} for i in ids],
        )

    def deregister(self, ids: list[str]) -> None:
        """Deregister instances (connection draining, if on, lets requests finish)."""
        self._call(
            "deregister_instances_from_load_balancer",
            LoadBalancerName=self.name,
            Instances=[{"InstanceId": i} for i in ids],
        )

    def wait_ready(self, ids: list[str]) -> None:
        """Wait until every instance is InService; TrafficError when one failed or time is
        up."""
        deadline = time.monotonic() + self.timeout
        while True:
            rows = self._health(ids)
            pending = [r for r in rows if r.get("State") != "InService"]
            if not pending:
                return
            failed = [
                r
                for r in pending
                if any(f in str(r.get("Description", "")) for f in _CLASSIC_FAILED)
            ]
            if failed or time.monotonic() >= deadline:
                waited = "" if failed else f" within {self.timeout:.0f} s"
                raise TrafficError(
                    f"green instances did not come InService{waited} in {self.label}; blue "
                    "keeps the traffic: " + "; ".join(_describe(r) for r in (failed or pending)),
                    switch=self.label,
                )
            time.sleep(self.poll_interval)

    def wait_leaving(self, ids: list[str]) -> None:
        """Nothing to wait for: a deregistered instance leaves the list at once (and drains)."""

    def close(self) -> None:
        """Close the boto3 client's HTTP connections."""
        close = getattr(self._client, "close", None)
        if callable(close):
            close()

    def _health(self, ids: list[str]) -> list[dict[str, Any]]:
        if not ids:
            return []
        rows: list[dict[str, Any]] = self._call(
            "describe_instance_health",
            LoadBalancerName=self.name,
            Instances=[{"InstanceId": i} for i in ids],
        )["InstanceStates"]
        return rows

    def _call(self, operation: str, **kwargs: Any) -> Any:
        """One boto3 call; every botocore failure becomes a TrafficError naming the LB."""
        return aws_call(
            self._client,
            operation,
            kwargs,
            service="ELB",
            what=self.label,
            label=self.label,
            where=self.endpoint_url or f"the ELB endpoint of {self.region}",
            hint=lambda code, _message: _classic_hint(code),
        )


def _describe(row: Mapping[str, Any]) -> str:
    text = f"{row.get('InstanceId')} {row.get('State')}"
    detail = " ".join(
        str(row.get(k)) for k in ("ReasonCode", "Description") if row.get(k) and row.get(k) != "N/A"
    )
    return f"{text} ({detail})" if detail else text


def _classic_hint(code: str) -> str:
    if code in ("LoadBalancerNotFound", "AccessPointNotFound"):
        return "check classicLoadBalancers and the region (the target groups' or the hosts')"
    if code == "InvalidInstance":
        return "the instances must be running, in the load balancer's region and VPC"
    if code in (
        "AccessDenied",
        "AccessDeniedException",
        "UnauthorizedOperation",
        "InvalidClientTokenId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
    ):
        return (
            "AWS refused the worker's credentials; check them and their permissions "
            "(elasticloadbalancing:DescribeLoadBalancers, DescribeInstanceHealth, "
            "RegisterInstancesWithLoadBalancer, DeregisterInstancesFromLoadBalancer)"
        )
    return "see the AWS message"


class _TargetGroup:
    """An ELBv2 target group as a member: ids by its target type, the group's port."""

    def __init__(self, switch: ElbV2Switch) -> None:
        self.switch = switch
        self.label = f"target group {switch.arn}"

    def id_of(self, host: HostIds) -> str:
        if self.switch.target_type == "ip":
            if not host.private_ip:
                raise TrafficError(
                    f"host {host.name} has no private IP, and {self.label} (target type ip) "
                    "registers private IPs: give the host privateIp. Nothing was switched",
                    switch=self.label,
                )
            return self.switch.canonical(host.private_ip)
        if not host.instance_id:
            raise _no_instance_id(host, self.label)
        return self.switch.canonical(host.instance_id)

    def registered(self) -> list[str]:
        return self.switch.registered()

    def live(self) -> list[str]:
        return self.switch.live()

    def register(self, ids: list[str]) -> None:
        self.switch.register(ids)

    def deregister(self, ids: list[str]) -> None:
        self.switch.deregister(ids)

    def wait_ready(self, ids: list[str]) -> None:
        self.switch.wait_ready(ids)

    def wait_leaving(self, ids: list[str]) -> None:
        self.switch.wait_leaving(ids)


class AwsLoadBalancersSwitch(TrafficSwitch):
    """ELBv2 target groups and classic load balancers whose registered hosts are the live set.

    ``switch`` takes host names (keys of ``hosts``); ``live`` returns host names too (an id no
    host has is returned as it is).
    """

    def __init__(
        self,
        *,
        region: str,
        target_group_arns: list[str],
        classic_load_balancers: list[str],
        endpoint_url: str | None = None,
        timeout: float = 600.0,
        poll_interval: float = 5.0,
        hosts: Mapping[str, HostIds] | None = None,
        max_attempts: int = 5,
    ) -> None:
        self.region = region
        self.hosts = dict(hosts or {})
        names = [*target_group_arns, *classic_load_balancers]
        self.label = ", ".join(names)
        elbv2: Any = None
        self._members: list[_Member] = []
        self._closers: list[Any] = []
        if target_group_arns:
            elbv2 = boto3.session.Session().client(
                "elbv2", region_name=region, endpoint_url=endpoint_url, config=_config(max_attempts)
            )
            self._closers.append(elbv2)
        for arn in unique(target_group_arns):
            self._members.append(
                _TargetGroup(
                    ElbV2Switch(
                        region=region,
                        target_group_arn=arn,
                        endpoint_url=endpoint_url,
                        timeout=timeout,
                        poll_interval=poll_interval,
                        client=elbv2,
                    )
                )
            )
        for name in unique(classic_load_balancers):
            member = ClassicElbSwitch(
                name=name,
                region=region,
                endpoint_url=endpoint_url,
                timeout=timeout,
                poll_interval=poll_interval,
                max_attempts=max_attempts,
            )
            self._closers.append(member)
            self._members.append(member)

    def live(self) -> list[str]:
        """Hosts that take traffic in any of the load balancers, in a stable order."""
        return unique([n for member in self._members for n in self._names(member.live())])

    def switch(self, backends: list[str]) -> SwitchResult:
        """Register green everywhere, wait until healthy everywhere, then deregister blue."""
        started = time.monotonic()
        names = unique(backends)
        if not names:
            raise TrafficError(
                f"refusing to switch {self.label} to an empty set: every request would fail",
                switch=self.label,
            )
        # Every id first: a host a load balancer cannot know fails the switch before any change.
        wanted = {m.label: unique([m.id_of(self._host(n)) for n in names]) for m in self._members}
        previous: dict[str, list[str]] = {m.label: m.registered() for m in self._members}
        added = {k: [i for i in wanted[k] if i not in previous[k]] for k in wanted}
        removed = {k: [i for i in previous[k] if i not in wanted[k]] for k in wanted}
        touched: list[_Member] = []
        try:
            for member in self._members:
                if added[member.label]:
                    touched.append(member)
                    member.register(added[member.label])
            for member in touched:
                member.wait_ready(added[member.label])
        except TrafficError:
            # Green must not keep any traffic after a failed switch: blue has it all.
            for member in touched:
                with contextlib.suppress(TrafficError):
                    member.deregister(added[member.label])
            raise
        for member in self._members:
            if removed[member.label]:
                member.deregister(removed[member.label])
        for member in self._members:
            if removed[member.label]:
                member.wait_leaving(removed[member.label])
        live = {m.label: m.live() for m in self._members}
        return SwitchResult.finish(
            label=self.label,
            added=unique([n for k in added for n in self._names(added[k])]),
            removed=unique([n for k in removed for n in self._names(removed[k])]),
            previous=unique([n for k in previous for n in self._names(previous[k])]),
            live=unique([n for k in live for n in self._names(live[k])]),
            started=started,
            balancers=live,
        )

    def close(self) -> None:
        """Close the boto3 clients' HTTP connections."""
        for closer in self._closers:
            close = getattr(closer, "close", None)
            if callable(close):
                close()

    def _host(self, name: str) -> HostIds:
        host = self.hosts.get(name)
        if host is not None:
            return host
        # A bare id given directly (tests, tools): an instance id or an address.
        bare, _ = split_backend(name, label=self.label)
        if bare.startswith("i-"):
            return HostIds(name=name, instance_id=bare)
        return HostIds(name=name, private_ip=bare)

    def _names(self, ids: list[str]) -> list[str]:
        """Host names for load balancer ids (``i-0abc`` or ``i-0abc:80``, ``10.0.0.5:80``)."""
        by_id: dict[str, str] = {}
        for h in self.hosts.values():
            for ident in (h.instance_id, h.private_ip):
                if ident:
                    by_id.setdefault(ident, h.name)
        out = []
        for i in ids:
            bare, _ = split_backend(i, label=self.label)
            out.append(by_id.get(bare, i))
        return out
