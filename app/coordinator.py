"""The coordinator: turns pipeline files into an execution and drives it phase by phase.

``submit()`` validates, resolves and records an execution, then calls ``advance()``.
``advance()`` is the only place that decides what happens next. It is idempotent and may be
called any number of times, from the CLI, the gate, an error callback or a reconciler: it locks
the execution row (``SELECT ... FOR UPDATE``; SQLite: ``BEGIN IMMEDIATE``), reads the ledger,
records its decision (a unique PhaseRun row per dispatch), and publishes the next canvas only
after the commit.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Text, cast, func, insert, or_
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.orm import defer
from sqlalchemy.orm.attributes import set_committed_value
from sqlmodel import Session, col, select

from app.canvas import HostStepKey
from app.db import session_scope
from app.definitions.base import parse_duration
from app.definitions.models import INTERVENTION_ACTIONS
from app.errors import ConfigError, SpecError
from app.models import (
    Execution,
    HostStepRun,
    Instance,
    PhaseRun,
    StageRun,
    Status,
    StepRun,
    utcnow,
)
from app.providers.base import Host, discover
from app.settings import get_settings
from strategies.basic import Phase

log = logging.getLogger("vmfarm.coordinator")


def new_execution_id() -> str:
    return uuid.uuid4().hex[:12]


def submit(
    paths: Iterable[str],
    *,
    pipeline: str | None = None,
    inputs: Mapping[str, str] | None = None,
    user: str = "",
    publish: bool = True,
) -> str:
    """Validate and record an execution, dispatch its first phase; return the execution id.

    Raises SpecError/SpecErrors (nothing is recorded) when the files or inputs are wrong.
    """
    from app import audit, policy, rbac

    execution_id = new_execution_id()
    plan, stage_hosts = prepare(paths, pipeline=pipeline, inputs=inputs,
                                execution_id=execution_id)
    who = user or get_settings().user or ""
    rbac.guard("run", user=who, plan=plan, execution_id=execution_id)
    warnings = policy.enforce(plan, stage_hosts, user=who, execution_id=execution_id)
    host_dicts = [[h.to_dict() for h in hosts] for hosts in stage_hosts]  # once: 10,000s
    refused = [f"stage '{st['identifier']}': {why}"
               for st, hosts in zip(plan["stages"], host_dicts, strict=True)
               for why in unserved_delegates(st, hosts)]
    # Cloud hosts are listed by their region's workers: one with the tags must be live.
    refused += [f"stage '{st['identifier']}', infrastructure '{infra['identifier']}': {why}"
                for st in plan["stages"] if st.get("type") != "Approval"
                and _discovered_by_workers(st) for infra in st["infrastructures"]
                for chosen, why in [_choose_tags(
                    st, discovery_region(infra),
                    _wanted_tags(st, {"infrastructure": infra["identifier"]}, None))]
                if chosen is None]
    if refused:  # nothing is recorded: no live worker could take this work
        raise ConfigError("; ".join(refused) + " (start one with `vmfarm worker --region R "
                          "--tags ...`, or give the stage a delegateFallback)")
    with session_scope() as s:
        ex = Execution(
            id=execution_id, pipeline=plan["identifier"], pipeline_name=plan["name"],
            plan=plan, inputs={k: str(v) for k, v in (inputs or {}).items()},
            created_by=user or get_settings().user or "",
        )
        s.add(ex)
        s.flush()
        for i, stage in enumerate(plan["stages"]):
            s.add(StageRun(execution_id=execution_id, stage_index=i,
                           identifier=stage["identifier"], name=stage["name"],
                           hosts=host_dicts[i]))
            for j, step in enumerate(stage["steps"]):
                s.add(StepRun(execution_id=execution_id, stage_index=i, step_index=j,
                              identifier=step["identifier"], name=step.get("name", "")))
    audit.record("run", user=who, execution_id=execution_id, pipeline=plan["identifier"],
                 detail={"inputs": sorted(inputs or {}),
                         "policy_warnings": [f.to_dict() for f in warnings]},
                 outcome="submitted")
    if publish:
        advance(execution_id)
    return execution_id


def prepare(paths: Iterable[str], *, pipeline: str | None, inputs: Mapping[str, str] | None,
            execution_id: str) -> tuple[dict[str, Any], list[list[Host]]]:
    """Load, validate and resolve the files; discover static hosts (bad input raises)."""
    from app.definitions import choose_pipeline, load, resolve

    # The mapping as given: an input set's values remember the file and line they came from.
    bundle = load(paths, inputs=inputs if inputs is not None else {}, require_inputs=True)
    pipe = choose_pipeline(bundle, pipeline)
    plan = resolve(bundle, pipe, execution_id=execution_id)
    # Discover static hosts now: a bad host list is bad input, refused before anything runs.
    stage_hosts = [_discover_stage(st) if st.get("type") != "Approval" and _all_static(st)
                   else [] for st in plan["stages"]]
    return plan, stage_hosts


def dry_run(paths: Iterable[str], *, pipeline: str | None = None,
            inputs: Mapping[str, str] | None = None) -> dict[str, Any]:
    """What a run would do, as plain data: hosts per region, phases, every command unit
    rendered for the stage's first host, and what happens on failure. Touches no host and
    writes nothing."""
    from strategies import plan as plan_phases
    from tasks.hoststep import render_step

    plan, stage_hosts = prepare(paths, pipeline=pipeline, inputs=inputs,
                                execution_id="<dry-run>")
    stages: list[dict[str, Any]] = []
    for stage, hosts in zip(plan["stages"], stage_hosts, strict=True):
        if stage.get("type") == "Approval":
            approvers = stage["approval"]["spec"]["approvers"]
            stages.append({"identifier": stage["identifier"], "type": "Approval",
                           "approval": stage["approval"],
                           "summary": f"waits for {approvers.get('minimumCount', 1)} approval(s) "
                                      f"from {', '.join(approvers['userGroups'])}"})
            continue
        by_region: dict[str, list[str]] = {}
        for h in hosts:
            by_region.setdefault(h.region, []).append(h.name)
        strategy = stage["strategy"]
        notes = []
        live: list[str] = []
        if strategy.get("type") == "BlueGreen":
            with session_scope() as s:
                ex = Execution(id="<dry-run>", pipeline="", plan=plan)
                live = _live_set(s, ex, stage)
            notes.append(f"traffic is live on: {', '.join(live) if live else 'no host yet'}")
        slots = {h.name: str(h.attributes["slot"]) for h in hosts if h.attributes.get("slot")}
        phases = [p.to_dict() for p in plan_phases(stage, [h.name for h in hosts],
                                                   live=live, slots=slots)] if hosts else []
        sample = hosts[0] if hosts else None
        steps = [render_step(stage, step, sample) for step in stage["steps"]]
        stages.append({
            "identifier": stage["identifier"],
            "service": stage["service"]["identifier"],
            "environment": stage["environment"]["identifier"],
            "version": (stage.get("artifact") or {}).get("tag"),
            "strategy": strategy,
            "hosts_by_region": by_region if hosts else "discovered when the run starts",
            "phases": phases,
            "rendered_for": sample.name if sample else None,
            "steps": steps,
            "on_failure": _failure_policy(stage),
            "notes": notes,
        })
    return {"pipeline": plan["identifier"], "name": plan["name"], "stages": stages}


def _failure_policy(stage: dict[str, Any]) -> str:
    budget = stage["strategy"].get("failureBudget") or {}
    allowed = budget.get("maxFailedHosts") or 0
    pct = budget.get("maxFailedPercent") or 0
    tolerance = (f"up to {allowed} host(s) or {pct:g}% may fail; more fails the stage"
                 if allowed or pct else "any failed host fails the stage")
    action = stage_action(stage, [(None, "AllErrors")])["type"]
    how = ("its rollbackSteps run on every host it changed" if stage.get("rollbackSteps")
           else "every host it changed is redeployed with its previous version")
    then = {"StageRollback": f"the stage rolls back ({how}), phases in reverse order",
            "PipelineRollback": f"this stage and the earlier ones roll back ({how})",
            "Abort": "the execution is aborted; hosts keep what they have",
            "ManualIntervention": "the execution waits for a person (vmfarm intervene)",
            "MarkAsFailure": "the stage fails; hosts keep what they have",
            "Ignore": "the failure is ignored and the stage goes on",
            "MarkAsSuccess": "the failure is marked as success and the stage goes on"}[action]
    return f"{tolerance}; later phases and stages do not start; {then}."


def retry_failed(execution_id: str, *, user: str = "", publish: bool = True) -> str:
    """A new execution of the same plan on the hosts that did not succeed; returns its id.

    Stages where every host succeeded are skipped; so are approvals that were granted. The
    ledger keeps both executions: the new one names the one it retries.
    """
    with session_scope() as s:
        ex = s.get(Execution, execution_id)
        if ex is None:
            raise LookupError(f"no execution '{execution_id}'")
        if ex.status not in Status.TERMINAL:
            raise LookupError(f"execution {execution_id} is still {ex.status}; retry it when "
                              "it has ended (or abort it)")
        runs = s.exec(select(StageRun).where(StageRun.execution_id == execution_id)
                      .order_by(col(StageRun.stage_index))).all()
        rows = s.exec(select(HostStepRun).where(HostStepRun.execution_id == execution_id,
                                                HostStepRun.kind == "deploy")).all()
        approvals = {p.stage_index: p.status for p in s.exec(select(PhaseRun).where(
            PhaseRun.execution_id == execution_id, PhaseRun.kind == "approval")).all()}
        plan, inputs, stages = ex.plan, dict(ex.inputs), []
        for run in runs:
            latest: dict[tuple[str, int], HostStepRun] = {}
            for r in rows:
                if r.stage_index == run.stage_index:
                    k = (r.host, r.step_index)
                    if k not in latest or r.attempt > latest[k].attempt:
                        latest[k] = r
            n_steps = len(plan["stages"][run.stage_index]["steps"])
            redo = [h for h in run.hosts
                    if not all((latest.get((h["name"], i)) is not None
                                and latest[(h["name"], i)].status in Status.PASSED)
                               for i in range(n_steps))]
            skip = (approvals.get(run.stage_index) == Status.SUCCEEDED
                    if plan["stages"][run.stage_index].get("type") == "Approval"
                    else not redo)
            stages.append((run, redo, skip))
    if all(skip for _, _, skip in stages):
        raise LookupError(f"execution {execution_id} has no failed host to retry")
    new_id = new_execution_id()
    # <+pipeline.executionId> was rendered into the plan: the retry is a new execution, so it
    # names its own id (ids are 12 random hex digits: replacing them is exact).
    plan = json.loads(json.dumps(plan).replace(execution_id, new_id))
    with session_scope() as s:
        s.add(Execution(id=new_id, pipeline=plan["identifier"], pipeline_name=plan["name"],
                        plan=plan, inputs={**inputs, "retry_of": execution_id},
                        created_by=user or get_settings().user or ""))
        s.flush()
        for run, redo, skip in stages:
            s.add(StageRun(execution_id=new_id, stage_index=run.stage_index,
                           identifier=run.identifier, name=run.name, hosts=redo,
                           status=Status.SKIPPED if skip else Status.PENDING))
            for j, step in enumerate(plan["stages"][run.stage_index]["steps"]):
                s.add(StepRun(execution_id=new_id, stage_index=run.stage_index, step_index=j,
                              identifier=step["identifier"], name=step.get("name", "")))
    if publish:
        advance(new_id)
    return new_id


def _all_static(stage: dict[str, Any]) -> bool:
    return all(i["provider"] == "static" for i in stage["infrastructures"])


def _discover_stage(stage: dict[str, Any]) -> list[Host]:
    hosts: list[Host] = []
    seen: dict[str, str] = {}
    for infra in stage["infrastructures"]:
        for h in discover(infra):
            if h.name in seen:
                raise SpecError(
                    f"host {h.name} appears in infrastructures '{seen[h.name]}' and "
                    f"'{infra['identifier']}' of stage '{stage['identifier']}'",
                    file=infra.get("source", ""))
            seen[h.name] = infra["identifier"]
            hosts.append(h)
    if not hosts:
        raise SpecError(f"stage '{stage['identifier']}' targets no hosts",
                        file=stage["infrastructures"][0].get("source", "") if
                        stage["infrastructures"] else "")
    return hosts


@dataclass
class _Dispatch:
    """Something to publish after the commit: one phase's deploy, verify or switch canvas."""

    kind: str
    execution_id: str
    stage_index: int
    phase: int
    hosts: list[tuple[str, str]]
    step_count: int = 0
    lanes: int | None = None
    steps_of: dict[str, tuple[int, tuple[str, int] | None]] | None = None
    countdown: float = 0.0
    tags_of: dict[tuple[str, int], tuple[str, ...]] | None = None
    discover: list[tuple[dict[str, Any], str, tuple[str, ...]]] | None = None


