"""Pipeline schedules: the cron parser and next-run computation (checked against a brute-force
minute scan), the schedules file, the tick's once-per-slot file claims and `vmfarm schedules`.
The Redis claims and the tick on a real worker are in tests/service/test_schedules.py.
"""

from __future__ import annotations

import re
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from app.errors import ConfigError
from app.schedules import (
    Cron,
    FileClaims,
    Schedule,
    describe,
    load_schedules,
    schedules_file,
    tick,
)

BERLIN = ZoneInfo("Europe/Berlin")


def at(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0, tz: Any = UTC
) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=tz)


# --- cron expressions ----------------------------------------------------------------------------


def test_fields_lists_ranges_steps_and_names_parse() -> None:
    c = Cron.parse("*/15 9-17/4 1,15 jan-mar,DEC mon-fri")
    assert c.minutes == {0, 15, 30, 45} and c.hours == {9, 13, 17}
    assert c.days == {1, 15} and c.months == {1, 2, 3, 12} and c.weekdays == {1, 2, 3, 4, 5}
    assert Cron.parse("5/20 * * * 7").minutes == {5, 25, 45}
    assert Cron.parse("0 0 * * 7").weekdays == {0} == Cron.parse("0 0 * * sun").weekdays
    assert Cron.parse("@daily") == Cron.parse("@daily")
    assert Cron.parse("@hourly").minutes == {0} and len(Cron.parse("@hourly").hours) == 24
    assert Cron.parse("@weekly").weekdays == {0}
    assert Cron.parse("@yearly").months == {1} == Cron.parse("@annually").months


@pytest.mark.parametrize(
    "text, says",
    [
        ("* * * *", "has 4 fields"),
        ("* * * * * *", "has 6 fields"),
        ("60 * * * *", "minute: 60 is out of range 0-59"),
        ("* 24 * * *", "hour: 24"),
        ("* * 0 * *", "day of month: 0"),
        ("* * * 13 *", "month: 13"),
        ("* * * * 8", "day of week: 8"),
        ("5-1 * * * *", "goes backwards"),
        ("*/0 * * * *", "step '0' must be a positive number"),
        ("1,,2 * * * *", "empty item"),
        ("* * * foo *", "is not a number or a name"),
        ("@reboot", "unknown macro"),
        ("0 0 30 2 *", "never fires"),
        ("0 0 31 4,6 *", "never fires"),
    ],
)
def test_bad_expressions_are_refused_naming_the_field(text: str, says: str) -> None:
    with pytest.raises(ValueError, match=re.escape(says)):
        Cron.parse(text)


def test_next_runs_in_utc() -> None:
    c = Cron.parse("0 2 * * *")
    assert c.next_after(at(2025, 1, 1, 1, 59)) == at(2025, 1, 1, 2, 0)
    assert c.next_after(at(2025, 1, 1, 2, 0)) == at(2025, 1, 2, 2, 0)  # strictly after
    weekdays = Cron.parse("0 8 * * 1-5")
    assert weekdays.next_after(at(2025, 1, 3, 9, 0)) == at(2025, 1, 6, 8, 0)  # Fri -> Mon
    assert Cron.parse("0 0 29 2 *").next_after(at(2025, 3, 1)) == at(2028, 2, 29)
    # Both day fields restricted: either matches (cron's rule) -- the 13th or any Friday.
    either = Cron.parse("0 0 13 * fri")
    assert either.next_after(at(2025, 6, 1)) == at(2025, 6, 6)  # a Friday
    assert either.next_after(at(2025, 6, 10)) == at(2025, 6, 13)
    # A star day-of-month keeps AND: Fridays only.
    assert Cron.parse("0 0 */1 * fri").next_after(at(2025, 6, 10)) == at(2025, 6, 13)
    assert Cron.parse("*/15 * * * *").last_at_or_before(at(2025, 1, 1, 10, 14, 59)) == at(
        2025, 1, 1, 10, 0
    )
    assert Cron.parse("0 0 1 1 *").last_at_or_before(at(2025, 1, 1)) == at(2025, 1, 1)


