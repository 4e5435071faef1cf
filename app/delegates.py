"""Delegate selection: which workers may run a region task, and the queue that takes it there.

Harness picks a delegate for a task by tags (every tag a task asks for, the delegate must have)
and, among the eligible delegates, the least loaded one. vmfarm does the same with queues:

* a worker started with ``--region R --tags a,b`` consumes ``vmfarm.R`` and one queue per
  non-empty subset of its tags: ``vmfarm.R[a]``, ``vmfarm.R[b]`` and ``vmfarm.R[a,b]``;
* a task that needs tags T goes to ``vmfarm.R[T]`` (T sorted, comma-joined: ``queue_for``),
  which is consumed by exactly the workers of R whose tags include T;
* prefetch is off, so the first eligible worker with a free slot takes it: least loaded.

Every ``vmfarm worker`` registers in the ledger (``WorkerBeat``) and renews its row every
``heartbeat_interval`` seconds; it is live while its last beat is younger than
``heartbeat_timeout``. ``unserved`` and ``resolve_queue`` read that registry so that the
coordinator can refuse (or fall back) before dispatching work that no live worker could take:
otherwise it would wait in its queue until it expires.
"""

from __future__ import annotations

import itertools
import logging
import re
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any, NamedTuple

from app.celery import region_queue

log = logging.getLogger("vmfarm.delegates")

# A worker takes at most this many tags: it consumes 2**n - 1 tag queues per region.
MAX_TAGS = 6
_TAG_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_QUEUE_RE = re.compile(r"^vmfarm\.([a-z0-9][a-z0-9-]{0,62})(?:\[([a-z0-9_,-]+)\])?$")

# (region, tags) or (region, tags, fallback): what one task needs to run.
Requirement = tuple[str, Iterable[str]] | tuple[str, Iterable[str], bool]


# --- names ----------------------------------------------------------------------------------------


def normalise_tags(tags: Iterable[str] | str | None) -> tuple[str, ...]:
    """Tags sorted and without duplicates; a string is a comma-separated list. A tag is
    ``[a-z0-9][a-z0-9_-]*`` (at most 63 characters): anything else raises ValueError."""
    if tags is None:
        return ()
    items = tags.split(",") if isinstance(tags, str) else list(tags)
    found: set[str] = set()
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"invalid worker tag {item!r}: tags are strings")
        tag = item.strip()
        if not tag:
            continue
        if not _TAG_RE.match(tag):
            raise ValueError(
                f"invalid worker tag {tag!r}: use lower-case letters, digits, '-' "
                "and '_', starting with a letter or a digit"
            )
        found.add(tag)
    return tuple(sorted(found))


def queue_for(region: str, tags: Iterable[str] = ()) -> str:
    """The queue of a task of ``region`` that needs workers with every one of ``tags``:
    ``vmfarm.<region>`` without tags, else ``vmfarm.<region>[a,b]`` (sorted, comma-joined).

    ValueError for an invalid region or tag name, or more than MAX_TAGS tags (no worker could
    consume that queue).
    """
    base = region_queue(region)
    wanted = normalise_tags(tags)
    if not wanted:
        return base
    if len(wanted) > MAX_TAGS:
        raise ValueError(
            f"a task may require at most {MAX_TAGS} worker tags (a worker takes "
            f"at most {MAX_TAGS}); got {len(wanted)}: {', '.join(wanted)}"
        )
    return f"{base}[{','.join(wanted)}]"


def parse_queue(name: str) -> tuple[str, tuple[str, ...]] | None:
    """``vmfarm.r1[a,b]`` -> ``("r1", ("a", "b"))``; ``None`` for any other queue (control)."""
    m = _QUEUE_RE.match(name)
    if m is None or name == "vmfarm.control":
        return None
    return m.group(1), tuple(m.group(2).split(",")) if m.group(2) else ()