# --- what never changes once written, read once per process -------------------------------------
#
# An execution's plan never changes once it is recorded, nor do a started stage's hosts and
# phases. With 10,000 hosts they are megabytes of JSON: reading and decoding them at every gate
# and every advance made a stage cost O(hosts x phases), O(hosts^2) with phases of a fixed size.
# The coordinator reads them once per process. Entries are keyed by database, execution id and
# creation time (a test database may reuse an id) and only hold what was read back committed.

_MEMO_SIZE = 16
_memo_lock = threading.Lock()
_plans: OrderedDict[tuple[Any, ...], dict[str, Any]] = OrderedDict()
_stages: OrderedDict[tuple[Any, ...], _StageData] = OrderedDict()


@dataclass
class _StageData:
    """A started stage's hosts and phases as stored, and what the coordinator derives."""

    hosts: list[dict[str, Any]]
    phases: list[dict[str, Any]]
    by_name: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Position in ``phases`` of the phase with each index.
    position: dict[int, int] = field(default_factory=dict)

    @classmethod
    def of(cls, run: StageRun) -> _StageData:
        return cls(run.hosts, run.phases, {h["name"]: h for h in run.hosts},
                   {int(ph["index"]): i for i, ph in enumerate(run.phases)})


def _memo_get(memo: OrderedDict[tuple[Any, ...], Any], key: tuple[Any, ...]) -> Any:
    with _memo_lock:
        hit = memo.get(key)
        if hit is not None:
            memo.move_to_end(key)
        return hit


def _memo_put(memo: OrderedDict[tuple[Any, ...], Any], key: tuple[Any, ...], value: Any) -> None:
    with _memo_lock:
        memo[key] = value
        memo.move_to_end(key)
        while len(memo) > _MEMO_SIZE:
            memo.popitem(last=False)


def _deferred(*attrs: Any) -> list[Any]:
    """Load options: these (large) columns are read only when used."""
    return [defer(a) for a in attrs]


def _db_key(s: Session) -> str:
    return str(s.get_bind().engine.url)


def _lock_execution(s: Session, execution_id: str) -> Execution | None:
    """The execution row, locked; its plan from this process's memory after the first read."""
    stmt = select(Execution).where(Execution.id == execution_id).options(
        *_deferred(Execution.plan))
    if s.get_bind().dialect.name == "postgresql":
        stmt = stmt.with_for_update()
    ex = s.exec(stmt).first()
    if ex is not None and "plan" in sa_inspect(ex).unloaded:
        key = (_db_key(s), ex.id, ex.created_at)
        plan = _memo_get(_plans, key)
        if plan is None:
            plan = s.exec(select(Execution.plan).where(Execution.id == ex.id)).one()
            _memo_put(_plans, key, plan)
        set_committed_value(ex, "plan", plan)
    return ex


def _stage_run(s: Session, ex: Execution, stage_index: int) -> StageRun:
    """A stage's row; once the stage has started, its hosts and phases come from memory."""
    key = (_db_key(s), ex.id, ex.created_at, stage_index)
    data: _StageData | None = _memo_get(_stages, key)
    where = (StageRun.execution_id == ex.id, StageRun.stage_index == stage_index)
    if data is None:
        run = s.exec(select(StageRun).where(*where)).one()
        if run.status != Status.PENDING and run.phases:
            _memo_put(_stages, key, _StageData.of(run))
        return run
    run = s.exec(select(StageRun).where(*where).options(
        *_deferred(StageRun.hosts, StageRun.phases))).one()
    unloaded = sa_inspect(run).unloaded
    if "hosts" in unloaded:
        set_committed_value(run, "hosts", data.hosts)
    if "phases" in unloaded:
        set_committed_value(run, "phases", data.phases)
    return run


def _stage_data(s: Session, ex: Execution, run: StageRun) -> _StageData:
    """The derived maps of a stage (from memory when it was read back started)."""
    data: _StageData | None = _memo_get(_stages, (_db_key(s), ex.id, ex.created_at,
                                                  run.stage_index))
    if data is not None and data.hosts is run.hosts and data.phases is run.phases:
        return data
    return _StageData.of(run)


def advance(execution_id: str) -> str:
    """Decide and perform the next action for an execution; returns what it did."""
    dispatches: list[_Dispatch] = []
    with session_scope() as s:
        ex = _lock_execution(s, execution_id)
        if ex is None:
            return "missing"
        if ex.status in Status.TERMINAL:
            return "noop"
        before = _snapshot(s, ex)
        decision = _decide(s, ex, dispatches)
        after = _snapshot(s, ex)
    # Publish only after COMMIT: a task must never run before its rows are visible.
    for d in dispatches:
        _publish(d)
    _notify(execution_id, before, after)
    return decision


def _snapshot(s: Session, ex: Execution) -> dict[str, Any] | None:
    """What notifications compare (app.notify.snapshot); None when the pipeline has no
    notification rules (nothing to compare, nothing to read)."""
    if not ex.plan.get("notificationRules"):
        return None
    from app.notify import snapshot

    s.flush()
    runs: Any = s.exec(select(StageRun.stage_index, StageRun.status).where(  # no hosts
        StageRun.execution_id == ex.id)).all()
    return snapshot(ex, runs)


def _notify(execution_id: str, before: dict[str, Any] | None,
            after: dict[str, Any] | None) -> None:
    """Send the notifications of a transition (pipeline started, failed, stage failed,
    approval needed, rollback done...) once, after the commit: from a control task, so a slow
    webhook never holds up the coordinator; inline in embedded mode (the worker there stops
    with the run)."""
    if after is None or before == after:
        return
    from app.notify import events_for

    if not events_for(before, after):
        return
    if get_settings().embedded:
        send_notifications(execution_id, before, after)
        return
    from tasks.control import notify_task

    notify_task.apply_async(kwargs={"execution_id": execution_id, "before": before,
                                    "after": after})


def send_notifications(execution_id: str, before: dict[str, Any] | None,
                       after: dict[str, Any]) -> int:
    """Deliver the transition's notifications, secrets masked; returns how many were sent.
    Each transition is seen once, under the execution's lock, so each event is sent once."""
    from app.notify import notify_transition
    from app.secrets import mask

    sent = notify_transition(execution_id, before, after, claim=lambda _key: True, mask=mask)
    return sum(1 for d in sent if d.ok)


def _discovered_by_workers(stage_plan: dict[str, Any]) -> bool:
    """Cloud hosts are listed by the region's workers (they hold its credentials); embedded
    runs, and static host lists, need no task."""
    return not get_settings().embedded and not _all_static(stage_plan)


def discovery_region(infra: dict[str, Any]) -> str:
    """The region whose workers list an infrastructure's hosts: its ``region``, else the first
    of ``hostFilter.spec.regions``, else ``default``."""
    spec = infra.get("spec") or {}
    regions = ((spec.get("hostFilter") or {}).get("spec") or {}).get("regions") or []
    return str(spec.get("region") or (regions[0] if regions else "") or "default")


def _decide_discovery(s: Session, ex: Execution, run: StageRun, stage_plan: dict[str, Any],
                      dispatches: list[_Dispatch]) -> str:
    """'' once the stage's hosts are known, else what is happening (discovery sent, waiting,
    or the stage failed)."""
    rec = s.exec(select(PhaseRun).where(PhaseRun.execution_id == ex.id,
                                        PhaseRun.stage_index == run.stage_index,
                                        PhaseRun.kind == "discover")).first()
    if rec is None:
        work, problems = [], []
        for infra in stage_plan["infrastructures"]:
            region = discovery_region(infra)
            want = _wanted_tags(stage_plan, {"infrastructure": infra["identifier"]}, None)
            chosen, why = _choose_tags(stage_plan, region, want)
            if chosen is None:
                problems.append(f"infrastructure '{infra['identifier']}': {why}")
            work.append((infra, region, want if chosen is None else chosen))
        rec = PhaseRun(execution_id=ex.id, stage_index=run.stage_index, phase=-1,
                       kind="discover", hosts=[],
                       verdict={"infrastructures": [{"identifier": i["identifier"],
                                                     "region": r, "tags": list(t)}
                                                    for i, r, t in work]})
        if problems:  # nobody could list the hosts: fail now instead of waiting in a queue
            rec.status, rec.gate_at = Status.FAILED, utcnow()
            rec.verdict = {**(rec.verdict or {}), "error": "; ".join(problems),
                           "error_class": "Unknown"}
        s.add(rec)
        s.flush()
        if ex.status == Status.QUEUED:
            ex.status, ex.started_at = Status.RUNNING, utcnow()
            s.add(ex)
        run.started_at = utcnow()
        s.add(run)
        if not problems:
            dispatches.append(_Dispatch("discover", ex.id, run.stage_index, -1, [],
                                        discover=work))
            return "discovering hosts"
    if rec.status == Status.RUNNING:
        return "discovering hosts"
    if rec.status == Status.FAILED:
        v = rec.verdict or {}
        return _stage_failed(s, ex, run, v.get("error", "host discovery failed"),
                             [(None, v.get("error_class") or "Unknown")], None, dispatches) \
            or _fail_stage(s, ex, run, v.get("error", "host discovery failed"))
    return ""


