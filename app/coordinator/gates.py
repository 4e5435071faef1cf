"""What finished work reports: a phase's gate, a verification verdict, a traffic switch, the
hosts discovery found. Each records its outcome under the execution's lock, then advances.
"""

from __future__ import annotations

from typing import Any

from sqlmodel import select

from app.coordinator.ledger import deployment_stage, running_record, stage_run
from app.coordinator.machine import advance
from app.coordinator.routing import unserved_delegates
from app.coordinator.verdicts import (
    canary_verdict,
    evaluate_phase,
    prometheus_verdict,
    within_budget,
)
from app.coordinator.watch import record_check, watch_inputs, watch_record
from app.db import session_scope
from app.models import (
    Status,
    utcnow,
)


def gate(execution_id: str, stage_index: int, phase: int, *, kind: str = "deploy") -> str:
    """The chord body: record the phase's verdict from the ledger, then advance."""
    with session_scope() as s:
        found = running_record(s, execution_id, stage_index, phase, kind)
        if found is not None:
            evaluate_phase(s, *found, gate=True)
    return advance(execution_id)


def verification_gate(execution_id: str, stage_index: int, phase: int) -> str:
    """Body of a verification chord: judge the phase's checks from the ledger, then advance."""
    from app.models import CheckRun, Execution

    # The metric source is asked before the execution is locked: a slow Prometheus never holds
    # up the coordinator (every other advance of this execution waits for its lock).
    analysis: dict[str, Any] | None = None
    stage = None
    hosts: list[dict[str, Any]] = []
    phases: list[dict[str, Any]] = []
    with session_scope() as s:
        ex = s.get(Execution, execution_id)
        stage = deployment_stage(ex, stage_index) if ex is not None else None
        verification = stage.strategy.verification if stage is not None else None
        if ex is not None and verification is not None and verification.canary_analysis is not None:
            run = stage_run(s, ex, stage_index)
            hosts, phases = list(run.hosts), list(run.phases)
    if stage is not None and phases:  # a canary analysis, outside the transaction
        try:
            analysis = canary_verdict(stage, hosts, phases, phase)
        except Exception as exc:  # the gate always gets a verdict: a failed one, with why
            analysis = {
                "passed": False,
                "reasons": [f"canary analysis failed: {type(exc).__name__}: {exc}"],
            }
    reasons: list[str] = []
    prom_result: dict[str, Any] | None = None
    if verification is not None and verification.prometheus is not None:
        prom_ok, prom_result = prometheus_verdict(verification.prometheus)
        if not prom_ok:
            reasons.append(prom_result.get("reason", "prometheus check failed"))
    if analysis is not None:
        reasons.extend(analysis.get("reasons") or [])
    with session_scope() as s:
        found = running_record(s, execution_id, stage_index, phase, "verify")
        if found is None:
            return advance(execution_id)
        ex, run, pr = found
        checks = {
            c.host: c
            for c in s.exec(
                select(CheckRun).where(
                    CheckRun.execution_id == execution_id,
                    CheckRun.stage_index == stage_index,
                    CheckRun.phase == phase,
                )
            ).all()
        }
        failed, per_host = [], {}
        for host in pr.hosts:
            c = checks.get(host)
            per_host[host] = {
                "passed": bool(c and c.passed),
                "results": c.results if c else {},
                "reasons": c.reasons if c else ["the host's checks never ran"],
            }
            if not (c and c.passed):
                failed.append(host)
        passed, rule = within_budget(s, ex, run, pr, failed)
        passed = passed and not reasons
        pr.verdict = {
            "passed": passed,
            "hosts": len(pr.hosts),
            "succeeded": len(pr.hosts) - len(failed),
            "failed": failed,
            "checks": per_host,
            "prometheus": prom_result,
            "reasons": reasons,
            "rule": rule,
            **({"analysis": analysis} if analysis is not None else {}),
        }
        pr.status = Status.SUCCEEDED if passed else Status.FAILED
        pr.gate_at = utcnow()
        s.add(pr)
    return advance(execution_id)


