"""Pipeline schedules on real services: the tick's once-per-slot claims in Redis (SET NX) and the
tick as a Celery task on a real control worker submitting a real execution (Redis databases
leased from the allocator, the session's PostgreSQL). The parser, the file and the file claims
are in tests/unit/test_schedules.py.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from app.errors import ConfigError
from app.schedules import (
    Cron,
    FileClaims,
    RedisClaims,
    Schedule,
    tick,
)
from tests.conftest import REPO, _stop, base_env
from tests.waiting import wait_for


def at(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0, tz: Any = UTC
) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=tz)


# --- cron expressions ----------------------------------------------------------------------------


# --- the schedules file --------------------------------------------------------------------------


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


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


@pytest.fixture
def claims_url(redis_db: Callable[[], str]) -> str:
    """A Redis database leased for the test (emptied when leased), for the claims."""
    return redis_db()


@pytest.fixture
def redis_claims(claims_url: str) -> Iterator[RedisClaims]:
    store = RedisClaims(claims_url)
    yield store
    store.client.flushdb()


@pytest.mark.parametrize("kind", ["file", "redis"])
def test_a_due_schedule_is_submitted_once_however_often_the_tick_runs(
    kind: str, tmp_path: Path, redis_claims: RedisClaims
) -> None:
    store = FileClaims(tmp_path) if kind == "file" else redis_claims
    submit = FakeSubmit()
    plan = [sched(pipeline="app", inputs={"tag": "2"}), sched("hourly", "@hourly")]
    first = tick(at(2025, 5, 1, 2, 0, 3), schedules=plan, submit=submit, store=store)
    assert first == [
        {
            "name": "nightly",
            "slot": "2025-05-01T02:00:00Z",
            "execution": "exec1",
            "at": "2025-05-01T02:00:03Z",
        },
        {
            "name": "hourly",
            "slot": "2025-05-01T02:00:00Z",
            "execution": "exec2",
            "at": "2025-05-01T02:00:03Z",
        },
    ]
    assert submit.calls[0] == {
        "files": ["/p/pipe.yaml"],
        "pipeline": "app",
        "inputs": {"tag": "2"},
        "user": "scheduler",
    }
    # Again in the same minute, and from a second "beat": nothing new.
    again = tick(at(2025, 5, 1, 2, 0, 40), schedules=plan, submit=submit, store=store)
    assert [r.get("claimed") for r in again] == [False, False] and len(submit.calls) == 2
    # The next hour's slot is new for the hourly schedule only.
    later = tick(at(2025, 5, 1, 3, 0, 1), schedules=plan, submit=submit, store=store)
    assert [(r["name"], r.get("execution")) for r in later] == [("hourly", "exec3")]
    assert store.last("nightly") == {
        "slot": "2025-05-01T02:00:00Z",
        "execution": "exec1",
        "at": "2025-05-01T02:00:03Z",
    }
    assert store.last("never") is None


@pytest.mark.parametrize("kind", ["file", "redis"])
def test_concurrent_ticks_claim_a_slot_once(kind: str, tmp_path: Path, claims_url: str) -> None:
    submit = FakeSubmit()
    plan = [sched(f"s{i}", "*/5 * * * *") for i in range(5)]
    barrier = threading.Barrier(8)

    def one() -> None:
        store = FileClaims(tmp_path) if kind == "file" else RedisClaims(claims_url)
        barrier.wait()
        tick(at(2025, 5, 1, 2, 5, 9), schedules=plan, submit=submit, store=store)

    threads = [threading.Thread(target=one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(c["files"][0] for c in submit.calls) == ["/p/pipe.yaml"] * 5


# --- vmfarm schedules -----------------------------------------------------------------------------


# --- the tick on a real control worker ------------------------------------------------------------

PIPELINE = """
apiVersion: v1
kind: Service
metadata: {name: sched-svc, identifier: sched_svc}
spec:
  serviceDefinition: {type: SSH}
---
apiVersion: v1
kind: Environment
metadata: {name: sched-env, identifier: sched_env}
spec: {type: PreProduction}
---
apiVersion: v1
kind: Infrastructure
metadata: {name: sched-hosts, identifier: sched_hosts}
spec:
  environmentRef: sched_env
  deploymentType: Ssh
  type: Pdc
  spec:
    region: sc
    connection: {type: SSH, user: root}
    hosts: [{hostname: 127.0.1.209}]
