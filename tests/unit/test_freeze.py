"""Freeze windows with an injected clock (no sleeps): time zones, durations and end times,
Daily/Weekly/Monthly/Yearly recurrences and their ``until``, which runs a freeze's rules
match, and what a wrong freeze file says (file:line and the field)."""

from __future__ import annotations

import textwrap
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from app.definitions import freeze
from app.definitions.freeze import FreezeWindow
from app.errors import ConfigError, SpecError, SpecErrors, VmfarmError
from tests.unit.test_spec import GOOD, plan_of


def at(text: str) -> datetime:
    """A UTC instant: ``2026-12-24 18:30``."""
    return datetime.strptime(text, "%Y-%m-%d %H:%M").replace(tzinfo=UTC)


def window(**fields: Any) -> FreezeWindow:
    return FreezeWindow.model_validate(fields)


def test_a_one_off_window_holds_from_its_start_for_its_duration_in_its_time_zone() -> None:
    # 06:00 PM in Berlin (winter, UTC+1) is 17:00 UTC; four hours
    w = window(timeZone="Europe/Berlin", startTime="2026-12-24 06:00 PM", duration="4h")
    assert w.ends_after(at("2026-12-24 16:59")) is None
    assert w.ends_after(at("2026-12-24 17:00")) == at("2026-12-24 21:00")
    assert w.ends_after(at("2026-12-24 20:59")) == at("2026-12-24 21:00")
    assert w.ends_after(at("2026-12-24 21:00")) is None  # the end is not inside


def test_an_end_time_is_read_in_the_window_time_zone_too() -> None:
    w = window(
        timeZone="America/New_York", startTime="2026-07-03 17:00", endTime="2026-07-06 08:00 AM"
    )
    # New York in July is UTC-4
    assert w.ends_after(at("2026-07-03 20:59")) is None
    assert w.ends_after(at("2026-07-05 12:00")) == at("2026-07-06 12:00")


def test_daily_recurrence_holds_every_day_at_the_same_wall_time_across_dst() -> None:
    # 10 PM to 6 AM in Berlin, every night from 2026-03-20 (DST starts on 2026-03-29)
    w = window(
        timeZone="Europe/Berlin",
        startTime="2026-03-20 10:00 PM",
        duration="8h",
        recurrence={"type": "Daily"},
    )
    assert w.ends_after(at("2026-03-25 21:30")) == at("2026-03-26 05:00")  # UTC+1
    assert w.ends_after(at("2026-03-26 04:59")) == at("2026-03-26 05:00")  # past midnight
    assert w.ends_after(at("2026-03-26 12:00")) is None
    # after the switch to summer time, still 10 PM local: 20:00 UTC
    assert w.ends_after(at("2026-04-02 19:59")) is None
    assert w.ends_after(at("2026-04-02 20:00")) == at("2026-04-03 04:00")
    # and never before the first start
    assert w.ends_after(at("2026-03-19 22:00")) is None


def test_weekly_recurrence_and_its_until() -> None:
    # Fridays 4 PM to Monday 8 AM (UTC), weekly until the end of May 2026
    w = window(
        timeZone="UTC",
        startTime="2026-05-01 04:00 PM",
        endTime="2026-05-04 08:00 AM",
        recurrence={"type": "Weekly", "spec": {"until": "2026-05-31 11:59 PM"}},
    )
    assert w.ends_after(at("2026-05-09 12:00")) == at("2026-05-11 08:00")  # a Saturday
    assert w.ends_after(at("2026-05-13 12:00")) is None  # a Wednesday
    assert w.ends_after(at("2026-05-30 12:00")) == at("2026-06-01 08:00")  # last start 29th
    assert w.ends_after(at("2026-06-06 12:00")) is None  # 5 June starts after until


def test_monthly_recurrence_every_n_months_clamps_to_the_month_end() -> None:
    w = window(
        timeZone="UTC",
        startTime="2026-01-31 10:00 PM",
        duration="4h",
        recurrence={"type": "Monthly", "spec": {"value": 2}},
    )
    assert w.ends_after(at("2026-01-31 23:00")) == at("2026-02-01 02:00")
    # every second month: March 31st, not February
    assert w.ends_after(at("2026-02-28 23:00")) is None
    assert w.ends_after(at("2026-03-31 23:00")) == at("2026-04-01 02:00")
    # May 31st, July 31st... and in a 30-day month the day is clamped
    monthly = window(
        timeZone="UTC",
        startTime="2026-01-31 10:00 PM",
        duration="4h",
        recurrence={"type": "Monthly"},
    )
    assert monthly.ends_after(at("2026-04-30 23:00")) == at("2026-05-01 02:00")


def test_yearly_recurrence_holds_each_year_and_a_window_longer_than_a_day() -> None:
    w = window(
        timeZone="Asia/Kolkata",
        startTime="2024-12-24 12:00 AM",
        duration="1w",
        recurrence={"type": "Yearly"},
    )
    # midnight in Kolkata (UTC+5:30) on the 24th is 18:30 UTC on the 23rd; a week long
    assert w.ends_after(at("2027-12-23 18:29")) is None
    assert w.ends_after(at("2027-12-23 18:30")) == at("2027-12-30 18:30")
    assert w.ends_after(at("2027-12-29 00:00")) == at("2027-12-30 18:30")
    # a daily window longer than a day overlaps the next occurrence: the latest one ends last
    long = window(
        timeZone="UTC", startTime="2026-01-01 00:00", duration="36h", recurrence={"type": "Daily"}
    )
    assert long.ends_after(at("2026-01-02 06:00")) == at("2026-01-03 12:00")