def discovery_done(execution_id: str, stage_index: int, results: list[dict[str, Any]]) -> str:
    """Body of a discovery chord: record the hosts each region's workers found (or why they
    could not), check that live workers can take the stage's tasks, then advance."""
    with session_scope() as s:
        found = _running_record(s, execution_id, stage_index, -1, "discover")
        if found is None:
            return advance(execution_id)
        ex, run, rec = found
        stage_plan = ex.plan["stages"][stage_index]
        verdict = dict(rec.verdict or {})
        errors = [r for r in results if r.get("error")]
        hosts: list[dict[str, Any]] = []
        seen: dict[str, str] = {}
        problem, error_class = "", "Unknown"
        for r in results:
            for h in r.get("hosts", []):
                if h["name"] in seen:
                    problem = (f"host {h['name']} appears in infrastructures "
                               f"'{seen[h['name']]}' and '{h['infrastructure']}'")
                seen[h["name"]] = h["infrastructure"]
                hosts.append(h)
        if errors:
            problem = "; ".join(str(e["error"]) for e in errors)
            error_class = str(errors[0].get("error_class") or "Unknown")
        elif not hosts:
            problem = (f"stage '{stage_plan['identifier']}' targets no hosts: discovery found "
                       "no running instance that matches")
        elif not problem:
            missing = unserved_delegates(stage_plan, hosts)
            if missing:
                problem = "; ".join(missing)
        verdict.update(workers=[{"worker": r.get("worker"), "queue": r.get("queue")}
                                for r in results], hosts=len(hosts))
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


def _start_stage(s: Session, ex: Execution, run: StageRun, stage_plan: dict[str, Any]) -> str:
    """Discover the stage's hosts and plan its phases; '' or an error message."""
    from strategies import plan as plan_phases

    try:
        hosts = [Host.from_dict(h) for h in run.hosts] or _discover_stage(stage_plan)
        names = [h.name for h in hosts]
        slots = {h.name: str(h.attributes["slot"]) for h in hosts if h.attributes.get("slot")}
        live = _live_set(s, ex, stage_plan) if stage_plan["strategy"].get("type") == \
            "BlueGreen" else []
        phases = plan_phases(stage_plan, names, live=live, slots=slots)
    except (ConfigError, SpecError, ValueError) as exc:
        return str(exc)
    # Rewrite the (large) host list only when it was not stored in its normal form already.
    normal = [{f.name: getattr(h, f.name) for f in fields(Host)} for h in hosts]
    if normal != run.hosts:
        run.hosts = [h.to_dict() for h in hosts]
    run.phases = [p.to_dict() for p in phases]
    run.status, run.started_at = Status.RUNNING, utcnow()
    if ex.status == Status.QUEUED:
        ex.status, ex.started_at = Status.RUNNING, utcnow()
    s.add(ex)
    s.add(run)
    return ""


def _decide(s: Session, ex: Execution, dispatches: list[_Dispatch]) -> str:
    if ex.status == Status.ROLLING_BACK:
        return _decide_rollback(s, ex, dispatches)
    stages = ex.plan["stages"]
    while True:
        if ex.current_stage >= len(stages):
            _finish(s, ex, Status.SUCCEEDED)
            return "succeeded"
        stage_plan = stages[ex.current_stage]
        run = _stage_run(s, ex, ex.current_stage)
        if run.status == Status.SKIPPED:  # a retry leaves out stages that need nothing
            ex.current_stage += 1
            s.add(ex)
            continue
        if stage_plan.get("type") == "Approval":
            outcome = _decide_approval(s, ex, run, stage_plan, dispatches)
            if outcome:
                return outcome
            continue
        if run.status == Status.PENDING and not run.hosts and _discovered_by_workers(
                stage_plan):
            outcome = _decide_discovery(s, ex, run, stage_plan, dispatches)
            if outcome:
                return outcome
        if run.status == Status.PENDING:
            problem = _start_stage(s, ex, run, stage_plan)
            if problem:
                return _stage_failed(s, ex, run, problem, [(None, "Unknown")], None,
                                     dispatches) or _fail_stage(s, ex, run, problem)
        # Phases run one after another: every phase before the last one dispatched has passed
        # its gates. Read the records from that one on (not all of them at every advance).
        latest = s.exec(select(func.max(PhaseRun.phase)).where(
            PhaseRun.execution_id == ex.id, PhaseRun.stage_index == run.stage_index,
            col(PhaseRun.kind).in_(["deploy", "switch"]))).one()
        records = {(p.phase, p.kind): p for p in s.exec(select(PhaseRun).where(
            PhaseRun.execution_id == ex.id, PhaseRun.stage_index == run.stage_index,
            PhaseRun.phase >= (latest if latest is not None else -1))).all()}
        verification = stage_plan["strategy"].get("verification")
        start = 0 if latest is None else _stage_data(s, ex, run).position.get(int(latest), 0)
        for i in range(start, len(run.phases)):
            phase = Phase.from_dict(run.phases[i])
            main = records.get((phase.index, phase.kind))
            if main is None:
                _dispatch(s, ex, run, phase, phase.kind, dispatches)
                return f"dispatched {phase.name}"
            if main.status == Status.RUNNING and not (
                    phase.kind == "deploy" and _evaluate_phase(s, ex, run, main, gate=False)):
                return "waiting"
            if main.status == Status.FAILED:
                outcome = _stage_failed(s, ex, run, _phase_failure(phase, main),
                                        _failures_of(stage_plan, main), main, dispatches)
                if outcome:
                    return outcome
            if phase.verify and verification:
                check = records.get((phase.index, "verify"))
                if check is None:
                    _dispatch(s, ex, run, phase, "verify", dispatches)
                    return f"verifying {phase.name}"
                if check.status == Status.RUNNING:
                    return "waiting"
                if check.status == Status.FAILED:
                    outcome = _stage_failed(s, ex, run, _phase_failure(phase, check),
                                            [(None, "Verification")], check, dispatches)
                    if outcome:
                        return outcome
        _summarise_steps(s, ex, run)
        run.status, run.finished_at = Status.SUCCEEDED, utcnow()
        s.add(run)
        ex.current_stage += 1
        s.add(ex)


def _approval_record(s: Session, ex: Execution, stage_index: int) -> PhaseRun | None:
    return s.exec(select(PhaseRun).where(PhaseRun.execution_id == ex.id,
                                         PhaseRun.stage_index == stage_index,
                                         PhaseRun.kind == "approval")).first()


def _decide_approval(s: Session, ex: Execution, run: StageRun,
                     stage_plan: dict[str, Any], dispatches: list[_Dispatch]) -> str:
    """An Approval stage: wait (no work in flight) until approved, rejected or timed out.

    Returns what happened, or '' when the stage is approved and the next one may start."""
    rec = _approval_record(s, ex, run.stage_index)
    if rec is None:
        step = stage_plan["approval"]
        s.add(PhaseRun(execution_id=ex.id, stage_index=run.stage_index, phase=0,
                       kind="approval", hosts=[], verdict={
                           "message": step["spec"].get("approvalMessage", ""),
                           "groups": step["spec"]["approvers"]["userGroups"],
                           "required": step["spec"]["approvers"].get("minimumCount", 1),
                           "approvals": [], "rejected_by": None}))
        run.status, run.started_at = Status.RUNNING, utcnow()
        ex.status = Status.WAITING
        ex.started_at = ex.started_at or utcnow()
        s.add(run)
        s.add(ex)
        return "waiting for approval"
    if rec.status == Status.RUNNING:
        return "waiting for approval"
    if rec.status == Status.FAILED:
        reason = (rec.verdict or {}).get("reason", "approval failed")
        cls = "ApprovalRejection" if (rec.verdict or {}).get("rejected_by") else "Timeout"
        outcome = _stage_failed(s, ex, run, reason, [(None, cls)], rec, dispatches)
        if outcome:
            return outcome
    run.status, run.finished_at = Status.SUCCEEDED, utcnow()
    s.add(run)
    ex.current_stage += 1
    s.add(ex)
    return ""


class ApprovalRefused(Exception):
    """The caller may not approve or reject this execution (the message says why)."""


def _approvers(groups: list[str]) -> set[str]:
    import yaml

    path = get_settings().users_file
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as exc:
        raise ConfigError(f"cannot read the users file {path} ({exc.strerror}); set "
                          "VMFARM_USERS_FILE") from None
    known = data.get("groups") or {}
    missing = [g for g in groups if g not in known]
    if missing:
        raise ConfigError(f"user group(s) {', '.join(missing)} are not in {path} "
                          f"(groups there: {', '.join(sorted(known)) or 'none'})")
    return {str(u) for g in groups for u in known[g] or []}


def decide_approval(execution_id: str, *, user: str, approve: bool, comment: str = "") -> str:
    """Record an approval or a rejection by ``user``; returns what it did.

    Raises ApprovalRefused (not an approver, the pipeline's executor when that is disallowed,
    a second vote) and LookupError (no such execution, or it waits for no approval).
    """
    with session_scope() as s:
        ex = _lock_execution(s, execution_id)
        if ex is None:
            raise LookupError(f"no execution '{execution_id}'")
        rec = _approval_record(s, ex, ex.current_stage) if ex.status == Status.WAITING else None
        if rec is None or rec.status != Status.RUNNING:
            raise LookupError(f"execution {execution_id} is not waiting for an approval "
                              f"(it is {ex.status})")
        spec = ex.plan["stages"][ex.current_stage]["approval"]["spec"]["approvers"]
        verdict = dict(rec.verdict or {})
        if user not in _approvers(spec["userGroups"]):
            raise ApprovalRefused(f"{user or 'this user'} is not in the approver groups "
                                  f"{', '.join(spec['userGroups'])}")
        if approve and spec.get("disallowPipelineExecutor") and user == ex.created_by:
            raise ApprovalRefused(f"{user} started this execution and this approval disallows "
                                  "the pipeline executor; another approver must approve")
        if any(a["user"] == user for a in verdict.get("approvals", [])):
            raise ApprovalRefused(f"{user} has already approved this execution")
        entry = {"user": user, "comment": comment, "at": utcnow().isoformat() + "Z"}
        if approve:
            verdict["approvals"] = [*verdict.get("approvals", []), entry]
            done = len(verdict["approvals"]) >= int(verdict.get("required", 1))
            if done:
                rec.status, rec.gate_at = Status.SUCCEEDED, utcnow()
                ex.status = Status.RUNNING
            outcome = (f"approved by {user} ({len(verdict['approvals'])} of "
                       f"{verdict.get('required', 1)})")
        else:
            verdict["rejected_by"] = entry
            verdict["reason"] = f"approval rejected by {user}" + (f": {comment}" if comment
                                                                    else "")
            rec.status, rec.gate_at = Status.FAILED, utcnow()
            ex.status = Status.RUNNING
            done = True
            outcome = f"rejected by {user}"
        rec.verdict = verdict
        s.add(rec)
        s.add(ex)
    if done:
        outcome += f"; execution {advance(execution_id)}"
    return outcome


def _phase_failure(phase: Phase, record: PhaseRun) -> str:
    v = record.verdict or {}
    failed = v.get("failed", [])
    what = {"deploy": "failed", "verify": "failed verification",
            "switch": "could not take traffic"}.get(record.kind, "failed")
    if record.kind == "switch":
        return f"{phase.name}: traffic switch failed: {v.get('error', 'unknown error')}"
    hosts = ", ".join(failed[:10]) + (" ..." if len(failed) > 10 else "")
    extra = f" ({'; '.join(v['reasons'])})" if v.get("reasons") else ""
    return f"{len(failed)} host(s) {what} in {phase.name}: {hosts}{extra}"


