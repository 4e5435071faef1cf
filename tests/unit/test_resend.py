"""Which hosts' messages should be in a queue (app.coordinator.resend), and the task ids by
which the reconciler finds them there."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import Any

import pytest

from app import canvas
from app.canvas import HostStepKey, phase_canvas, retry_canvas, task_id_of
from app.coordinator.resend import _task_id, lane_reached

T0 = datetime(2026, 1, 1, 12, 0, 0)
HOSTS = ["h1", "h2", "h3", "h4", "h5"]


def row(
    host: str, step: int, status: str, at: int | None = None, attempt: int = 1
) -> tuple[Any, ...]:
    """(host, step, status, finished_at, attempt): finished ``at`` seconds after T0."""
    return (host, step, status, T0 + timedelta(seconds=at) if at is not None else None, attempt)


def test_a_host_behind_a_running_one_in_its_lane_has_no_message_to_lose() -> None:
    # Two lanes: h1 -> h3 -> h5 and h2 -> h4; h1 runs its second step, h2 has not started
    rows = [row("h1", 0, "SUCCEEDED", 5), row("h1", 1, "RUNNING")]
    reached = dict(lane_reached(HOSTS, 2, 2, rows, T0, {}))
    # h2 is first in its lane: sent with the phase; h3, h4, h5 wait for their lane
    assert reached == {"h2": T0}


def test_a_host_whose_lane_predecessor_finished_should_be_queued_since_then() -> None:
    rows = [
        row("h1", 0, "SUCCEEDED", 5),
        row("h1", 1, "FAILED", 9),
        row("h2", 0, "FAILED", 3),
        row("h2", 1, "SKIPPED", 4),
    ]
    reached = dict(lane_reached(HOSTS, 2, 2, rows, T0, {}))
    assert reached == {"h3": T0 + timedelta(seconds=9), "h4": T0 + timedelta(seconds=4)}


def test_a_predecessor_with_an_attempt_waiting_or_a_step_to_come_has_not_finished() -> None:
    # h1 failed and waits for its retry (attempt 2 PENDING); h2 ran its first step only
    rows = [
        row("h1", 0, "FAILED", 5),
        row("h1", 0, "PENDING", attempt=2),
        row("h1", 1, "SKIPPED", 6),
        row("h2", 0, "SUCCEEDED", 3),
    ]
    assert dict(lane_reached(HOSTS, 2, 2, rows, T0, {})) == {}


def test_a_resent_host_recorded_pending_is_still_waiting_and_its_resend_restarts_the_wait() -> None:
    resent_at = T0 + timedelta(seconds=30)
    rows = [row("h1", 0, "PENDING"), row("h2", 0, "SUCCEEDED", 2)]
    reached = dict(lane_reached(["h1", "h2"], None, 1, rows, T0, {"h1": resent_at}))
    assert reached == {"h1": resent_at}
    # a host that claimed its step (RUNNING) has started
    assert lane_reached(["h1"], None, 1, [row("h1", 0, "RUNNING")], T0, {}) == []


def _ids(sig: Any) -> list[str | None]:
    """The task ids of a chord's header tasks, lane by lane."""
    out: list[str | None] = []
    for lane in sig.tasks:
        out.extend(t.options.get("task_id") for t in getattr(lane, "tasks", [lane]))
    return out


def test_host_tasks_carry_their_key_s_task_id_and_a_resend_is_the_same_message(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(canvas, "traced", lambda: True)
    sig = phase_canvas(
        execution_id="e1",
        stage_index=0,
        phase=1,
        hosts=[("h1", "r1"), ("h2", "r1"), ("h3", "r1")],
        step_count=2,
        lanes=2,
    )
    keys = [HostStepKey("e1", 0, 1, h, 0, 1, "r1") for h in ("h1", "h3", "h2")]
    assert _ids(sig) == [task_id_of(k) for k in keys]
    again = retry_canvas(
        execution_id="e1",
        stage_index=0,
        phase=1,
        lane=[("h1", "r1", 0, 1), ("h3", "r1", 0, 1)],
        step_count=2,
        deadline=0.0,
        countdown=0,
    )
    assert _ids(again) == [task_id_of(k) for k in keys[:2]]
    assert "countdown" not in again.tasks[0].tasks[0].options  # sent at once
    # another attempt is another message
    assert task_id_of(HostStepKey("e1", 0, 1, "h1", 0, 2, "r1")) != task_id_of(keys[0])


def test_without_a_native_chord_backend_task_ids_are_celery_s_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(canvas, "traced", lambda: False)
    sig = phase_canvas(
        execution_id="e1", stage_index=0, phase=0, hosts=[("h1", "r1")], step_count=1
    )
    assert _ids(sig) == [None]


def test_the_task_id_is_read_from_a_message_s_headers_whatever_its_body() -> None:
    message = {
        "body": "c2lnbmVkIGJvZHk=",
        "content-encoding": "utf-8",
        "content-type": "application/x-sign-json",
        "headers": {"lang": "py", "task": "vmfarm.run_host", "id": "abc-1"},
        "properties": {"correlation_id": "abc-1", "delivery_tag": "t1"},
    }
    raw = json.dumps(message)
    assert _task_id(raw) == "abc-1"
    assert _task_id(raw.encode()) == "abc-1"