def tag_subsets(tags: Iterable[str]) -> list[tuple[str, ...]]:
    """Every non-empty subset of a worker's tags, each sorted: the tag queues it consumes."""
    have = normalise_tags(tags)
    if len(have) > MAX_TAGS:
        raise ValueError(
            f"a worker takes at most {MAX_TAGS} tags (it consumes a queue per "
            f"subset of them); got {len(have)}: {', '.join(have)}"
        )
    return [c for n in range(1, len(have) + 1) for c in itertools.combinations(have, n)]


def worker_queues(regions: Iterable[str], tags: Iterable[str] = ()) -> list[str]:
    """The region queues a worker with ``tags`` consumes: per region, the plain queue and one
    per non-empty subset of its tags."""
    subsets = tag_subsets(tags)
    names: set[str] = set()
    for region in regions:
        names.add(region_queue(region))
        names.update(queue_for(region, s) for s in subsets)
    return sorted(names)


# --- the registry -------------------------------------------------------------------------------


def _as_dict(row: Any, now: datetime, timeout: float) -> dict[str, Any]:
    age = max(0.0, (now - row.beat_at).total_seconds())
    return {
        "name": row.name,
        "hostname": row.hostname,
        "pid": row.pid,
        "regions": list(row.regions or []),
        "tags": list(row.tags or []),
        "queues": list(row.queues or []),
        "concurrency": row.concurrency,
        "pool": row.pool,
        "in_flight": row.in_flight,
        "started_at": row.started_at.isoformat() + "Z",
        "beat_at": row.beat_at.isoformat() + "Z",
        "age": round(age, 1),
        "live": age <= timeout,
    }


def all_workers(now: datetime | None = None) -> list[dict[str, Any]]:
    """Every registered worker, live or not (``live``: last beat within heartbeat_timeout;
    ``age``: seconds since it), by name."""
    from sqlmodel import select

    from app.db import session_scope
    from app.models import WorkerBeat, utcnow
    from app.settings import get_settings

    now = now or utcnow()
    timeout = get_settings().heartbeat_timeout
    with session_scope() as s:
        rows = s.exec(select(WorkerBeat).order_by(WorkerBeat.name)).all()
        return [_as_dict(r, now, timeout) for r in rows]


def live_workers(now: datetime | None = None) -> list[dict[str, Any]]:
    """The workers whose last heartbeat is within heartbeat_timeout, as dicts: name, hostname,
    pid, regions, tags, queues, concurrency, pool, in_flight, started_at, beat_at (ISO, UTC),
    age (seconds since the last beat), live (True)."""
    return [w for w in all_workers(now) if w["live"]]


def serves(worker: dict[str, Any], region: str, tags: Iterable[str] = ()) -> bool:
    """Whether ``worker`` (a registry dict) consumes ``region`` with every one of ``tags``."""
    return region in worker.get("regions", []) and set(normalise_tags(tags)) <= set(
        worker.get("tags", [])
    )


def describe(worker: dict[str, Any]) -> str:
    """``w-r1@host (r1, tags: gpu)``."""
    regions = ", ".join(worker.get("regions", [])) or "control only"
    return f"{worker['name']} ({regions}, tags: {', '.join(worker.get('tags', [])) or 'none'})"


def _describe_many(workers: Sequence[dict[str, Any]], limit: int = 8) -> str:
    if not workers:
        return "none"
    shown = ", ".join(describe(w) for w in workers[:limit])
    return shown + (f" and {len(workers) - limit} more" if len(workers) > limit else "")


class QueueChoice(NamedTuple):
    """Where to send a requirement's tasks: ``queue`` (``None``: no live worker can take them)
    and a message (empty when the requirement is served as asked; else why not, or the
    fallback taken)."""

    queue: str | None
    message: str

    @property
    def tags(self) -> list[str]:
        """The tags to put in a step key so that ``route_task`` picks ``queue`` (none after a
        fallback to the plain region queue)."""
        parsed = parse_queue(self.queue) if self.queue else None
        return list(parsed[1]) if parsed else []


def _embedded() -> bool:
    from app.settings import get_settings

    return get_settings().embedded


