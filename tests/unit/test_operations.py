"""The operations layer (app.operations) checks RBAC and records the audit trail for every user
action, whoever calls it: the CLI, a schedule, the server to come. A user without the
permission is refused, the refusal is in the audit trail and nothing is done; with it, the
action happens and is audited under the actor's name.

On a temporary SQLite ledger, embedded mode; no broker, worker, host or network. The actions
that need an execution a worker has run (intervene, rollback) proceed in
tests/service/test_operations_runs.py.
"""

from __future__ import annotations

import ast
import os
import pwd
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from app import operations
from app.db import reset_engines, session_scope
from app.models import Execution, Status
from app.operations import Actor, ApprovalRefused, PermissionRefused
from app.settings import get_settings

REPO = Path(__file__).resolve().parents[2]

USERS = """\
groups:
  release_managers: [alice, bob]
  developers: [dan]
"""

RBAC = """\
roles:
  admin: ["*"]
  approver: [pipeline:approve]
  stopper: [pipeline:abort]
bindings:
  - {role: admin, users: [alice]}
  - {role: approver, users: [dan]}
  - {role: stopper, users: [olga]}
"""

SERVICE_AND_HOSTS = """\
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  serviceDefinition: {type: SSH}
---
apiVersion: v1
kind: Environment
metadata: {name: prod}
spec: {type: Production}
---
apiVersion: v1
kind: Infrastructure
metadata: {name: prod-hosts, identifier: prod_hosts}
spec:
  environmentRef: prod
  type: Pdc
  spec:
    connection: {type: Local}
    hosts: [{hostname: 10.30.0.1}]
"""

DEPLOY_STAGE = """\
    - stage:
        name: Deploy prod
        identifier: deploy_prod
        type: Deployment
        spec:
          service: {serviceRef: web}
          environment:
            environmentRef: prod
            infrastructureDefinitions: [{identifier: prod_hosts}]
          execution:
            steps:
              - step:
                  type: Command
                  name: Touch
                  identifier: touch
                  spec:
                    onDelegate: true
                    commandUnits:
                      - identifier: touch
                        type: Script
                        spec: {source: {type: Inline, spec: {script: "true"}}}
"""

APPROVAL_STAGE = """\
    - stage:
        name: Go
        identifier: go
        type: Approval
        spec:
          execution:
            steps:
              - step:
                  type: HarnessApproval
                  name: Go
                  identifier: go
                  spec:
                    approvalMessage: ship it?
                    approvers: {userGroups: [release_managers], minimumCount: 1}
"""


