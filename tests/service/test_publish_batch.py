"""A phase's messages go to Redis in a few pipelines (app.celery.batched), and the phase still
runs as before: every host once, on its region's queue, signed, gated after its last host.

Real Redis, real PostgreSQL, real workers whose messages are signed (each worker its own key);
the workers use the test-only no-op connection (VMFARM_TEST_CONNECTION=noop: every command
"runs" at once, nothing is touched), so hundreds of hosts run in seconds. This process submits
the run, as the server or the CLI would, and publishes the first phase itself (counted); the
control worker publishes the second from the first one's gate.
"""

from __future__ import annotations

import contextlib
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.alloc import Allocator
from tests.conftest import REDIS_BASE, Cluster, app_pointed_at
from tests.service.conftest import Keys, _secure_cluster
from tests.waiting import wait_for

HOSTS = 400  # two phases of 200: four pipelines of 50 each (BATCH below)
STEPS = 2
BATCH = 50


def _pipeline(root: Path, hosts: int) -> Path:
    listed = "\n".join(
        f"      - {{hostname: p{i:04d}, region: r{i % 2 + 1}}}" for i in range(hosts)
    )
    steps = "".join(
        f"""\
              - step:
                  type: Command
                  name: Step {n}
                  identifier: step{n}
                  spec:
                    commandUnits:
                      - identifier: unit{n}
                        type: Script
                        spec: {{source: {{type: Inline, spec: {{script: "echo {n}"}}}}}}
"""
        for n in range(STEPS)
    )
    path = root / "batch.yaml"
    path.write_text(f"""\
apiVersion: v1
kind: Service
metadata: {{name: batch}}
spec: {{serviceDefinition: {{type: SSH}}}}
---
apiVersion: v1
kind: Environment
metadata: {{name: batch}}
spec: {{type: PreProduction}}
---
apiVersion: v1
kind: Infrastructure
metadata: {{name: noop, identifier: noop}}
spec:
  environmentRef: batch
  type: Pdc
  spec:
    connection: {{type: SSH}}
    hosts:
{listed}
---
apiVersion: v1
kind: Pipeline
metadata: {{name: batch}}
spec:
  stages:
    - stage:
        name: Deploy
        identifier: deploy
        type: Deployment
        spec:
          service: {{serviceRef: batch}}
          environment: {{environmentRef: batch, infrastructureDefinitions: [{{identifier: noop}}]}}
          strategy: {{type: Rolling, phases: ["50%"]}}
          execution:
            steps:
{steps}""")
    return path


@pytest.fixture(scope="module")
def noop_cluster(
    pg_url: str,
    signing_keys: Keys,
    alloc: Allocator,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Cluster]:
    """Signed workers for r1, r2 and control, with no-op connections."""
    with alloc.redis_db(REDIS_BASE) as b, alloc.redis_db(REDIS_BASE) as r:
        yield from _secure_cluster(
            pg_url,
            signing_keys,
            tmp_path_factory,
            b.url,
            r.url,
            worker_env={"VMFARM_TEST_CONNECTION": "noop"},
        )


