"""Governance: RBAC (roles, wildcards, group bindings, production qualifiers), policies as code
and the audit trail, on a temporary SQLite ledger. No broker, workers, hosts or network."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

from app.db import reset_engines, session_scope
from app.errors import ConfigError
from app.models import Execution
from app.settings import get_settings

REPO = Path(__file__).resolve().parents[2]

USERS = """\
groups:
  release_managers: [alice, bob]
  developers: [dan, erin]
"""

RBAC = """\
roles:
  viewer: [pipeline:view, environment:view]
  deployer:
    description: runs pipelines outside production
    permissions: [pipeline:execute, pipeline:view, pipeline:abort, "environment:*:non-production"]
  release_manager:
    permissions: [pipeline:approve, pipeline:execute, pipeline:rollback, environment:deploy]
  admin: ["pipeline:*", "environment:*"]
bindings:
  - role: deployer
    groups: [developers]
  - roles: [release_manager, viewer]
    groups: [release_managers]
  - role: admin
    users: [root_user]
  - role: deployer
    users: [scoped]
    resources: ["web*"]
"""


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty SQLite ledger under tmp_path, run from tmp_path (no configs/ there)."""
    for key in list(os.environ):
        if key.startswith("VMFARM_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("VMFARM_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "users.yaml").write_text(USERS)
    monkeypatch.setenv("VMFARM_USERS_FILE", str(tmp_path / "users.yaml"))
    get_settings.cache_clear()
    reset_engines()
    yield tmp_path
    reset_engines()
    get_settings.cache_clear()


