"""The operations that need an execution a worker has run: ``intervene`` (a stage paused by a
ManualIntervention) and ``rollback`` (a successful run). A user without the permission is
refused and the refusal audited; with it, the action happens and is audited as the actor's.

A real Celery worker runs the steps: the embedded one (a thread of this process, SQLite broker
and ledger under a temporary VMFARM_HOME), as ``vmfarm run`` starts it. The steps run on the
delegate (this machine): no SSH host is needed.
"""

from __future__ import annotations

import os
import time
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from app import operations
from app.db import reset_engines, session_scope
from app.models import Execution, Status
from app.operations import Actor, PermissionRefused
from app.settings import get_settings

RBAC = """\
roles:
  admin: ["*"]
bindings:
  - {role: admin, users: [alice]}
"""

FILES = """\
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  serviceDefinition:
    type: SSH
    spec:
      artifacts:
        primary: {type: Local, spec: {path: ., tag: <+input>}}
---
apiVersion: v1
kind: Environment
metadata: {name: qa}
spec: {type: PreProduction}
---
apiVersion: v1
kind: Infrastructure
metadata: {name: qa-hosts, identifier: qa_hosts}
spec:
  environmentRef: qa
  type: Pdc
  spec:
    connection: {type: Local}
    hosts: [{hostname: 10.30.0.1}]
---
apiVersion: v1
kind: Pipeline
metadata: {name: web, identifier: web}
spec:
  variables:
    - {name: result, value: <+input>.default(0)}
  stages:
    - stage:
        name: Deploy qa
        identifier: deploy_qa
        type: Deployment
        spec:
          service: {serviceRef: web}
          environment:
            environmentRef: qa
            infrastructureDefinitions: [{identifier: qa_hosts}]
          execution:
            steps:
              - step:
                  type: Command
                  name: Install
                  identifier: install
                  failureStrategies:
                    - onFailure:
                        errors: [AllErrors]
                        action:
                          type: ManualIntervention
                          spec:
                            timeout: 1h
                            onTimeout: {action: {type: Abort}}
                  spec:
                    onDelegate: true
                    commandUnits:
                      - identifier: install
                        type: Script
                        spec:
                          source:
                            type: Inline
                            spec: {script: "exit <+pipeline.variables.result>"}
"""

ALICE, MALLORY = Actor("alice"), Actor("mallory")


@pytest.fixture
def pipeline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The pipeline file, with a fresh embedded ledger and RBAC (alice may do anything)."""
    for key in list(os.environ):
        if key.startswith("VMFARM_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("VMFARM_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "users.yaml").write_text("groups: {}\n")
    (tmp_path / "rbac.yaml").write_text(RBAC)
    (tmp_path / "pipeline.yaml").write_text(FILES)
    monkeypatch.setenv("VMFARM_USERS_FILE", str(tmp_path / "users.yaml"))
    monkeypatch.setenv("VMFARM_RBAC_FILE", str(tmp_path / "rbac.yaml"))
    get_settings.cache_clear()
    reset_engines()
    yield str(tmp_path / "pipeline.yaml")
    reset_engines()
    get_settings.cache_clear()


def _status(execution_id: str) -> str:
    with session_scope() as s:
        ex = s.get(Execution, execution_id)
        assert ex is not None
        return ex.status


def _until(execution_id: str, statuses: Collection[str], timeout: float = 90) -> str:
    deadline = time.monotonic() + timeout
    while (status := _status(execution_id)) not in statuses:
        assert time.monotonic() < deadline, f"{execution_id} is still {status}"
        time.sleep(0.2)
    return status


def _trail(execution_id: str) -> list[tuple[str, str, str]]:
    from app.audit import events

    return [
        (e["action"], e["user"], e["outcome"])
        for e in reversed(events(100, execution_id=execution_id))
    ]


@contextmanager
def _run(pipeline: str, result: int, tag: str = "1.0") -> Iterator[str]:
    """Run the pipeline (its step exits ``result``; version ``tag``) on the embedded worker;
    yields the execution id once it has ended or waits for a person, the worker still
    running."""
    from app.coordinator import advance
    from app.providers.base import DEFAULT_REGION
    from app.worker import EmbeddedWorker

    execution_id = operations.run(
        ALICE, [pipeline], inputs={"result": str(result), "tag": tag}, publish=False
    )
    with EmbeddedWorker([DEFAULT_REGION]):  # the region of a host that names none
        advance(execution_id)
        _until(execution_id, {*Status.TERMINAL, Status.WAITING})
        yield execution_id


def test_intervene_is_refused_without_the_permission_and_audited_with_it(pipeline: str) -> None:
    with _run(pipeline, 3) as execution_id:
        # Given the stage waits for a person after its step failed
        assert _status(execution_id) == Status.WAITING
        # mallory may not answer: refused, audited, still waiting
        with pytest.raises(PermissionRefused, match="mallory may not intervene"):
            operations.intervene(MALLORY, execution_id, "Ignore")
        assert _trail(execution_id)[-1] == ("intervene", "mallory", "refused")
        assert _status(execution_id) == Status.WAITING
        # alice answers Abort: done and audited as hers
        said = operations.intervene(ALICE, execution_id, "Abort", comment="bad build")
        assert said.startswith("Abort chosen by alice")
        assert _until(execution_id, Status.TERMINAL) == Status.ABORTED
        assert _trail(execution_id)[-1] == ("intervene", "alice", "Abort")


def test_rollback_is_refused_without_the_permission_and_audited_with_it(pipeline: str) -> None:
    with _run(pipeline, 0, "1.0") as first:
        assert _status(first) == Status.SUCCEEDED
        # A first deployment has nothing to go back to: refused alike, nothing recorded
        for action in (operations.rollback_plan, operations.rollback):
            with pytest.raises(
                LookupError,
                match=f"execution {first} has no host to roll "
                r"back \(1 host\(s\): no earlier version",
            ):
                action(ALICE, first)
        assert _trail(first)[-1] == ("run", "alice", "submitted")
    with _run(pipeline, 0, "2.0") as execution_id:
        assert _status(execution_id) == Status.SUCCEEDED
        # mallory may neither see the plan nor roll back: refused, audited, nothing new
        with pytest.raises(PermissionRefused, match="mallory may not view"):
            operations.rollback_plan(MALLORY, execution_id)
        with pytest.raises(PermissionRefused, match="mallory may not rollback"):
            operations.rollback(MALLORY, execution_id)
        assert _trail(execution_id)[-2:] == [
            ("view", "mallory", "refused"),
            ("rollback", "mallory", "refused"),
        ]
        # alice sees the host the run changed, then rolls it back as a new execution of hers
        plan = operations.rollback_plan(ALICE, execution_id)
        assert [h["host"] for st in plan["stages"] for h in st["hosts"]] == ["10.30.0.1"]
        new_id = operations.rollback(ALICE, execution_id, publish=False)
        with session_scope() as s:
            ex = s.get(Execution, new_id)
            assert ex is not None
            assert (ex.created_by, ex.inputs["rollback_of"]) == ("alice", execution_id)
        assert _trail(new_id) == [("rollback", "alice", "submitted")]
