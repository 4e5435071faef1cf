"""Deployment freezes: Harness's freeze windows, read from files an operator controls.

A freeze is written as Harness writes it (optionally under ``apiVersion: v1`` and
``kind: Freeze``)::

    freeze:
      name: Year-end freeze
      identifier: year_end
      status: Enabled                   # Enabled | Disabled
      entityConfigs:                    # a run is frozen when one rule matches one of its
        - name: production              # deployment stages (every entity of the rule matches)
          entities:
            - type: EnvType             # Service | Environment | EnvType | Pipeline
              filterType: Equals        # All | Equals | NotEquals   (Org, Project: All only)
              entityRefs: [Production]
            - type: Service
              filterType: NotEquals
              entityRefs: [hotfix_tool]
      windows:
        - timeZone: Europe/Berlin       # IANA time zone; times below are local to it
          startTime: 2026-12-20 06:00 PM   # also 2026-12-20 18:00
          duration: 2w                  # or endTime: 2027-01-04 08:00 AM
          recurrence:                   # optional: Daily | Weekly | Monthly | Yearly
            type: Yearly
            spec:
              until: 2030-12-31 11:59 PM   # last start (optional); Monthly takes value: N
                                           # (every N months, 2-11)

Freezes come from ``vmfarm run --freeze FILE`` and from the folder ``VMFARM_FREEZE_DIR`` (the
operator's). They only add: each enabled window of each source applies on its own, so no file
can lift or disable another's freeze (the pipeline files may not hold one at all).

``active()`` is a pure function of the freezes, the plan and the time it is given (tests inject
it); ``app.operations`` refuses a run inside a window, or lets a user with ``freeze:override``
through, and audits both.
"""

from __future__ import annotations

import calendar
import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import AfterValidator, Field, model_validator

from app.definitions.base import Identifier, Model, parse_duration
from app.errors import ConfigError, VmfarmError

TIME_FORMATS = ("%Y-%m-%d %I:%M %p", "%Y-%m-%d %H:%M")
ENV_TYPES = ("Production", "PreProduction")


class FreezeActiveError(VmfarmError):
    """A run falls inside an active freeze window (nothing was recorded); exit 2."""


def parse_time(text: str) -> datetime:
    """``2026-12-20 06:00 PM`` (Harness's form) or ``2026-12-20 18:00``: a wall-clock time."""
    for fmt in TIME_FORMATS:
        try:
            return datetime.strptime(text.strip(), fmt)
        except ValueError:
            continue
    raise ValueError(
        f"'{text}' is not a time: write it as Harness does, 2026-12-20 06:00 PM "
        "(or 2026-12-20 18:00), local to the window's timeZone"
    )


def _check_time(v: str) -> str:
    parse_time(v)
    return v


def parse_length(text: str) -> timedelta:
    """A window's duration: ``30m``, ``4h``, ``2d``, ``1w`` (and combinations, ``1w2d``)."""
    t = str(text).strip()
    m = re.fullmatch(r"(?:(\d+)w)?\s*(.*)", t)
    weeks = int(m.group(1) or 0) if m else 0
    rest = m.group(2) if m else t
    seconds = parse_duration(rest) if rest else 0.0
    if weeks * 7 * 86400 + seconds <= 0:
        raise ValueError(f"'{text}' is not a duration (use e.g. 30m, 4h, 2d, 1w)")
    return timedelta(weeks=weeks, seconds=seconds)


def _check_length(v: str) -> str:
    parse_length(v)
    return v


def _check_zone(v: str) -> str:
    try:
        ZoneInfo(v)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(
            f"unknown time zone '{v}' (an IANA name such as Europe/Berlin, America/New_York or UTC)"
        ) from None
    return v


LocalTime = Annotated[str, AfterValidator(_check_time)]


class FreezeEntity(Model):
    type: Literal["Service", "Environment", "EnvType", "Pipeline", "Org", "Project"]
    filter_type: Literal["All", "Equals", "NotEquals"]
    entity_refs: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _refs(self) -> FreezeEntity:
        if self.type in ("Org", "Project") and self.filter_type != "All":
            raise ValueError(
                f"a {self.type} filter other than All is not supported: vmfarm "
                "has one organisation and project (its freeze covers every "
                "pipeline it runs); filter by Pipeline, Service, Environment or "
                "EnvType"
            )
        if self.filter_type == "All" and self.entity_refs:
            raise ValueError("filterType All takes no entityRefs (use Equals or NotEquals)")
        if self.filter_type != "All" and not self.entity_refs:
            raise ValueError(f"filterType {self.filter_type} needs entityRefs")
        if self.type == "EnvType":
            bad = [r for r in self.entity_refs if r not in ENV_TYPES]
            if bad:
                raise ValueError(
                    f"unknown environment type(s) {', '.join(bad)} (Production, PreProduction)"
                )
        return self

    def matches(self, value: str) -> bool:
        """Does a stage's value (its service, environment, ...) fall under this filter?"""
        if self.filter_type == "All":
            return True
        return (value in self.entity_refs) == (self.filter_type == "Equals")