def _choose(
    region: str, tags: Iterable[str], fallback: bool, workers: Sequence[dict[str, Any]]
) -> QueueChoice:
    wanted = normalise_tags(tags)
    queue = queue_for(region, wanted)
    live = [w for w in workers if w.get("live", True)]
    in_region = [w for w in live if region in w.get("regions", [])]
    if any(set(wanted) <= set(w.get("tags", [])) for w in in_region):
        return QueueChoice(queue, "")
    what = f"region {region}" + (f" with tags [{', '.join(wanted)}]" if wanted else "")
    if wanted and fallback and in_region:
        plain = region_queue(region)
        return QueueChoice(
            plain,
            f"no live worker serves {what}; falling back to the other "
            f"workers of region {region} (queue {plain})",
        )
    message = f"no live worker serves {what} (live workers: {_describe_many(live)})"
    silent = [w for w in workers if not w.get("live", True) and serves(w, region, wanted)]
    if silent:
        message += "; not heard from: " + ", ".join(
            f"{w['name']} (last beat {w['age']:.0f}s ago)" for w in silent
        )
    return QueueChoice(None, message)


def resolve_queue(
    region: str,
    tags: Iterable[str] = (),
    fallback: bool = False,
    *,
    workers: Sequence[dict[str, Any]] | None = None,
) -> QueueChoice:
    """The queue for tasks of ``region`` that need ``tags``, given the live workers.

    * a live worker of the region has every tag: ``(queue_for(region, tags), "")``;
    * none has, ``fallback`` is true and the region has a live worker: the plain region queue,
      and a message saying so (``choice.tags`` is then empty: put no tags in the step key);
    * otherwise ``(None, message)``, the message naming the region, the tags and the live
      workers. Whether to refuse or dispatch anyway (a worker may start) is the caller's call.

    ``workers`` defaults to the registry (``all_workers()``). In embedded mode the worker is
    in-process and serves every queue it is given: the plain region queue, always.
    ValueError for an invalid region or tag name, or more than MAX_TAGS tags.
    """
    if workers is None:
        if _embedded():
            normalise_tags(tags)
            return QueueChoice(region_queue(region), "")
        workers = all_workers()
    return _choose(region, tags, fallback, workers)


def _requirements(requirements: Iterable[Requirement]) -> list[tuple[str, tuple[str, ...], bool]]:
    seen: dict[tuple[str, tuple[str, ...], bool], None] = {}
    for req in requirements:
        region, tags = req[0], normalise_tags(req[1])
        fallback = bool(req[2]) if len(req) > 2 else False
        seen.setdefault((region, tags, fallback), None)
    return list(seen)


def unserved(
    requirements: Iterable[Requirement], *, workers: Sequence[dict[str, Any]] | None = None
) -> list[str]:
    """One message per distinct requirement ``(region, tags)`` or ``(region, tags, fallback)``
    that no live worker can serve, e.g. ``no live worker serves region eu-west-1 with tags
    [gpu, pci] (live workers: w-r1@host (r1, tags: none))``. Empty when all are served.

    A worker serves (region, tags) when it consumes the region and has every tag; with
    ``fallback`` any live worker of the region will do. ``workers`` defaults to the registry;
    in embedded mode everything is served (the in-process worker).
    """
    reqs = _requirements(requirements)
    if workers is None:
        if _embedded():
            return []
        workers = all_workers()
    out = []
    for region, tags, fallback in reqs:
        choice = _choose(region, tags, fallback, workers)
        if choice.queue is None:
            out.append(choice.message)
    return out


# --- queues on the broker -------------------------------------------------------------------------


