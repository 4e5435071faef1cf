"""Verification checks on a region's worker, and the blue-green traffic switch.

Checks run close to the hosts, from the worker (as a load balancer would probe them); their
numbers go to the ledger (CheckRun) and the gate on control decides from there.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from sqlalchemy import update
from sqlmodel import col, select

from app.canvas import HostStepKey
from app.db import claim_once, retrying, session_scope
from app.definitions.base import parse_duration
from app.definitions.expressions import render
from app.definitions.models import VerificationSpec
from app.definitions.plan import DeploymentStagePlan, HealthCheckStepPlan
from app.execution.ledger import stage_data as _stage_data
from app.models import CheckRun, PhaseRun, Status, utcnow
from app.providers.base import Host
from app.settings import get_settings
from app.units import host_context

log = logging.getLogger("vmfarm.tasks")


def _claim(key: HostStepKey, worker: str | None) -> tuple[int, CheckRun | None]:
    """As app.execution.ledger.claim (``claim_once``: tried again across a ledger restart)."""
    values = dict(
        idem_key=key.idem,
        execution_id=key.execution,
        stage_index=key.stage,
        phase=key.phase,
        host=key.host,
        region=key.region,
        status=Status.RUNNING,
        results={},
        reasons=[],
        worker=worker,
        started_at=utcnow(),
    )
    return claim_once(CheckRun, values, what=f"claiming the checks {key.idem}")


def check(key: HostStepKey, *, worker: str | None = None) -> dict[str, Any]:
    """Run the stage's verification checks against one host; record them; return a summary."""
    run_id, existing = _claim(key, worker)
    if existing is not None:
        return {"host": key.host, "passed": existing.passed, "duplicate": True}
    results: dict[str, Any] = {}
    reasons: list[str] = []
    try:
        if key.deadline is not None and time.time() > key.deadline:
            reasons.append(
                f"expired: no worker of region {key.region} ran the checks within "
                f"{get_settings().dispatch_expires} s"
            )
        else:
            stage, hosts = _stage_data(key.execution, key.stage)
            host = Host.from_dict(hosts[key.host])
            verification = stage.strategy.verification
            if verification is not None:
                results, reasons = _run_checks(verification, host, stage)
    except Exception as exc:  # record, never lose the host: the gate decides
        log.exception("verification of %s failed", key.idem)
        reasons.append(f"internal error: {type(exc).__name__}: {exc}")
    passed = not reasons

    def write() -> None:
        with session_scope() as s:
            s.execute(
                update(CheckRun)
                .where(col(CheckRun.id) == run_id)
                .values(
                    status=Status.SUCCEEDED if passed else Status.FAILED,
                    passed=passed,
                    results=results,
                    reasons=reasons,
                    finished_at=utcnow(),
                )
            )

    retrying(write, what=f"recording the checks {key.idem}")
    return {"host": key.host, "passed": passed}


def _run_checks(
    verification: VerificationSpec, host: Host, stage: DeploymentStagePlan
) -> tuple[dict[str, Any], list[str]]:
    from app.verify.probes import evaluate, http_check, probe

    ctx = host_context(host, stage)
    results: dict[str, Any] = {}
    reasons: list[str] = []
    hc = verification.health_check
    if hc is not None:
        url = render(hc.url, ctx)
        r = http_check(
            url,
            expect_status=tuple(hc.expect_status or [200]),
            expect_body=hc.expect_body,
            retries=hc.retries,
            interval=parse_duration(hc.interval),
            timeout=parse_duration(hc.timeout),
        )
        results["health"] = r.to_dict()
        if not r.ok:
            reasons.append(
                f"health check {url} failed after {r.attempts} attempt(s): "
                f"{r.error or f'status {r.status_code}'}"
            )
    pb = verification.probe
    if pb is not None:
        url = render(pb.url, ctx)
        stats = probe(
            url,
            duration=parse_duration(pb.duration),
            concurrency=pb.concurrency,
            timeout=parse_duration(pb.timeout),
        )
        results["probe"] = stats.to_dict()
        criteria = verification.success_criteria
        if criteria is not None:
            ok, why = evaluate(criteria.to_json(), stats.to_dict())
            if not ok:
                reasons.extend(f"{url}: {w}" for w in why)
    return results, reasons


