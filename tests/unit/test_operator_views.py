"""What an operator reads back: a schedule's last outcome is its execution's status in the
ledger, and an execution status filter that names no status is refused, not an empty list.
On a real temporary SQLite ledger (embedded mode)."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from app.db import reset_engines, session_scope
from app.models import Execution, Status
from app.report import execution_statuses, recent_executions
from app.schedules import Cron, FileClaims, Schedule, describe, tick
from app.settings import get_settings


@pytest.fixture
def ledger(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    for key in list(os.environ):
        if key.startswith("VMFARM_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("VMFARM_HOME", str(tmp_path))
    get_settings.cache_clear()
    reset_engines()
    yield tmp_path
    reset_engines()
    get_settings.cache_clear()


def _submit_into_ledger(files: Sequence[str], **_: Any) -> str:
    """What coordinator.submit leaves behind, for the tick: an execution row."""
    with session_scope() as s:
        s.add(Execution(id="exsched1", pipeline="nightly_app", status=Status.QUEUED, plan={}))
    return "exsched1"


def _set_status(ex_id: str, status: str) -> None:
    with session_scope() as s:
        ex = s.get(Execution, ex_id)
        assert ex is not None
        ex.status = status
        s.add(ex)


def test_a_schedule_shows_its_last_execution_s_status(ledger: Path) -> None:
    store = FileClaims(ledger)
    plan = [Schedule(name="nightly", cron=Cron.parse("0 2 * * *"), files=("/p/pipe.yaml",))]
    slot_time = datetime(2025, 5, 1, 2, 0, 30, tzinfo=UTC)
    [ran] = tick(slot_time, schedules=plan, submit=_submit_into_ledger, store=store)
    assert ran["execution"] == "exsched1"
    later = datetime(2025, 5, 1, 3, 0, tzinfo=UTC)
    [row] = describe(plan, later, store=store)
    assert row["last"]["execution"] == "exsched1" and row["last"]["status"] == "QUEUED"
    _set_status("exsched1", Status.FAILED)
    [row] = describe(plan, later, store=store)
    assert row["last"]["status"] == "FAILED"
    _set_status("exsched1", Status.SUCCEEDED)
    assert describe(plan, later, store=store)[0]["last"]["status"] == "SUCCEEDED"


def test_an_unreadable_ledger_leaves_the_status_unknown_and_lists_the_schedules(
    ledger: Path,
) -> None:
    store = FileClaims(ledger)
    plan = [Schedule(name="nightly", cron=Cron.parse("0 2 * * *"), files=("/p/pipe.yaml",))]
    tick(
        datetime(2025, 5, 1, 2, 0, 30, tzinfo=UTC),
        schedules=plan,
        submit=_submit_into_ledger,
        store=store,
    )

    def broken(ids: Sequence[str]) -> dict[str, str]:
        raise OSError("database is down")

    [row] = describe(plan, datetime(2025, 5, 1, 3, 0, tzinfo=UTC), store=store, statuses=broken)
    assert row["last"]["execution"] == "exsched1" and row["last"]["status"] is None
    assert row["next_run"] == "2025-05-02T02:00:00Z"


def test_an_unknown_execution_status_is_refused_naming_the_real_ones(ledger: Path) -> None:
    with session_scope() as s:
        s.add(Execution(id="ex1", pipeline="web", status=Status.FAILED, plan={}))
    assert [e.id for e in recent_executions(statuses=["failed"])] == ["ex1"]
    assert recent_executions(statuses=["RUNNING"]) == []
    with pytest.raises(
        ValueError,
        match=r"unknown execution status 'BOGUS' \(one of: QUEUED, "
        r"RUNNING, WAITING",
    ):
        recent_executions(statuses=["BOGUS"])
    # A host's status is not an execution's.
    with pytest.raises(ValueError, match="'SKIPPED'"):
        execution_statuses(["SKIPPED"])
