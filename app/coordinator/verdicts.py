"""Phase verdicts from the ledger: which hosts passed, the failure budget, verification
checks and their Prometheus query.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Text, cast, or_
from sqlmodel import Session, col, select

from app.coordinator.instances import record_instances, record_rolled_back
from app.coordinator.ledger import deferred, deployment_stage
from app.coordinator.retry import retry_due
from app.definitions.models import PrometheusCheck
from app.definitions.plan import DeploymentStagePlan, StepPlan, step_when
from app.models import (
    Execution,
    HostStepRun,
    PhaseRun,
    StageRun,
    Status,
    utcnow,
)
from app.settings import get_settings
from strategies.basic import Phase


def evaluate_phase(s: Session, ex: Execution, run: StageRun, pr: PhaseRun, *, gate: bool) -> bool:
    """Write the phase verdict when every host of it is done; False while any still runs.

    Called by the gate (every header task has finished) or by a nudge (maybe not). A host is
    done when each step has a finished row, or a step failed (later steps are skipped); with the
    gate, a missing row means its task never ran, which counts as failed. A host with a step
    running or an attempt waiting to be retried is not done, whoever asks. A rollback phase
    passes when every host of it rolled back (no failure budget applies to a rollback).
    """
    kind = "rollback" if pr.kind == "rollback" else "deploy"
    targets = (run.rollback or {}).get("hosts", {})
    stage_plan = deployment_stage(ex, run.stage_index)

    def n_steps(host: str) -> int:
        if kind == "rollback":
            return int((targets.get(host) or {}).get("steps", 0))
        return len(stage_plan.steps)

    rows = s.exec(
        select(HostStepRun)
        .where(
            HostStepRun.execution_id == ex.id,
            HostStepRun.stage_index == run.stage_index,
            HostStepRun.phase == pr.phase,
            HostStepRun.kind == kind,
        )
        .options(*deferred(HostStepRun.stdout_tail, HostStepRun.stderr_tail, HostStepRun.outputs))
    ).all()
    by_host: dict[str, dict[int, HostStepRun]] = {}
    for r in rows:
        cur = by_host.setdefault(r.host, {}).get(r.step_index)
        if cur is None or r.attempt > cur.attempt:
            by_host[r.host][r.step_index] = r
    failed: list[str] = []
    per_host: dict[str, dict[str, Any]] = {}
    # Steps whose when lets them run after a failure (stageStatus Failure or All).
    after_failure_steps = {
        i
        for i, st in enumerate(stage_plan.steps)
        if any(
            w is not None and w.stage_status != "Success" for w in (step_when(st), st.group_when)
        )
    }
    for host in pr.hosts:
        steps = by_host.get(host, {})
        # Work in flight: a running step, or an attempt that waits for its retry (recorded
        # PENDING by the retry engine), however long the wait: the phase is not judged, even
        # by its gate (the retry's own chord ends with this phase's gate).
        # A host stopped at a Wait or approval step (WAITING) is not done either.
        if any(
            r.status in (Status.RUNNING, Status.PENDING, Status.WAITING) or retry_due(stage_plan, r)
            for r in steps.values()
        ):
            return False
        has_failed = any(r.status == Status.FAILED for r in steps.values())
        complete = len(steps) == n_steps(host) and all(
            r.status in Status.TERMINAL for r in steps.values()
        )
        if (
            has_failed
            and not (complete or gate)
            and kind == "deploy"
            and any(i not in steps for i in after_failure_steps)
        ):
            return False  # a step that runs after a failure (its when) is still to come
        if not (complete or has_failed or gate):
            return False
        ok = (
            complete
            and not has_failed
            and all(Status.passed(r.status, r.error) for r in steps.values())
        )
        if not ok:
            failed.append(host)
            bad = next(
                (
                    r
                    for r in sorted(steps.values(), key=lambda r: r.step_index)
                    if not Status.passed(r.status, r.error)
                ),
                None,
            )
            per_host[host] = {
                "step": bad.step_id if bad else None,
                "unit": bad.failed_unit if bad else None,
                "exit_code": bad.exit_code if bad else None,
                "error_class": (bad.error_class if bad else None) or "Unknown",
                "error": (bad.error if bad else None) or "the host's tasks never ran",
            }
    if kind == "rollback":
        passed, rule = not failed, "every host of the phase rolls back"
    else:
        passed, rule = within_budget(s, ex, run, pr, failed)
    pr.verdict = {
        **(pr.verdict or {}),
        "passed": passed,
        "hosts": len(pr.hosts),
        "succeeded": len(pr.hosts) - len(failed),
        "failed": failed,
        "failures": per_host,
        "rule": rule,
    }
    pr.status = Status.SUCCEEDED if passed else Status.FAILED
    pr.gate_at = utcnow()
    s.add(pr)
    ok_hosts = [h for h in pr.hosts if h not in failed]
    if kind == "rollback":
        record_rolled_back(s, ex, run, ok_hosts)
    elif stage_plan.type != "Custom":  # a Custom stage deploys nothing anywhere
        record_instances(s, ex, run, ok_hosts, phase=pr.phase)
    return True


def within_budget(
    s: Session, ex: Execution, run: StageRun, pr: PhaseRun, failed: list[str]
) -> tuple[bool, str]:
    """Does the stage stay within its failure budget, counting every phase so far?

    Like Ansible's max_fail_percentage, the budget must be *exceeded* to fail.
    """
    budget = deployment_stage(ex, run.stage_index).strategy.failure_budget
    total = len(run.hosts)
    allowed = max(budget.max_failed_hosts, int(budget.max_failed_percent * total / 100))
    # Only the verdicts that may name failed hosts: a passed phase whose verdict says
    # "failed": [] is left out in SQL (a verdict with any other text is read and checked).
    earlier = {
        h
        for v in s.exec(
            select(PhaseRun.verdict).where(
                PhaseRun.execution_id == ex.id,
                PhaseRun.stage_index == run.stage_index,
                PhaseRun.id != pr.id,
                col(PhaseRun.verdict).is_not(None),
                or_(
                    col(PhaseRun.status) != Status.SUCCEEDED,
                    ~cast(PhaseRun.verdict, Text).contains('"failed": []', autoescape=True),
                ),
            )
        ).all()
        for h in (v or {}).get("failed", [])
    }
    count = len(earlier | set(failed))
    rule = (
        f"at most {allowed} of {total} host(s) may fail in the stage"
        if allowed
        else "every host succeeds (failure budget 0)"
    )
    return count <= allowed, f"{rule}; {count} failed so far"


def prometheus_verdict(check: PrometheusCheck) -> tuple[bool, dict[str, Any]]:
    """Query Prometheus once for the phase and judge the value (app.verify.evaluate)."""
    from app.verify.probes import evaluate, prometheus_query

    url = check.url or get_settings().prometheus_url
    if not url:
        return False, {
            "reason": "a prometheus check needs a URL (prometheus.url or VMFARM_PROMETHEUS_URL)"
        }
    criterion = check.model_dump(include={"query", "below", "above"}, exclude_none=True)
    try:
        value = prometheus_query(url, check.query)
        ok, reasons = evaluate({"prometheus": criterion}, {"prometheus": value})
    except Exception as exc:  # a broken metric source fails the gate, with the reason
        return False, {"query": check.query, "reason": f"prometheus check failed: {exc}"}
    return ok, {"query": check.query, "value": value, "reason": "; ".join(reasons)}


def canary_verdict(
    stage: DeploymentStagePlan,
    hosts: list[dict[str, Any]],
    phases: list[dict[str, Any]],
    phase: int,
) -> dict[str, Any] | None:
    """The stage's canary analysis after ``phase`` (app.verify.canary): the hosts deployed so
    far against the hosts still on the current version (those of the later phases); None
    when the stage has no canary analysis. ``hosts`` and ``phases`` are the stage run's, as
    stored. Call it outside any transaction: it waits for Prometheus."""
    from app.definitions.expressions import render
    from app.providers.base import Host
    from app.units import host_context
    from app.verify.canary import analyse
    from app.verify.probes import prometheus_query

    spec = stage.strategy.verification.canary_analysis if stage.strategy.verification else None
    if spec is None:
        return None
    by_name = {h["name"]: Host.from_dict(h) for h in hosts}

    def labels(names: list[str]) -> list[str]:
        return [render(spec.instance, host_context(by_name[n], stage)) for n in names]

    planned = [Phase.from_dict(p) for p in phases]
    canary = [n for p in planned if p.index <= phase and p.kind == "deploy" for n in p.hosts]
    baseline = [n for p in planned if p.index > phase and p.kind == "deploy" for n in p.hosts]
    url = spec.prometheus_url or get_settings().prometheus_url
    if not url:
        return {
            "passed": False,
            "reasons": [
                "canary analysis needs a Prometheus URL (prometheusUrl or VMFARM_PROMETHEUS_URL)"
            ],
        }
    verdict = analyse(
        spec, url=url, canary=labels(canary), baseline=labels(baseline), query=prometheus_query
    )
    verdict["canary"]["hosts"], verdict["baseline"]["hosts"] = canary, baseline
    return verdict


def phase_failure(phase: Phase, record: PhaseRun) -> str:
    v = record.verdict or {}
    failed = v.get("failed", [])
    what = {
        "deploy": "failed",
        "verify": "failed verification",
        "switch": "could not take traffic",
    }.get(record.kind, "failed")
    if record.kind == "switch":
        return f"{phase.name}: traffic switch failed: {v.get('error', 'unknown error')}"
    hosts = ", ".join(failed[:10]) + (" ..." if len(failed) > 10 else "")
    extra = f" ({'; '.join(v['reasons'])})" if v.get("reasons") else ""
    if not failed and extra:  # every host passed its checks; the phase as a whole did not
        return f"{phase.name} {what}: {'; '.join(v['reasons'])}"
    return f"{len(failed)} host(s) {what} in {phase.name}: {hosts}{extra}"


def failures_of(stage: DeploymentStagePlan, pr: PhaseRun) -> list[tuple[StepPlan | None, str]]:
    """(failed step, error class) per failed host of a deploy phase."""
    steps = {st.identifier: st for st in stage.steps}
    out: list[tuple[StepPlan | None, str]] = []
    for f in ((pr.verdict or {}).get("failures") or {}).values():
        out.append((steps.get(f.get("step") or ""), f.get("error_class") or "Unknown"))
    return out or [(None, "Unknown")]
