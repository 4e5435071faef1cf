"""Cron triggers for pipelines: a schedules file, a tick that submits due runs once per slot.

The schedules file (``VMFARM_SCHEDULES_FILE``; by default ``configs/schedules.yaml`` when it
exists in the working directory; an empty ``VMFARM_SCHEDULES_FILE`` turns schedules off)::

    schedules:
      - name: nightly-redeploy          # unique; [A-Za-z0-9_.-]
        cron: "0 2 * * *"               # minute hour day-of-month month day-of-week, or @daily...
        timezone: Europe/Paris          # IANA name; default UTC
        files: [compose/]               # relative to the schedules file's folder
        pipeline: compose_demo          # optional: when the files define several
        inputs: {tag: 1.0.0}            # optional: runtime inputs (--set)
        startingDeadline: 5m            # optional: how late a slot may still start (default 5m)
        enabled: true                   # optional

Cron syntax is Vixie cron's five fields: ``*``, ``a``, ``a-b``, ``*/n``, ``a-b/n``, ``a/n``,
comma lists, month and weekday names (``jan``, ``mon``), weekday 0 or 7 for Sunday, and the
macros ``@yearly`` (``@annually``), ``@monthly``, ``@weekly``, ``@daily`` (``@midnight``) and
``@hourly``. When both day-of-month and day-of-week are restricted (neither starts with ``*``) a
day matches if *either* does, as in cron. Times are wall-clock times in the schedule's timezone:
a time that a daylight-saving jump skips runs at the same instant one hour later wall-clock (the
offset before the jump applies), and a repeated time runs once (its first occurrence).

The tick (task ``vmfarm.schedules_tick``, sent every minute by the beat of
``vmfarm worker --control --beat``) takes, for each schedule, the latest slot at or before now;
a slot younger than ``startingDeadline`` is *claimed*, then submitted with
``app.operations.run(Actor("scheduler"), files, pipeline=..., inputs=...)``: RBAC applies to the
user ``scheduler`` as to anyone (it needs ``pipeline:execute``), and the run is audited as
``scheduler``'s. A slot is claimed at most once, whoever ticks and however often:

* with a Redis broker, by ``SET vmfarm:schedule:<name>:<slot> NX`` on the broker (kept 8 days);
* otherwise (embedded mode), under an exclusive ``flock`` of ``$VMFARM_HOME/schedules.lock``,
  by moving the schedule's last slot forward in ``$VMFARM_HOME/schedules-state.json``.

A claimed slot whose submission fails (bad files, no live worker) is not tried again: the
error is logged and kept as the schedule's last outcome (``vmfarm schedules`` shows it). A slot
missed by more than its deadline (no beat running then) is skipped, never caught up.
"""

from __future__ import annotations

import calendar
import contextlib
import fcntl
import json
import logging
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta, tzinfo
from pathlib import Path
from typing import Any, Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from app.celery import app
from app.errors import ConfigError

log = logging.getLogger("vmfarm.schedules")

DEFAULT_FILE = Path("configs/schedules.yaml")
DEFAULT_DEADLINE = 300.0
SCHEDULER_USER = "scheduler"
# How far ahead (and back) a cron search looks: a 29 February on a Monday recurs within 28 years.
_SEARCH_YEARS = 30
# A daylight-saving jump moves wall clock by at most this much: candidates this far apart in
# local time may be out of order in UTC, so the search compares them all.
_DST_SLACK = timedelta(hours=3)
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
_CLAIM_TTL = 8 * 24 * 3600

# --- cron expressions ----------------------------------------------------------------------------

MACROS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
_MONTHS = {m.lower(): i for i, m in enumerate(calendar.month_abbr) if m}
_DAYS = {"sun": 0, "mon": 1, "tue": 2, "wed": 3, "thu": 4, "fri": 5, "sat": 6}
# (name, low, high, names)
_FIELDS: tuple[tuple[str, int, int, Mapping[str, int]], ...] = (
    ("minute", 0, 59, {}),
    ("hour", 0, 23, {}),
    ("day of month", 1, 31, {}),
    ("month", 1, 12, _MONTHS),
    ("day of week", 0, 7, _DAYS),
)


