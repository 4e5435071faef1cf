"""Delegate selection as data: worker tags and their queues, routing, requirements against a
given set of live workers, and the `vmfarm worker` / `workers` / `hosts` commands where they need
no broker. The real worker fleet is in tests/service/test_delegates.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
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
from tests.alloc import Allocator
from tests.conftest import DATA, REDIS_BASE, REPO, _stop, base_env, run_vmfarm
from tests.waiting import wait_for

GPU, PLAIN = "w-gpu@delegates", "w-plain@delegates"
STATIC = {"identifier": "lab_rz", "name": "lab-rz", "provider": "static", "source": "test:1",
          "spec": {"region": "rz", "hosts": [{"hostname": "127.0.1.250"},
                                             {"hostname": "127.0.1.251", "region": "ry"}]}}


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
    assert len(tag_subsets([f"t{i}" for i in range(MAX_TAGS)])) == 2 ** MAX_TAGS - 1
    assert worker_queues(["r1"], ["gpu", "pci"]) == [
        "vmfarm.r1", "vmfarm.r1[gpu,pci]", "vmfarm.r1[gpu]", "vmfarm.r1[pci]"]
    assert worker_queues(["r1", "r2"], []) == ["vmfarm.r1", "vmfarm.r2"]
    # Every requirement a worker can meet is one of its queues; no other is.
    mine = set(worker_queues(["r1"], ["a", "b", "c"]))
    for need in (["a"], ["c", "a"], ["a", "b", "c"]):
        assert queue_for("r1", need) in mine
    assert queue_for("r1", ["d"]) not in mine and queue_for("r2", ["a"]) not in mine


def test_steps_with_tags_in_their_key_go_to_the_tag_queue() -> None:
    assert route("vmfarm.run_step", key={"region": "r1", "tags": ["gpu"]}) == "vmfarm.r1[gpu]"
    assert route("vmfarm.check_host", key={"region": "r1", "tags": ["pci", "gpu"]}) == \
        "vmfarm.r1[gpu,pci]"
    assert route("vmfarm.run_step", key={"region": "r1", "tags": []}) == "vmfarm.r1"
    assert route("vmfarm.run_step", key={"region": "r1"}) == "vmfarm.r1"
    assert route("vmfarm.advance") == CONTROL_QUEUE
    with pytest.raises(ValueError, match="invalid worker tag"):
        route("vmfarm.run_step", key={"region": "r1", "tags": ["GPU"]})


def test_discovery_is_routed_by_its_region_and_tags_kwargs() -> None:
    assert route("vmfarm.discover", infra=STATIC, region="rz") == "vmfarm.rz"
    assert route("vmfarm.discover", infra=STATIC, region="rz", tags=["gpu"]) == "vmfarm.rz[gpu]"
    assert "tasks.discovery" in app.conf.include


def _w(name: str, regions: list[str], tags: list[str], *, live: bool = True,
       age: float = 1.0) -> dict[str, Any]:
    return {"name": name, "regions": regions, "tags": tags, "live": live, "age": age}


def test_a_requirement_is_served_by_a_live_worker_of_its_region_with_every_tag() -> None:
    fleet = [_w("a@h", ["r1"], ["gpu", "pci"]), _w("b@h", ["r1"], []),
             _w("c@h", ["r2"], ["arm"], live=False, age=300)]
    assert unserved([("r1", frozenset({"gpu"})), ("r1", frozenset()),
                     ("r1", {"gpu", "pci"})], workers=fleet) == []
    msgs = unserved([("r1", {"gpu", "arm"}), ("r2", {"arm"}), ("r1", {"gpu", "arm"})],
                    workers=fleet)
    assert len(msgs) == 2  # one message per distinct requirement
    assert msgs[0].startswith("no live worker serves region r1 with tags [arm, gpu] (live "
                              "workers: a@h (r1, tags: gpu, pci), b@h (r1, tags: none))")
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


# --- a fleet of real worker processes -------------------------------------------------------------


@dataclass
class Fleet:
    env: dict[str, str]
    procs: dict[str, subprocess.Popen[bytes]]
    logs: dict[str, Path]

    def vmfarm(self, *args: str, timeout_s: str = "30") -> subprocess.CompletedProcess[str]:
        return run_vmfarm(*args, env={**self.env, "VMFARM_HEARTBEAT_TIMEOUT": timeout_s})

    def workers(self, timeout_s: str = "30") -> dict[str, Any]:
        res = self.vmfarm("workers", "-o", "json", timeout_s=timeout_s)
        assert res.returncode == 0, res.stderr
        return dict(json.loads(res.stdout))

    def worker_logs(self) -> str:
        return "\n".join(f"--- {n}\n{p.read_text(errors='replace')[-3000:]}"
                         for n, p in self.logs.items() if p.exists())

    def wait_for(self, what: str, check: Callable[[], bool], timeout: float = 60) -> None:
        wait_for(check, timeout, what, interval=0.25, explain=self.worker_logs)


def _by_name(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {w["name"]: w for w in report["workers"]}


@pytest.fixture(scope="module")
def fleet(pg_url: str, tmp_path_factory: pytest.TempPathFactory,
          alloc: Allocator) -> Iterator[Fleet]:
    """Two region workers of region rz: one tagged gpu, one without tags."""
    with alloc.redis_db(REDIS_BASE) as broker, alloc.redis_db(REDIS_BASE) as results:
        yield from _fleet(pg_url, tmp_path_factory, broker.url, results.url)


def _fleet(pg_url: str, tmp_path_factory: pytest.TempPathFactory, broker: str,
           results: str) -> Iterator[Fleet]:
    home = tmp_path_factory.mktemp("delegates")
    env = base_env(VMFARM_BROKER_URL=broker, VMFARM_RESULT_BACKEND=results,
                   VMFARM_DATABASE_URL=pg_url, VMFARM_HOME=str(home),
                   VMFARM_HEARTBEAT_INTERVAL="0.5")
    specs = {GPU: ["--region", "rz", "--tags", "gpu"], PLAIN: ["--region", "rz"]}
    procs, logs = {}, {}
    for name, args in specs.items():
        logs[name] = home / f"{name.split('@')[0]}.log"
        with logs[name].open("wb") as fh:
            procs[name] = subprocess.Popen(
                [sys.executable, "-m", "cli.main", "worker", "-n", name, "-c", "2", *args],
                env=env, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    fl = Fleet(env=env, procs=procs, logs=logs)
    try:
        fl.wait_for("both workers registered as live", lambda: all(
            _by_name(fl.workers()).get(n, {}).get("live") for n in specs))
        yield fl
    finally:
        _stop(list(procs.values()))


# --- command line ---------------------------------------------------------------------------------


def test_worker_tags_are_validated(tmp_path: Path) -> None:
    # Refused before the broker is reached: nothing listens at this URL (a closed port).
    env = base_env(VMFARM_HOME=str(tmp_path), VMFARM_BROKER_URL="redis://127.0.0.1:1/0")
    for args, says in ((["--region", "rz", "--tags", "GPU"], "invalid worker tag"),
                       (["--region", "rz", "--tags", "a,b,c,d,e,f,g"], "at most 6"),
                       (["--control", "--tags", "gpu"], "give --region")):
        res = run_vmfarm("worker", *args, env=env, timeout=60)
        assert res.returncode == 2 and says in res.stderr, res.stderr


def test_workers_without_a_redis_broker_shows_unknown_depths(tmp_path: Path) -> None:
    env = base_env(VMFARM_HOME=str(tmp_path))
    res = run_vmfarm("workers", "-o", "json", env=env)
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["broker"] == "other" and report["workers"] == []
    assert {q["name"]: q["depth"] for q in report["queues"]} == {CONTROL_QUEUE: None}


def test_hosts_lists_the_hosts_of_a_pipelines_infrastructures(tmp_path: Path) -> None:
    env = base_env(VMFARM_HOME=str(tmp_path))
    good = str(DATA / "good")
    text = run_vmfarm("hosts", good, env=env)
    assert text.returncode == 0, text.stderr
    assert "test_hosts" in text.stdout and "static" in text.stdout
    assert "127.0.1.201" in text.stdout and "127.0.1.202" in text.stdout

    res = run_vmfarm("hosts", good, "--infra", "test_hosts", "-o", "json", env=env)
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["pipeline"] == "hello"
    [infra] = data["infrastructures"]
    assert (infra["identifier"], infra["provider"], infra["region"], infra["stages"]) == (
        "test_hosts", "static", "r1", ["deploy"])
    assert [(h["name"], h["address"], h["region"]) for h in infra["hosts"]] == [
        ("127.0.1.201", "127.0.1.201", "r1"), ("127.0.1.202", "127.0.1.202", "r2")]
    assert {"public_ip", "private_ip", "slot"} <= set(infra["hosts"][0])


def test_hosts_refuses_bad_input_with_exit_2(tmp_path: Path) -> None:
    env = base_env(VMFARM_HOME=str(tmp_path))
    bad = DATA / "bad" / "infra_no_hosts.yaml"
    res = run_vmfarm("hosts", str(bad), env=env)
    assert res.returncode == 2
    assert f"{bad}:" in res.stderr and "needs at least one host" in res.stderr
    res = run_vmfarm("hosts", str(DATA / "good"), "--infra", "nope", env=env)
    assert res.returncode == 2 and "no infrastructure 'nope'" in res.stderr
    res = run_vmfarm("hosts", str(tmp_path / "missing.yaml"), env=env)
    assert res.returncode == 2 and "no such file" in res.stderr