def _fail_stage(s: Session, ex: Execution, run: StageRun, error: str) -> str:
    _summarise_steps(s, ex, run)
    run.status, run.error, run.finished_at = Status.FAILED, error, utcnow()
    s.add(run)
    _finish(s, ex, Status.FAILED, error=f"stage '{run.identifier}': {error}")
    return "failed"


# --- failure strategies at the stage: rollback, manual intervention, abort ---------------------

# When hosts of one phase fail in different ways, the strongest action wins.
_SEVERITY = ("PipelineRollback", "StageRollback", "Abort", "ManualIntervention", "MarkAsFailure",
             "Ignore", "MarkAsSuccess")


def _failures_of(stage: dict[str, Any], pr: PhaseRun) -> list[tuple[dict[str, Any] | None, str]]:
    """(failed step, error class) per failed host of a deploy phase."""
    steps = {st["identifier"]: st for st in stage["steps"]}
    out: list[tuple[dict[str, Any] | None, str]] = []
    for f in ((pr.verdict or {}).get("failures") or {}).values():
        out.append((steps.get(f.get("step") or ""), f.get("error_class") or "Unknown"))
    return out or [(None, "Unknown")]


def stage_action(stage: dict[str, Any],
                 failures: list[tuple[dict[str, Any] | None, str]]) -> dict[str, Any]:
    """The failure strategy action for a failed phase (Harness precedence per failure, then the
    strongest across failures). A Retry that ran out gives its onRetryFailure action. With no
    matching strategy a deployment stage rolls back; an approval stage just fails."""
    from tasks.hoststep import failure_action

    default = {"type": "MarkAsFailure"} if stage.get("type") == "Approval" else \
        {"type": "StageRollback"}
    chosen: dict[str, Any] | None = None
    for step, error_class in failures:
        action = failure_action(step, stage, error_class)
        while action is not None and action["type"] == "Retry":
            action = ((action.get("spec") or {}).get("onRetryFailure") or {}).get("action")
        action = action or default
        if chosen is None or _SEVERITY.index(action["type"]) < _SEVERITY.index(chosen["type"]):
            chosen = action
    return chosen or default


def _stage_failed(s: Session, ex: Execution, run: StageRun, error: str,
                  failures: list[tuple[dict[str, Any] | None, str]], record: PhaseRun | None,
                  dispatches: list[_Dispatch]) -> str:
    """Apply the stage's failure strategy; '' when the failure was overridden (Ignore,
    MarkAsSuccess) and the stage goes on, else what happened."""
    stage = ex.plan["stages"][run.stage_index]
    action = stage_action(stage, failures)
    if action["type"] == "ManualIntervention":
        kind = f"mi-{record.kind if record else 'start'}"
        phase = record.phase if record else -1
        mi = s.exec(select(PhaseRun).where(PhaseRun.execution_id == ex.id,
                                           PhaseRun.stage_index == run.stage_index,
                                           PhaseRun.phase == phase,
                                           PhaseRun.kind == kind)).first()
        spec = action.get("spec") or {}
        timeout = parse_duration(spec.get("timeout") or "1h")
        if mi is None:
            s.add(PhaseRun(execution_id=ex.id, stage_index=run.stage_index, phase=phase,
                           kind=kind, hosts=list((record.verdict or {}).get("failed", []))
                           if record else [],
                           verdict={"error": error, "timeout": spec.get("timeout") or "1h",
                                    "on_timeout": spec["onTimeout"]["action"]["type"],
                                    "choices": list(INTERVENTION_ACTIONS)}))
            ex.status = Status.WAITING
            s.add(ex)
            # The post-timeout action is due then: wake the coordinator (the reconciler too).
            dispatches.append(_Dispatch("timer", ex.id, run.stage_index, phase, [],
                                        countdown=timeout + 0.5))
            return "waiting for manual intervention"
        if mi.status == Status.RUNNING:
            if utcnow() < mi.dispatched_at + timedelta(seconds=timeout):
                return "waiting for manual intervention"
            verdict = dict(mi.verdict or {})
            verdict.update(chosen=verdict["on_timeout"], by="timeout",
                           at=utcnow().isoformat() + "Z")
            mi.verdict, mi.status, mi.gate_at = verdict, Status.SUCCEEDED, utcnow()
            s.add(mi)
            ex.status = Status.RUNNING
            s.add(ex)
        v = mi.verdict or {}
        action = {"type": v["chosen"]}
        who = f"after the {v.get('timeout')} timeout" if v.get("by") == "timeout" \
            else f"by {v.get('by')}"
        error = f"{error}; manual intervention: {action['type']} {who}"
    kind_of = action["type"]
    if kind_of in ("Ignore", "MarkAsSuccess") and record is not None:
        verdict = dict(record.verdict or {})
        verdict.update(overridden=kind_of, overridden_failed=verdict.get("failed", []),
                       failed=[], passed=True)
        record.verdict, record.status = verdict, Status.SUCCEEDED
        s.add(record)
        return ""
    if kind_of == "Abort":
        _summarise_steps(s, ex, run)
        run.status, run.error, run.finished_at = Status.ABORTED, error, utcnow()
        s.add(run)
        _finish(s, ex, Status.ABORTED, error=f"stage '{run.identifier}': {error} (aborted by "
                                             "the failure strategy)")
        return "aborted"
    if kind_of in ("StageRollback", "PipelineRollback"):
        return _begin_rollback(s, ex, run, error, scope=kind_of, cause="failure",
                               dispatches=dispatches)
    return _fail_stage(s, ex, run, error)


def _begin_rollback(s: Session, ex: Execution, run: StageRun, error: str, *, scope: str,
                    cause: str, dispatches: list[_Dispatch]) -> str:
    """Mark the stage failed (or aborted) and start rolling back: this stage, or with
    PipelineRollback every deployment stage so far, latest first."""
    stages = [run.stage_index]
    if scope == "PipelineRollback":
        for i in range(run.stage_index - 1, -1, -1):
            if ex.plan["stages"][i].get("type") == "Approval":
                continue
            earlier = s.exec(select(StageRun).where(StageRun.execution_id == ex.id,
                                                    StageRun.stage_index == i)).one()
            if earlier.status in (Status.SUCCEEDED, Status.FAILED):
                stages.append(i)
    if ex.plan["stages"][run.stage_index].get("type") == "Approval":
        stages.remove(run.stage_index)
    _summarise_steps(s, ex, run)
    run.status = Status.ABORTED if cause == "aborted" else Status.FAILED
    run.error, run.finished_at = error, utcnow()
    s.add(run)
    ex.rollback = {"cause": cause, "scope": scope, "stages": stages, "error": error}
    ex.status = Status.ROLLING_BACK
    ex.error = f"stage '{run.identifier}': {error}"
    s.add(ex)
    return _decide_rollback(s, ex, dispatches)


def _decide_rollback(s: Session, ex: Execution, dispatches: list[_Dispatch]) -> str:
    """Roll back the stages named in ``ex.rollback``, each phase as its own canvas, once."""
    from app.rollback import plan_stage_rollback

    info = ex.rollback or {}
    for si in info.get("stages", []):
        run = _stage_run(s, ex, si)
        if run.status in (Status.ROLLED_BACK, Status.ROLLBACK_FAILED):
            continue
        if run.rollback is None:
            running = s.exec(select(HostStepRun).where(
                HostStepRun.execution_id == ex.id, HostStepRun.stage_index == si,
                HostStepRun.kind == "deploy", HostStepRun.status == Status.RUNNING)).all()
            if running:  # an abort: hosts stop at their next unit, then roll back
                return f"rolling back: waiting for {len(running)} running step(s) to stop"
            run.rollback = plan_stage_rollback(s, ex, run)
            run.status = Status.ROLLING_BACK
            s.add(run)
        # Host lists are read only for the phase being judged (a deferred column).
        records = {p.phase: p for p in s.exec(select(PhaseRun).where(
            PhaseRun.execution_id == ex.id, PhaseRun.stage_index == si,
            PhaseRun.kind == "rollback").options(*_deferred(PhaseRun.hosts))).all()}
        switches = {p.phase: p for p in s.exec(select(PhaseRun).where(
            PhaseRun.execution_id == ex.id, PhaseRun.stage_index == si,
            PhaseRun.kind == "rollback-switch").options(*_deferred(PhaseRun.hosts))).all()}
        for ph in run.rollback["phases"]:
            if not ph["hosts"]:
                continue
            if ph.get("kind") == "switch":  # traffic first (blue-green)
                rec = switches.get(ph["index"])
                if rec is None:
                    s.add(PhaseRun(execution_id=ex.id, stage_index=si, phase=ph["index"],
                                   kind="rollback-switch", hosts=list(ph["hosts"])))
                    s.flush()
                    dispatches.append(_Dispatch("rollback-switch", ex.id, si, ph["index"], []))
                    return f"dispatched {ph['name']}"
                if rec.status == Status.RUNNING:
                    return "rolling back"
                continue
            rec = records.get(ph["index"])
            if rec is None:
                _dispatch_rollback(s, ex, run, ph, dispatches)
                return f"dispatched {ph['name']}"
            if rec.status == Status.RUNNING and not _evaluate_phase(s, ex, run, rec,
                                                                    gate=False):
                return "rolling back"
        failed = [r for r in [*records.values(), *switches.values()]
                  if r.status == Status.FAILED]
        run.status = Status.ROLLBACK_FAILED if failed else Status.ROLLED_BACK
        run.finished_at = utcnow()
        s.add(run)
    runs = s.exec(select(StageRun).where(StageRun.execution_id == ex.id,
                                         col(StageRun.stage_index).in_(info.get("stages", []))
                                         )).all()
    if any(r.status == Status.ROLLBACK_FAILED for r in runs):
        _finish(s, ex, Status.ROLLBACK_FAILED,
                error=f"{ex.error or info.get('error')}; the rollback failed on some hosts")
        return "rollback failed"
    final = {"aborted": Status.ABORTED, "requested": Status.SUCCEEDED}.get(
        info.get("cause", ""), Status.FAILED)
    done = sum(len(r.hosts) for r in s.exec(select(PhaseRun).where(
        PhaseRun.execution_id == ex.id, PhaseRun.kind == "rollback",
        PhaseRun.status == Status.SUCCEEDED)).all())
    note = "" if info.get("cause") == "requested" else (
        f"; rolled back {done} host(s)" if done else
        "; nothing was rolled back (no host had an earlier version recorded)")
    _finish(s, ex, final, error=f"{ex.error or info.get('error')}{note}"
            if final != Status.SUCCEEDED else None)
    return "rolled back"


def _dispatch_rollback(s: Session, ex: Execution, run: StageRun, ph: dict[str, Any],
                       out: list[_Dispatch]) -> None:
    by_name = {h["name"]: h for h in run.hosts}
    s.add(PhaseRun(execution_id=ex.id, stage_index=run.stage_index, phase=ph["index"],
                   kind="rollback", hosts=list(ph["hosts"]),
                   verdict={"skipped": ph.get("skipped", {})}))
    s.flush()  # unique (execution, stage, phase, "rollback"): dispatched exactly once
    targets = run.rollback["hosts"] if run.rollback else {}
    builtin = (run.rollback or {}).get("mode") != "rollbackSteps"
    steps_of: dict[str, tuple[int, tuple[str, int] | None]] = {}
    for name in ph["hosts"]:
        t = targets[name]
        src = t.get("source") if builtin else None
        steps_of[name] = (int(t["steps"]), (str(src[0]), int(src[1])) if src else None)
    stage = ex.plan["stages"][run.stage_index]
    out.append(_Dispatch("rollback", ex.id, run.stage_index, ph["index"],
                         [(n, by_name[n]["region"]) for n in ph["hosts"]],
                         lanes=stage["strategy"].get("maxConcurrency"), steps_of=steps_of,
                         tags_of=_tags_of(stage, [by_name[n] for n in ph["hosts"]],
                                          stage.get("rollbackSteps") or stage["steps"])))


