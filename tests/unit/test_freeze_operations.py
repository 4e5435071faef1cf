"""Freeze windows are checked in the operations layer, so every way in gets them: a scheduled
run, a retry, a run with the clock injected. On the temporary ledger of test_operations."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from app import operations
from app.definitions.freeze import FreezeActiveError
from tests.unit import test_operations
from tests.unit.test_operations import ALICE, RBAC, _count, _state, _tick, _trail

ledger = test_operations.home  # its `home` fixture, here named `ledger`: an empty ledger, RBAC on

FREEZE = """\
freeze:
  name: Launch freeze
  identifier: launch
  status: Enabled
  entityConfigs:
    - name: production
      entities:
        - {type: EnvType, filterType: Equals, entityRefs: [Production]}
  windows:
    - timeZone: Europe/Paris
      startTime: {start}
      duration: {duration}
"""


def _operator_freeze(
    ledger: Path, monkeypatch: pytest.MonkeyPatch, *, start: str, duration: str
) -> None:
    folder = ledger / "freezes"
    folder.mkdir(exist_ok=True)
    (folder / "launch.yaml").write_text(
        FREEZE.replace("{start}", start).replace("{duration}", duration)
    )
    monkeypatch.setenv("VMFARM_FREEZE_DIR", str(folder))


def test_a_run_is_judged_at_the_time_it_is_given(
    ledger: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a freeze of production from 9 AM to 5 PM in Paris on 2026-06-01 (UTC+2)
    _operator_freeze(ledger, monkeypatch, start="2026-06-01 09:00 AM", duration="8h")
    deploy = [str(ledger / "deploy.yaml")]
    # Then at 14:59 UTC a run is refused, naming the window and its end
    with pytest.raises(
        FreezeActiveError,
        match=r"'Launch freeze' \(launch, .*launch.yaml:2\) "
        r"is active until 2026-06-01 17:00 Europe/Paris",
    ):
        operations.run(ALICE, deploy, publish=False, now=datetime(2026, 6, 1, 14, 59, tzinfo=UTC))
    assert _trail() == [("run", "alice", "frozen")] and _count() == 0
    # and at 15:00 UTC (17:00 in Paris) it is recorded
    operations.run(ALICE, deploy, publish=False, now=datetime(2026, 6, 1, 15, 0, tzinfo=UTC))
    assert _count() == 1


def test_a_retry_deploys_again_and_is_frozen_too(
    ledger: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ended = _state(ledger, "ended")
    assert ended is not None
    _operator_freeze(ledger, monkeypatch, start="2000-01-01 12:00 AM", duration="10000w")
    with pytest.raises(FreezeActiveError, match="retry refused"):
        operations.retry(ALICE, ended, publish=False)
    # alice holds every permission ("*"): her override goes through and is audited
    new_id = operations.retry(ALICE, ended, publish=False, override_freeze=True)
    assert ("override_freeze", "alice", "overridden") in _trail(new_id)


def test_a_scheduled_run_in_a_freeze_window_is_refused_and_audited(
    ledger: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given the scheduler may run pipelines, and the operator froze production for long
    (ledger / "rbac.yaml").write_text(
        RBAC.replace("roles:\n", "roles:\n  runner: [pipeline:execute, environment:deploy]\n")
        + "  - {role: runner, users: [scheduler]}\n"
    )
    _operator_freeze(ledger, monkeypatch, start="2000-01-01 12:00 AM", duration="10000w")
    # Then the due slot is not submitted: the freeze is its outcome, and audited
    [result] = _tick(ledger)
    assert "freeze window 'Launch freeze'" in result["error"]
    assert ("run", "scheduler", "frozen") in _trail()
    assert _count() == 0