@pytest.fixture
def rbac_on(home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = home / "rbac.yaml"
    path.write_text(RBAC)
    monkeypatch.setenv("VMFARM_RBAC_FILE", str(path))
    return path


def _stage(
    ident: str,
    env_type: str,
    *,
    env: str | None = None,
    steps: tuple[str, ...] = ("install",),
    hosts: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    return {
        "identifier": ident,
        "name": ident,
        "service": {"identifier": "web", "name": "web"},
        "environment": {
            "identifier": env or ident + "_env",
            "name": env or ident,
            "type": env_type,
        },
        "steps": [{"identifier": s, "type": "Command", "spec": {}} for s in steps],
        "infrastructures": [
            {
                "identifier": f"{ident}_hosts",
                "provider": "static",
                "spec": {"region": "r1", "hosts": hosts or [{"hostname": "127.0.1.250"}]},
            }
        ],
        "strategy": {"type": "Basic"},
    }


def _approval(
    ident: str = "approve", groups: tuple[str, ...] = ("release_managers",)
) -> dict[str, Any]:
    return {
        "type": "Approval",
        "identifier": ident,
        "name": ident,
        "steps": [],
        "infrastructures": [],
        "strategy": {"type": "Basic"},
        "approval": {
            "identifier": "ok",
            "type": "HarnessApproval",
            "spec": {"approvers": {"userGroups": list(groups)}},
        },
    }


def _plan(*stages: dict[str, Any], ident: str = "web_release") -> dict[str, Any]:
    return {"identifier": ident, "name": ident, "stages": list(stages)}


# --- RBAC -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("granted", "needed", "expected"),
    [
        ("pipeline:execute", "pipeline:execute", True),
        ("pipeline:*", "pipeline:execute", True),
        ("pipeline:*", "pipeline:view", True),
        ("pipeline:*", "environment:view", False),
        ("*", "environment:deploy:production", True),
        ("*:view", "pipeline:view", True),
        ("*:view", "pipeline:execute", False),
        ("environment:*", "environment:deploy:production", True),
        ("environment:deploy", "environment:deploy:production", True),
        ("environment:*:non-production", "environment:view:non-production", True),
        ("environment:*:non-production", "environment:deploy:production", False),
        ("environment:deploy:non-production", "environment:deploy:production", False),
        ("environment:view:non-production", "environment:view", False),
    ],
)
def test_a_granted_permission_covers_by_segment_wildcards_and_prefix(
    granted: str, needed: str, expected: bool
) -> None:
    from app.rbac import grants

    assert grants(granted, needed) is expected


def test_without_an_rbac_file_everything_is_allowed(home: Path) -> None:
    from app.rbac import authorize, guard, load_rbac, rbac_enabled

    # Given no VMFARM_RBAC_FILE and no configs/rbac.yaml in the working directory
    assert not rbac_enabled() and load_rbac() is None
    # Then anyone may do anything, and nothing is recorded
    authorize("nobody", "pipeline:delete", resource="x", environment_type="Production")
    guard("run", user="nobody", plan=_plan(_stage("prod", "Production")))
    from app.audit import events

    assert events(10) == []


def test_a_named_rbac_file_that_is_missing_refuses_rather_than_allows(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.rbac import authorize, rbac_enabled

    monkeypatch.setenv("VMFARM_RBAC_FILE", str(home / "nope.yaml"))
    assert rbac_enabled()
    with pytest.raises(ConfigError, match=r"cannot read the RBAC file .*nope\.yaml"):
        authorize("root_user", "pipeline:view")


def test_group_bindings_give_their_roles_to_the_members(rbac_on: Path) -> None:
    from app.rbac import PermissionRefused, authorize

    # alice is in release_managers: release_manager and viewer roles
    authorize("alice", "pipeline:approve", resource="web_release")
    authorize("alice", "environment:deploy", resource="prod", environment_type="Production")
    authorize("alice", "environment:view:production", resource="prod")
    # dan is a developer: deployer only
    authorize("dan", "pipeline:execute", resource="web_release")
    with pytest.raises(PermissionRefused):
        authorize("dan", "pipeline:approve", resource="web_release")
    # root_user's admin role is bound to the user directly: wildcards cover everything
    authorize("root_user", "pipeline:rollback", resource="anything")
    authorize("root_user", "environment:deploy:production", resource="prod")
    # someone in no group and no binding holds nothing
    with pytest.raises(PermissionRefused):
        authorize("mallory", "pipeline:view", resource="web_release")


def test_production_needs_the_production_qualifier(rbac_on: Path) -> None:
    from app.rbac import PermissionRefused, authorize

    authorize("dan", "environment:deploy", resource="staging", environment_type="PreProduction")
    authorize("dan", "environment:view", resource="staging", environment_type="PreProduction")
    with pytest.raises(PermissionRefused) as refused:
        authorize("dan", "environment:deploy", resource="prod", environment_type="Production")
    assert refused.value.permission == "environment:deploy:production"
    assert refused.value.granted_by == ("admin", "release_manager")


def test_the_refusal_names_the_user_the_permission_and_where_it_comes_from(rbac_on: Path) -> None:
    from app.rbac import PermissionRefused, authorize

    with pytest.raises(PermissionRefused) as refused:
        authorize("erin", "environment:deploy:production", resource="prod")
    assert str(refused.value) == (
        "erin: missing permission environment:deploy:production on environment 'prod'; "
        f"role(s) granting it in {rbac_on}: admin, release_manager; erin has role(s) deployer "
        "(group developers); bind erin or one of their groups (developers) to one of those "
        "roles"
    )
    assert refused.value.user == "erin"


def test_a_binding_scoped_to_resources_grants_only_on_them(rbac_on: Path) -> None:
    from app.rbac import PermissionRefused, authorize

    authorize("scoped", "pipeline:execute", resource="web_release")
    with pytest.raises(PermissionRefused, match=r"scoped holds it only on web\*"):
        authorize("scoped", "pipeline:execute", resource="billing")
    with pytest.raises(PermissionRefused):
        authorize("scoped", "pipeline:execute")  # no resource: a scoped grant does not apply


def test_an_unnamed_user_holds_nothing(rbac_on: Path) -> None:
    from app.rbac import PermissionRefused, authorize

    with pytest.raises(PermissionRefused, match=r"an unnamed user \(set VMFARM_USER\)"):
        authorize("", "pipeline:view")


def test_required_permissions_follow_the_stages_environment_types() -> None:
    from app.rbac import Need, required_permissions

    plan = _plan(_stage("qa", "PreProduction"), _approval(), _stage("prod", "Production"))
    assert required_permissions("run", plan) == [
        Need("pipeline:execute", "web_release"),
        Need("environment:deploy:non-production", "qa_env", "qa"),
        Need("environment:deploy:production", "prod_env", "prod"),
    ]
    assert required_permissions("view", plan)[2] == Need(
        "environment:view:production", "prod_env", "prod"
    )
    assert required_permissions("intervene", plan, stage_index=2) == [
        Need("pipeline:intervene", "web_release"),
        Need("environment:deploy:production", "prod_env", "prod"),
    ]
    assert required_permissions("approve", plan) == [Need("pipeline:approve", "web_release")]
    assert required_permissions("reject", None) == [Need("pipeline:approve", None)]
    assert [n.permission for n in required_permissions("rollback", plan)] == [
        "pipeline:rollback",
        "environment:deploy:non-production",
        "environment:deploy:production",
    ]
    with pytest.raises(ValueError, match="unknown action 'deploy'"):
        required_permissions("deploy", plan)


def test_guard_refuses_a_production_run_and_records_the_refusal(rbac_on: Path) -> None:
    from app.audit import events
    from app.rbac import PermissionRefused, guard

    plan = _plan(_stage("qa", "PreProduction"), _approval(), _stage("prod", "Production"))
    # Given dan, a developer, may deploy outside production only
    guard("run", user="dan", plan=_plan(_stage("qa", "PreProduction")), execution_id="ex1")
    # When he runs a pipeline that also deploys to production
    with pytest.raises(PermissionRefused) as refused:
        guard("run", user="dan", plan=plan, execution_id="ex2")
    # Then the refusal names the stage, and the audit trail has it
    assert str(refused.value).startswith(
        "dan may not run: missing permission environment:deploy:production on environment "
        "'prod_env' (stage 'prod')"
    )
    (event,) = events(10)
    assert (
        event["user"],
        event["action"],
        event["execution_id"],
        event["pipeline"],
        event["outcome"],
    ) == ("dan", "run", "ex2", "web_release", "refused")
    assert event["detail"]["permission"] == "environment:deploy:production"
    assert event["detail"]["stage"] == "prod"


def test_guard_reads_the_plan_of_an_execution_from_the_ledger(rbac_on: Path) -> None:
    from app.audit import events
    from app.rbac import PermissionRefused, guard

    plan = _plan(_stage("qa", "PreProduction"), _stage("prod", "Production"))
    with session_scope() as s:
        s.add(Execution(id="exq", pipeline="web_release", plan=plan, current_stage=0))
        s.add(Execution(id="exp", pipeline="web_release", plan=plan, current_stage=1))
    # intervening in a stage paused in QA is a developer's call; in production it is not
    guard("intervene", user="root_user", execution_id="exp")
    with pytest.raises(PermissionRefused, match="pipeline:intervene"):
        guard("intervene", user="dan", execution_id="exq")
    guard("abort", user="dan", execution_id="exp")
    with pytest.raises(PermissionRefused, match="pipeline:approve on pipeline 'web_release'"):
        guard("approve", user="dan", execution_id="exp")
    guard("approve", user="bob", execution_id="exp")
    # an execution that does not exist is left to the command to report
    guard("abort", user="mallory", execution_id="missing")
    assert [(e["action"], e["user"], e["outcome"]) for e in events(10)] == [
        ("approve", "dan", "refused"),
        ("intervene", "dan", "refused"),
    ]


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("roles: {a: [pipeline:view]}\nbindings: [{role: b, users: [x]}]", "unknown role(s) b"),
        (
            "roles: {a: [pipeline:view]}\nbindings: [{role: a, groups: [ops]}]",
            "binds group(s) ops that are not in the users file",
        ),
        ("roles: {a: ['pipeline view']}", "'pipeline view' is not a permission"),
        ("roles: {a: [pipeline:view]}\nbindings: [{role: a}]", "to no user or group"),
        ("roles: {a: [pipeline:view]}\nbinding: []", "binding: Extra inputs are not permitted"),
        ("roles: [", "not valid YAML"),
    ],
)
def test_a_wrong_rbac_file_is_a_config_error_naming_it(
    home: Path, monkeypatch: pytest.MonkeyPatch, text: str, problem: str
) -> None:
    from app.rbac import authorize

    path = home / "bad-rbac.yaml"
    path.write_text(text)
    monkeypatch.setenv("VMFARM_RBAC_FILE", str(path))
    with pytest.raises(ConfigError) as exc:
        authorize("x", "pipeline:view")
    assert str(path) in str(exc.value) and problem in str(exc.value)