def queue_depths(names: Iterable[str] = (), *, strict: bool = False) -> dict[str, int | None]:
    """Messages waiting in each of ``names`` and in every other ``vmfarm.*`` queue the broker
    knows: declared by a worker or a publisher (bound to the vmfarm exchange), or holding
    messages (a Redis list named after the queue), whether or not anyone consumes it.

    Only a Redis broker can say: a queue is a Redis list named as the queue, plus one list per
    priority step (``<queue>\\x06\\x16<priority>``), which kombu's ``_size`` sums. For any other
    broker every depth is ``None`` (unknown); so it is when Redis cannot be reached, unless
    ``strict`` (then the error is raised).
    """
    from app.celery import CONTROL_QUEUE, EXCHANGE, app
    from app.settings import get_settings

    wanted = {*names, CONTROL_QUEUE}
    if not get_settings().celery_broker.startswith(("redis://", "rediss://")):
        return dict.fromkeys(sorted(wanted))
    try:
        with app.connection_for_read() as conn:
            conn.ensure_connection(max_retries=1, timeout=5)
            channel = conn.default_channel
            try:
                # Every queue bound to the vmfarm exchange, by whoever declared it.
                wanted.update(q for _rk, _pattern, q in channel.get_table(EXCHANGE.name))
            except Exception:  # no binding yet: the table does not exist
                log.debug("no bindings for exchange %s", EXCHANGE.name, exc_info=True)
            wanted.update(queues_holding_messages(channel.client))
            return {q: int(channel._size(q)) for q in sorted(wanted) if q.startswith("vmfarm.")}
    except Exception as exc:
        if strict:
            raise
        log.warning("cannot read queue depths from the broker: %s", exc)
        return dict.fromkeys(sorted(wanted))


# kombu's Redis transport keeps priority steps of a queue in lists named queue + this + step.
_PRIORITY_SEP = "\x06\x16"


def queues_holding_messages(client: Any) -> set[str]:
    """Names of the vmfarm queues that hold messages on a Redis broker: its ``vmfarm.*``
    lists (priority lists count for their queue). ``client``: a redis-py client."""
    found: set[str] = set()
    for key in client.scan_iter(match="vmfarm.*", count=1000):
        name = key.decode("utf-8", "replace") if isinstance(key, bytes) else str(key)
        name = name.split(_PRIORITY_SEP, 1)[0]
        if name == "vmfarm.control" or _QUEUE_RE.match(name):
            found.add(name)
    return found


def forget_workers(
    names: Iterable[str] = (), *, stale: bool = False, now: datetime | None = None
) -> list[str]:
    """Remove workers from the registry: those named, and with ``stale`` every worker not
    heard from within heartbeat_timeout. A live worker is never removed (it would register
    again at its next beat): LookupError names it, and unknown names. Returns the names
    removed.

    A worker that dies without its clean shutdown stays registered as stale (``vmfarm
    workers`` and the ``vmfarm_workers{state="stale"}`` metric show it) until it restarts
    under the same name or is forgotten here.
    """
    from datetime import timedelta

    from sqlalchemy import delete
    from sqlmodel import col

    from app.db import session_scope
    from app.models import WorkerBeat, utcnow
    from app.settings import get_settings

    now = now or utcnow()
    every = {w["name"]: w for w in all_workers(now)}
    wanted = list(dict.fromkeys(names))
    unknown = [n for n in wanted if n not in every]
    if unknown:
        raise LookupError(
            f"no registered worker {', '.join(unknown)} (registered: "
            f"{', '.join(sorted(every)) or 'none'})"
        )
    live = [n for n in wanted if every[n]["live"]]
    if live:
        raise LookupError(
            f"worker {', '.join(live)} is live (heard from within the heartbeat "
            "timeout): stop it instead; a stopped worker removes itself"
        )
    chosen = set(wanted) | ({n for n, w in every.items() if not w["live"]} if stale else set())
    if chosen:
        # Only rows still stale: a worker that beat again meanwhile stays.
        quiet = now - timedelta(seconds=get_settings().heartbeat_timeout)
        with session_scope() as s:
            s.exec(
                delete(WorkerBeat).where(
                    col(WorkerBeat.name).in_(sorted(chosen)), col(WorkerBeat.beat_at) < quiet
                )
            )
    return sorted(chosen)
