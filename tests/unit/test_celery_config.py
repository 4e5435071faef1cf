"""The Celery configuration every process shares: routing and delivery semantics."""

from __future__ import annotations

import pytest
from celery.exceptions import QueueNotFound

from app.canvas import HostStepKey, phase_canvas
from app.celery import CONTROL_QUEUE, app, build_config


def route(name: str, **kwargs: object) -> str:
    return str(app.amqp.router.route({}, name, (), kwargs)["queue"].name)


def test_steps_go_to_their_hosts_region_queue_and_control_tasks_to_control() -> None:
    assert route("vmfarm.run_step", key={"region": "eu-west-1"}) == "vmfarm.eu-west-1"
    assert route("vmfarm.run_step", key={"region": "r2"}) == "vmfarm.r2"
    assert route("vmfarm.run_host", key={"region": "r2"}, until=2) == "vmfarm.r2"
    assert route("vmfarm.verify_gate") == CONTROL_QUEUE
    assert route("vmfarm.advance") == CONTROL_QUEUE


def test_an_unknown_queue_name_fails_loudly_instead_of_creating_a_dead_queue() -> None:
    with pytest.raises(QueueNotFound):
        app.amqp.router.route({"queue": "vmfarm.typo"}, "vmfarm.advance", (), {})
    with pytest.raises(ValueError, match="invalid region"):
        route("vmfarm.run_step", key={"region": "Bad Region"})


def test_ssh_steps_are_acknowledged_early_and_never_prefetched() -> None:
    conf = build_config()
    assert conf["task_acks_late"] is False
    assert conf["task_reject_on_worker_lost"] is False
    assert conf["worker_prefetch_multiplier"] == 1
    assert conf["task_create_missing_queues"] is False
    assert conf["accept_content"] == ["json"]


def test_a_phase_is_one_chord_of_one_task_per_host_with_the_gate_on_control() -> None:
    canvas = phase_canvas(
        execution_id="e1",
        stage_index=0,
        phase=2,
        hosts=[("h1", "r1"), ("h2", "r2")],
        step_count=3,
        expires=60,
    )
    header = canvas.tasks
    assert len(header) == 2
    assert [t.name for t in header] == ["vmfarm.run_host"] * 2
    key = HostStepKey.from_dict(header[0].kwargs["key"])
    assert (key.idem, header[0].kwargs["until"]) == ("e1:0:2:h1:0:1", 3)
    assert header[1].kwargs["key"]["region"] == "r2"
    assert canvas.body.name == "vmfarm.verify_gate"
    assert canvas.body.kwargs == {
        "execution_id": "e1",
        "stage_index": 0,
        "phase": 2,
        "kind": "deploy",
    }
    assert canvas.body.immutable


def test_steps_that_need_other_worker_tags_start_a_new_task_on_their_queue() -> None:
    canvas = phase_canvas(
        execution_id="e1",
        stage_index=0,
        phase=0,
        hosts=[("h1", "r1")],
        step_count=4,
        expires=60,
        tags_of={("h1", 1): ("gpu",), ("h1", 2): ("gpu",)},
    )
    links = canvas.tasks[0].tasks
    assert [
        (t.kwargs["key"]["i"], t.kwargs["until"], t.kwargs["key"].get("tags")) for t in links
    ] == [(0, 1, None), (1, 3, ["gpu"]), (3, 4, None)]
    assert [route(t.name, **t.kwargs) for t in links] == [
        "vmfarm.r1",
        "vmfarm.r1[gpu]",
        "vmfarm.r1",
    ]


def test_lanes_chain_hosts_one_after_another() -> None:
    canvas = phase_canvas(
        execution_id="e1",
        stage_index=0,
        phase=0,
        hosts=[("h1", "r1"), ("h2", "r1"), ("h3", "r1")],
        step_count=2,
        expires=60,
        lanes=2,
    )
    lanes = [
        [t.kwargs["key"]["h"] for t in (c.tasks if hasattr(c, "tasks") else [c])]
        for c in canvas.tasks
    ]
    assert lanes == [["h1", "h3"], ["h2"]]