def test_the_reference_user_groups_form_binds_each_group(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.rbac import PermissionRefused, authorize

    (home / "users.yaml").write_text("groups:\n  Developers: [dan]\n  Platform Admin: [pat]\n")
    path = home / "rbac.yaml"
    path.write_text("""\
rbac:
  userGroups:
    - name: Developers
      permissions: [pipeline:view, environment:view:non-production]
    - name: Platform Admin
      permissions: ["pipeline:*", "environment:*", "service:*", "connector:*"]
""")
    monkeypatch.setenv("VMFARM_RBAC_FILE", str(path))
    authorize("dan", "environment:view", resource="qa", environment_type="PreProduction")
    with pytest.raises(PermissionRefused, match=r"role\(s\) granting it .*: Platform Admin"):
        authorize("dan", "environment:view", resource="prod", environment_type="Production")
    authorize("pat", "connector:edit")


def test_the_example_rbac_file_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    from app.rbac import load_rbac

    monkeypatch.setenv("VMFARM_USERS_FILE", str(REPO / "configs" / "users.yaml"))
    get_settings.cache_clear()
    try:
        cfg = load_rbac(REPO / "configs" / "rbac.example.yaml")
        assert cfg is not None
        assert cfg.allows("alice", "environment:deploy:production", resource="prod")
        assert not cfg.allows("erin", "pipeline:execute", resource="billing")
        assert cfg.allows("erin", "pipeline:execute", resource="web")
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()


# --- policies -------------------------------------------------------------------------------------


def _rules(text: str) -> list[Any]:
    import yaml

    from app.policy import Rule

    return [Rule.model_validate(r) for r in yaml.safe_load(text)]


APPROVAL_RULE = """\
- name: Require Approval for Production
  requireApprovalBefore: {environmentType: Production}
"""


def test_a_production_stage_without_an_approval_before_it_is_an_error_finding() -> None:
    from app.policy import Finding, evaluate

    rules = _rules(APPROVAL_RULE)
    findings = evaluate(
        _plan(_stage("qa", "PreProduction"), _stage("prod", "Production")), rules=rules
    )
    assert findings == [
        Finding(
            "Require Approval for Production",
            "error",
            "prod",
            "deploys to Production environment 'prod_env' with no Approval stage before it (add an "
            "Approval stage earlier in the pipeline)",
        )
    ]
    # an approval after the production stage does not count; one before it does
    assert evaluate(_plan(_stage("prod", "Production"), _approval()), rules=rules)
    assert (
        evaluate(
            _plan(_stage("qa", "PreProduction"), _approval(), _stage("prod", "Production")),
            rules=rules,
        )
        == []
    )


def test_the_approval_must_ask_the_named_groups() -> None:
    from app.policy import evaluate

    rules = _rules("""\
- name: prod approval
  requireApprovalBefore: {approverGroups: [release_managers]}
""")
    (finding,) = evaluate(
        _plan(_approval(groups=("sre",)), _stage("prod", "Production")), rules=rules
    )
    assert "no Approval stage asking release_managers before it" in finding.message
    assert (
        evaluate(
            _plan(_approval(groups=("sre", "release_managers")), _stage("prod", "Production")),
            rules=rules,
        )
        == []
    )


def test_a_missing_required_step_is_a_finding() -> None:
    from app.policy import evaluate

    rules = _rules("""\
- name: Security Scan Required
  requiredSteps: {environmentType: Production, steps: [security_scan, "smoke*"]}
""")
    plan = _plan(
        _stage("qa", "PreProduction"), _stage("prod", "Production", steps=("install", "smoke_test"))
    )
    (finding,) = evaluate(plan, rules=rules)
    assert (finding.rule, finding.stage) == ("Security Scan Required", "prod")
    assert finding.message == (
        "deploys to Production environment 'prod_env' without the "
        "required step(s) security_scan (steps: install, smoke_test)"
    )
    ok = _plan(_stage("prod", "Production", steps=("security_scan", "install", "smoke")))
    assert evaluate(ok, rules=rules) == []


def test_forbidden_instance_types_on_static_and_given_hosts() -> None:
    from app.policy import evaluate
    from app.providers.base import Host

    rules = _rules("""\
- name: no metal
  severity: warn
  forbiddenInstanceTypes: {types: ["*.metal"]}
""")
    plan = _plan(
        _stage(
            "prod",
            "Production",
            hosts=[
                {"hostname": "127.0.1.250", "attributes": {"instanceType": "m5.metal"}},
                {"hostname": "127.0.1.251", "hostAttributes": {"instanceType": "m5.large"}},
            ],
        )
    )
    (finding,) = evaluate(plan, rules=rules)
    assert finding.message == (
        "targets host(s) of a forbidden instance type: 127.0.1.250 (instanceType m5.metal)"
    )
    # discovered cloud hosts, given per stage (a list aligned with the stages, or by id)
    gcp = Host(
        name="vm-1",
        address="10.0.0.1",
        region="r1",
        infrastructure="gcp",
        attributes={"machineType": "c3.metal"},
    )
    (finding,) = evaluate(plan, [[gcp]], rules=rules)
    assert "vm-1 (machineType c3.metal)" in finding.message
    (finding,) = evaluate(
        plan, {"prod": [{"name": "vm-2", "attributes": {"size": "x.metal"}}]}, rules=rules
    )
    assert "vm-2 (size x.metal)" in finding.message


def test_a_deny_rule_matches_paths_of_the_stage() -> None:
    from app.policy import evaluate

    rules = _rules("""\
- name: no static prod
  deny:
    match: {environment.type: Production, infrastructure.provider: static}
    message: production runs on cloud hosts
- name: no debug steps
  deny:
    match: {step.identifier: ["debug*", "shell"]}
""")
    plan = _plan(
        _stage("qa", "PreProduction", steps=("install", "debug_dump")), _stage("prod", "Production")
    )
    assert [(f.rule, f.stage, f.message) for f in evaluate(plan, rules=rules)] == [
        ("no debug steps", "qa", "matches step.identifier=debug*|shell (step 'debug_dump')"),
        ("no static prod", "prod", "production runs on cloud hosts (infrastructure 'prod_hosts')"),
    ]


def test_warnings_do_not_block_errors_do_and_are_audited(home: Path) -> None:
    from app.audit import events
    from app.policy import PolicyViolation, enforce

    warn = _rules("""\
- name: approval please
  severity: warn
  requireApprovalBefore: {}
""")
    plan = _plan(_stage("prod", "Production"))
    # Given a warn-severity rule is broken, the run goes on with the warning
    (finding,) = enforce(plan, rules=warn, user="dan", execution_id="ex1")
    assert finding.severity == "warn"
    assert events(10) == []
    # When the same rule is an error, the run is refused and the denial audited
    with pytest.raises(PolicyViolation) as denied:
        enforce(plan, rules=_rules(APPROVAL_RULE), user="dan", execution_id="ex2")
    assert str(denied.value).startswith(
        "refused by policy: 'Require Approval for Production': stage 'prod': deploys to "
        "Production environment 'prod_env'"
    )
    (event,) = events(10)
    assert (event["action"], event["outcome"], event["execution_id"]) == ("run", "denied", "ex2")
    assert event["detail"]["findings"][0]["rule"] == "Require Approval for Production"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("policies:\n  - name: x\n", "exactly one of requireApprovalBefore"),
        (
            "policies:\n  - name: x\n    severity: fatal\n    requireApprovalBefore: {}\n",
            "policies.0.severity",
        ),
        ("policies:\n  - name: x\n    requiredSteps: {steps: []}\n", "requiredSteps.steps"),
        (
            "policies:\n  - {name: x, deny: {match: {a: b}}}\n  - {name: x, deny: {match: {a: c}}}\n",
            "rule names must be unique (x)",
        ),
    ],
)
def test_a_wrong_policy_file_is_a_config_error_naming_it(
    tmp_path: Path, text: str, problem: str
) -> None:
    from app.policy import load_policies

    path = tmp_path / "policies.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as exc:
        load_policies(path)
    assert str(path) in str(exc.value) and problem in str(exc.value)