@pytest.mark.parametrize(
    "text",
    [
        "*/7 * * * *",
        "0 */5 * * *",
        "30 4 1,15 * 5",
        "15 10 * * mon-fri",
        "0 0 * * 0",
        "59 23 31 * *",
        "0,30 8-18 * jan,jul *",
    ],
)
@pytest.mark.parametrize("tz", ["UTC", "America/New_York", "Asia/Kolkata"])
def test_next_and_last_agree_with_a_brute_force_minute_scan(text: str, tz: str) -> None:
    c, zone = Cron.parse(text), ZoneInfo(tz)
    start = at(2025, 6, 27, 13, 7, 30)  # a summer week: no daylight-saving change in it
    expected: list[datetime] = []
    t = start.replace(second=0)
    while len(expected) < 6 and t < start + timedelta(days=200):
        t += timedelta(minutes=1)
        if c.matches(t.astimezone(zone).replace(tzinfo=None)):
            expected.append(t)
    got: list[datetime] = []
    t = start
    for _ in range(len(expected)):
        nxt = c.next_after(t, zone)
        assert nxt is not None
        got.append(nxt)
        assert c.last_at_or_before(nxt, zone) == nxt
        assert c.last_at_or_before(nxt - timedelta(seconds=1), zone) in (
            None,
            *([got[-2]] if len(got) > 1 else []),
            c.last_at_or_before(t, zone),
        )
        t = nxt
    assert got == expected and expected


def test_daylight_saving_gaps_run_late_once_and_repeats_run_once() -> None:
    c = Cron.parse("30 2 * * *")
    # 2025-03-30 02:30 does not exist in Berlin: the slot runs at 03:30 CEST (01:30 UTC).
    spring = c.next_after(at(2025, 3, 29, 12), BERLIN)
    assert spring == at(2025, 3, 30, 1, 30)
    assert c.next_after(spring, BERLIN) == at(2025, 3, 31, 0, 30)
    # 2025-10-26 02:30 happens twice: the first one (CEST, 00:30 UTC) only.
    fall = c.next_after(at(2025, 10, 25, 12), BERLIN)
    assert fall == at(2025, 10, 26, 0, 30)
    assert c.next_after(fall, BERLIN) == at(2025, 10, 27, 1, 30)
    # Every 15 minutes through the spring gap: increasing instants, none twice.
    q = Cron.parse("*/15 * * * *")
    t, seen = at(2025, 3, 30, 0, 0), []
    for _ in range(8):
        nxt = q.next_after(t, BERLIN)
        assert nxt is not None and nxt > t
        seen.append(nxt)
        t = nxt
    assert seen == [at(2025, 3, 30, 0, 15) + timedelta(minutes=15 * i) for i in range(8)]


# --- the schedules file --------------------------------------------------------------------------


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_a_schedules_file_loads_with_paths_relative_to_it(tmp_path: Path) -> None:
    f = write(
        tmp_path / "conf" / "schedules.yaml",
        """
schedules:
  - name: nightly
    cron: "0 2 * * *"
    files: [pipes/app.yaml, ../shared]
    pipeline: app
    inputs: {tag: 1.2.3, n: 4}
    timezone: Europe/Berlin
    startingDeadline: 90s
  - name: paused
    cron: "@hourly"
    files: x.yaml
    enabled: false
""",
    )
    nightly, paused = load_schedules(f)
    assert nightly.files == (
        str(tmp_path / "conf" / "pipes" / "app.yaml"),
        str(tmp_path / "shared"),
    )
    assert (nightly.pipeline, dict(nightly.inputs), nightly.timezone, nightly.deadline) == (
        "app",
        {"tag": "1.2.3", "n": "4"},
        "Europe/Berlin",
        90.0,
    )
    assert paused.enabled is False and paused.files == (str(tmp_path / "conf" / "x.yaml"),)
    assert paused.due_slot(at(2025, 1, 1, 10, 0)) is None
    assert write(tmp_path / "empty.yaml", "") and load_schedules(tmp_path / "empty.yaml") == []


