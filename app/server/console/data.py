"""What the console's pages show, read from the ledger as plain data (no HTML here).

The execution page of a 500-host run must stay readable: ``summarise`` turns the report into
counts per status and per step, failures grouped by error (as ``vmfarm status`` groups them),
and one page of hosts (the failed and running first), so a page never lists thousands of rows.
"""

from __future__ import annotations

from collections import Counter
from datetime import timedelta
from typing import Any

from app.status import Status

HOSTS_PER_PAGE = 100
# The order hosts are listed in: what needs a look first.
_HOST_ORDER = {
    Status.FAILED: 0,
    Status.ROLLBACK_FAILED: 1,
    Status.ABORTED: 2,
    Status.RUNNING: 3,
    Status.WAITING: 4,
    Status.PENDING: 5,
}


def environments_of(plan: dict[str, Any]) -> list[str]:
    """The environments a plan's stages deploy to, in order (from the plan as stored)."""
    out: list[str] = []
    for stage in plan.get("stages") or []:
        env = stage.get("environment") if isinstance(stage, dict) else None
        ident = env.get("identifier") if isinstance(env, dict) else None
        if ident and ident not in out:
            out.append(str(ident))
    return out


def executions(
    *,
    pipeline: str = "",
    environment: str = "",
    statuses: list[str] | None = None,
    user: str = "",
    since_hours: float | None = None,
    limit: int = 100,
) -> list[dict[str, Any]]:
    """The newest executions matching every filter given (ValueError for an unknown status)."""
    from sqlmodel import col, select

    from app.db import session_scope
    from app.models import Execution, StageRun, utcnow
    from app.report import execution_statuses

    wanted = execution_statuses(statuses or [])
    q = select(Execution)
    if pipeline:
        q = q.where(Execution.pipeline == pipeline)
    if wanted:
        q = q.where(col(Execution.status).in_(wanted))
    if user:
        q = q.where(Execution.created_by == user)
    if since_hours is not None:
        q = q.where(Execution.created_at >= utcnow() - timedelta(hours=since_hours))
    # The environment lives in the plan (JSON): read more rows and filter them here.
    q = q.order_by(col(Execution.created_at).desc()).limit(limit * (5 if environment else 1))
    with session_scope() as s:
        rows = s.exec(q).all()
        ids = [r.id for r in rows]
        stages = (
            s.exec(
                select(StageRun.execution_id, StageRun.identifier, StageRun.status)
                .where(col(StageRun.execution_id).in_(ids))
                .order_by(col(StageRun.stage_index))
            ).all()
            if ids
            else []
        )
    stages_of: dict[str, list[dict[str, str]]] = {}
    for ex_id, ident, st in stages:
        stages_of.setdefault(ex_id, []).append({"identifier": ident, "status": st})
    out = []
    for r in rows:
        envs = environments_of(r.plan or {})
        if environment and environment not in envs:
            continue
        out.append(
            {
                "id": r.id,
                "pipeline": r.pipeline,
                "pipeline_name": r.pipeline_name,
                "status": r.status,
                "created_by": r.created_by,
                "created_at": r.created_at.isoformat(timespec="seconds") + "Z",
                "finished_at": r.finished_at.isoformat(timespec="seconds") + "Z"
                if r.finished_at
                else None,
                "environments": envs,
                "stages": stages_of.get(r.id, []),
                "error": r.error,
            }
        )
        if len(out) >= limit:
            break
    return out


def _first_line(text: str | None) -> str:
    line = (text or "").strip().splitlines()
    return line[0][:300] if line else ""


def failure_of(host: dict[str, Any]) -> str | None:
    """What a failed host's failure is grouped under: its failing step's error class and
    first line of error (or exit code)."""
    if host["status"] not in (Status.FAILED, Status.ROLLBACK_FAILED):
        return None
    if host.get("verification") == "FAILED":
        return "verification failed"
    for step in host["steps"]:
        if step["status"] == Status.FAILED:
            why = _first_line(step.get("error")) or (
                f"exit code {step['exit_code']}" if step.get("exit_code") is not None else "failed"
            )
            cls = step.get("error_class")
            return f"{step['step']}: " + (f"{cls}: {why}" if cls else why)
    rb = host.get("rollback") or {}
    if rb.get("status") == Status.ROLLBACK_FAILED:
        return f"rollback {rb.get('step')}: {_first_line(rb.get('error'))}"
    return "failed"