def test_the_example_policy_file_loads_and_disabled_rules_are_skipped(tmp_path: Path) -> None:
    from app.policy import load_policies

    names = [r.name for r in load_policies(REPO / "configs" / "policies.example.yaml")]
    assert "Require Approval for Production" in names and "Security Scan Required" in names
    path = tmp_path / "p.yaml"
    path.write_text("- {name: not now, enabled: false, requireApprovalBefore: {}}\n")
    assert load_policies(path) == []


# --- the commands ---------------------------------------------------------------------------------


def _cli() -> click.Group:
    from cli.commands.governance import register

    @click.group()
    def root() -> None:
        """A fresh group, as cli/main.py builds it."""

    register(root)
    return root


PIPELINE_FILES = """\
apiVersion: v1
kind: Service
metadata: {name: web, identifier: web}
spec:
  serviceDefinition: {type: Ssh}
---
apiVersion: v1
kind: Environment
metadata: {name: prod, identifier: prod}
spec: {type: Production}
---
apiVersion: v1
kind: Infrastructure
metadata: {name: prod-hosts, identifier: prod_hosts}
spec:
  environmentRef: prod
  deploymentType: Ssh
  type: Pdc
  spec:
    region: r1
    hosts:
      - hostname: 127.0.1.250
        attributes: {instanceType: m5.metal}
      - hostname: 127.0.1.251
        attributes: {instanceType: m5.large}
---
apiVersion: v1
kind: Pipeline
metadata: {name: web release, identifier: web_release}
spec:
  variables:
    - {name: note, type: String, value: <+input>}
  stages:
    - stage:
        name: Deploy prod
        identifier: deploy_prod
        type: Deployment
        spec:
          deploymentType: Ssh
          service: {serviceRef: web}
          environment:
            environmentRef: prod
            infrastructureDefinitions: [{identifier: prod_hosts}]
          execution:
            steps:
              - step:
                  type: Command
                  name: Install
                  identifier: install
                  spec:
                    commandUnits:
                      - identifier: run
                        type: Script
                        spec:
                          source: {type: Inline, spec: {script: echo hi}}
"""