def intervene(execution_id: str, *, action: str, user: str = "", comment: str = "") -> str:
    """A person's answer to a ManualIntervention: one of INTERVENTION_ACTIONS."""
    if action not in INTERVENTION_ACTIONS:
        raise ApprovalRefused(f"unknown action {action!r}; choose one of "
                              f"{', '.join(INTERVENTION_ACTIONS)}")
    with session_scope() as s:
        ex = _lock_execution(s, execution_id)
        if ex is None:
            raise LookupError(f"no execution '{execution_id}'")
        mi = s.exec(select(PhaseRun).where(PhaseRun.execution_id == execution_id,
                                           col(PhaseRun.kind).startswith("mi-"),
                                           PhaseRun.status == Status.RUNNING)).first()
        if mi is None or ex.status != Status.WAITING:
            raise LookupError(f"execution {execution_id} is not waiting for a manual "
                              f"intervention (it is {ex.status})")
        verdict = dict(mi.verdict or {})
        verdict.update(chosen=action, by=user or "someone", comment=comment,
                       at=utcnow().isoformat() + "Z")
        mi.verdict, mi.status, mi.gate_at = verdict, Status.SUCCEEDED, utcnow()
        ex.status = Status.RUNNING
        s.add(mi)
        s.add(ex)
    return f"{action} chosen by {user or 'someone'}; execution {advance(execution_id)}"


# --- delegates: which workers take a stage's tasks ------------------------------------------------


def _wanted_tags(stage: dict[str, Any], host: dict[str, Any],
                 step: dict[str, Any] | None) -> tuple[str, ...]:
    """The worker tags a task on ``host`` needs: the pipeline's and stage's selectors, its
    infrastructure's, and the step's own."""
    infra: dict[str, Any] = next((i for i in stage.get("infrastructures", [])
                                  if i["identifier"] == host.get("infrastructure")), {})
    tags = {*(stage.get("delegateSelectors") or []),
            *((infra.get("spec") or {}).get("delegateSelectors") or []),
            *(((step or {}).get("spec") or {}).get("delegateSelectors") or [])}
    return tuple(sorted(tags))


def _choose_tags(stage: dict[str, Any], region: str,
                 tags: tuple[str, ...]) -> tuple[tuple[str, ...] | None, str]:
    """(the tags to route with, a note) for a task of ``region`` that wants ``tags``: the live
    workers with them, else the stage's delegateFallback; (None, why) when nobody can serve."""
    from app.delegates import resolve_queue

    if not tags:
        return (), ""
    choice = resolve_queue(region, tags)
    if choice.queue:
        return tuple(choice.tags), ""
    fallback = stage.get("delegateFallback")
    if fallback is not None:
        second = resolve_queue(region, fallback, True)
        if second.queue:
            return tuple(second.tags), (f"no live worker of region {region} has tags "
                                        f"[{', '.join(tags)}]: using the fallback "
                                        f"[{', '.join(fallback) or 'any worker'}]")
    return None, choice.message


def _tags_of(stage: dict[str, Any], hosts: list[dict[str, Any]],
             steps: list[dict[str, Any]]) -> dict[tuple[str, int], tuple[str, ...]]:
    """Routing tags per (host, step index), step -1 being the host's verification checks. A
    requirement no live worker serves keeps its tags: the task waits in its queue for one
    (and fails with Timeout past its dispatch deadline)."""
    out: dict[tuple[str, int], tuple[str, ...]] = {}
    memo: dict[tuple[str, tuple[str, ...]], tuple[str, ...]] = {}
    for h in hosts:
        for i, step in [(-1, None), *enumerate(steps)]:
            want = _wanted_tags(stage, h, step)
            if not want:
                continue
            k = (h["region"], want)
            if k not in memo:
                chosen, note = _choose_tags(stage, h["region"], want)
                if note:
                    log.warning("stage %s: %s", stage.get("identifier"), note)
                memo[k] = want if chosen is None else chosen
            if memo[k]:
                out[(h["name"], i)] = memo[k]
    return out


def unserved_delegates(stage: dict[str, Any], hosts: list[dict[str, Any]]) -> list[str]:
    """Why no live worker could take some of the stage's tasks (empty when all can)."""
    problems: dict[str, None] = {}
    seen: set[tuple[Any, Any]] = set()
    for h in hosts:
        # The answer depends on the host's infrastructure and region only.
        if (h.get("infrastructure"), h["region"]) in seen:
            continue
        seen.add((h.get("infrastructure"), h["region"]))
        for step in [None, *stage.get("steps", [])]:
            want = _wanted_tags(stage, h, step)
            chosen, why = _choose_tags(stage, h["region"], want)
            if chosen is None:
                problems.setdefault(why, None)
    return list(problems)


def _dispatch(s: Session, ex: Execution, run: StageRun, phase: Phase, kind: str,
              out: list[_Dispatch]) -> None:
    by_name = _stage_data(s, ex, run).by_name
    s.add(PhaseRun(execution_id=ex.id, stage_index=run.stage_index, phase=phase.index,
                   kind=kind, hosts=list(phase.hosts)))
    s.flush()  # the unique (execution, stage, phase, kind) row: a second dispatch fails here
    stage_plan = ex.plan["stages"][run.stage_index]
    out.append(_Dispatch(kind, ex.id, run.stage_index, phase.index,
                         [(n, by_name[n]["region"]) for n in phase.hosts],
                         step_count=len(stage_plan["steps"]),
                         lanes=stage_plan["strategy"].get("maxConcurrency"),
                         tags_of=_tags_of(stage_plan, [by_name[n] for n in phase.hosts],
                                          stage_plan["steps"])))


def _publish(d: _Dispatch) -> None:
    from app.canvas import phase_canvas, switch_canvas, verify_canvas

    expires = get_settings().dispatch_expires
    if d.kind == "timer":
        from tasks.control import advance_task

        advance_task.apply_async(kwargs={"execution_id": d.execution_id}, countdown=d.countdown)
        return
    if d.kind in ("deploy", "rollback"):
        canvas = phase_canvas(execution_id=d.execution_id, stage_index=d.stage_index,
                              phase=d.phase, hosts=d.hosts, step_count=d.step_count,
                              expires=expires, lanes=d.lanes, kind=d.kind, steps_of=d.steps_of,
                              tags_of=d.tags_of)
    elif d.kind == "verify":
        canvas = verify_canvas(execution_id=d.execution_id, stage_index=d.stage_index,
                               phase=d.phase, hosts=d.hosts, expires=expires,
                               tags_of=d.tags_of)
    elif d.kind == "discover":
        from celery import chord

        from tasks.control import discovery_done
        from tasks.discovery import discover_hosts

        canvas = chord([discover_hosts.s(infra=i, region=r, tags=list(t))
                        for i, r, t in d.discover or []],
                       discovery_done.s(execution_id=d.execution_id, stage_index=d.stage_index))
    else:
        canvas = switch_canvas(execution_id=d.execution_id, stage_index=d.stage_index,
                               phase=d.phase, kind=d.kind)
    canvas.apply_async()
    log.info("execution %s: published %s of stage %d phase %d (%d hosts)", d.execution_id,
             d.kind, d.stage_index, d.phase, len(d.hosts))


def _live_set(s: Session, ex: Execution, stage_plan: dict[str, Any]) -> list[str]:
    """Hosts that took traffic after the last successful switch for this service and
    environment (the ledger's memory of blue-green; the switch task checks the real one)."""
    svc = stage_plan["service"]["identifier"]
    env = stage_plan["environment"]["identifier"]
    rows = s.exec(select(PhaseRun).where(col(PhaseRun.kind).in_(["switch", "rollback-switch"]),
                                         PhaseRun.status == Status.SUCCEEDED)
                  .order_by(col(PhaseRun.gate_at).desc()).limit(200)).all()
    for r in rows:
        v = r.verdict or {}
        if v.get("service") == svc and v.get("environment") == env:
            return list(v.get("live", []))
    return []


def _running_record(s: Session, execution_id: str, stage_index: int, phase: int,
                    kind: str) -> tuple[Execution, StageRun, PhaseRun] | None:
    """The locked execution, its stage and the phase record of ``kind`` that still waits for
    its verdict; None when there is nothing left to judge (a repeated gate, an ended run)."""
    ex = _lock_execution(s, execution_id)
    if ex is None or ex.status in Status.TERMINAL:
        return None
    pr = s.exec(select(PhaseRun).where(
        PhaseRun.execution_id == execution_id, PhaseRun.stage_index == stage_index,
        PhaseRun.phase == phase, PhaseRun.kind == kind)).first()
    if pr is None or pr.status != Status.RUNNING:
        return None
    return ex, _stage_run(s, ex, stage_index), pr


def gate(execution_id: str, stage_index: int, phase: int, *, kind: str = "deploy") -> str:
    """The chord body: record the phase's verdict from the ledger, then advance."""
    with session_scope() as s:
        found = _running_record(s, execution_id, stage_index, phase, kind)
        if found is not None:
            _evaluate_phase(s, *found, gate=True)
    return advance(execution_id)


def record_lost_step(key: HostStepKey, *, error_class: str, error: str) -> None:
    """A step task failed before it could record its outcome: record it as failed.

    Creates the row when the task never claimed it (expired, revoked); leaves a finished row
    alone (the task did record its outcome and failed later).
    """
    from sqlalchemy.exc import IntegrityError

    with session_scope() as s:
        row = s.exec(select(HostStepRun).where(HostStepRun.idem_key == key.idem)).first()
        if row is not None and row.status in Status.TERMINAL:
            return
        if row is None:
            stage = s.get(Execution, key.execution)
            step_id = stage.plan["stages"][key.stage]["steps"][key.step]["identifier"] \
                if stage else ""
            row = HostStepRun(idem_key=key.idem, execution_id=key.execution,
                              stage_index=key.stage, phase=key.phase, step_index=key.step,
                              step_id=step_id, host=key.host, region=key.region,
                              attempt=key.attempt)
        row.status, row.error_class, row.error = Status.FAILED, error_class, error
        row.finished_at = utcnow()
        try:
            with s.begin_nested():
                s.add(row)
        except IntegrityError:  # the task claimed it meanwhile: its own outcome wins
            pass