def watch_check(execution_id: str, stage_index: int, seq: int) -> str:
    """One check of a stage's watch after deployment (app.coordinator.watch): measure outside
    the lock (Prometheus and the health checks may be slow), record and judge under it, send
    the next check after the commit; advance when the watch ended."""
    import time

    from app.coordinator.ledger import lock_execution
    from app.coordinator.publish import Dispatch, publish
    from app.verify.probes import http_check, prometheus_query
    from app.verify.watch import measure

    with session_scope() as s:
        found = watch_inputs(s, execution_id, stage_index, seq)
    if found is None:
        return "noop"
    sample = measure(
        found["spec"],
        url=found["url"],
        instances=found["instances"],
        health_urls=found["health_urls"],
        started=found["started"],
        now=time.time(),
        query=prometheus_query,
        check=http_check,
    )
    with session_scope() as s:
        ex = lock_execution(s, execution_id)
        rec = watch_record(s, execution_id, stage_index)
        if ex is None or rec is None or rec.status != Status.RUNNING:
            return "noop"
        if (rec.verdict or {}).get("seq") != seq:
            return "noop"  # a duplicate, or the reconciler sent a newer check
        state, wait = record_check(s, rec, sample, now=time.time())
        next_seq = int((rec.verdict or {}).get("seq") or 0)
    if wait is not None:
        publish(Dispatch("watch", execution_id, stage_index, next_seq, [], countdown=wait))
        return state
    return advance(execution_id)


def record_switch(
    execution_id: str,
    stage_index: int,
    phase: int,
    *,
    ok: bool,
    result: dict[str, Any],
    kind: str = "switch",
) -> str:
    """Record a traffic switch's outcome (and the new live set), then advance."""
    with session_scope() as s:
        found = running_record(s, execution_id, stage_index, phase, kind)
        if found is None:
            return advance(execution_id)
        ex, _, pr = found
        stage = deployment_stage(ex, stage_index)
        pr.verdict = {
            **result,
            "passed": ok,
            "live": pr.hosts if ok else result.get("live"),
            "service": stage.service.identifier,
            "environment": stage.environment.identifier,
        }
        pr.status = Status.SUCCEEDED if ok else Status.FAILED
        pr.gate_at = utcnow()
        s.add(pr)
    return advance(execution_id)


def discovery_done(execution_id: str, stage_index: int, results: list[dict[str, Any]]) -> str:
    """Body of a discovery chord: record the hosts each region's workers found (or why they
    could not), check that live workers can take the stage's tasks, then advance."""
    with session_scope() as s:
        found = running_record(s, execution_id, stage_index, -1, "discover")
        if found is None:
            return advance(execution_id)
        ex, run, rec = found
        stage_plan = deployment_stage(ex, stage_index)
        verdict = dict(rec.verdict or {})
        errors = [r for r in results if r.get("error")]
        hosts: list[dict[str, Any]] = []
        seen: dict[str, str] = {}
        problem, error_class = "", "Unknown"
        for r in results:
            for h in r.get("hosts", []):
                if h["name"] in seen:
                    problem = (
                        f"host {h['name']} appears in infrastructures "
                        f"'{seen[h['name']]}' and '{h['infrastructure']}'"
                    )
                seen[h["name"]] = h["infrastructure"]
                hosts.append(h)
        if errors:
            problem = "; ".join(str(e["error"]) for e in errors)
            error_class = str(errors[0].get("error_class") or "Unknown")
        elif not hosts:
            problem = (
                f"stage '{stage_plan.identifier}' targets no hosts: discovery found "
                "no running instance that matches"
            )
        elif not problem:
            missing = unserved_delegates(stage_plan, hosts)
            if missing:
                problem = "; ".join(missing)
        verdict.update(
            workers=[{"worker": r.get("worker"), "queue": r.get("queue")} for r in results],
            hosts=len(hosts),
        )
        if problem:
            verdict.update(error=problem, error_class=error_class)
            rec.status = Status.FAILED
        else:
            rec.status = Status.SUCCEEDED
            run.hosts = hosts
            s.add(run)
        rec.verdict, rec.gate_at = verdict, utcnow()
        rec.hosts = [h["name"] for h in hosts]
        s.add(rec)
    return advance(execution_id)