class EntityConfig(Model):
    """One rule: it matches a stage when every one of its entities does (a type it does not
    name matches every value)."""

    name: str
    entities: list[FreezeEntity] = Field(min_length=1)


class RecurrenceSpec(Model):
    until: LocalTime | None = None
    value: int | None = Field(default=None, ge=2, le=11)


class Recurrence(Model):
    type: Literal["Daily", "Weekly", "Monthly", "Yearly"]
    spec: RecurrenceSpec = Field(default_factory=RecurrenceSpec)

    @model_validator(mode="after")
    def _value(self) -> Recurrence:
        if self.spec.value is not None and self.type != "Monthly":
            raise ValueError("spec.value (every N months) is for a Monthly recurrence only")
        return self


class FreezeWindow(Model):
    time_zone: Annotated[str, AfterValidator(_check_zone)]
    start_time: LocalTime
    duration: Annotated[str, AfterValidator(_check_length)] | None = None
    end_time: LocalTime | None = None
    recurrence: Recurrence | None = None

    @model_validator(mode="after")
    def _end(self) -> FreezeWindow:
        if (self.duration is None) == (self.end_time is None):
            raise ValueError("a window takes either duration or endTime (one of them)")
        if self.end_time is not None and self.length() <= timedelta(0):
            raise ValueError(f"endTime {self.end_time} is not after startTime {self.start_time}")
        until = self.recurrence.spec.until if self.recurrence else None
        if until is not None and parse_time(until) < parse_time(self.start_time):
            raise ValueError(f"recurrence until {until} is before startTime {self.start_time}")
        return self

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.time_zone)

    def _aware(self, wall: datetime) -> datetime:
        return wall.replace(tzinfo=self.zone)

    def length(self) -> timedelta:
        if self.duration is not None:
            return parse_length(self.duration)
        assert self.end_time is not None
        return self._aware(parse_time(self.end_time)) - self._aware(parse_time(self.start_time))

    def _nth_start(self, n: int) -> datetime:
        """The wall-clock start of occurrence ``n`` (0 is startTime itself)."""
        start = parse_time(self.start_time)
        kind = self.recurrence.type if self.recurrence else None
        if kind == "Daily":
            return start + timedelta(days=n)
        if kind == "Weekly":
            return start + timedelta(weeks=n)
        months = (
            n * (self.recurrence.spec.value or 1)
            if kind == "Monthly" and self.recurrence
            else 12 * n
        )
        return _add_months(start, months)

    def ends_after(self, now: datetime) -> datetime | None:
        """When the occurrence of this window that ``now`` (timezone-aware) falls in ends, or
        None when ``now`` is outside every occurrence."""
        length = self.length()
        if self.recurrence is None:
            start = self._aware(parse_time(self.start_time))
            return start + length if start <= now < start + length else None
        first = parse_time(self.start_time)
        wall = now.astimezone(self.zone).replace(tzinfo=None)
        kind = self.recurrence.type
        every = self.recurrence.spec.value or 1
        if kind == "Daily":
            guess, period = (wall - first).days, timedelta(days=1)
        elif kind == "Weekly":
            guess, period = (wall - first).days // 7, timedelta(weeks=1)
        elif kind == "Monthly":
            months = (wall.year - first.year) * 12 + wall.month - first.month
            guess, period = months // every, timedelta(days=28 * every)
        else:
            guess, period = wall.year - first.year, timedelta(days=365)
        until = self.recurrence.spec.until
        last = parse_time(until) if until else None
        # An occurrence longer than the period overlaps the next ones: look back far enough.
        back = math.ceil(length / period) + 1
        for n in range(guess + 1, guess - back - 1, -1):
            if n < 0:
                break
            wall_start = self._nth_start(n)
            if last is not None and wall_start > last:
                continue
            start = self._aware(wall_start)
            if start <= now < start + length:
                return start + length
        return None


def _add_months(t: datetime, months: int) -> datetime:
    """``t`` plus whole months, the day clamped to the month's last (Jan 31 + 1 = Feb 28)."""
    index = t.year * 12 + t.month - 1 + months
    year, month = divmod(index, 12)
    day = min(t.day, calendar.monthrange(year, month + 1)[1])
    return t.replace(year=year, month=month + 1, day=day)


def _no_notifications(v: list[Any]) -> list[Any]:
    if v:
        raise ValueError(
            "notificationRules of a freeze are not supported: vmfarm says why a "
            "run is refused when it is, and audits it; write []"
        )
    return v


class FreezeBody(Model):
    name: str
    identifier: Identifier
    status: Literal["Enabled", "Disabled"]
    entity_configs: list[EntityConfig] = Field(min_length=1)
    windows: list[FreezeWindow] = Field(min_length=1)
    description: str | None = None
    tags: dict[str, Any] = Field(default_factory=dict)
    # vmfarm has one organisation and project: a freeze covers every pipeline it runs, as a
    # project-level freeze covers its project.
    org_identifier: str | None = None
    project_identifier: str | None = None
    notification_rules: Annotated[list[Any], AfterValidator(_no_notifications)] = Field(
        default_factory=list
    )