FREEZE = textwrap.dedent("""\
    freeze:
      name: Year-end freeze
      identifier: year_end
      status: Enabled
      entityConfigs:
        - name: rule
          entities:
            - type: EnvType
              filterType: {env_filter}
              entityRefs: [{env_type}]
            - type: Service
              filterType: NotEquals
              entityRefs: [hotfix]
      windows:
        - timeZone: UTC
          startTime: 2026-12-20 06:00 PM
          duration: 2w
    """)


def _freeze(
    tmp_path: Path, *, env_filter: str = "Equals", env_type: str = "PreProduction", extra: str = ""
) -> Path:
    path = tmp_path / "freeze.yaml"
    path.write_text(FREEZE.format(env_filter=env_filter, env_type=env_type) + extra)
    return path


def test_a_freeze_holds_for_the_runs_its_rules_match(tmp_path: Path) -> None:
    plan = plan_of([GOOD], {"tag": "1.0"})  # hello_app to test_env, a PreProduction one
    from app.definitions.plan import Plan

    typed = Plan.of(plan)
    (found,) = freeze.load([_freeze(tmp_path)])
    (hit,) = freeze.active([found], typed, at("2026-12-25 12:00"))
    assert hit.stages == ("deploy",) and hit.ends == at("2027-01-03 18:00")
    message = hit.describe()
    assert "'Year-end freeze' (year_end, " in message and "freeze.yaml:2" in message
    assert "until 2027-01-03 18:00 UTC" in message
    # outside its window, or for an environment type it does not name, it does not hold
    assert freeze.active([found], typed, at("2026-12-20 17:59")) == []
    (prod,) = freeze.load([_freeze(tmp_path, env_type="Production")])
    assert freeze.active([prod], typed, at("2026-12-25 12:00")) == []
    (not_prod,) = freeze.load([_freeze(tmp_path, env_filter="NotEquals", env_type="Production")])
    assert len(freeze.active([not_prod], typed, at("2026-12-25 12:00"))) == 1
    # a Disabled freeze never holds
    (off,) = freeze.load([_freeze(tmp_path)])
    off.body.status = "Disabled"
    assert freeze.active([off], typed, at("2026-12-25 12:00")) == []


def test_the_operator_folder_is_read_and_a_missing_one_is_an_error(tmp_path: Path) -> None:
    folder = tmp_path / "freezes"
    folder.mkdir()
    _freeze(folder)
    (folder / "notes.txt").write_text("not a freeze")
    assert [f.body.identifier for f in freeze.load(directory=folder)] == ["year_end"]
    with pytest.raises(ConfigError, match=r"VMFARM_FREEZE_DIR .* is not a directory"):
        freeze.load(directory=tmp_path / "nowhere")


@pytest.mark.parametrize(
    ("old", "new", "field", "message"),
    [
        ("timeZone: UTC", "timeZone: Mars/Olympus", "timeZone", "unknown time zone 'Mars/Olympus'"),
        ("startTime: 2026-12-20 06:00 PM", "startTime: 20.12.2026", "startTime", "is not a time"),
        ("duration: 2w", "endTime: 2026-12-19 06:00 PM", "windows", "is not after startTime"),
        (
            "duration: 2w",
            "duration: 2w\n      endTime: 2027-01-01 10:00",
            "windows",
            "either duration or endTime",
        ),
        ("filterType: NotEquals", "filterType: Sometimes", "filterType", "Sometimes"),
        ("status: Enabled", "status: Active", "status", "Active"),
        (
            "entityRefs: [PreProduction]",
            "entityRefs: [Staging]",
            "entities",
            "unknown environment type",
        ),
        (
            "duration: 2w",
            "duration: 2w\n      recurrence: {type: Daily, spec: {value: 3}}",
            "recurrence",
            "Monthly recurrence only",
        ),
    ],
)
def test_a_wrong_freeze_is_refused_with_its_place(
    tmp_path: Path, old: str, new: str, field: str, message: str
) -> None:
    path = _freeze(tmp_path)
    text = path.read_text()
    assert text.count(old) == 1
    path.write_text(text.replace(old, new))
    with pytest.raises((SpecError, SpecErrors)) as exc:
        freeze.load([path])
    errors = exc.value.errors if isinstance(exc.value, SpecErrors) else [exc.value]
    assert any(
        message in e.message and field in str(e) and e.file == str(path) and e.line > 1
        for e in errors
    ), [str(e) for e in errors]


def test_a_freeze_among_the_pipeline_files_is_refused(tmp_path: Path) -> None:
    # Given a Disabled freeze written next to the pipeline (it could lift the operator's)
    folder = tmp_path / "files"
    import shutil

    shutil.copytree(GOOD, folder)
    (folder / "freeze.yaml").write_text(
        "kind: Freeze\n"
        + FREEZE.format(env_filter="All", env_type="x").replace(
            "              entityRefs: [x]\n", ""
        )
    )
    with pytest.raises(VmfarmError) as exc:
        plan_of([folder], {"tag": "1.0"})
    errors = exc.value.errors if isinstance(exc.value, SpecErrors) else [exc.value]
    assert any(
        "does not go with the pipeline files" in str(e) and "freeze.yaml:1" in str(e)
        for e in errors
    ), [str(e) for e in errors]