def summarise(
    stage: dict[str, Any],
    *,
    status: str = "",
    search: str = "",
    page: int = 1,
    per_page: int = HOSTS_PER_PAGE,
) -> dict[str, Any]:
    """One stage's hosts for a person: counts per status, per step and status, per version,
    failures grouped by error (largest group first, a few hosts named each), and one page of
    hosts (filtered by ``status`` and a ``search`` in the name; needing a look first)."""
    hosts = stage["hosts"]
    by_status = Counter(h["status"] for h in hosts)
    by_step: dict[str, Counter[str]] = {sid: Counter() for sid in stage["steps"]}
    for h in hosts:
        for st in h["steps"]:
            by_step.setdefault(st["step"], Counter())[st["status"]] += 1
    versions = Counter(h.get("version") or "none" for h in hosts)
    groups: dict[str, list[str]] = {}
    for h in hosts:
        why = failure_of(h)
        if why:
            groups.setdefault(why, []).append(h["host"])
    failures = [
        {"error": why, "count": len(names), "hosts": names[:5]}
        for why, names in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))
    ]
    chosen = [
        h
        for h in hosts
        if (not status or h["status"] == status) and (not search or search in h["host"])
    ]
    chosen.sort(key=lambda h: (_HOST_ORDER.get(h["status"], 9), h["host"]))
    pages = max(1, (len(chosen) + per_page - 1) // per_page)
    page = min(max(1, page), pages)
    shown = chosen[(page - 1) * per_page : page * per_page]
    return {
        "total": len(hosts),
        "by_status": dict(sorted(by_status.items())),
        "by_step": {sid: dict(sorted(c.items())) for sid, c in by_step.items()},
        "versions": dict(versions.most_common()),
        "failures": failures,
        "matching": len(chosen),
        "page": page,
        "pages": pages,
        "hosts": [
            {
                "host": h["host"],
                "region": h["region"],
                "status": h["status"],
                "version": h.get("version"),
                "step": next(
                    (
                        st["step"]
                        for st in h["steps"]
                        if st["status"] not in Status.PASSED and st["status"] != Status.PENDING
                    ),
                    None,
                ),
                "failure": failure_of(h),
            }
            for h in shown
        ],
    }


def approval_of(report: dict[str, Any]) -> dict[str, Any] | None:
    """The approval the execution waits for: message, groups, votes so far, how many needed."""
    if report["status"] != Status.WAITING:
        return None
    for stage in report["stages"]:
        for phase in stage["phases"]:
            if phase["kind"] == "approval" and phase["status"] == Status.RUNNING:
                v = phase.get("verdict") or {}
                return {
                    "stage": stage["name"],
                    "message": v.get("message") or "",
                    "groups": v.get("groups") or [],
                    "required": v.get("required") or 1,
                    "votes": v.get("approvals") or [],
                    "disallow_executor": bool(v.get("disallow_executor")),
                }
    return None


def host_of(report: dict[str, Any], host: str) -> dict[str, Any] | None:
    """One host across the execution's stages: each stage's steps with every attempt."""
    found = []
    for stage in report["stages"]:
        for h in stage["hosts"]:
            if h["host"] == host:
                found.append({"stage": stage["name"], "index": stage["index"], **h})
    return {"host": host, "stages": found} if found else None


def log_since(
    execution_id: str, host: str, after: int = 0, limit: int = 2000
) -> tuple[list[dict[str, Any]], int]:
    """A host's log chunks written after chunk id ``after``, in order, masked; and the last
    id read (what a live follower asks from next)."""
    from sqlmodel import col, select

    from app.db import session_scope
    from app.models import HostStepRun, LogChunk
    from app.secrets import mask

    with session_scope() as s:
        rows = s.exec(
            select(LogChunk, HostStepRun)
            .join(HostStepRun, col(HostStepRun.id) == col(LogChunk.host_step_run_id))
            .where(
                HostStepRun.execution_id == execution_id,
                HostStepRun.host == host,
                col(LogChunk.id) > after,
            )
            .order_by(col(LogChunk.id))
            .limit(limit)
        ).all()
    last = after
    out = []
    for chunk, run in rows:
        last = max(last, chunk.id or 0)
        out.append(
            {
                "id": chunk.id,
                "stage": run.stage_index,
                "step": run.step_id,
                "kind": run.kind,
                "attempt": run.attempt,
                "unit": chunk.unit,
                "stream": chunk.stream,
                "text": mask(chunk.text),
            }
        )
    return out, last


def fleet() -> dict[str, Any]:
    """Regions with their queues (depth) and workers (live or stale, tags, load), and the
    instances of each service per environment with their versions and releases."""
    from sqlmodel import col, select

    from app.celery import CONTROL_QUEUE
    from app.db import session_scope
    from app.delegates import all_workers, parse_queue, queue_depths
    from app.models import Instance

    workers = all_workers()
    known = {q for w in workers for q in w["queues"]}
    try:
        depths: dict[str, int | None] = queue_depths(known)
    except Exception:  # the broker is down: show the registry anyway
        depths = dict.fromkeys(known)
    regions: dict[str, dict[str, Any]] = {}

    def region(name: str) -> dict[str, Any]:
        return regions.setdefault(name, {"name": name, "queues": [], "workers": []})

    for q, depth in sorted(depths.items()):
        parsed = parse_queue(q)
        name = parsed[0] if parsed else ("control" if q == CONTROL_QUEUE else None)
        if name is None:
            continue
        region(name)["queues"].append(
            {
                "name": q,
                "tags": list(parsed[1]) if parsed else [],
                "depth": depth,
                "consumers": sum(1 for w in workers if w["live"] and q in w["queues"]),
            }
        )
    for w in workers:
        names = list(w["regions"] or []) + (["control"] if CONTROL_QUEUE in w["queues"] else [])
        for name in names:
            region(name)["workers"].append(w)
    with session_scope() as s:
        rows = s.exec(
            select(Instance).order_by(
                col(Instance.service), col(Instance.environment), col(Instance.host)
            )
        ).all()
    services: dict[tuple[str, str], dict[str, Any]] = {}
    for i in rows:
        entry = services.setdefault(
            (i.service, i.environment),
            {
                "service": i.service,
                "environment": i.environment,
                "versions": Counter(),
                "hosts": [],
            },
        )
        entry["versions"][i.version or "none"] += 1
        entry["hosts"].append(
            {
                "host": i.host,
                "infrastructure": i.infrastructure,
                "region": i.region,
                "version": i.version,
                "previous_version": i.previous_version,
                "releases": list(i.releases or []),
                "execution_id": i.execution_id,
            }
        )
    return {
        "regions": [regions[k] for k in sorted(regions)],
        "live": sum(1 for w in workers if w["live"]),
        "stale": sum(1 for w in workers if not w["live"]),
        "services": [
            {**v, "versions": dict(v["versions"].most_common())}
            for _, v in sorted(services.items())
        ],
    }


def audit(
    *, user: str = "", action: str = "", execution_id: str = "", outcome: str = "", limit: int = 100
) -> list[dict[str, Any]]:
    """The newest audit events matching every filter given."""
    from app import audit as trail

    rows = trail.events(
        limit if not outcome else limit * 5,
        execution_id=execution_id or None,
        user=user or None,
        action=action or None,
    )
    if outcome:
        rows = [r for r in rows if r["outcome"] == outcome][:limit]
    return rows


__all__ = [
    "approval_of",
    "audit",
    "environments_of",
    "executions",
    "failure_of",
    "fleet",
    "host_of",
    "log_since",
    "summarise",
]