POLICIES = """\
policies:
  - name: Require Approval for Production
    requireApprovalBefore: {environmentType: Production}
  - name: No metal
    severity: warn
    forbiddenInstanceTypes: {types: ["*.metal"]}
"""


def test_policy_check_prints_findings_and_exits_2_on_an_error(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pipeline = home / "pipeline.yaml"
    pipeline.write_text(PIPELINE_FILES)
    policies = home / "policies.yaml"
    policies.write_text(POLICIES)
    runner = CliRunner()
    # Given a Production stage with no approval and a metal host
    res = runner.invoke(
        _cli(), ["policy", "check", str(pipeline), "--set", "note=hi", "--policies", str(policies)]
    )
    assert res.exit_code == 2, res.output
    assert (
        "error [Require Approval for Production] stage 'deploy_prod': deploys to Production "
        "environment 'prod' with no Approval stage before it"
    ) in res.stdout
    assert (
        "warn  [No metal] stage 'deploy_prod': targets host(s) of a forbidden instance "
        "type: 127.0.1.250 (instanceType m5.metal)"
    ) in res.stdout
    assert "1 error(s), 1 warning(s): a run would be refused" in res.stdout
    # -o json, with the policy file from VMFARM_POLICY_FILE
    monkeypatch.setenv("VMFARM_POLICY_FILE", str(policies))
    res = runner.invoke(
        _cli(), ["policy", "check", str(pipeline), "--set", "note=hi", "-o", "json"]
    )
    monkeypatch.delenv("VMFARM_POLICY_FILE")
    assert res.exit_code == 2
    doc = json.loads(res.stdout)
    assert doc["passed"] is False and doc["pipeline"] == "web_release"
    assert [(f["rule"], f["severity"]) for f in doc["findings"]] == [
        ("Require Approval for Production", "error"),
        ("No metal", "warn"),
    ]
    # only the warning left: exit 0
    policies.write_text(
        POLICIES.replace(
            "    requireApprovalBefore", "    severity: warn\n    requireApprovalBefore"
        )
    )
    res = runner.invoke(
        _cli(), ["policy", "check", str(pipeline), "--set", "note=hi", "--policies", str(policies)]
    )
    assert res.exit_code == 0, res.output
    assert "0 error(s), 2 warning(s): a run would be allowed" in res.stdout
    # nothing was recorded: a check is not an execution
    from app.audit import events

    assert events(10) == []


def test_policy_check_refuses_bad_input(home: Path) -> None:
    pipeline = home / "pipeline.yaml"
    pipeline.write_text(PIPELINE_FILES)
    runner = CliRunner()
    res = runner.invoke(_cli(), ["policy", "check", str(pipeline)])
    assert res.exit_code == 2 and "runtime input <+input> has no value" in res.stderr
    bad = home / "bad.yaml"
    bad.write_text("policies: [{name: x}]\n")
    res = runner.invoke(
        _cli(), ["policy", "check", str(pipeline), "--set", "note=hi", "--policies", str(bad)]
    )
    assert res.exit_code == 2 and "exactly one of requireApprovalBefore" in res.stderr
    # without a policy file there is nothing to check
    res = runner.invoke(_cli(), ["policy", "check", str(pipeline), "--set", "note=hi"])
    assert res.exit_code == 0 and "no policy file" in res.stdout


def test_audit_events_are_recorded_masked_and_listed(home: Path) -> None:
    from app.audit import events, record
    from app.secrets import register as register_secret

    with session_scope() as s:
        s.add(Execution(id="ex1", pipeline="web_release", plan={}))
    register_secret(["hunter2-governance"])
    record(
        "run",
        user="dan",
        execution_id="ex1",
        outcome="submitted",
        detail={"note": "token is hunter2-governance", "db_password": "plain", "inputs": ["tag"]},
    )
    record(
        "approve", user="alice", execution_id="ex1", outcome="approved", detail={"comment": "ok"}
    )
    record("abort", user="dan", execution_id="ex2", outcome="aborted")
    # newest first, filtered
    assert [e["action"] for e in events(10)] == ["abort", "approve", "run"]
    assert [e["action"] for e in events(10, user="dan")] == ["abort", "run"]
    assert [e["action"] for e in events(10, execution_id="ex1", action="run")] == ["run"]
    assert len(events(2)) == 2
    (run,) = events(1, action="run")
    # the pipeline comes from the execution; no secret reaches the row
    assert run["pipeline"] == "web_release"
    assert "hunter2-governance" not in json.dumps(run)
    assert run["detail"]["db_password"] == "***" and run["detail"]["inputs"] == ["tag"]

    runner = CliRunner()
    res = runner.invoke(_cli(), ["audit", "--user", "dan", "-o", "json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    assert [(r["action"], r["execution_id"], r["outcome"]) for r in rows] == [
        ("abort", "ex2", "aborted"),
        ("run", "ex1", "submitted"),
    ]
    assert rows[0]["at"].endswith("Z")
    res = runner.invoke(_cli(), ["audit", "--execution", "ex1", "--limit", "1"])
    assert res.exit_code == 0, res.output
    assert "approve" in res.stdout and "alice" in res.stdout and "abort" not in res.stdout
    res = runner.invoke(_cli(), ["audit", "--action", "rollback"])
    assert res.exit_code == 0 and "no audit events" in res.stderr


def test_an_event_recorded_in_a_transaction_shares_its_fate(home: Path) -> None:
    from app.audit import events, record

    with session_scope() as s:
        s.add(Execution(id="ex9", pipeline="api", plan={}))
        s.flush()
        assert (
            record("approve", user="bob", execution_id="ex9", outcome="approved", session=s) is None
        )
    with pytest.raises(RuntimeError), session_scope() as s:
        record("reject", user="bob", execution_id="ex9", outcome="rejected", session=s)
        raise RuntimeError("the decision failed")
    assert [(e["action"], e["pipeline"]) for e in events(10)] == [("approve", "api")]