def _pipeline(ident: str, *stages: str) -> str:
    return (
        SERVICE_AND_HOSTS + "---\napiVersion: v1\nkind: Pipeline\n"
        f"metadata: {{name: {ident}, identifier: {ident}}}\nspec:\n  stages:\n" + "".join(stages)
    )


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty SQLite ledger, RBAC on (RBAC above), run from tmp_path (no configs/ there)."""
    for key in list(os.environ):
        if key.startswith("VMFARM_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("VMFARM_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "users.yaml").write_text(USERS)
    (tmp_path / "rbac.yaml").write_text(RBAC)
    (tmp_path / "deploy.yaml").write_text(_pipeline("web_release", DEPLOY_STAGE))
    (tmp_path / "gated.yaml").write_text(_pipeline("web_gated", APPROVAL_STAGE, DEPLOY_STAGE))
    monkeypatch.setenv("VMFARM_USERS_FILE", str(tmp_path / "users.yaml"))
    monkeypatch.setenv("VMFARM_RBAC_FILE", str(tmp_path / "rbac.yaml"))
    get_settings.cache_clear()
    reset_engines()
    yield tmp_path
    reset_engines()
    get_settings.cache_clear()


ALICE, BOB, DAN, OLGA, MALLORY = (Actor(n) for n in ("alice", "bob", "dan", "olga", "mallory"))


def _trail(execution_id: str | None = None) -> list[tuple[str, str, str]]:
    """(action, user, outcome) of the audit trail, oldest first."""
    from app.audit import events

    return [
        (e["action"], e["user"], e["outcome"])
        for e in reversed(events(100, execution_id=execution_id))
    ]


def _execution(execution_id: str) -> Execution:
    with session_scope() as s:
        ex = s.get(Execution, execution_id)
        assert ex is not None
        s.expunge(ex)
        return ex


def _count() -> int:
    from app.report import recent_executions

    return len(recent_executions(100))


def _state(home: Path, kind: str) -> str | None:
    """An execution in the state an action needs, made by alice (who may do anything):
    "queued" (recorded, its first work not sent: no worker here), "ended" (aborted) or
    "waiting approval"; "none" for no execution."""
    if kind == "none":
        return None
    if kind == "waiting approval":
        execution_id = operations.run(ALICE, [str(home / "gated.yaml")])
        assert _execution(execution_id).status == Status.WAITING
        return execution_id
    execution_id = operations.run(ALICE, [str(home / "deploy.yaml")], publish=False)
    if kind == "ended":
        assert operations.abort(ALICE, execution_id) == "aborted"
    return execution_id


def _act(action: str, actor: Actor, execution_id: str | None, home: Path) -> Any:
    if action == "run":
        return operations.run(actor, [str(home / "deploy.yaml")], publish=False)
    assert execution_id is not None
    if action == "retry":
        return operations.retry(actor, execution_id, publish=False)
    if action == "approve":
        return operations.approve(actor, execution_id, comment="looks good")
    if action == "reject":
        return operations.reject(actor, execution_id, comment="not today")
    if action == "abort":
        return operations.abort(actor, execution_id)
    if action == "intervene":
        return operations.intervene(actor, execution_id, "Abort", comment="stop")
    if action == "rollback":
        return operations.rollback(actor, execution_id, publish=False)
    assert action == "rollback_plan"
    return operations.rollback_plan(actor, execution_id)


# (operation, the state it needs, the audit action of a refusal, the permission it needs)
EVERY_ACTION = [
    ("run", "none", "run", "pipeline:execute"),
    ("retry", "ended", "retry", "pipeline:execute"),
    ("approve", "waiting approval", "approve", "pipeline:approve"),
    ("reject", "waiting approval", "reject", "pipeline:approve"),
    ("abort", "queued", "abort", "pipeline:abort"),
    ("intervene", "queued", "intervene", "pipeline:intervene"),
    ("rollback", "queued", "rollback", "pipeline:rollback"),
    ("rollback_plan", "queued", "view", "pipeline:view"),
]


@pytest.mark.parametrize(
    ("action", "state", "audited", "permission"), EVERY_ACTION, ids=[a[0] for a in EVERY_ACTION]
)
def test_a_user_without_the_permission_is_refused_audited_and_nothing_is_done(
    home: Path, action: str, state: str, audited: str, permission: str
) -> None:
    # Given an execution in the state the action needs, and mallory, who holds no role
    execution_id = _state(home, state)
    before = (_count(), execution_id and _execution(execution_id).status)
    trail = _trail()
    # When mallory tries the action
    with pytest.raises(PermissionRefused) as refused:
        _act(action, MALLORY, execution_id, home)
    # Then the refusal names what is missing, the audit trail has it, and nothing changed
    assert f"mallory may not {audited}: missing permission {permission}" in str(refused.value)
    assert _trail() == [*trail, (audited, "mallory", "refused")]
    assert (_count(), execution_id and _execution(execution_id).status) == before


def test_run_records_the_execution_as_the_actors_and_audits_it(home: Path) -> None:
    execution_id = operations.run(ALICE, [str(home / "deploy.yaml")], inputs={}, publish=False)
    ex = _execution(execution_id)
    assert (ex.created_by, ex.pipeline, ex.status) == ("alice", "web_release", Status.QUEUED)
    assert _trail(execution_id) == [("run", "alice", "submitted")]


@pytest.mark.parametrize("rbac", [True, False], ids=["rbac on", "single-user"])
def test_a_run_let_through_with_policy_warnings_is_audited_with_them(
    home: Path, monkeypatch: pytest.MonkeyPatch, rbac: bool
) -> None:
    # Given a warn-severity rule the pipeline breaks (no approval before production)
    (home / "policies.yaml").write_text(
        "policies:\n  - name: approval please\n    severity: warn\n"
        "    requireApprovalBefore: {environmentType: Production}\n"
    )
    monkeypatch.setenv("VMFARM_POLICY_FILE", str(home / "policies.yaml"))
    if not rbac:
        monkeypatch.delenv("VMFARM_RBAC_FILE")
    # When it runs, it is recorded, and its audit row says what it was warned about
    execution_id = operations.run(ALICE, [str(home / "deploy.yaml")], publish=False)
    from app.audit import events

    [row] = events(10, execution_id=execution_id)
    assert (row["action"], row["user"], row["outcome"]) == ("run", "alice", "submitted")
    assert [w["rule"] for w in row["detail"]["policy_warnings"]] == ["approval please"]


def test_retry_is_a_new_execution_by_the_actor_audited_with_what_it_retries(home: Path) -> None:
    ended = _state(home, "ended")
    assert ended is not None
    new_id = operations.retry(ALICE, ended, publish=False)
    assert _execution(new_id).created_by == "alice"
    assert _execution(new_id).inputs["retry_of"] == ended
    assert _trail(new_id) == [("retry", "alice", "submitted")]
    from app.audit import events

    assert events(1, execution_id=new_id)[0]["detail"] == {"retry_of": ended}


@pytest.mark.parametrize(("approve", "outcome"), [(True, "approved"), (False, "rejected")])
def test_an_approver_decides_and_the_decision_is_audited(
    home: Path, approve: bool, outcome: str
) -> None:
    execution_id = _state(home, "waiting approval")
    assert execution_id is not None
    said = (operations.approve if approve else operations.reject)(
        ALICE, execution_id, comment="checked"
    )
    assert said.startswith(f"{outcome} by alice")
    assert _trail(execution_id)[-1] == ("approve" if approve else "reject", "alice", outcome)
    assert _execution(execution_id).status != Status.WAITING


def test_an_rbac_approver_outside_the_approval_groups_is_refused_and_audited(home: Path) -> None:
    # dan holds pipeline:approve, but the approval asks release_managers only
    execution_id = _state(home, "waiting approval")
    assert execution_id is not None
    with pytest.raises(ApprovalRefused, match="dan is not in the approver groups"):
        operations.approve(DAN, execution_id)
    assert _trail(execution_id)[-1] == ("approve", "dan", "refused")
    assert _execution(execution_id).status == Status.WAITING


def test_abort_is_audited_with_its_outcome(home: Path) -> None:
    execution_id = _state(home, "queued")
    assert execution_id is not None
    assert operations.abort(OLGA, execution_id) == "aborted"
    assert _trail(execution_id)[-1] == ("abort", "olga", "aborted")
    # an execution that has ended is told as such, and audited as such
    assert operations.abort(OLGA, execution_id) == Status.ABORTED
    assert _trail(execution_id)[-1] == ("abort", "olga", Status.ABORTED)


def test_abort_with_rollback_needs_the_rollback_permission_too(home: Path) -> None:
    execution_id = _state(home, "queued")
    assert execution_id is not None
    with pytest.raises(PermissionRefused, match="olga may not rollback"):
        operations.abort(OLGA, execution_id, rollback=True)
    assert _trail(execution_id)[-1] == ("rollback", "olga", "refused")
    assert _execution(execution_id).status == Status.QUEUED


def test_no_execution_is_a_lookup_error_and_nothing_is_audited(home: Path) -> None:
    for act in (
        lambda: operations.abort(ALICE, "nosuchexec01"),
        lambda: operations.retry(ALICE, "nosuchexec01"),
        lambda: operations.approve(ALICE, "nosuchexec01"),
        lambda: operations.intervene(ALICE, "nosuchexec01", "Ignore"),
        lambda: operations.rollback(ALICE, "nosuchexec01"),
        lambda: operations.rollback_plan(ALICE, "nosuchexec01"),
    ):
        with pytest.raises(LookupError, match="no execution 'nosuchexec01'"):
            act()
    assert _trail() == []


# --- schedules ------------------------------------------------------------------------------------


def _tick(home: Path) -> list[dict[str, Any]]:
    from app.schedules import FileClaims, load_schedules, tick

    path = home / "schedules.yaml"
    path.write_text(
        "schedules:\n  - {name: nightly, cron: '0 2 * * *', files: [gated.yaml],\n"
        "     startingDeadline: 1h}\n"
    )
    return tick(
        datetime(2025, 5, 1, 2, 0, 30, tzinfo=UTC),
        schedules=load_schedules(path),
        store=FileClaims(home / "home"),
    )


def test_a_scheduled_run_is_refused_when_the_scheduler_may_not_execute(home: Path) -> None:
    # Given the RBAC file binds no role to the user `scheduler`
    [result] = _tick(home)
    # Then the slot is claimed but not submitted: the refusal is its outcome and audited
    assert "scheduler may not run: missing permission pipeline:execute" in result["error"]
    assert _trail() == [("run", "scheduler", "refused")]
    assert _count() == 0


def test_a_scheduled_run_is_the_schedulers_and_audited(home: Path) -> None:
    # Given `scheduler` may run pipelines
    (home / "rbac.yaml").write_text(
        RBAC.replace("roles:\n", "roles:\n  runner: [pipeline:execute, environment:deploy]\n")
        + "  - {role: runner, users: [scheduler]}\n"
    )
    # Then the due slot is an execution of its, audited as its
    [result] = _tick(home)
    execution_id = result["execution"]
    assert _execution(execution_id).created_by == "scheduler"
    assert _trail(execution_id) == [("run", "scheduler", "submitted")]


# --- who acts -------------------------------------------------------------------------------------


def test_an_actor_always_has_a_name() -> None:
    with pytest.raises(ValueError, match="needs a user name"):
        Actor("  ")


def test_the_cli_user_is_vmfarm_user_else_user_else_the_os_account(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cli.context import Cli

    def actor() -> str:
        get_settings.cache_clear()
        return Cli().actor.name

    monkeypatch.setenv("VMFARM_USER", "vera")
    monkeypatch.setenv("USER", "ursula")
    assert actor() == "vera"
    monkeypatch.delenv("VMFARM_USER")
    assert actor() == "ursula"
    monkeypatch.delenv("USER")
    assert actor() == pwd.getpwuid(os.getuid()).pw_name


@pytest.mark.parametrize(
    "args",
    [
        ["retry", "{id}", "--only-failed"],
        ["approve", "{id}"],
        ["reject", "{id}"],
        ["abort", "{id}"],
        ["intervene", "{id}", "Ignore"],
        ["rollback", "{id}"],
        ["rollback", "{id}", "--plan"],
    ],
    ids=lambda a: " ".join(a[::2]),
)
def test_the_cli_says_refused_and_exits_3(
    home: Path, monkeypatch: pytest.MonkeyPatch, args: list[str]
) -> None:
    from cli.main import main

    execution_id = _state(home, "queued")
    assert execution_id is not None
    monkeypatch.setenv("VMFARM_USER", "mallory")
    get_settings.cache_clear()
    res = CliRunner().invoke(main, [a.format(id=execution_id) for a in args])
    assert res.exit_code == 3, res.output
    assert res.stderr.startswith("refused: mallory may not ")
    assert _execution(execution_id).status == Status.QUEUED


# --- layers ---------------------------------------------------------------------------------------


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return found


def test_the_coordinator_imports_neither_the_operations_layer_nor_the_cli() -> None:
    for path in sorted((REPO / "app" / "coordinator").glob("*.py")):
        bad = {m for m in _imports(path) if m.startswith(("app.operations", "cli"))}
        assert not bad, f"{path.name} imports {bad}"


def test_the_operations_layer_imports_only_what_it_may() -> None:
    allowed = ("app.coordinator", "app.rbac", "app.audit", "app.policy", "app.definitions")
    found = {
        m for m in _imports(REPO / "app" / "operations.py") if m.startswith(("app", "cli", "tasks"))
    }
    # `from app import audit, coordinator`: the package itself, then the modules named
    assert {m for m in found if m != "app" and not m.startswith(allowed)} == set()
