"""What an identity may do comes from the server's RBAC file and the token, nothing else."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from app.auth import Identity
from app.auth.permissions import allows, authorize, may_grant_roles
from app.rbac import PermissionRefused, load_rbac

RBAC = """
roles:
  viewer: [pipeline:view, token:view]
  deployer: [pipeline:view, pipeline:execute, environment:deploy:non-production]
  admin: ["*"]
bindings:
  - role: deployer
    groups: [deployers]
  - role: viewer
    users: [bob]
  - role: admin
    users: [root-person]
"""


@pytest.fixture
def cfg(tmp_path: Path):  # type: ignore[no-untyped-def]
    path = tmp_path / "rbac.yaml"
    path.write_text(RBAC)
    return load_rbac(path, groups={"deployers": frozenset({"dana"})})


def test_groups_come_from_the_token_or_the_servers_users_file(cfg) -> None:  # type: ignore[no-untyped-def]
    alice = Identity("alice", "oidc", groups=frozenset({"deployers"}))
    dana = Identity("dana", "oidc")  # in the server's users file
    carol = Identity("carol", "oidc")
    assert allows(cfg, alice, "pipeline:execute")
    assert allows(cfg, dana, "pipeline:execute")
    assert not allows(cfg, carol, "pipeline:view")
    with pytest.raises(PermissionRefused, match="carol lacks permission pipeline:execute"):
        authorize(cfg, carol, "pipeline:execute")


def test_the_callers_environment_and_working_directory_grant_nothing(
    cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    # Given a caller who sets every variable the local CLI believes
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "rbac.yaml").write_text(
        "roles: {all: ['*']}\nbindings: [{role: all, users: ['*']}]\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VMFARM_USER", "root-person")
    monkeypatch.setenv("VMFARM_RBAC_FILE", str(tmp_path / "configs" / "rbac.yaml"))
    assert os.environ["VMFARM_USER"] == "root-person"
    # Then the identity from the token alone decides
    assert not allows(cfg, Identity("carol", "oidc"), "pipeline:execute")


def test_an_api_token_holds_its_roles_not_its_names_bindings(cfg) -> None:  # type: ignore[no-untyped-def]
    ci = Identity("token:ci", "token", roles=("viewer",), token_id="t1")
    assert allows(cfg, ci, "pipeline:view")
    assert not allows(cfg, ci, "pipeline:execute")
    # a token named like an admin is still only what its roles say
    assert not allows(cfg, Identity("root-person", "token", roles=("viewer",)), "token:create")


def test_nobody_makes_a_token_stronger_than_themselves(cfg) -> None:  # type: ignore[no-untyped-def]
    alice = Identity("alice", "oidc", groups=frozenset({"deployers"}))
    assert may_grant_roles(cfg, alice, ["deployer"]) == []
    assert may_grant_roles(cfg, alice, ["admin"]) == ["*"]
    with pytest.raises(ValueError, match="unknown role"):
        may_grant_roles(cfg, alice, ["nope"])


def test_operations_guard_with_the_servers_rules_counts_token_groups_and_roles(
    cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    from app import rbac

    # A local RBAC file that would allow everyone everything is not the one applied
    local = tmp_path / "local-rbac.yaml"
    local.write_text('roles: {all: ["*"]}\nbindings: [{role: all, users: ["*"]}]\n')
    monkeypatch.setenv("VMFARM_RBAC_FILE", str(local))
    plan = {
        "identifier": "web",
        "stages": [
            {
                "type": "Deployment",
                "identifier": "d",
                "environment": {"identifier": "prod", "type": "Production"},
            }
        ],
    }
    with pytest.raises(
        PermissionRefused, match="carol may not run: missing permission pipeline:execute"
    ):
        rbac.guard("run", user="carol", plan=plan, rules=cfg)
    # alice's token says she is a deployer: that is enough outside production only
    with pytest.raises(PermissionRefused, match="environment:deploy:production"):
        rbac.guard("run", user="alice", plan=plan, rules=cfg, groups=["deployers"])
    plan["stages"][0]["environment"]["type"] = "PreProduction"
    rbac.guard("run", user="alice", plan=plan, rules=cfg, groups=["deployers"])
    # an API token holds its roles (not the bindings of its name)
    rbac.guard("run", user="token:ci", plan=plan, rules=cfg, roles=["admin"])
    with pytest.raises(PermissionRefused):
        rbac.guard("run", user="bob", plan=plan, rules=cfg, roles=["viewer"])