def _value(text: str, what: str, low: int, high: int, names: Mapping[str, int]) -> int:
    t = text.strip().lower()
    if t in names:
        return names[t]
    if not t.isdigit():
        raise ValueError(
            f"{what}: {text!r} is not a number"
            + (f" or a name ({', '.join(names)})" if names else "")
        )
    n = int(t)
    if not low <= n <= high:
        raise ValueError(f"{what}: {n} is out of range {low}-{high}")
    return n


def _parse_field(
    text: str, what: str, low: int, high: int, names: Mapping[str, int]
) -> frozenset[int]:
    out: set[int] = set()
    for part in text.split(","):
        if not part:
            raise ValueError(f"{what}: empty item in {text!r}")
        rng, slash, step_text = part.partition("/")
        step = 1
        if slash:
            if not step_text.isdigit() or int(step_text) < 1:
                raise ValueError(f"{what}: step {step_text!r} must be a positive number")
            step = int(step_text)
        if rng == "*":
            a, b = low, high
        elif "-" in rng:
            lo, _, hi = rng.partition("-")
            a, b = _value(lo, what, low, high, names), _value(hi, what, low, high, names)
            if a > b:
                raise ValueError(f"{what}: range {rng!r} goes backwards")
        else:
            a = _value(rng, what, low, high, names)
            b = high if slash else a  # "5/15": from 5 to the end, every 15
        out.update(range(a, b + 1, step))
    return frozenset(out)


@dataclass(frozen=True)
class Cron:
    """A parsed five-field cron expression (``Cron.parse("*/15 9-17 * * mon-fri")``)."""

    text: str
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Sunday ... 6 = Saturday
    dom_star: bool
    dow_star: bool

    @classmethod
    def parse(cls, text: str) -> Cron:
        """ValueError naming the field for anything cron would not accept, or a date that never
        comes (``0 0 30 2 *``)."""
        raw = str(text).strip()
        expr = MACROS.get(raw.lower(), raw)
        if expr.startswith("@"):
            raise ValueError(f"unknown macro {raw!r} (known: {', '.join(MACROS)})")
        parts = expr.split()
        if len(parts) != 5:
            raise ValueError(
                f"{raw!r} has {len(parts)} fields; a cron expression has 5: "
                "minute hour day-of-month month day-of-week"
            )
        sets = [_parse_field(p, *spec) for p, spec in zip(parts, _FIELDS, strict=True)]
        weekdays = frozenset(d % 7 for d in sets[4])
        cron = cls(
            text=raw,
            minutes=sets[0],
            hours=sets[1],
            days=sets[2],
            months=sets[3],
            weekdays=weekdays,
            dom_star=parts[2].startswith("*"),
            dow_star=parts[4].startswith("*"),
        )
        if cron.dow_star and not any(d <= _month_days(m) for m in cron.months for d in cron.days):
            raise ValueError(
                f"{raw!r} never fires: no month of "
                f"{sorted(cron.months)} has day {sorted(cron.days)}"
            )
        return cron

    def matches_day(self, d: date) -> bool:
        if d.month not in self.months:
            return False
        dom = d.day in self.days
        dow = (d.isoweekday() % 7) in self.weekdays
        if self.dom_star or self.dow_star:
            return dom and dow
        return dom or dow

    def matches(self, t: datetime) -> bool:
        """Whether wall-clock time ``t`` (its minute) is a slot."""
        return t.minute in self.minutes and t.hour in self.hours and self.matches_day(t.date())

    def _local(self, start: datetime, forward: bool) -> Iterator[datetime]:
        """Matching naive wall-clock minutes from ``start`` (included), in time order."""
        hours = sorted(self.hours, reverse=not forward)
        minutes = sorted(self.minutes, reverse=not forward)
        start = start.replace(second=0, microsecond=0, tzinfo=None)
        day = start.date()
        one = timedelta(days=1 if forward else -1)
        for _ in range(366 * _SEARCH_YEARS):
            if self.matches_day(day):
                for h in hours:
                    for m in minutes:
                        t = datetime(day.year, day.month, day.day, h, m)
                        if (t >= start) if forward else (t <= start):
                            yield t
            day += one

    def next_after(self, after: datetime, tz: tzinfo = UTC) -> datetime | None:
        """The first slot strictly after the aware instant ``after``, as an aware UTC datetime
        (slots are wall-clock times in ``tz``). None if there is none within 30 years."""
        best: datetime | None = None
        best_local: datetime | None = None
        for local in self._local(after.astimezone(tz) - _DST_SLACK, forward=True):
            if best_local is not None and local > best_local + _DST_SLACK:
                break
            at = local.replace(tzinfo=tz).astimezone(UTC)
            if at > after and (best is None or at < best):
                best, best_local = at, best_local or local
        return best

    def last_at_or_before(self, at: datetime, tz: tzinfo = UTC) -> datetime | None:
        """The latest slot at or before the aware instant ``at``, as an aware UTC datetime."""
        best: datetime | None = None
        best_local: datetime | None = None
        for local in self._local(at.astimezone(tz) + _DST_SLACK, forward=False):
            if best_local is not None and local < best_local - _DST_SLACK:
                break
            when = local.replace(tzinfo=tz).astimezone(UTC)
            if when <= at and (best is None or when > best):
                best, best_local = when, best_local or local
        return best