---
apiVersion: v1
kind: Pipeline
metadata: {name: scheduled, identifier: scheduled}
spec:
  stages:
    - stage:
        name: Approve
        identifier: approve
        type: Approval
        spec:
          execution:
            steps:
              - step:
                  type: HarnessApproval
                  name: Approve
                  identifier: approve
                  timeout: 1d
                  spec:
                    approvalMessage: go?
                    approvers: {userGroups: [ops], minimumCount: 1}
    - stage:
        name: Deploy
        identifier: deploy
        type: Deployment
        spec:
          service: {serviceRef: sched_svc}
          environment:
            environmentRef: sched_env
            infrastructureDefinitions: [{identifier: sched_hosts}]
          execution:
            steps:
              - step:
                  type: Command
                  name: Hello
                  identifier: hello
                  spec:
                    commandUnits:
                      - identifier: hi
                        type: Script
                        spec: {source: {type: Inline, spec: {script: echo hi}}}
"""


def test_the_tick_task_on_a_control_worker_submits_a_real_execution(
    pg_url: str,
    tmp_path: Path,
    claims_url: str,
    redis_claims: RedisClaims,
    redis_db: Callable[[], str],
) -> None:
    write(tmp_path / "pipe" / "all.yaml", PIPELINE)
    users = write(tmp_path / "users.yaml", "groups:\n  ops: [alice]\n")
    f = write(
        tmp_path / "schedules.yaml",
        "schedules:\n  - {name: every-minute, cron: '* * * * *', files: [pipe],\n"
        "     pipeline: scheduled, startingDeadline: 1h}\n",
    )
    # The broker's database is where the tick keeps its claims.
    env = base_env(
        VMFARM_BROKER_URL=claims_url,
        VMFARM_RESULT_BACKEND=redis_db(),
        VMFARM_DATABASE_URL=pg_url,
        VMFARM_HOME=str(tmp_path / "home"),
        VMFARM_SCHEDULES_FILE=str(f),
        VMFARM_USERS_FILE=str(users),
        VMFARM_HEARTBEAT_INTERVAL="0.5",
    )
    log = tmp_path / "worker.log"
    with log.open("wb") as fh:
        # Control (the tick) and region sc (the pipeline's hosts: submit wants a live worker).
        worker = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cli.main",
                "worker",
                "--control",
                "--region",
                "sc",
                "-n",
                "w-sched@test",
                "-c",
                "2",
            ],
            env=env,
            cwd=REPO,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    # Two ticks in a row, as two beats would send them.
    send = "from app.celery import app\nfor _ in range(2): app.send_task('vmfarm.schedules_tick')\n"

    def worker_log() -> str:
        return log.read_text(errors="replace")[-4000:]

    def logged(pattern: str, times: int = 1) -> bool:
        assert worker.poll() is None, f"the worker exited:\n{worker_log()}"
        return len(re.findall(pattern, log.read_text(errors="replace"))) >= times

    try:
        wait_for(lambda: logged(r" ready\."), 120, "the worker to start", explain=worker_log)
        subprocess.run([sys.executable, "-c", send], env=env, cwd=REPO, check=True, timeout=60)
        # Both ticks done (the worker logs each task it finished; ticks keep no result).
        wait_for(
            lambda: logged(r"Task vmfarm\.schedules_tick\[[^\]]+\] succeeded", 2),
            120,
            "both ticks to finish",
            explain=worker_log,
        )
        last = redis_claims.last("every-minute")
        assert last and "execution" in last, (last, worker_log())
        res = subprocess.run(
            [sys.executable, "-m", "cli.main", "executions", "-o", "json"],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert res.returncode == 0, res.stderr
        mine = [e for e in json.loads(res.stdout) if e["pipeline"] == "scheduled"]
        assert last["execution"] in [e["id"] for e in mine]
        assert {(e["created_by"], e["status"]) for e in mine} == {("scheduler", "WAITING")}
        # One execution per claimed slot: two if the minute turned between the two ticks.
        claims = redis_claims.client.keys("vmfarm:schedule:every-minute:*")
        assert len(mine) == len(claims) and len(claims) in (1, 2)
    finally:
        _stop([worker])
