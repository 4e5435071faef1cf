"""Delegate selection as data: worker tags and their queues, routing, requirements against a
given set of live workers, and the `vmfarm worker` / `workers` / `hosts` commands where they need
no broker. The real worker fleet is in tests/service/test_delegates.py.
"""

from __future__ import annotations

from typing import Any

import pytest

from app.celery import CONTROL_QUEUE, app
from app.delegates import (
    MAX_TAGS,
    QueueChoice,
    normalise_tags,
    parse_queue,
    queue_for,
    resolve_queue,
    tag_subsets,
    unserved,
    worker_queues,
)

GPU, PLAIN = "w-gpu@delegates", "w-plain@delegates"
STATIC = {
    "identifier": "lab_rz",
    "name": "lab-rz",
    "provider": "static",
    "source": "test:1",
    "spec": {
        "region": "rz",
        "hosts": [{"hostname": "127.0.1.250"}, {"hostname": "127.0.1.251", "region": "ry"}],
    },
}


def route(name: str, **kwargs: object) -> str:
    return str(app.amqp.router.route({}, name, (), kwargs)["queue"].name)


# --- names and routing (no services) --------------------------------------------------------------


def test_a_task_without_tags_goes_to_the_plain_region_queue() -> None:
    assert queue_for("eu-west-1") == "vmfarm.eu-west-1"
    assert queue_for("eu-west-1", []) == "vmfarm.eu-west-1"


def test_tags_name_one_queue_whatever_their_order_or_repetition() -> None:
    assert queue_for("r1", ["gpu"]) == "vmfarm.r1[gpu]"
    assert queue_for("r1", ["pci", "gpu", "pci"]) == "vmfarm.r1[gpu,pci]"
    assert queue_for("r1", {"gpu", "pci"}) == queue_for("r1", ("pci", "gpu"))
    assert queue_for("r1", "pci,gpu") == "vmfarm.r1[gpu,pci]"
    assert parse_queue("vmfarm.r1[gpu,pci]") == ("r1", ("gpu", "pci"))
    assert parse_queue("vmfarm.r1") == ("r1", ())
    assert parse_queue(CONTROL_QUEUE) is None


@pytest.mark.parametrize("tags", [["GPU"], ["has space"], ["-x"], ["a,b]"], ["x" * 64], [""]])
def test_invalid_tag_names_are_refused(tags: list[str]) -> None:
    if tags == [""]:  # an empty item is no tag at all
        assert queue_for("r1", tags) == "vmfarm.r1"
        return
    with pytest.raises(ValueError, match="invalid worker tag"):
        queue_for("r1", tags)


def test_invalid_regions_and_too_many_tags_are_refused() -> None:
    with pytest.raises(ValueError, match="invalid region"):
        queue_for("Bad Region", ["gpu"])
    with pytest.raises(ValueError, match=f"at most {MAX_TAGS}"):
        queue_for("r1", [f"t{i}" for i in range(MAX_TAGS + 1)])
    with pytest.raises(ValueError, match=f"at most {MAX_TAGS}"):
        tag_subsets([f"t{i}" for i in range(MAX_TAGS + 1)])


def test_a_worker_consumes_its_region_queue_and_one_queue_per_subset_of_its_tags() -> None:
    assert tag_subsets(["b", "a"]) == [("a",), ("b",), ("a", "b")]
    assert len(tag_subsets([f"t{i}" for i in range(MAX_TAGS)])) == 2**MAX_TAGS - 1
    assert worker_queues(["r1"], ["gpu", "pci"]) == [
        "vmfarm.r1",
        "vmfarm.r1[gpu,pci]",
        "vmfarm.r1[gpu]",
        "vmfarm.r1[pci]",
    ]
    assert worker_queues(["r1", "r2"], []) == ["vmfarm.r1", "vmfarm.r2"]
    # Every requirement a worker can meet is one of its queues; no other is.
    mine = set(worker_queues(["r1"], ["a", "b", "c"]))
    for need in (["a"], ["c", "a"], ["a", "b", "c"]):
        assert queue_for("r1", need) in mine
    assert queue_for("r1", ["d"]) not in mine and queue_for("r2", ["a"]) not in mine