def abort(execution_id: str, *, user: str = "", rollback: bool = False) -> str:
    """Stop an execution: no new work is sent; running hosts stop at their next unit.

    With ``rollback``, the current stage then rolls back the hosts it changed (once their
    running steps have stopped). Returns "aborted", "rolling back", "missing", or the status of
    an execution that had already ended.
    """
    dispatches: list[_Dispatch] = []
    with session_scope() as s:
        ex = _lock_execution(s, execution_id)
        if ex is None:
            return "missing"
        if ex.status in Status.TERMINAL:
            return ex.status
        before = _snapshot(s, ex)
        who = f" by {user}" if user else ""
        for pr in s.exec(select(PhaseRun).where(PhaseRun.execution_id == execution_id,
                                                PhaseRun.status == Status.RUNNING)).all():
            if pr.kind != "rollback":
                pr.status, pr.gate_at = Status.ABORTED, utcnow()
                s.add(pr)
        current = s.exec(select(StageRun).where(StageRun.execution_id == execution_id,
                                                StageRun.stage_index == ex.current_stage)
                         ).first()
        if rollback and ex.status != Status.ROLLING_BACK and current is not None and \
                ex.plan["stages"][current.stage_index].get("type") != "Approval" and \
                current.status == Status.RUNNING:
            _begin_rollback(s, ex, current, f"aborted{who}", scope="StageRollback",
                            cause="aborted", dispatches=dispatches)
            outcome = "rolling back"
        else:
            _finish(s, ex, Status.ABORTED, error=f"aborted{who}")
            for run in s.exec(select(StageRun).where(
                    StageRun.execution_id == execution_id,
                    col(StageRun.status).in_([Status.RUNNING, Status.ROLLING_BACK]))).all():
                run.status, run.finished_at = Status.ABORTED, utcnow()
                s.add(run)
            outcome = "aborted"
        after = _snapshot(s, ex)
    for d in dispatches:
        _publish(d)
    _notify(execution_id, before, after)
    return outcome


def rollback_plan(execution_id: str) -> dict[str, Any]:
    """What ``vmfarm rollback`` would do for a finished execution, per stage and host (the
    plan the rollback execution itself computes)."""
    from app.rollback import changed_hosts, plan_stage_rollback

    with session_scope() as s:
        ex = s.get(Execution, execution_id)
        if ex is None:
            raise LookupError(f"no execution '{execution_id}'")
        if ex.status != Status.SUCCEEDED:
            raise LookupError(f"execution {execution_id} is {ex.status}: only a successful "
                              "execution is rolled back with `vmfarm rollback` (a failed one "
                              "rolls back by its failure strategy)")
        probe = Execution(id="<rollback-plan>", pipeline=ex.pipeline, plan=ex.plan,
                          rollback={"of": execution_id})
        stages = []
        for run in s.exec(select(StageRun).where(StageRun.execution_id == execution_id)
                          .order_by(col(StageRun.stage_index).desc())).all():
            stage = ex.plan["stages"][run.stage_index]
            if stage.get("type") == "Approval" or run.status != Status.SUCCEEDED:
                continue
            by_name = {h["name"]: h for h in run.hosts}
            for name in changed_hosts(s, execution_id, run.stage_index) & set(by_name):
                inst = s.exec(select(Instance).where(
                    Instance.service == stage["service"]["identifier"],
                    Instance.environment == stage["environment"]["identifier"],
                    Instance.infrastructure == by_name[name]["infrastructure"],
                    Instance.host == name)).first()
                if inst is not None and inst.execution_id != execution_id:
                    raise LookupError(
                        f"host {name} now runs {inst.version} from execution "
                        f"{inst.execution_id}, deployed after {execution_id}: roll that one "
                        "back first")
            plan = plan_stage_rollback(s, probe, run)
            current = {i.host: i.version for i in s.exec(select(Instance).where(
                Instance.service == stage["service"]["identifier"],
                Instance.environment == stage["environment"]["identifier"],
                col(Instance.host).in_(list(by_name)))).all()}
            skipped = {h: why for ph in plan["phases"] for h, why in ph["skipped"].items()}
            hosts = []
            for name, t in plan["hosts"].items():
                how = None
                if name not in skipped:
                    how = ("rollbackSteps" if plan["mode"] == "rollbackSteps" else
                           f"re-run the steps of execution {t['source'][0]}")
                hosts.append({"host": name, "region": by_name[name]["region"],
                              "from": current.get(name), "to": t.get("version"), "how": how,
                              "skipped": skipped.get(name)})
            stages.append({"stage": stage["identifier"],
                           "service": stage["service"]["identifier"],
                           "environment": stage["environment"]["identifier"],
                           "phases_in_order": [{"phase": ph["name"], "hosts": ph["hosts"]}
                                               for ph in plan["phases"]],
                           "hosts": hosts})
    return {"execution": execution_id, "pipeline": ex.pipeline, "stages": stages}


def rollback_execution(execution_id: str, *, user: str = "", publish: bool = True) -> str:
    """Roll a successful execution back on every host it changed: a new execution (the
    ledger keeps both) whose stages run their rollback phases, latest stage first."""
    plan = rollback_plan(execution_id)
    if not any(st["hosts"] for st in plan["stages"]):
        raise LookupError(f"execution {execution_id} changed no host that can be rolled back")
    new_id = new_execution_id()
    with session_scope() as s:
        ex = s.get(Execution, execution_id)
        assert ex is not None
        order = [i for i, st in enumerate(ex.plan["stages"])
                 if st["identifier"] in {x["stage"] for x in plan["stages"]}][::-1]
        runs = {r.stage_index: r for r in s.exec(select(StageRun).where(
            StageRun.execution_id == execution_id)).all()}
        s.add(Execution(id=new_id, pipeline=ex.pipeline, pipeline_name=ex.pipeline_name,
                        plan=ex.plan, inputs={**ex.inputs, "rollback_of": execution_id},
                        created_by=user or get_settings().user or "",
                        status=Status.ROLLING_BACK, started_at=utcnow(),
                        current_stage=len(ex.plan["stages"]),
                        rollback={"cause": "requested", "scope": "PipelineRollback",
                                  "stages": order, "of": execution_id,
                                  "error": f"rollback of {execution_id}"}))
        s.flush()
        for i, st in enumerate(ex.plan["stages"]):
            old = runs[i]
            s.add(StageRun(execution_id=new_id, stage_index=i, identifier=old.identifier,
                           name=old.name, hosts=old.hosts, phases=old.phases,
                           status=Status.PENDING if i in order else Status.SKIPPED))
            for j, step in enumerate(st.get("steps", [])):
                s.add(StepRun(execution_id=new_id, stage_index=i, step_index=j,
                              identifier=step["identifier"], name=step.get("name", "")))
    if publish:
        advance(new_id)
    return new_id


def reconcile(*, now: Any = None) -> list[str]:
    """Catch what error callbacks miss (design note §3): steps whose worker stopped renewing
    their heartbeat, and dispatched work that no worker took; then let the coordinator decide.

    Safe to run any number of times, from Celery beat and from `vmfarm reconcile`.
    """
    from datetime import timedelta

    settings = get_settings()
    now = now or utcnow()
    stale = now - timedelta(seconds=settings.heartbeat_timeout)
    unclaimed = now - timedelta(seconds=settings.dispatch_expires + settings.heartbeat_timeout)
    actions: list[str] = []
    touched: set[str] = set()
    lost: list[HostStepKey] = []
    with session_scope() as s:
        for r in s.exec(select(HostStepRun).where(HostStepRun.status == Status.RUNNING,
                                                  HostStepRun.heartbeat_at < stale)).all():
            r.status, r.error_class = Status.FAILED, "DelegateRestart"
            r.error = (f"worker lost: no heartbeat from {r.worker or 'its worker'} since "
                       f"{r.heartbeat_at:%H:%M:%S} UTC (timeout {settings.heartbeat_timeout:g} s)")
            r.finished_at = now
            if not r.step_id:  # claimed, never finished: name its step from the plan
                owner = s.get(Execution, r.execution_id)
                stage = owner.plan["stages"][r.stage_index] if owner else {}
                steps = stage.get("steps" if r.kind == "deploy" else "rollbackSteps") or []
                r.step_id = steps[r.step_index]["identifier"] if r.step_index < len(steps) \
                    else ""
            s.add(r)
            touched.add(r.execution_id)
            lost.append(HostStepKey(r.execution_id, r.stage_index, r.phase, r.host,
                                    r.step_index, r.attempt, r.region, kind=r.kind))
            actions.append(f"{r.execution_id}: {r.host} step {r.step_id}: worker lost")
        for pr in s.exec(select(PhaseRun).where(PhaseRun.status == Status.RUNNING,
                                                PhaseRun.kind == "approval")).all():
            ex = s.get(Execution, pr.execution_id)
            step = ex.plan["stages"][pr.stage_index]["approval"] if ex else {}
            limit = parse_duration(step.get("timeout") or "1d")
            if ex is not None and pr.dispatched_at < now - timedelta(seconds=limit):
                pr.status, pr.gate_at = Status.FAILED, now
                pr.verdict = {**(pr.verdict or {}),
                              "reason": f"approval timed out after {step.get('timeout', '1d')}"}
                ex.status = Status.RUNNING
                s.add(pr)
                s.add(ex)
                touched.add(ex.id)
                actions.append(f"{ex.id}: approval timed out")
        # Discovery that no worker answered: the stage fails instead of waiting forever.
        for pr in s.exec(select(PhaseRun).where(PhaseRun.status == Status.RUNNING,
                                                PhaseRun.kind == "discover",
                                                PhaseRun.dispatched_at < unclaimed)).all():
            where = ", ".join(f"vmfarm.{i['region']}" for i in
                              (pr.verdict or {}).get("infrastructures", []))
            pr.status, pr.gate_at = Status.FAILED, now
            pr.verdict = {**(pr.verdict or {}), "error_class": "Timeout",
                          "error": f"no worker listed the hosts within "
                                   f"{settings.dispatch_expires:g} s (queues: {where})"}
            s.add(pr)
            touched.add(pr.execution_id)
            actions.append(f"{pr.execution_id}: host discovery timed out")
        # Manual interventions whose post-timeout action is due (advance applies it).
        touched.update(pr.execution_id for pr in s.exec(select(PhaseRun).where(
            PhaseRun.status == Status.RUNNING, col(PhaseRun.kind).startswith("mi-"))).all())
        # Rolling back after an abort waits for running steps; they may end without a gate.
        touched.update(e.id for e in s.exec(select(Execution).where(
            Execution.status == Status.ROLLING_BACK)).all())
        waiting = {pr.execution_id for pr in s.exec(select(PhaseRun).where(
            PhaseRun.status == Status.RUNNING, PhaseRun.kind == "deploy",
            PhaseRun.dispatched_at < unclaimed)).all()}
        # An execution whose submitter died between recording it and dispatching it.
        touched.update(e.id for e in s.exec(select(Execution).where(
            Execution.status == Status.QUEUED, Execution.created_at < stale)).all())
    for key in lost:
        actions.append(f"{key.execution}: {key.host} step {key.step}: worker lost; "
                       f"{_after_worker_lost(key)}")
    for ex_id, host, first_step in _unclaimed_hosts(waiting, unclaimed):
        record_lost_step(first_step, error_class="Timeout",
                         error=f"no worker took the steps of {host} within "
                               f"{settings.dispatch_expires:g} s; nothing ran")
        touched.add(ex_id)
        actions.append(f"{ex_id}: {host}: no worker took its steps")
    for ex_id in sorted(touched):
        with session_scope() as s:
            ex = _lock_execution(s, ex_id)
            if ex is None or ex.status in Status.TERMINAL:
                continue
            for pr in s.exec(select(PhaseRun).where(
                    PhaseRun.execution_id == ex_id, PhaseRun.status == Status.RUNNING,
                    col(PhaseRun.kind).in_(["deploy", "rollback"]))).all():
                run = s.exec(select(StageRun).where(
                    StageRun.execution_id == ex_id,
                    StageRun.stage_index == pr.stage_index)).one()
                _evaluate_phase(s, ex, run, pr, gate=False)
        actions.append(f"{ex_id}: {advance(ex_id)}")
    return actions + _judge_lost_gates(now)