@pytest.mark.parametrize(
    "body, says",
    [
        ("- {cron: '* * * * *', files: [a]}", "'name' must be a name"),
        ("- {name: a, cron: '* * *', files: [a]}", "(a): cron: '* * *' has 3 fields"),
        ("- {name: a, cron: '* * * * *'}", "'files' must list"),
        ("- {name: a, cron: '* * * * *', files: [a], timezone: Mars/Base}", "unknown timezone"),
        ("- {name: a, cron: '* * * * *', files: [a], when: now}", "unknown field(s) when"),
        ("- {name: a, cron: '* * * * *', files: [a], inputs: [x]}", "'inputs' must map"),
        ("- {name: a, cron: '* * * * *', files: [a], startingDeadline: soon}", "startingDeadline"),
        (
            "- {name: a, cron: '* * * * *', files: [a]}\n- {name: a, cron: '@daily', files: [b]}",
            "two schedules are named 'a'",
        ),
        ("schedules: {a: 1}", "'schedules' must be a list"),
        ("- [unclosed", "cannot read the schedules file"),
    ],
)
def test_bad_schedules_files_are_refused_naming_the_entry(
    tmp_path: Path, body: str, says: str
) -> None:
    f = write(tmp_path / "s.yaml", body)
    with pytest.raises(ConfigError, match=re.escape(says)) as info:
        load_schedules(f)
    assert str(f) in str(info.value)


def test_the_file_comes_from_the_environment_or_the_default_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("VMFARM_SCHEDULES_FILE", raising=False)
    assert schedules_file() is None and load_schedules() == []
    write(tmp_path / "configs" / "schedules.yaml", "schedules: []\n")
    assert schedules_file() == Path("configs/schedules.yaml")
    monkeypatch.setenv("VMFARM_SCHEDULES_FILE", "")
    assert schedules_file() is None  # empty: schedules off
    monkeypatch.setenv("VMFARM_SCHEDULES_FILE", str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="no such schedules file"):
        load_schedules()


# --- the tick ------------------------------------------------------------------------------------


class FakeSubmit:
    def __init__(self, fail: bool = False) -> None:
        self.calls: list[dict[str, Any]] = []
        self.fail = fail
        self.lock = threading.Lock()

    def __call__(
        self, files: list[str], *, pipeline: str | None, inputs: dict[str, str], user: str
    ) -> str:
        with self.lock:
            self.calls.append(
                {"files": files, "pipeline": pipeline, "inputs": inputs, "user": user}
            )
            n = len(self.calls)
        if self.fail:
            raise ConfigError("no live worker serves region r1")
        return f"exec{n}"


def sched(name: str = "nightly", cron: str = "0 2 * * *", **kw: Any) -> Schedule:
    return Schedule(name=name, cron=Cron.parse(cron), files=("/p/pipe.yaml",), **kw)


def test_late_slots_are_skipped_and_failures_are_kept_not_retried(tmp_path: Path) -> None:
    store = FileClaims(tmp_path)
    submit = FakeSubmit(fail=True)
    plan = [sched(deadline=120)]
    assert tick(at(2025, 5, 1, 2, 2, 1), schedules=plan, submit=submit, store=store) == []
    [res] = tick(at(2025, 5, 1, 2, 1, 59), schedules=plan, submit=submit, store=store)
    assert res["error"] == "no live worker serves region r1"
    assert tick(at(2025, 5, 1, 2, 1, 59), schedules=plan, submit=submit, store=store) == [
        {"name": "nightly", "slot": "2025-05-01T02:00:00Z", "claimed": False}
    ]
    assert len(submit.calls) == 1
    assert store.last("nightly")["error"] == "no live worker serves region r1"  # type: ignore[index]
    # A slot older than the one kept is never claimed (the state only moves forward).
    assert not store.claim("nightly", at(2025, 4, 30, 2, 0))
    rows = describe(plan, at(2025, 5, 1, 12, 0), store=store)
    assert rows[0]["next_run"] == "2025-05-02T02:00:00Z" and rows[0]["in_seconds"] == 50400
    assert rows[0]["last"]["slot"] == "2025-05-01T02:00:00Z"


def test_the_tick_is_a_task_on_the_beat_every_minute() -> None:
    from celery.schedules import crontab

    from app.celery import app, build_config

    entry = build_config()["beat_schedule"]["vmfarm-schedules"]
    assert entry["task"] == "vmfarm.schedules_tick" and entry["schedule"] == crontab()
    assert "app.schedules" in app.conf.include
    app.loader.import_default_modules()
    assert "vmfarm.schedules_tick" in app.tasks
    assert (
        app.amqp.router.route({}, "vmfarm.schedules_tick", (), {})["queue"].name == "vmfarm.control"
    )


# --- vmfarm schedules -----------------------------------------------------------------------------


# --- the tick on a real control worker ------------------------------------------------------------