def test_steps_with_tags_in_their_key_go_to_the_tag_queue() -> None:
    assert route("vmfarm.run_step", key={"region": "r1", "tags": ["gpu"]}) == "vmfarm.r1[gpu]"
    assert (
        route("vmfarm.check_host", key={"region": "r1", "tags": ["pci", "gpu"]})
        == "vmfarm.r1[gpu,pci]"
    )
    assert route("vmfarm.run_step", key={"region": "r1", "tags": []}) == "vmfarm.r1"
    assert route("vmfarm.run_step", key={"region": "r1"}) == "vmfarm.r1"
    assert route("vmfarm.advance") == CONTROL_QUEUE
    with pytest.raises(ValueError, match="invalid worker tag"):
        route("vmfarm.run_step", key={"region": "r1", "tags": ["GPU"]})


def test_discovery_is_routed_by_its_region_and_tags_kwargs() -> None:
    assert route("vmfarm.discover", infra=STATIC, region="rz") == "vmfarm.rz"
    assert route("vmfarm.discover", infra=STATIC, region="rz", tags=["gpu"]) == "vmfarm.rz[gpu]"
    assert "tasks.discovery" in app.conf.include


def _w(
    name: str, regions: list[str], tags: list[str], *, live: bool = True, age: float = 1.0
) -> dict[str, Any]:
    return {"name": name, "regions": regions, "tags": tags, "live": live, "age": age}


def test_a_requirement_is_served_by_a_live_worker_of_its_region_with_every_tag() -> None:
    fleet = [
        _w("a@h", ["r1"], ["gpu", "pci"]),
        _w("b@h", ["r1"], []),
        _w("c@h", ["r2"], ["arm"], live=False, age=300),
    ]
    assert (
        unserved(
            [("r1", frozenset({"gpu"})), ("r1", frozenset()), ("r1", {"gpu", "pci"})], workers=fleet
        )
        == []
    )
    msgs = unserved(
        [("r1", {"gpu", "arm"}), ("r2", {"arm"}), ("r1", {"gpu", "arm"})], workers=fleet
    )
    assert len(msgs) == 2  # one message per distinct requirement
    assert msgs[0].startswith(
        "no live worker serves region r1 with tags [arm, gpu] (live "
        "workers: a@h (r1, tags: gpu, pci), b@h (r1, tags: none))"
    )
    assert "region r2 with tags [arm]" in msgs[1]
    assert "not heard from: c@h (last beat 300s ago)" in msgs[1]


def test_fallback_takes_the_plain_region_queue_when_no_tagged_worker_is_live() -> None:
    fleet = [_w("b@h", ["r1"], []), _w("g@h", ["r1"], ["gpu"], live=False)]
    choice = resolve_queue("r1", ["gpu"], True, workers=fleet)
    assert choice == QueueChoice("vmfarm.r1", choice.message)
    assert "falling back" in choice.message and choice.tags == []
    assert unserved([("r1", {"gpu"}, True)], workers=fleet) == []
    assert unserved([("r1", {"gpu"})], workers=fleet) != []
    nobody = resolve_queue("r2", ["gpu"], True, workers=fleet)
    assert nobody.queue is None and "region r2 with tags [gpu]" in nobody.message
    served = resolve_queue("r1", [], workers=fleet)
    assert served == ("vmfarm.r1", "")
    tagged = resolve_queue("r1", ["gpu"], workers=[*fleet, _w("g2@h", ["r1"], ["gpu", "x"])])
    assert tagged == ("vmfarm.r1[gpu]", "") and tagged.tags == ["gpu"]


def test_normalised_tags_are_sorted_and_unique() -> None:
    assert normalise_tags(["b", "a", "b", " c "]) == ("a", "b", "c")
    assert normalise_tags(None) == ()


# --- command line ---------------------------------------------------------------------------------