def _month_days(month: int) -> int:
    return 29 if month == 2 else calendar.monthrange(2001, month)[1]


# --- the schedules file --------------------------------------------------------------------------


@dataclass(frozen=True)
class Schedule:
    """One entry of the schedules file, checked; ``files`` are absolute paths."""

    name: str
    cron: Cron
    files: tuple[str, ...]
    pipeline: str | None = None
    inputs: Mapping[str, str] = field(default_factory=dict)
    timezone: str = "UTC"
    deadline: float = DEFAULT_DEADLINE
    enabled: bool = True
    source: str = ""

    @property
    def tz(self) -> tzinfo:
        return ZoneInfo(self.timezone)

    def next_run(self, now: datetime) -> datetime | None:
        return self.cron.next_after(now, self.tz)

    def due_slot(self, now: datetime) -> datetime | None:
        """The slot to submit at ``now``: the latest one at or before it, unless it is older
        than the deadline (missed) or the schedule is disabled."""
        if not self.enabled:
            return None
        slot = self.cron.last_at_or_before(now, self.tz)
        if slot is None or (now - slot).total_seconds() > self.deadline:
            return None
        return slot


def schedules_file() -> Path | None:
    """``VMFARM_SCHEDULES_FILE`` (empty: none), else ``configs/schedules.yaml`` if it exists."""
    env = os.environ.get("VMFARM_SCHEDULES_FILE")
    if env is not None:
        return Path(env) if env.strip() else None
    return DEFAULT_FILE if DEFAULT_FILE.is_file() else None


_KEYS = {"name", "cron", "files", "pipeline", "inputs", "timezone", "startingDeadline", "enabled"}