class FreezeSpec(Model):
    """A freeze document: Harness's ``freeze:`` (``kind: Freeze`` and ``apiVersion`` optional)."""

    api_version: Literal["v1"] | None = None
    kind: Literal["Freeze"] | None = None
    freeze: FreezeBody


@dataclass(frozen=True)
class Freeze:
    """A loaded freeze and where it was written (``file:line``)."""

    body: FreezeBody
    source: str


@dataclass(frozen=True)
class ActiveFreeze:
    """An enabled window of ``freeze`` that holds now, and the stages of the run it freezes."""

    freeze: Freeze
    ends: datetime
    time_zone: str
    stages: tuple[str, ...]

    def describe(self) -> str:
        """``freeze window 'Year-end' (year_end, file:line) is active until ...``."""
        b = self.freeze.body
        local = self.ends.astimezone(ZoneInfo(self.time_zone))
        utc = self.ends.astimezone(UTC)
        return (
            f"freeze window '{b.name}' ({b.identifier}, {self.freeze.source}) is active "
            f"until {local:%Y-%m-%d %H:%M} {self.time_zone} "
            f"({utc:%Y-%m-%dT%H:%M}Z) for stage(s) {', '.join(self.stages)}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "freeze": self.freeze.body.identifier,
            "name": self.freeze.body.name,
            "source": self.freeze.source,
            "ends": self.ends.astimezone(UTC).isoformat(),
            "stages": list(self.stages),
        }


def _stage_values(plan: Any) -> list[tuple[str, dict[str, str]]]:
    from app.definitions.plan import DeploymentStagePlan, PipelineStagePlan

    out: list[tuple[str, dict[str, str]]] = []
    for st in plan.stages:
        if isinstance(st, DeploymentStagePlan):
            out.append(
                (
                    st.identifier,
                    {
                        "Service": st.service.identifier,
                        "Environment": st.environment.identifier,
                        "EnvType": st.environment.type,
                        "Pipeline": plan.identifier,
                    },
                )
            )
        elif isinstance(st, PipelineStagePlan):  # a chained pipeline deploys too
            out += [(f"{st.identifier}/{i}", v) for i, v in _stage_values(st.child_plan())]
    return out


def frozen_stages(body: FreezeBody, plan: Any) -> list[str]:
    """The deployment stages of ``plan`` (a resolved Plan) that a rule of ``body`` matches."""
    out = []
    for stage, values in _stage_values(plan):
        if any(
            all(e.matches(values[e.type]) for e in rule.entities if e.type in values)
            for rule in body.entity_configs
        ):
            out.append(stage)
    return out


def active(freezes: Iterable[Freeze], plan: Any, now: datetime) -> list[ActiveFreeze]:
    """The enabled freeze windows that hold at ``now`` (aware) for a stage of ``plan``."""
    if now.tzinfo is None:
        raise ValueError("now must carry a time zone")
    out = []
    for f in freezes:
        if f.body.status != "Enabled":
            continue
        stages = frozen_stages(f.body, plan)
        if not stages:
            continue
        for w in f.body.windows:
            ends = w.ends_after(now)
            if ends is not None:
                out.append(ActiveFreeze(f, ends, w.time_zone, tuple(stages)))
                break
    return out


def freeze_dir() -> Path | None:
    """The operator's freeze folder, ``VMFARM_FREEZE_DIR`` (None when unset)."""
    explicit = os.environ.get("VMFARM_FREEZE_DIR", "").strip()
    return Path(explicit) if explicit else None


def load(files: Iterable[str | Path] = (), *, directory: Path | None = None) -> list[Freeze]:
    """The freezes in ``files`` and in the operator's ``directory`` (every ``*.yaml`` and
    ``*.yml`` in it). A file that is wrong is refused (SpecErrors, file:line and the field):
    a freeze is never dropped because it could not be read. A missing directory is a
    ConfigError (an operator who set it means it)."""
    from app.definitions.bundle import Collector
    from app.definitions.validation import validate
    from app.definitions.yamlload import load_documents

    paths = [Path(f) for f in files]
    if directory is not None:
        if not directory.is_dir():
            raise ConfigError(
                f"VMFARM_FREEZE_DIR {directory} is not a directory: create it, "
                "or unset it when there are no freezes"
            )
        paths += sorted(
            p for p in directory.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file()
        )
    errs = Collector()
    out: list[Freeze] = []
    for path in paths:
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read the freeze file {path}: {exc.strerror}") from None
        for doc in load_documents(text, str(path)):
            spec = validate(doc, (), FreezeSpec, doc.data, errs)
            if spec is not None:
                out.append(Freeze(spec.freeze, f"{doc.file}:{doc.pos(('freeze',))[0]}"))
    errs.raise_if_any()
    return out
