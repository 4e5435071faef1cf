"""Metrics read from the ledger: counters that only go up, and gauges of what is open now.

Counters are computed from SQL rows, not counted in a process: every number is the same
whatever process serves it, survives restarts of workers and of the exporter, and sees the
work of every worker (region workers run on other machines, the control worker is prefork).
Reading the whole ledger at every scrape would grow with its history, so the ``LedgerFold``
keeps running totals of *settled* executions and reads only the *open* ones per scrape:

* an execution is settled once it is terminal, finished ``grace`` seconds before the scrape
  (its last transaction has committed) and none of its host steps is still RUNNING (an
  aborted execution's steps may still be finishing; the reconciler fails the ones whose
  worker died). Its rows no longer change: they are summed once into the totals.
* every other execution is open: its rows are summed at every scrape, on top of the totals.

An execution moves from open to settled inside one scrape's snapshot (REPEATABLE READ on
PostgreSQL; SQLite serialises), so a counter never jumps or goes back when it does. The first
scrape of a new exporter sums the whole ledger once (a few aggregations).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from sqlalchemy import (
    ColumnElement,
    Select,
    Text,
    and_,
    case,
    cast,
    false,
    func,
    literal_column,
    select,
)
from sqlalchemy import or_ as sql_or
from sqlmodel import Session, col

from app.models import Execution, HostStepRun, PhaseRun, StageRun, Status

# Seconds. A host step takes from under a second to an hour; a phase up to a few hours.
STEP_BUCKETS: tuple[float, ...] = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
PHASE_BUCKETS: tuple[float, ...] = (1, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200)
# Unfinished executions, by the status they wait in.
ACTIVE = (Status.QUEUED, Status.RUNNING, Status.WAITING, Status.ROLLING_BACK)
# Executions whose work runs (not waiting for a person): how long they have run is watched.
RUNNING_LIKE = (Status.QUEUED, Status.RUNNING, Status.ROLLING_BACK)
# A gate's verdict is the status of its PhaseRun once decided.
VERDICTS = {Status.SUCCEEDED: "pass", Status.FAILED: "fail"}
GATE_KINDS = ("deploy", "verify", "approval", "switch", "rollback", "rollback-switch")
# Phases whose duration is the deployment's (not a person's wait: approvals, interventions).
PHASE_KINDS = ("deploy", "verify", "switch", "rollback", "rollback-switch")
ROLLBACK_OUTCOMES = (Status.ROLLED_BACK, Status.ROLLBACK_FAILED)
# How executions end (exposed from the start, as 0, per pipeline and environments).
OUTCOMES = (
    Status.SUCCEEDED,
    Status.FAILED,
    Status.ABORTED,
    Status.ROLLED_BACK,
    Status.ROLLBACK_FAILED,
)
# What the reconciler (app.coordinator.reconcile) does, recognised in the rows it writes.
RECONCILER_ACTIONS = (
    "lost_step",
    "unclaimed_step",
    "approval_timeout",
    "discovery_timeout",
    "lost_gate",
)
LOST_STEP_PREFIX = "worker lost: no heartbeat from"
UNCLAIMED_PREFIX = "no worker took the steps of"
APPROVAL_TIMEOUT_TEXT = "approval timed out after"
DISCOVERY_TIMEOUT_TEXT = "no worker listed the hosts"
LOST_GATE_TEXT = '"judged_by"'

Labels = tuple[str, ...]


# --- SQL pieces -----------------------------------------------------------------------------------


def environments_column(dialect: str) -> ColumnElement[Any]:
    """The environments an execution deploys to, from its plan: the identifiers of its stages'
    environments in stage order, each once, comma-joined ("staging,production"); NULL for a
    plan without one (an Approval-only pipeline)."""
    if dialect == "postgresql":
        expr = (
            "(SELECT string_agg(e, ',' ORDER BY k) FROM (SELECT s.value->'environment'"
            "->>'identifier' AS e, min(s.k) AS k FROM json_array_elements("
            "execution.plan->'stages') WITH ORDINALITY AS s(value, k) WHERE s.value->"
            "'environment'->>'identifier' IS NOT NULL GROUP BY 1) AS envs)"
        )
    elif dialect == "sqlite":
        expr = (
            "(SELECT group_concat(e, ',') FROM (SELECT json_extract(value, "
            "'$.environment.identifier') AS e, min(key) AS k FROM json_each("
            "execution.plan, '$.stages') WHERE e IS NOT NULL GROUP BY e ORDER BY k))"
        )
    else:
        raise RuntimeError(f"vmfarm's ledger metrics support SQLite and PostgreSQL, not {dialect}")
    return literal_column(expr)


def seconds_between(dialect: str, start: Any, end: Any) -> ColumnElement[Any]:
    """Seconds from ``start`` to ``end`` in SQL."""
    if dialect == "sqlite":  # julianday is a double: round its ~10 us noise off
        return func.round((func.julianday(end) - func.julianday(start)) * 86400.0, 3)
    return func.extract("epoch", end - start)


def _joined(table: Any) -> Any:
    """``table`` joined to its execution (for the pipeline's name)."""
    return table.__table__.join(
        Execution.__table__,  # type: ignore[attr-defined]
        col(Execution.id) == table.execution_id,
    )


# --- running totals -------------------------------------------------------------------------------


@dataclass
class Histograms:
    """Per label set: cumulative counts per bucket bound, then the count and the sum."""

    bounds: tuple[float, ...]
    values: dict[Labels, list[float]] = field(default_factory=dict)

    def add(self, labels: Labels, cumulative: Sequence[float], count: float, total: float) -> None:
        row = self.values.setdefault(labels, [0.0] * (len(self.bounds) + 2))
        for i, v in enumerate([*cumulative, count, total]):
            row[i] += float(v or 0)

    def merged(self, other: Histograms) -> Histograms:
        out = Histograms(self.bounds, {k: list(v) for k, v in self.values.items()})
        for labels, row in other.values.items():
            out.add(labels, row[:-2], row[-2], row[-1])
        return out


@dataclass
class Totals:
    """What the settled executions contributed (or, per scrape, the open ones)."""

    started: Counter[Labels] = field(default_factory=Counter)  # pipeline, environment
    finished: Counter[Labels] = field(default_factory=Counter)  # pipeline, env, status
    steps: Counter[Labels] = field(default_factory=Counter)  # region, kind, step, status
    step_durations: Histograms = field(default_factory=lambda: Histograms(STEP_BUCKETS))
    phase_durations: Histograms = field(default_factory=lambda: Histograms(PHASE_BUCKETS))
    verdicts: Counter[Labels] = field(default_factory=Counter)  # kind, verdict
    rollbacks: Counter[Labels] = field(default_factory=Counter)  # pipeline, status
    actions: Counter[Labels] = field(default_factory=Counter)  # action

    def merged(self, other: Totals) -> Totals:
        return Totals(
            started=self.started + other.started,
            finished=self.finished + other.finished,
            steps=self.steps + other.steps,
            step_durations=self.step_durations.merged(other.step_durations),
            phase_durations=self.phase_durations.merged(other.phase_durations),
            verdicts=self.verdicts + other.verdicts,
            rollbacks=self.rollbacks + other.rollbacks,
            actions=self.actions + other.actions,
        )


def _all(s: Session, query: Any) -> list[Any]:
    return list(s.connection().execute(query).all())


def _histogram(s: Session, totals: Histograms, query: Select[Any], labels: int) -> None:
    for row in _all(s, query):
        keys = tuple(str(v or "") for v in row[:labels])
        count, total, *cumulative = row[labels:]
        totals.add(keys, [float(c or 0) for c in cumulative], float(count or 0), float(total or 0))


def _bucket_sums(duration: ColumnElement[Any], bounds: Iterable[float]) -> list[Any]:
    return [func.sum(case((duration <= b, 1), else_=0)) for b in bounds]


ExecFilter = ColumnElement[bool]


def _executions(
    s: Session, dialect: str, started: ExecFilter, finished: ExecFilter, into: Totals
) -> None:
    """Executions started (``started`` filters them) and finished (``finished``)."""
    env = environments_column(dialect).label("environment")
    for where, counter, with_status in (
        (started, into.started, False),
        (finished, into.finished, True),
    ):
        inner = (
            select(
                col(Execution.pipeline).label("pipeline"),
                env,
                col(Execution.status).label("status"),
            )
            .where(where)
            .subquery()
        )
        keys = [inner.c.pipeline, inner.c.environment] + ([inner.c.status] if with_status else [])
        for *labels, n in _all(s, select(*keys, func.count()).group_by(*keys)):
            counter[tuple(str(v or "") for v in labels)] += int(n)


def _rows(s: Session, dialect: str, owner: ExecFilter, into: Totals) -> None:
    """The rows of the executions that ``owner`` (a filter on Execution.id) selects."""
    # Never correlated: some queries below join Execution themselves.
    ids = select(col(Execution.id)).where(owner).correlate(None)
    hs = col(HostStepRun.execution_id).in_(ids)
    done = col(HostStepRun.status) != Status.RUNNING
    region, kind, step = col(HostStepRun.region), col(HostStepRun.kind), col(HostStepRun.step_id)
    status = col(HostStepRun.status)
    for *labels, n in _all(
        s,
        select(region, kind, step, status, func.count())
        .where(hs, done)
        .group_by(region, kind, step, status),
    ):
        into.steps[tuple(str(v or "") for v in labels)] += int(n)
    dur = seconds_between(dialect, HostStepRun.started_at, HostStepRun.finished_at)
    _histogram(
        s,
        into.step_durations,
        select(
            kind,
            step,
            status,
            func.count(),
            func.coalesce(func.sum(dur), 0.0),
            *_bucket_sums(dur, STEP_BUCKETS),
        )
        .where(hs, done, col(HostStepRun.finished_at).is_not(None))
        .group_by(kind, step, status),
        3,
    )

    ps = col(PhaseRun.execution_id).in_(ids)
    pdur = seconds_between(dialect, PhaseRun.dispatched_at, PhaseRun.gate_at)
    pipeline, pkind, pstatus = col(Execution.pipeline), col(PhaseRun.kind), col(PhaseRun.status)
    _histogram(
        s,
        into.phase_durations,
        select(
            pipeline,
            pkind,
            pstatus,
            func.count(),
            func.coalesce(func.sum(pdur), 0.0),
            *_bucket_sums(pdur, PHASE_BUCKETS),
        )
        .select_from(_joined(PhaseRun))
        .where(
            ps,
            pkind.in_(PHASE_KINDS),
            col(PhaseRun.gate_at).is_not(None),
            pstatus != Status.RUNNING,
        )
        .group_by(pipeline, pkind, pstatus),
        3,
    )
    for k, st, n in _all(
        s,
        select(pkind, pstatus, func.count())
        .where(ps, pkind.in_(GATE_KINDS), pstatus.in_(list(VERDICTS)))
        .group_by(pkind, pstatus),
    ):
        into.verdicts[(k, VERDICTS[st])] += int(n)
    sstatus = col(StageRun.status)
    for p, st, n in _all(
        s,
        select(pipeline, sstatus, func.count())
        .select_from(_joined(StageRun))
        .where(col(StageRun.execution_id).in_(ids), sstatus.in_(ROLLBACK_OUTCOMES))
        .group_by(pipeline, sstatus),
    ):
        into.rollbacks[(p, st)] += int(n)
    error = func.coalesce(col(HostStepRun.error), "")
    verdict = func.coalesce(cast(PhaseRun.verdict, Text), "")
    counts = {
        "lost_step": select(func.count()).where(
            hs,
            col(HostStepRun.error_class) == "DelegateRestart",
            error.startswith(LOST_STEP_PREFIX),
        ),
        "unclaimed_step": select(func.count()).where(
            hs, col(HostStepRun.error_class) == "Timeout", error.startswith(UNCLAIMED_PREFIX)
        ),
        "approval_timeout": select(func.count()).where(
            ps,
            col(PhaseRun.kind) == "approval",
            col(PhaseRun.status) == Status.FAILED,
            verdict.contains(APPROVAL_TIMEOUT_TEXT),
        ),
        "discovery_timeout": select(func.count()).where(
            ps,
            col(PhaseRun.kind) == "discover",
            col(PhaseRun.status) == Status.FAILED,
            verdict.contains(DISCOVERY_TIMEOUT_TEXT),
        ),
        "lost_gate": select(func.count()).where(
            ps, col(PhaseRun.kind).in_(["deploy", "rollback"]), verdict.contains(LOST_GATE_TEXT)
        ),
    }
    for action, query in counts.items():
        into.actions[(action,)] += int(s.connection().execute(query).scalar() or 0)


# --- the fold -------------------------------------------------------------------------------------


def _terminal() -> ExecFilter:
    return col(Execution.status).in_(list(Status.TERMINAL))


@dataclass
class LedgerFold:
    """Running totals of the settled executions (see the module docstring).

    ``horizon``: executions created before it are in ``totals.started``; terminal executions
    that finished before it are in ``totals.finished`` and, unless listed in ``pending``
    (some host step was still RUNNING), their rows are in the row totals.
    """

    grace: float = 60.0
    horizon: datetime | None = None
    pending: set[str] = field(default_factory=set)
    totals: Totals = field(default_factory=Totals)

    def _running(self, s: Session, ids: Any) -> set[str]:
        return {
            r[0]
            for r in _all(
                s,
                select(col(HostStepRun.execution_id))
                .distinct()
                .where(
                    col(HostStepRun.execution_id).in_(ids),
                    col(HostStepRun.status) == Status.RUNNING,
                ),
            )
        }

    def advance(self, s: Session, dialect: str, now: datetime) -> None:
        """Fold what settled since the last call into the totals."""
        lo, hi = self.horizon, now - timedelta(seconds=self.grace)
        if lo is not None and hi <= lo:
            return
        created = col(Execution.created_at) < hi
        finished_band = and_(
            _terminal(), col(Execution.finished_at).is_not(None), col(Execution.finished_at) < hi
        )
        if lo is not None:
            created = and_(created, col(Execution.created_at) >= lo)
            finished_band = and_(finished_band, col(Execution.finished_at) >= lo)
        _executions(s, dialect, created, finished_band, self.totals)
        band = select(col(Execution.id)).where(finished_band).correlate(None)
        running = self._running(s, band)
        still = self._running(s, list(self.pending)) if self.pending else set()
        settled = self.pending - still
        owner: ExecFilter = sql_or(
            and_(col(Execution.id).in_(band), col(Execution.id).not_in(list(running))),
            col(Execution.id).in_(list(settled)) if settled else false(),
        )
        _rows(s, dialect, owner, self.totals)
        self.pending = still | running
        self.horizon = hi

    def open_totals(self, s: Session, dialect: str) -> Totals:
        """What the executions not folded yet contribute now."""
        out = Totals()
        h = self.horizon
        if h is None:  # nothing folded: everything is open
            everything = col(Execution.id).is_not(None)
            _executions(s, dialect, everything, _terminal(), out)
            _rows(s, dialect, everything, out)
            return out
        started = col(Execution.created_at) >= h
        finished = and_(
            _terminal(),
            sql_or(col(Execution.finished_at).is_(None), col(Execution.finished_at) >= h),
        )
        _executions(s, dialect, started, finished, out)
        owner = sql_or(
            col(Execution.status).not_in(list(Status.TERMINAL)),
            col(Execution.finished_at).is_(None),
            col(Execution.finished_at) >= h,
            col(Execution.id).in_(list(self.pending)) if self.pending else false(),
        )
        _rows(s, dialect, owner, out)
        return out


# --- gauges of what is open now -------------------------------------------------------------------


@dataclass
class Open:
    """Unfinished work now, per pipeline."""

    active: Counter[Labels] = field(default_factory=Counter)  # pipeline, status
    oldest_running: dict[str, float] = field(default_factory=dict)  # pipeline -> s
    approvals: Counter[str] = field(default_factory=Counter)  # pipeline
    oldest_approval: dict[str, float] = field(default_factory=dict)  # pipeline -> s
    interventions: Counter[str] = field(default_factory=Counter)  # pipeline
    steps_running: Counter[str] = field(default_factory=Counter)  # region
    rollbacks_running: Counter[str] = field(default_factory=Counter)  # pipeline


def open_work(s: Session, now: datetime) -> Open:
    """Unfinished executions, waiting approvals and interventions, steps in flight."""
    out = Open()
    pipeline, status = col(Execution.pipeline), col(Execution.status)
    for p, st, n in _all(
        s,
        select(pipeline, status, func.count()).where(status.in_(ACTIVE)).group_by(pipeline, status),
    ):
        out.active[(p, st)] += int(n)
    started = func.min(func.coalesce(Execution.started_at, Execution.created_at))
    for p, since in _all(
        s, select(pipeline, started).where(status.in_(RUNNING_LIKE)).group_by(pipeline)
    ):
        out.oldest_running[p] = max(0.0, (now - since).total_seconds())
    phases = (
        select(pipeline, func.count(), func.min(PhaseRun.dispatched_at))
        .select_from(_joined(PhaseRun))
        .where(col(PhaseRun.status) == Status.RUNNING, status.in_(ACTIVE))
        .group_by(pipeline)
    )
    for p, n, since in _all(
        s, phases.where(col(PhaseRun.kind) == "approval", status == Status.WAITING)
    ):
        out.approvals[p] += int(n)
        out.oldest_approval[p] = max(0.0, (now - since).total_seconds())
    for p, n, _since in _all(s, phases.where(col(PhaseRun.kind).startswith("mi-"))):
        out.interventions[p] += int(n)
    active_ids = select(col(Execution.id)).where(status.in_(ACTIVE)).correlate(None)
    region = col(HostStepRun.region)
    for r, n in _all(
        s,
        select(region, func.count())
        .where(
            col(HostStepRun.execution_id).in_(active_ids), col(HostStepRun.status) == Status.RUNNING
        )
        .group_by(region),
    ):
        out.steps_running[r or ""] += int(n)
    for p, n in _all(
        s,
        select(pipeline, func.count())
        .select_from(_joined(StageRun))
        .where(
            col(StageRun.execution_id).in_(active_ids), col(StageRun.status) == Status.ROLLING_BACK
        )
        .group_by(pipeline),
    ):
        out.rollbacks_running[p] += int(n)
    return out


# --- exposition -----------------------------------------------------------------------------------


def _le(b: float) -> str:
    return str(int(b)) + ".0" if float(b).is_integer() else repr(float(b))


def _histogram_family(name: str, doc: str, labels: list[str], h: Histograms) -> Metric:
    fam = HistogramMetricFamily(name, doc, labels=labels)
    les = [_le(b) for b in h.bounds] + ["+Inf"]
    for keys, row in sorted(h.values.items()):
        cumulative, count, total = row[:-2], row[-2], row[-1]
        fam.add_metric(list(keys), list(zip(les, [*cumulative, count], strict=True)), total)
    return fam


def families(t: Totals, o: Open) -> Iterator[Metric]:
    """The ledger's metric families from the totals (settled and open) and the open work."""
    started = CounterMetricFamily(
        "vmfarm_executions_started",
        "Executions recorded (runs, retries, rollbacks), by "
        "pipeline and the environments they deploy to",
        labels=["pipeline", "environment"],
    )
    for keys, n in sorted(t.started.items()):
        started.add_metric(list(keys), n)
    yield started
    finished = CounterMetricFamily(
        "vmfarm_executions_finished",
        "Executions that ended, by pipeline, environments and final status",
        labels=["pipeline", "environment", "status"],
    )
    # Every outcome of every pipeline and environments seen, as 0 until it happens: the first
    # failure must be an increase() of a series that was already there.
    seen = {(p, env, st) for (p, env) in t.started for st in OUTCOMES} | set(t.finished)
    for keys in sorted(seen):
        finished.add_metric(list(keys), t.finished.get(keys, 0))
    yield finished
    pipelines = sorted({k[0] for k in t.started} | {k[0] for k in o.active})
    active = GaugeMetricFamily(
        "vmfarm_executions_active",
        "Unfinished executions by pipeline and the status they are in",
        labels=["pipeline", "status"],
    )
    for p in pipelines:
        for status in ACTIVE:
            active.add_metric([p, status], o.active.get((p, status), 0))
    yield active
    oldest = GaugeMetricFamily(
        "vmfarm_executions_running_oldest_age_seconds",
        "Seconds since the oldest queued, "
        "running or rolling-back execution of the pipeline started",
        labels=["pipeline"],
    )
    for p, age in sorted(o.oldest_running.items()):
        oldest.add_metric([p], age)
    yield oldest
    steps = CounterMetricFamily(
        "vmfarm_host_steps",
        "Host step attempts that ended, by region, kind (deploy, "
        "rollback), step identifier and status",
        labels=["region", "kind", "step", "status"],
    )
    for keys, n in sorted(t.steps.items()):
        steps.add_metric(list(keys), n)
    yield steps
    running = GaugeMetricFamily(
        "vmfarm_host_steps_running", "Host steps running now, by region", labels=["region"]
    )
    for region, n in sorted(o.steps_running.items()):
        running.add_metric([region], n)
    yield running
    yield _histogram_family(
        "vmfarm_host_step_duration_seconds",
        "Duration of the host step attempts that ended, by kind, step identifier and status",
        ["kind", "step", "status"],
        t.step_durations,
    )
    yield _histogram_family(
        "vmfarm_phase_duration_seconds",
        "Duration of decided phases (deploy, verify, switch, "
        "rollback), from dispatch to the gate's verdict, by pipeline, kind and status",
        ["pipeline", "kind", "status"],
        t.phase_durations,
    )
    verdicts = CounterMetricFamily(
        "vmfarm_gate_verdicts",
        "Decided phase gates by kind and verdict (pass, fail)",
        labels=["kind", "verdict"],
    )
    # Deploy and verify verdicts always, as 0 until there is one: a rate() needs a series.
    every = {(k, v) for k in ("deploy", "verify") for v in VERDICTS.values()}
    for keys in sorted(every | set(t.verdicts)):
        verdicts.add_metric(list(keys), t.verdicts.get(keys, 0))
    yield verdicts
    rollbacks = CounterMetricFamily(
        "vmfarm_rollbacks",
        "Stages that ended rolled back or failed to roll back, by pipeline and outcome (status)",
        labels=["pipeline", "status"],
    )
    for p in sorted({k[0] for k in t.rollbacks} | set(pipelines)):
        for status in ROLLBACK_OUTCOMES:
            rollbacks.add_metric([p, status], t.rollbacks.get((p, status), 0))
    yield rollbacks
    rolling = GaugeMetricFamily(
        "vmfarm_rollbacks_running", "Stages rolling back now, by pipeline", labels=["pipeline"]
    )
    for p in pipelines:
        rolling.add_metric([p], o.rollbacks_running.get(p, 0))
    yield rolling
    actions = CounterMetricFamily(
        "vmfarm_reconciler_actions",
        "What the reconciler did: steps failed as lost "
        "(lost_step), work no worker took (unclaimed_step), approvals and discoveries timed "
        "out, phases judged without their gate (lost_gate)",
        labels=["action"],
    )
    for action in RECONCILER_ACTIONS:
        actions.add_metric([action], t.actions.get((action,), 0))
    yield actions
    approvals = GaugeMetricFamily(
        "vmfarm_approvals_waiting",
        "Approval stages waiting for people, by pipeline",
        labels=["pipeline"],
    )
    for p in pipelines:
        approvals.add_metric([p], o.approvals.get(p, 0))
    yield approvals
    waited = GaugeMetricFamily(
        "vmfarm_approvals_oldest_waiting_seconds",
        "Seconds the oldest waiting approval of the pipeline has waited",
        labels=["pipeline"],
    )
    for p, seconds in sorted(o.oldest_approval.items()):
        waited.add_metric([p], seconds)
    yield waited
    mi = GaugeMetricFamily(
        "vmfarm_interventions_waiting",
        "Manual interventions waiting for a person, by pipeline",
        labels=["pipeline"],
    )
    for p in pipelines:
        mi.add_metric([p], o.interventions.get(p, 0))
    yield mi