def health_step(
    step: HealthCheckStepPlan, host: Host, stage: DeploymentStagePlan
) -> tuple[bool, str]:
    """An HTTP or TCP HealthCheck step from the worker to the host: (healthy, what happened)."""
    from app.verify.probes import http_check, tcp_check

    spec = step.spec
    ctx = host_context(host, stage)
    retries, interval = spec.retries, parse_duration(spec.interval)
    timeout = parse_duration(spec.timeout)
    if spec.type == "HTTP":
        url = render(spec.url or "", ctx)
        r = http_check(
            url,
            expect_status=tuple(spec.expect_status or [200]),
            expect_body=spec.expect_body,
            retries=retries,
            interval=interval,
            timeout=timeout,
        )
        what = f"HTTP {url}"
    else:
        address = render(spec.host or host.address, ctx)
        port = int(render(str(spec.port), ctx))
        r = tcp_check(address, port, retries=retries, interval=interval, timeout=timeout)
        what = f"TCP {address}:{port}"
    if r.ok:
        return True, f"{what}: healthy after {r.attempts} attempt(s) ({r.elapsed_ms:.0f} ms)"
    return False, (
        f"{what}: unhealthy after {r.attempts} attempt(s): {r.error or f'status {r.status_code}'}"
    )


def do_switch(
    execution_id: str, stage_index: int, phase: int, kind: str = "switch"
) -> tuple[bool, dict[str, Any]]:
    """Make the phase's hosts the live set of the stage's traffic switch."""
    from app.traffic import HostIds, traffic_switch_from_spec

    stage, hosts = _stage_data(execution_id, stage_index)
    spec = stage.strategy.traffic
    assert spec is not None, "a switch phase belongs to a BlueGreen stage with traffic"
    traffic = spec.to_json()
    with session_scope() as s:
        pr = s.exec(
            select(PhaseRun).where(
                PhaseRun.execution_id == execution_id,
                PhaseRun.stage_index == stage_index,
                PhaseRun.phase == phase,
                PhaseRun.kind == kind,
            )
        ).one()
        names = list(pr.hosts)
    ids: dict[str, HostIds] = {}
    if traffic.get("type") == "AwsLoadBalancers":
        # Each load balancer knows a host by its own id (instance id, private IP): the switch
        # takes host names and looks them up here.
        backends = list(names)
        ids = {
            n: HostIds(
                name=n,
                instance_id=(h.get("attributes") or {}).get("instanceId"),
                private_ip=h.get("private_ip"),
            )
            for n, h in hosts.items()
        }
    else:
        # An AWS target group registers the hosts' private IPs; HAProxy reaches their address.
        field = "private_ip" if traffic.get("type") == "AwsElbV2" else "address"
        backends = [
            f"{hosts[n].get(field) or hosts[n]['address']}:{traffic.get('port', 8080)}"
            for n in names
        ]
    state_dir = get_settings().home_dir / "traffic"
    try:
        switch = traffic_switch_from_spec(spec.switch_spec(), state_dir=state_dir, hosts=ids)
        try:
            before = switch.live()
            result = switch.switch(backends)
        finally:
            switch.close()
    except Exception as exc:  # the gate records the reason; the old live set keeps traffic
        log.exception("traffic switch for %s failed", execution_id)
        return False, {"error": f"{type(exc).__name__}: {exc}", "backends": backends}
    return True, {
        "backends": backends,
        "before": before,
        "result": result.to_dict() if hasattr(result, "to_dict") else str(result),
    }