def _judge_lost_gates(now: Any) -> list[str]:
    """Judge deploy and rollback phases whose hosts have all finished but whose gate never ran.

    A phase's gate is its chord's body, and the chord's counters live in the result backend:
    a Redis restarted without persistence (or flushed) forgets them, the last header task then
    finds no chord to complete and the body is never sent. Once no step of such a phase has
    run for ``heartbeat_timeout`` seconds, the phase is judged from the ledger as the gate
    would have judged it, and the execution advances. A phase with a host that has not
    finished is left alone (its work may still sit in a queue: the reconciler's dispatch
    expiry covers that). Idempotent, and harmless next to a late gate: both lock the
    execution and only a RUNNING phase is judged.
    """
    quiet_for = get_settings().heartbeat_timeout
    quiet = now - timedelta(seconds=quiet_for)
    found: list[tuple[str, int, int, str]] = []
    with session_scope() as s:
        for pr in s.exec(select(PhaseRun).where(
                PhaseRun.status == Status.RUNNING, col(PhaseRun.kind).in_(["deploy", "rollback"]),
                PhaseRun.dispatched_at < quiet)).all():
            running, last = s.exec(select(
                func.count().filter(col(HostStepRun.status) == Status.RUNNING),
                func.max(HostStepRun.finished_at)).where(
                HostStepRun.execution_id == pr.execution_id,
                HostStepRun.stage_index == pr.stage_index, HostStepRun.phase == pr.phase,
                HostStepRun.kind == ("rollback" if pr.kind == "rollback" else "deploy"))).one()
            if not running and last is not None and last < quiet:
                found.append((pr.execution_id, pr.stage_index, pr.phase, pr.kind))
    actions: list[str] = []
    for ex_id, stage_index, phase, kind in found:
        with session_scope() as s:
            ex = _lock_execution(s, ex_id)
            record = s.exec(select(PhaseRun).where(
                PhaseRun.execution_id == ex_id, PhaseRun.stage_index == stage_index,
                PhaseRun.phase == phase, PhaseRun.kind == kind)).first()
            if ex is None or ex.status in Status.TERMINAL or record is None \
                    or record.status != Status.RUNNING:
                continue
            run = s.exec(select(StageRun).where(StageRun.execution_id == ex_id,
                                                StageRun.stage_index == stage_index)).one()
            if not _evaluate_phase(s, ex, run, record, gate=False):
                continue  # a host has not finished: not a lost gate
            record.verdict = {**(record.verdict or {}), "judged_by": (
                f"the reconciler: every host had finished for {quiet_for:g} s and the gate "
                "never ran (its chord state was lost from the result backend?)")}
            s.add(record)
        log.warning("execution %s: %s phase %d of stage %d had no gate; judged from the ledger",
                    ex_id, kind, phase, stage_index)
        actions.append(f"{ex_id}: stage {stage_index} {kind} phase {phase}: every host "
                       f"finished and no gate came; judged from the ledger; {advance(ex_id)}")
    return actions


NOT_RETRIED = "not retried:"


def _queue_served(region: str, tags: tuple[str, ...] = ()) -> bool:
    """Does a live worker consume the region's queue (its tag queue with ``tags``)? Asked of
    the workers themselves (Celery remote control); embedded mode counts as served."""
    from app.celery import app
    from app.delegates import queue_for

    if not get_settings().celery_broker.startswith(("redis://", "rediss://")):
        return True  # embedded: the worker is this process
    try:
        replies = app.control.inspect(timeout=1.0).active_queues()
    except Exception:  # no remote control on this transport
        return True
    if replies is None:
        return False
    queue = queue_for(region, tags)
    return any(q.get("name") == queue for qs in replies.values() for q in qs or [])


def _lane_followers(hosts: list[str], lanes: int | None, host: str) -> list[str]:
    """Hosts after ``host`` in its lane (phase_canvas deals hosts round-robin into lanes)."""
    n = len(hosts) if not lanes or lanes >= len(hosts) else lanes
    i = hosts.index(host)
    return hosts[i + n::n]


def _retry_pending(stage: dict[str, Any], row: HostStepRun) -> bool:
    """A step whose worker was lost and whose failure strategy retries it: the reconciler
    has sent a new attempt, so the host is not done."""
    if row.status != Status.FAILED or row.error_class != "DelegateRestart" or \
            row.kind != "deploy" or NOT_RETRIED in (row.error or ""):
        return False
    from tasks.hoststep import failure_action

    action = failure_action(stage["steps"][row.step_index], stage, "DelegateRestart")
    return bool(action and action["type"] == "Retry"
                and row.attempt - 1 < int(action["spec"]["retryCount"]))


def _after_worker_lost(key: HostStepKey) -> str:
    """Apply the failure strategy to a step whose worker was lost (DelegateRestart).

    Retry: a new attempt of that step and the host's later steps, then of the hosts that
    waited behind it in its lane, on the same region queue (another worker takes it).
    Otherwise the hosts behind it in its lane never run: they are recorded as failed."""
    from celery import chain, chord

    from tasks.control import advance_task
    from tasks.deploy import run_step
    from tasks.hoststep import failure_action

    with session_scope() as s:
        ex = s.get(Execution, key.execution)
        pr = s.exec(select(PhaseRun).where(
            PhaseRun.execution_id == key.execution, PhaseRun.stage_index == key.stage,
            PhaseRun.phase == key.phase, PhaseRun.kind == key.kind)).first()
        if ex is None or pr is None or key.kind != "deploy" or ex.status in Status.TERMINAL:
            return "nothing more to do"
        stage = ex.plan["stages"][key.stage]
        run = s.exec(select(StageRun).where(StageRun.execution_id == key.execution,
                                            StageRun.stage_index == key.stage)).one()
        regions = {h["name"]: h["region"] for h in run.hosts}
        started = {r.host for r in s.exec(select(HostStepRun).where(
            HostStepRun.execution_id == key.execution, HostStepRun.stage_index == key.stage,
            HostStepRun.phase == key.phase)).all()}
        followers = [h for h in _lane_followers(list(pr.hosts),
                                                stage["strategy"].get("maxConcurrency"),
                                                key.host) if h not in started]
        action = failure_action(stage["steps"][key.step], stage, "DelegateRestart")
        n_steps = len(stage["steps"])
        by_name = {h["name"]: h for h in run.hosts}
        tags_of = _tags_of(stage, [by_name[h] for h in [key.host, *followers]], stage["steps"])
    deadline = round(time.time() + get_settings().dispatch_expires, 3)
    retry = bool(action and action["type"] == "Retry"
                 and key.attempt - 1 < int(action["spec"]["retryCount"]))
    if retry and not _queue_served(key.region, tags_of.get((key.host, key.step), ())):
        with session_scope() as s:
            row = s.exec(select(HostStepRun).where(HostStepRun.idem_key == key.idem)).one()
            row.error = f"{row.error}; {NOT_RETRIED} no live worker consumes vmfarm.{key.region}"
            s.add(row)
        retry = False
    if retry and action is not None:
        intervals = action["spec"]["retryIntervals"]
        wait = parse_duration(intervals[min(key.attempt - 1, len(intervals) - 1)])
        links = [run_step.s(key=HostStepKey(key.execution, key.stage, key.phase, key.host, i,
                                            key.attempt + 1, key.region, deadline,
                                            tags=tags_of.get((key.host, i), ())).to_dict())
                 for i in range(key.step, n_steps)]
        links += [run_step.s(key=HostStepKey(key.execution, key.stage, key.phase, h, i, 1,
                                             regions[h], deadline,
                                             tags=tags_of.get((h, i), ())).to_dict())
                  for h in followers for i in range(n_steps)]
        links[0] = links[0].set(countdown=wait)
        chord([chain(*links)], advance_task.si(execution_id=key.execution)).apply_async()
        return (f"retrying as attempt {key.attempt + 1} on queue vmfarm.{key.region}"
                + (f" (then {', '.join(followers)})" if followers else ""))
    for h in followers:
        record_lost_step(HostStepKey(key.execution, key.stage, key.phase, h, 0, 1, regions[h]),
                         error_class="DelegateRestart",
                         error=f"never ran: the worker running its lane (host {key.host}) "
                               "was lost")
    return "failed (no Retry strategy for DelegateRestart)" + (
        f"; {', '.join(followers)} never ran" if followers else "")


def _unclaimed_hosts(execution_ids: set[str], before: Any) -> list[tuple[str, str, HostStepKey]]:
    """(execution, host, key of its first step) for hosts of long-dispatched phases with no
    row at all: their messages sit in a queue nobody consumes."""
    out = []
    with session_scope() as s:
        for ex_id in execution_ids:
            for pr in s.exec(select(PhaseRun).where(
                    PhaseRun.execution_id == ex_id, PhaseRun.status == Status.RUNNING,
                    PhaseRun.kind == "deploy", PhaseRun.dispatched_at < before)).all():
                run = s.exec(select(StageRun).where(StageRun.execution_id == ex_id,
                                                    StageRun.stage_index == pr.stage_index)).one()
                regions = {h["name"]: h["region"] for h in run.hosts}
                seen = {r.host for r in s.exec(select(HostStepRun).where(
                    HostStepRun.execution_id == ex_id, HostStepRun.stage_index == pr.stage_index,
                    HostStepRun.phase == pr.phase)).all()}
                for host in pr.hosts:
                    if host not in seen:
                        out.append((ex_id, host, HostStepKey(ex_id, pr.stage_index, pr.phase,
                                                             host, 0, 1, regions[host])))
    return out


def _evaluate_phase(s: Session, ex: Execution, run: StageRun, pr: PhaseRun, *,
                    gate: bool) -> bool:
    """Write the phase verdict when every host of it is done; False while any still runs.

    Called by the gate (every header task has finished) or by a nudge (maybe not). A host is
    done when each step has a finished row, or a step failed (later steps are skipped); with the
    gate, a missing row means its task never ran, which counts as failed. A rollback phase
    passes when every host of it rolled back (no failure budget applies to a rollback).
    """
    kind = "rollback" if pr.kind == "rollback" else "deploy"
    targets = (run.rollback or {}).get("hosts", {})

    def n_steps(host: str) -> int:
        if kind == "rollback":
            return int((targets.get(host) or {}).get("steps", 0))
        return len(ex.plan["stages"][run.stage_index]["steps"])

    rows = s.exec(select(HostStepRun).where(
        HostStepRun.execution_id == ex.id, HostStepRun.stage_index == run.stage_index,
        HostStepRun.phase == pr.phase, HostStepRun.kind == kind).options(
        *_deferred(HostStepRun.stdout_tail, HostStepRun.stderr_tail, HostStepRun.outputs))
    ).all()
    by_host: dict[str, dict[int, HostStepRun]] = {}
    for r in rows:
        cur = by_host.setdefault(r.host, {}).get(r.step_index)
        if cur is None or r.attempt > cur.attempt:
            by_host[r.host][r.step_index] = r
    failed: list[str] = []
    per_host: dict[str, dict[str, Any]] = {}
    stage_plan = ex.plan["stages"][run.stage_index]
    for host in pr.hosts:
        steps = by_host.get(host, {})
        running = any(r.status == Status.RUNNING or _retry_pending(stage_plan, r)
                      for r in steps.values())
        has_failed = any(r.status == Status.FAILED for r in steps.values())
        complete = len(steps) == n_steps(host) and all(r.status in Status.TERMINAL
                                                       for r in steps.values())
        if (running or not (complete or has_failed or gate)) and not gate:
            return False
        ok = complete and not has_failed and all(r.status in Status.PASSED
                                                 for r in steps.values())
        if not ok:
            failed.append(host)
            bad = next((r for r in sorted(steps.values(), key=lambda r: r.step_index)
                        if r.status not in Status.PASSED), None)
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
        passed, rule = _within_budget(s, ex, run, pr, failed)
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
        from app.rollback import record_rolled_back

        record_rolled_back(s, ex, run, ok_hosts)
    else:
        _record_instances(s, ex, run, ok_hosts, phase=pr.phase)
    return True