@pytest.fixture
def here(noop_cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """This process as the cluster's submitter (the server's key), pipelines of BATCH."""
    from app import celery

    with app_pointed_at({**noop_cluster.env, "VMFARM_TEST_CONNECTION": "noop"}):
        monkeypatch.setattr(celery, "PUBLISH_BATCH", BATCH)
        yield celery
        monkeypatch.undo()


class RoundTrips:
    """Redis round trips of this process: a command sent alone, a pipeline, a pub/sub
    command (SUBSCRIBE to a result channel)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import redis.client as rc

        self.seen: Counter[str] = Counter()
        alone, pipe, pubsub = (
            rc.Redis.execute_command,
            rc.Pipeline.execute,
            rc.PubSub.execute_command,
        )

        def counted_alone(client: Any, *args: Any, **kw: Any) -> Any:
            self.seen[f"command {args[0]}"] += 1
            return alone(client, *args, **kw)

        def counted_pipe(p: Any, *args: Any, **kw: Any) -> Any:
            self.seen[f"pipeline of {len(p.command_stack)}"] += 1
            return pipe(p, *args, **kw)

        def counted_pubsub(p: Any, *args: Any) -> Any:
            self.seen[f"pubsub {args[0]}"] += 1
            return pubsub(p, *args)

        monkeypatch.setattr(rc.Redis, "execute_command", counted_alone)
        monkeypatch.setattr(rc.Pipeline, "execute", counted_pipe)
        monkeypatch.setattr(rc.PubSub, "execute_command", counted_pubsub)

    @property
    def total(self) -> int:
        return sum(self.seen.values())


def _submit(path: Path) -> str:
    from app.coordinator.submit import submit

    return submit([str(path)], publish=False)


def _finished(cluster: Cluster, ex_id: str, timeout: float = 240) -> str:
    from app.db import session_scope
    from app.models import Execution, Status

    def status() -> str | None:
        with session_scope() as s:
            ex = s.get(Execution, ex_id)
            return ex.status if ex is not None and ex.status in Status.TERMINAL else None

    return wait_for(
        status, timeout, f"execution {ex_id} to finish", interval=0.5, explain=cluster.worker_logs
    )


def _assert_every_host_ran_once_in_order(cluster: Cluster, ex_id: str) -> None:
    from sqlmodel import select

    from app.db import session_scope
    from app.models import HostStepRun, PhaseRun

    with session_scope() as s:
        rows = s.exec(select(HostStepRun).where(HostStepRun.execution_id == ex_id)).all()
        phases = s.exec(
            select(PhaseRun).where(PhaseRun.execution_id == ex_id).order_by(PhaseRun.phase)
        ).all()
    # every host ran each of its steps exactly once, first attempt, and succeeded
    runs = Counter((r.host, r.step_index) for r in rows)
    assert len(runs) == HOSTS * STEPS, f"{len(runs)} host-steps recorded\n{cluster.worker_logs()}"
    assert set(runs.values()) == {1}
    assert {(r.status, r.attempt) for r in rows} == {("SUCCEEDED", 1)}
    # each on its own region's queue (routing per region)
    assert {r.queue for r in rows if r.region == "r1"} == {"vmfarm.r1"}
    assert {r.queue for r in rows if r.region == "r2"} == {"vmfarm.r2"}
    # the gate ran after every host of the first phase: no host of the second started before
    assert [p.status for p in phases] == ["SUCCEEDED", "SUCCEEDED"]
    first = [r for r in rows if r.phase == 0]
    second = [r for r in rows if r.phase == 1]
    assert len(first) == len(second) == HOSTS * STEPS // 2
    assert max(r.finished_at for r in first if r.finished_at) <= min(
        r.started_at for r in second if r.started_at
    )
    logs = cluster.worker_logs()
    assert "refused" not in logs.lower(), logs  # every message signed and accepted
    assert "duplicate delivery" not in logs, logs


@pytest.mark.timeout(420)
def test_a_signed_phase_goes_out_in_a_few_pipelines_and_every_host_runs_once(
    noop_cluster: Cluster, here: Any, tmp_path: Path
) -> None:
    # Given a rolling run on 400 hosts in two regions (2 phases of 200), recorded
    ex_id = _submit(_pipeline(tmp_path, HOSTS))

    # When this process starts it (records phase 1 and publishes its 200 signed messages)
    from app.coordinator.machine import advance

    with pytest.MonkeyPatch.context() as mp:
        trips = RoundTrips(mp)
        advance(ex_id)

    # Then the 200 messages took a handful of round trips: four pipelines of 50 (one Redis
    # command per message) and no result subscription (it was 3 commands per message)
    assert trips.seen["pipeline of 50"] == HOSTS // 2 // BATCH, trips.seen
    assert not [k for k in trips.seen if k.startswith("pubsub")], trips.seen
    assert trips.total <= HOSTS // 2 // BATCH + 10, trips.seen

    # And the run succeeds: every host ran each step once, on its region's worker, the second
    # phase (published by the control worker from the first phase's gate) after the first
    assert _finished(noop_cluster, ex_id) == "SUCCEEDED", noop_cluster.worker_logs()
    _assert_every_host_ran_once_in_order(noop_cluster, ex_id)


@pytest.mark.timeout(420)
def test_publishing_goes_on_when_redis_cuts_the_publisher_s_connections_between_pipelines(
    noop_cluster: Cluster, here: Any, tmp_path: Path
) -> None:
    import redis

    from app.coordinator.machine import advance

    # Given a recorded run, and Redis cutting this process's broker connections (CLIENT KILL,
    # server side) after the first pipeline of the first phase has been sent
    ex_id = _submit(_pipeline(tmp_path, HOSTS))
    broker = redis.Redis.from_url(os.environ["VMFARM_BROKER_URL"])
    me, db = broker.client_id(), broker.connection_pool.connection_kwargs["db"]
    cut: list[int] = []
    flush = here.ReplayingBatch.flush

    def cut_after_first(batch: Any) -> None:
        flush(batch)
        if not cut:  # only this process's connections: a local port one of our sockets holds
            ours = {f"127.0.0.1:{port}" for port in _local_ports()}
            for c in broker.client_list():
                if int(c["db"]) == db and int(c["id"]) != me and c["addr"] in ours:
                    broker.client_kill_filter(_id=c["id"])
                    cut.append(int(c["id"]))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(here.ReplayingBatch, "flush", cut_after_first)
        # When the first phase is published
        advance(ex_id)
    assert cut, "no broker connection of this process was cut"

    # Then no host is lost or run twice: the run succeeds with every host-step once
    assert _finished(noop_cluster, ex_id) == "SUCCEEDED", noop_cluster.worker_logs()
    _assert_every_host_ran_once_in_order(noop_cluster, ex_id)


def _local_ports() -> set[int]:
    """Local ports of this process's TCP sockets to 127.0.0.1:6379 (from /proc)."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    redis_port = int(REDIS_BASE.rsplit(":", 1)[-1].split("/")[0])
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        parts = line.split()
        local, remote, inode = parts[1], parts[2], parts[9]
        if inode in inodes and int(remote.split(":")[1], 16) == redis_port:
            ports.add(int(local.split(":")[1], 16))
    return ports


class CuttingProxy:
    """A TCP proxy to Redis that, once armed, forwards half of the next chunk of LPUSH
    commands and then closes both sides: a pipeline cut in the middle, some of its messages
    taken by Redis and the rest lost, and the publisher's read meets a closed connection."""

    def __init__(self, port: int, upstream: tuple[str, int]) -> None:
        import socket
        import threading

        self.upstream, self.armed, self.cuts = upstream, False, 0
        self.server = socket.create_server(("127.0.0.1", port))
        self.port = port
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket
        import threading

        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            up = socket.create_connection(self.upstream)
            threading.Thread(target=self._pump, args=(client, up, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(up, client, False), daemon=True).start()

    def _pump(self, src: Any, dst: Any, to_redis: bool) -> None:
        try:
            while chunk := src.recv(65536):
                if to_redis and self.armed and chunk.count(b"LPUSH") > 1:
                    self.armed = False
                    self.cuts += 1
                    dst.sendall(chunk[: len(chunk) // 2])
                    break
                dst.sendall(chunk)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.close()

    def close(self) -> None:
        self.server.close()


def test_a_pipeline_cut_in_the_middle_is_sent_again_and_no_message_is_lost(
    free_port: Any, redis_db: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    import redis

    from app import celery
    from app.coordinator.publish import Dispatch, publish
    from app.db import reset_engines

    # Given a publisher whose broker connection goes through a proxy that cuts a pipeline of
    # 50 messages halfway, once the first pipeline of a 200-host phase has gone through (no
    # worker consumes: the queues are read afterwards)
    broker = redis_db()
    host, port = broker.split("//", 1)[1].split("/", 1)[0].split(":")
    proxy = CuttingProxy(free_port(), (host, int(port)))
    monkeypatch.setenv(
        "VMFARM_BROKER_URL", f"redis://127.0.0.1:{proxy.port}/{broker.rsplit('/', 1)[1]}"
    )
    monkeypatch.setenv("VMFARM_RESULT_BACKEND", redis_db())
    celery.reconfigure()
    monkeypatch.setattr(celery, "PUBLISH_BATCH", BATCH)
    flush = celery.ReplayingBatch.flush
    flushes: list[int] = []

    def arm_after_first(batch: Any) -> None:
        flush(batch)
        flushes.append(1)
        proxy.armed = len(flushes) == 1

    monkeypatch.setattr(celery.ReplayingBatch, "flush", arm_after_first)
    hosts = [(f"c{i:03d}", f"r{i % 2 + 1}") for i in range(200)]
    try:
        # When the phase is published
        publish(Dispatch("deploy", "cutexec", 0, 0, hosts, step_count=2))
    finally:
        proxy.close()
        monkeypatch.undo()
        celery.reconfigure()
        reset_engines()

    # Then the cut happened, and every host's message is in its region's queue: those Redis
    # took before the cut twice at most (they run once: same task id, idempotent claim), none
    # lost, none of another pipeline sent again
    assert proxy.cuts == 1
    r = redis.Redis.from_url(broker)
    seen: Counter[str] = Counter()
    for region in ("r1", "r2"):
        for raw in r.lrange(f"vmfarm.{region}", 0, -1):
            headers = json.loads(raw)["headers"]
            key = headers["kwargsrepr"].split("'")[3]  # {'key': 'cutexec:0:0:HOST:0:1', ...}
            assert key.split(":")[3] in {h for h, reg in hosts if reg == region}
            seen[key.split(":")[3]] += 1
    assert set(seen) == {h for h, _ in hosts}
    assert set(seen.values()) <= {1, 2} and sum(seen.values()) - len(hosts) < BATCH
