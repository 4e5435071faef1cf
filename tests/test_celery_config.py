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


def test_a_phase_is_one_chord_of_per_host_step_chains_with_the_gate_on_control() -> None:
    canvas = phase_canvas(execution_id="e1", stage_index=0, phase=2,
                          hosts=[("h1", "r1"), ("h2", "r2")], step_count=3, expires=60)
    header = canvas.tasks
    assert len(header) == 2
    first_chain = header[0].tasks
    assert [t.name for t in first_chain] == ["vmfarm.run_step"] * 3
    keys = [HostStepKey.from_dict(t.kwargs["key"]) for t in first_chain]
    assert [k.step for k in keys] == [0, 1, 2]
    assert {k.idem for k in keys} == {"e1:0:2:h1:0:1", "e1:0:2:h1:1:1", "e1:0:2:h1:2:1"}
    assert header[1].tasks[0].kwargs["key"]["region"] == "r2"
    assert canvas.body.name == "vmfarm.verify_gate"
    assert canvas.body.kwargs == {"execution_id": "e1", "stage_index": 0, "phase": 2,
                                  "kind": "deploy"}
    assert canvas.body.immutable