def _within_budget(s: Session, ex: Execution, run: StageRun, pr: PhaseRun,
                   failed: list[str]) -> tuple[bool, str]:
    """Does the stage stay within its failure budget, counting every phase so far?

    Like Ansible's max_fail_percentage, the budget must be *exceeded* to fail.
    """
    budget = ex.plan["stages"][run.stage_index]["strategy"].get("failureBudget") or {}
    total = len(run.hosts)
    allowed = max(int(budget.get("maxFailedHosts", 0)),
                  int(float(budget.get("maxFailedPercent", 0.0)) * total / 100))
    # Only the verdicts that may name failed hosts: a passed phase whose verdict says
    # "failed": [] is left out in SQL (a verdict with any other text is read and checked).
    earlier = {h for v in s.exec(select(PhaseRun.verdict).where(
        PhaseRun.execution_id == ex.id, PhaseRun.stage_index == run.stage_index,
        PhaseRun.id != pr.id, col(PhaseRun.verdict).is_not(None),
        or_(col(PhaseRun.status) != Status.SUCCEEDED,
            ~cast(PhaseRun.verdict, Text).contains('"failed": []', autoescape=True)))).all()
        for h in (v or {}).get("failed", [])}
    count = len(earlier | set(failed))
    rule = (f"at most {allowed} of {total} host(s) may fail in the stage"
            if allowed else "every host succeeds (failure budget 0)")
    return count <= allowed, f"{rule}; {count} failed so far"


def verification_gate(execution_id: str, stage_index: int, phase: int) -> str:
    """Body of a verification chord: judge the phase's checks from the ledger, then advance."""
    from app.models import CheckRun

    with session_scope() as s:
        found = _running_record(s, execution_id, stage_index, phase, "verify")
        if found is None:
            return advance(execution_id)
        ex, run, pr = found
        checks = {c.host: c for c in s.exec(select(CheckRun).where(
            CheckRun.execution_id == execution_id, CheckRun.stage_index == stage_index,
            CheckRun.phase == phase)).all()}
        failed, per_host = [], {}
        for host in pr.hosts:
            c = checks.get(host)
            per_host[host] = {"passed": bool(c and c.passed), "results": c.results if c else {},
                              "reasons": c.reasons if c else ["the host's checks never ran"]}
            if not (c and c.passed):
                failed.append(host)
        verification = ex.plan["stages"][stage_index]["strategy"].get("verification") or {}
        reasons: list[str] = []
        prom_result: dict[str, Any] | None = None
        if verification.get("prometheus"):
            prom_ok, prom_result = _prometheus_verdict(verification["prometheus"])
            if not prom_ok:
                reasons.append(prom_result.get("reason", "prometheus check failed"))
        passed, rule = _within_budget(s, ex, run, pr, failed)
        passed = passed and not reasons
        pr.verdict = {"passed": passed, "hosts": len(pr.hosts),
                      "succeeded": len(pr.hosts) - len(failed), "failed": failed,
                      "checks": per_host, "prometheus": prom_result, "reasons": reasons,
                      "rule": rule}
        pr.status = Status.SUCCEEDED if passed else Status.FAILED
        pr.gate_at = utcnow()
        s.add(pr)
    return advance(execution_id)


def _prometheus_verdict(spec: dict[str, Any]) -> tuple[bool, dict[str, Any]]:
    """Query Prometheus once for the phase and judge the value (app.verify.evaluate)."""
    from app.verify.probes import evaluate, prometheus_query

    url = spec.get("url") or get_settings().prometheus_url
    if not url:
        return False, {"reason": "a prometheus check needs a URL (prometheus.url or "
                                 "VMFARM_PROMETHEUS_URL)"}
    criterion = {k: spec[k] for k in ("query", "below", "above") if spec.get(k) is not None}
    try:
        value = prometheus_query(url, spec["query"])
        ok, reasons = evaluate({"prometheus": criterion}, {"prometheus": value})
    except Exception as exc:  # a broken metric source fails the gate, with the reason
        return False, {"query": spec["query"], "reason": f"prometheus check failed: {exc}"}
    return ok, {"query": spec["query"], "value": value, "reason": "; ".join(reasons)}


def record_switch(execution_id: str, stage_index: int, phase: int, *, ok: bool,
                  result: dict[str, Any], kind: str = "switch") -> str:
    """Record a traffic switch's outcome (and the new live set), then advance."""
    with session_scope() as s:
        found = _running_record(s, execution_id, stage_index, phase, kind)
        if found is None:
            return advance(execution_id)
        ex, _, pr = found
        stage = ex.plan["stages"][stage_index]
        pr.verdict = {**result, "passed": ok, "live": pr.hosts if ok else result.get("live"),
                      "service": stage["service"]["identifier"],
                      "environment": stage["environment"]["identifier"]}
        pr.status = Status.SUCCEEDED if ok else Status.FAILED
        pr.gate_at = utcnow()
        s.add(pr)
    return advance(execution_id)


def _record_instances(s: Session, ex: Execution, run: StageRun, hosts: list[str],
                      phase: int | None = None) -> None:
    """Update the per-host ledger: which version now runs where."""
    if not hosts:
        return
    stage = ex.plan["stages"][run.stage_index]
    version = (stage.get("artifact") or {}).get("tag")
    by_name = _stage_data(s, ex, run).by_name
    svc, env = stage["service"]["identifier"], stage["environment"]["identifier"]
    by_infra: dict[str, list[str]] = {}
    for name in hosts:
        by_infra.setdefault(by_name[name]["infrastructure"], []).append(name)
    # By the whole unique key (service, environment, infrastructure, host): index lookups
    # per host, not a scan of every instance the service has (that grew with every phase).
    existing: dict[tuple[str, str], Instance] = {}
    for infra, names in by_infra.items():
        for i in s.exec(select(Instance).where(Instance.service == svc,
                                               Instance.environment == env,
                                               Instance.infrastructure == infra,
                                               col(Instance.host).in_(names))).all():
            existing[(i.infrastructure, i.host)] = i
    held = releases_held(s, ex.id, run.stage_index, hosts, kind="deploy", phase=phase)
    now = utcnow()
    new: list[dict[str, Any]] = []
    for name in hosts:
        h = by_name[name]
        inst = existing.get((h["infrastructure"], name))
        if inst is None:  # rows, not model objects: building one costs more than its insert
            new.append({"service": svc, "environment": env,
                        "infrastructure": h["infrastructure"], "host": name,
                        "region": h["region"], "version": version, "previous_version": None,
                        "execution_id": ex.id, "previous_execution_id": None,
                        "releases": held.get(name), "updated_at": now})
            continue
        if inst.version != version:
            inst.previous_version = inst.version
            inst.previous_execution_id = inst.execution_id
        if name in held:
            inst.releases = held[name]
        inst.version, inst.execution_id, inst.updated_at = version, ex.id, now
        inst.region = h["region"]
        s.add(inst)
    if new:
        s.execute(insert(Instance), new)


def releases_held(s: Session, execution_id: str, stage_index: int, hosts: list[str], *,
                  kind: str, phase: int | None = None) -> dict[str, list[str]]:
    """The releases each host reported holding in its last Release unit of the stage (of the
    phase ``phase`` when given: a host's rows of one dispatch all carry its phase)."""
    from tasks.hoststep import RELEASES_OUTPUT

    out: dict[str, tuple[int, list[str]]] = {}
    where: list[Any] = [HostStepRun.execution_id == execution_id,
                        HostStepRun.stage_index == stage_index, HostStepRun.kind == kind,
                        col(HostStepRun.host).in_(hosts)]
    if phase is not None:
        where.append(HostStepRun.phase == phase)
    for rid, host, outputs in s.exec(select(HostStepRun.id, HostStepRun.host,
                                            HostStepRun.outputs).where(*where)).all():
        listed = (outputs or {}).get(RELEASES_OUTPUT)
        if listed is not None and (host not in out or (rid or 0) > out[host][0]):
            out[host] = (rid or 0, str(listed).split())
    return {h: v for h, (_, v) in out.items()}


def _summarise_steps(s: Session, ex: Execution, run: StageRun) -> None:
    """Each step's counts over the stage's hosts (every attempt), summed in SQL."""
    counts: dict[int, dict[str, int]] = {}
    for step_index, status, n in s.exec(
            select(HostStepRun.step_index, HostStepRun.status, func.count())
            .where(HostStepRun.execution_id == ex.id,
                   HostStepRun.stage_index == run.stage_index, HostStepRun.kind == "deploy")
            .group_by(col(HostStepRun.step_index), col(HostStepRun.status))).all():
        counts.setdefault(step_index, {})[status] = n
    times = {step_index: (first, last) for step_index, first, last in s.exec(
        select(HostStepRun.step_index, func.min(HostStepRun.started_at),
               func.max(HostStepRun.finished_at))
        .where(HostStepRun.execution_id == ex.id, HostStepRun.stage_index == run.stage_index,
               HostStepRun.kind == "deploy")
        .group_by(col(HostStepRun.step_index))).all()}
    steps = s.exec(select(StepRun).where(StepRun.execution_id == ex.id,
                                         StepRun.stage_index == run.stage_index)).all()
    for st in steps:
        mine = counts.get(st.step_index, {})
        st.succeeded = mine.get(Status.SUCCEEDED, 0)
        st.failed = mine.get(Status.FAILED, 0)
        st.skipped = mine.get(Status.SKIPPED, 0)
        st.started_at, st.finished_at = times.get(st.step_index, (None, None))
        st.status = (Status.FAILED if st.failed else Status.SUCCEEDED if st.succeeded
                     else Status.SKIPPED)
        s.add(st)


def _finish(s: Session, ex: Execution, status: str, *, error: str | None = None) -> None:
    ex.status, ex.finished_at = status, utcnow()
    if error:
        ex.error = error
    for run in s.exec(select(StageRun).where(StageRun.execution_id == ex.id,
                                             StageRun.status == Status.PENDING)).all():
        run.status = Status.SKIPPED
        s.add(run)
    s.add(ex)