def _entry(raw: Any, where: str, base: Path) -> Schedule:
    from app.definitions.base import parse_duration

    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: a schedule is a mapping with name, cron and files")
    unknown = sorted(set(map(str, raw)) - _KEYS)
    if unknown:
        raise ConfigError(
            f"{where}: unknown field(s) {', '.join(unknown)} (known: {', '.join(sorted(_KEYS))})"
        )
    name = raw.get("name")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        hint = " (quote it: YAML reads yes/no/on/off as booleans)" if isinstance(name, bool) else ""
        raise ConfigError(
            f"{where}: 'name' must be a name of letters, digits, '_', '.', '-' (got {name!r}){hint}"
        )
    where = f"{where} ({name})"
    try:
        cron = Cron.parse(str(raw.get("cron", "")))
    except ValueError as exc:
        raise ConfigError(f"{where}: cron: {exc}") from None
    files = raw.get("files")
    if isinstance(files, str):
        files = [files]
    if not isinstance(files, list) or not files or not all(isinstance(f, str) and f for f in files):
        raise ConfigError(f"{where}: 'files' must list the pipeline files or folders to run")
    pipeline = raw.get("pipeline")
    if pipeline is not None and not isinstance(pipeline, str):
        raise ConfigError(f"{where}: 'pipeline' must be a pipeline identifier")
    inputs = raw.get("inputs") or {}
    if not isinstance(inputs, dict):
        raise ConfigError(f"{where}: 'inputs' must map input names to values")
    tz_name = str(raw.get("timezone") or "UTC")
    try:
        ZoneInfo(tz_name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(
            f"{where}: unknown timezone {tz_name!r} (use an IANA name such as Europe/Paris or UTC)"
        ) from None
    deadline = DEFAULT_DEADLINE
    if raw.get("startingDeadline") is not None:
        try:
            deadline = parse_duration(str(raw["startingDeadline"]))
        except ValueError as exc:
            raise ConfigError(f"{where}: startingDeadline: {exc}") from None
        if deadline < 0:
            raise ConfigError(f"{where}: startingDeadline must not be negative")
    enabled = raw.get("enabled", True)
    if not isinstance(enabled, bool):
        raise ConfigError(f"{where}: 'enabled' must be true or false")
    return Schedule(
        name=name,
        cron=cron,
        files=tuple(str((base / f).resolve()) for f in files),
        pipeline=pipeline,
        inputs={str(k): "" if v is None else str(v) for k, v in inputs.items()},
        timezone=tz_name,
        deadline=deadline,
        enabled=enabled,
        source=where,
    )


def load_schedules(path: Path | str | None = None) -> list[Schedule]:
    """The schedules of ``path`` (default: ``schedules_file()``; none: []). ConfigError naming
    the file and the entry for anything wrong."""
    import yaml

    p = Path(path) if path is not None else schedules_file()
    if p is None:
        return []
    try:
        data = yaml.safe_load(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such schedules file") from None
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{p}: cannot read the schedules file: {exc}") from None
    if data is None:
        return []
    items = data.get("schedules") if isinstance(data, dict) else data
    if items is None:
        return []
    if not isinstance(items, list):
        raise ConfigError(f"{p}: 'schedules' must be a list")
    base = p.resolve().parent
    out = [_entry(raw, f"{p}: schedules[{i}]", base) for i, raw in enumerate(items)]
    seen: set[str] = set()
    for s in out:
        if s.name in seen:
            raise ConfigError(f"{p}: two schedules are named {s.name!r}")
        seen.add(s.name)
    return out


# --- claims: one submission per (schedule, slot) -------------------------------------------------


def _iso(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class ClaimStore(Protocol):
    def claim(self, name: str, slot: datetime) -> bool:
        """True for exactly one caller per (name, slot)."""

    def record(self, name: str, slot: datetime, outcome: dict[str, Any]) -> None:
        """Keep the outcome of a claimed slot as the schedule's last run."""

    def last(self, name: str) -> dict[str, Any] | None:
        """The last claimed slot of ``name``: {slot, outcome?} (None: never)."""


class RedisClaims:
    """Claims on the Redis broker: ``SET vmfarm:schedule:<name>:<slot> NX EX 8d``."""

    def __init__(self, url: str) -> None:
        import redis

        self.client = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5)

    def claim(self, name: str, slot: datetime) -> bool:
        key = f"vmfarm:schedule:{name}:{_iso(slot)}"
        if not self.client.set(key, _iso(datetime.now(UTC)), nx=True, ex=_CLAIM_TTL):
            return False
        self.client.set(
            f"vmfarm:schedule-last:{name}", json.dumps({"slot": _iso(slot)}), ex=_CLAIM_TTL * 8
        )
        return True

    def record(self, name: str, slot: datetime, outcome: dict[str, Any]) -> None:
        self.client.set(
            f"vmfarm:schedule-last:{name}",
            json.dumps({"slot": _iso(slot), **outcome}),
            ex=_CLAIM_TTL * 8,
        )

    def last(self, name: str) -> dict[str, Any] | None:
        raw = self.client.get(f"vmfarm:schedule-last:{name}")
        return dict(json.loads(raw)) if raw else None


class FileClaims:
    """Claims in ``<home>/schedules-state.json`` under an exclusive lock of
    ``<home>/schedules.lock``: a slot is claimed when it is later than the last one kept."""

    def __init__(self, home: Path) -> None:
        self.state = home / "schedules-state.json"
        self.lock = home / "schedules.lock"

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        self.lock.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with open(os.open(self.lock, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                data = self._read()
                before = json.dumps(data, sort_keys=True)
                yield data
                if json.dumps(data, sort_keys=True) != before:
                    tmp = self.state.with_name(self.state.name + ".tmp")
                    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                    with open(fd, "w") as out:
                        out.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
                    os.replace(tmp, self.state)
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.state.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{self.state}: unreadable schedules state: {exc}") from None
        return data if isinstance(data, dict) else {}

    def claim(self, name: str, slot: datetime) -> bool:
        with self._locked() as data:
            kept = data.get(name) or {}
            if str(kept.get("slot", "")) >= _iso(slot):  # ISO UTC strings sort as times
                return False
            data[name] = {"slot": _iso(slot)}
            return True

    def record(self, name: str, slot: datetime, outcome: dict[str, Any]) -> None:
        with self._locked() as data:
            if (data.get(name) or {}).get("slot") == _iso(slot):
                data[name] = {"slot": _iso(slot), **outcome}

    def last(self, name: str) -> dict[str, Any] | None:
        kept = self._read().get(name)
        return dict(kept) if isinstance(kept, dict) else None


def default_store() -> ClaimStore:
    """Redis claims on the broker when it is Redis, else the file under VMFARM_HOME."""
    from app.settings import get_settings

    s = get_settings()
    if s.celery_broker.startswith(("redis://", "rediss://")):
        return RedisClaims(s.celery_broker)
    return FileClaims(s.home_dir)


# --- the tick ------------------------------------------------------------------------------------

Submit = Callable[..., str]


def _submit(
    files: Sequence[str], *, pipeline: str | None, inputs: Mapping[str, str], user: str
) -> str:
    from app import operations

    return operations.run(operations.Actor(user), files, pipeline=pipeline, inputs=inputs)


def tick(
    now: datetime | None = None,
    *,
    schedules: Sequence[Schedule] | None = None,
    submit: Submit | None = None,
    store: ClaimStore | None = None,
) -> list[dict[str, Any]]:
    """Submit every schedule whose latest slot is due and not yet claimed; return what was
    done, one dict per due schedule: ``{name, slot, execution}`` or ``{name, slot, error}``,
    or ``{name, slot, claimed: False}`` when another tick had it."""
    now = (now or datetime.now(UTC)).astimezone(UTC)
    if schedules is None:
        schedules = load_schedules()
    submit = submit or _submit
    results: list[dict[str, Any]] = []
    for sched in schedules:
        slot = sched.due_slot(now)
        if slot is None:
            continue
        if store is None:
            store = default_store()
        if not store.claim(sched.name, slot):
            results.append({"name": sched.name, "slot": _iso(slot), "claimed": False})
            continue
        outcome: dict[str, Any]
        try:
            execution = submit(
                list(sched.files),
                pipeline=sched.pipeline,
                inputs=dict(sched.inputs),
                user=SCHEDULER_USER,
            )
        except Exception as exc:  # bad files, no live worker: kept as the last outcome
            log.error("schedule %s (slot %s): not submitted: %s", sched.name, _iso(slot), exc)
            outcome = {"error": str(exc), "at": _iso(now)}
        else:
            log.info(
                "schedule %s (slot %s): submitted execution %s", sched.name, _iso(slot), execution
            )
            outcome = {"execution": execution, "at": _iso(now)}
        try:
            store.record(sched.name, slot, outcome)
        except Exception as exc:
            log.warning("schedule %s: cannot record its outcome: %s", sched.name, exc)
        results.append({"name": sched.name, "slot": _iso(slot), **outcome})
    return results


@app.task(name="vmfarm.schedules_tick", ignore_result=True)
def schedules_tick() -> list[dict[str, Any]]:
    """The beat's every-minute tick (see the module docstring)."""
    try:
        return tick()
    except ConfigError as exc:  # a broken schedules file: say so every minute, keep ticking
        log.error("schedules: %s", exc)
        return []


def execution_statuses(ids: Sequence[str]) -> dict[str, str]:
    """The ledger's status of each of these executions (those it has)."""
    if not ids:
        return {}
    from sqlmodel import col, select

    from app.db import session_scope
    from app.models import Execution

    with session_scope() as s:
        rows = s.exec(
            select(Execution.id, Execution.status).where(col(Execution.id).in_(list(ids)))
        ).all()
    return {str(i): str(st) for i, st in rows}


def describe(
    schedules: Sequence[Schedule],
    now: datetime | None = None,
    *,
    store: ClaimStore | None = None,
    statuses: Callable[[Sequence[str]], Mapping[str, str]] | None = execution_statuses,
) -> list[dict[str, Any]]:
    """The schedules as ``vmfarm schedules -o json`` prints them, with their next run and, when
    the claim store answers, their last one: ``last`` is ``{slot, at, execution, status}``
    (``status``: the execution's status in the ledger now, e.g. SUCCEEDED, FAILED, RUNNING;
    None when the ledger cannot say), or ``{slot, at, error}`` for a slot whose submission
    failed, or ``{slot}`` while it is being submitted."""
    now = (now or datetime.now(UTC)).astimezone(UTC)
    lasts: dict[str, dict[str, Any] | None] = {}
    for s in schedules:
        lasts[s.name] = None
        if store is not None:
            try:
                lasts[s.name] = store.last(s.name)
            except Exception as exc:
                log.debug("schedule %s: last run unknown: %s", s.name, exc)
    ids = sorted({str(v["execution"]) for v in lasts.values() if v and v.get("execution")})
    known: Mapping[str, str] = {}
    if ids and statuses is not None:
        try:
            known = statuses(ids)
        except Exception as exc:  # the ledger is a nicety here: list the schedules anyway
            log.warning("schedules: the last executions' status is unknown: %s", exc)
    for v in lasts.values():
        if v and v.get("execution"):
            v["status"] = known.get(str(v["execution"]))
    out: list[dict[str, Any]] = []
    for s in schedules:
        nxt = s.next_run(now) if s.enabled else None
        last = lasts[s.name]
        out.append(
            {
                "name": s.name,
                "cron": s.cron.text,
                "timezone": s.timezone,
                "files": list(s.files),
                "pipeline": s.pipeline,
                "inputs": dict(s.inputs),
                "enabled": s.enabled,
                "startingDeadline": s.deadline,
                "next_run": _iso(nxt) if nxt else None,
                "next_run_local": nxt.astimezone(s.tz).isoformat() if nxt else None,
                "in_seconds": round((nxt - now).total_seconds()) if nxt else None,
                "missing_files": [f for f in s.files if not Path(f).exists()],
                "last": last,
            }
        )
    return out
