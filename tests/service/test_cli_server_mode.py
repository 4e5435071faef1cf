"""The CLI in server mode, as people and CI use it: ``vmfarm login`` through the real OIDC
provider (its sign-in form answered as a browser would, the redirect followed back to the
CLI), API tokens made, listed and revoked from the CLI, every command refused with the
server's own 403 for someone without the permission, and no SQL or Celery in the process.

Users (tests/service/conftest.py): alice is a deployer and token admin, carol only views
pipelines, bob is bound to nothing."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO, base_env, run_vmfarm
from tests.service.conftest import Server, gated_pipeline

EX = "/api/v1/executions"


def cli_login(server: Server, subject: str, config_home: Path) -> dict[str, str]:
    """``vmfarm login URL --no-browser`` in a subprocess, signed in as ``subject`` on the
    provider's form; the environment in which the CLI then acts as them."""
    env = base_env(XDG_CONFIG_HOME=str(config_home))
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "login", server.url, "--no-browser"],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        assert line.startswith("Sign in at: "), line + proc.stderr.read()
        url = line.removeprefix("Sign in at: ").strip()
        assert url.startswith(server.oidc.url + "/")
        # The browser: the provider's sign-in form, answered as subject, then its redirect,
        # which lands on the CLI's listener on 127.0.0.1.
        form = httpx.get(url, timeout=10)
        assert form.status_code == 200 and 'name="sub"' in form.text
        answer = httpx.post(url, data={"sub": subject}, timeout=10)
        assert answer.status_code in (302, 303), answer.text
        back = httpx.get(answer.headers["location"], timeout=10)
        assert back.status_code == 200 and "Signed in to vmfarm" in back.text
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert f"signed in to {server.url} as {subject}" in err
    return env


@pytest.fixture(scope="module")
def people(server: Server, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, str]]:
    """alice, bob and carol signed in with the CLI, each with a config folder of their own."""
    root = tmp_path_factory.mktemp("people")
    return {who: cli_login(server, who, root / who) for who in ("alice", "bob", "carol")}


def vmfarm(
    env: dict[str, str], *args: str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return run_vmfarm(*args, env=env, timeout=timeout)


def submit_gated(env: dict[str, str], tmp_path: Path, *, groups: list[str] | None = None) -> str:
    """Submit a pipeline that waits for an approval, detached; its execution id."""
    path = tmp_path / f"gate-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(gated_pipeline("cli-gate", groups=groups or ["deployers"]))
    res = vmfarm(env, "run", str(path), "--detach")
    assert res.returncode == 0, res.stderr
    return res.stdout.strip().splitlines()[-1]


def test_login_keeps_a_private_token_that_the_server_takes_as_that_person(
    server: Server, people: dict[str, dict[str, str]], tmp_path: Path
) -> None:
    alice = people["alice"]
    login = Path(alice["XDG_CONFIG_HOME"]) / "vmfarm" / "login.json"
    assert stat.S_IMODE(login.stat().st_mode) == 0o600
    assert stat.S_IMODE(login.parent.stat().st_mode) == 0o700
    # When alice submits and reads her execution back, the server names her as its creator
    ex_id = submit_gated(alice, tmp_path)
    res = vmfarm(alice, "executions", "-o", "json", "--limit", "50")
    assert res.returncode == 0, res.stderr
    mine = [e for e in json.loads(res.stdout) if e["id"] == ex_id]
    assert mine and mine[0]["created_by"] == "alice"
    # And after logout the CLI no longer talks to the server
    home = {**alice, "XDG_CONFIG_HOME": str(tmp_path / "copy")}
    (tmp_path / "copy" / "vmfarm").mkdir(parents=True)
    (tmp_path / "copy" / "vmfarm" / "login.json").write_text(login.read_text())
    assert vmfarm(home, "logout").returncode == 0
    res = vmfarm(home, "tokens", "list")
    assert res.returncode == 2 and "needs a vmfarm server" in res.stderr


def test_an_expired_sign_in_is_renewed_with_the_providers_refresh_token(
    server: Server, people: dict[str, dict[str, str]], tmp_path: Path
) -> None:
    # Given a copy of alice's sign-in whose token has expired
    from tests.unit.test_remote import jwt_of

    home = tmp_path / "config"
    (home / "vmfarm").mkdir(parents=True)
    stored = json.loads(
        (Path(people["alice"]["XDG_CONFIG_HOME"]) / "vmfarm" / "login.json").read_text()
    )
    stored["token"] = jwt_of(sub="alice", exp=1)
    (home / "vmfarm" / "login.json").write_text(json.dumps(stored))
    # When she runs a command, the CLI renews it at the provider with the refresh token: the
    # provider accepts the refresh token and the client, but this provider renews without
    # an ID token, which is all the server takes: so the CLI says to sign in again (exit 3)
    res = vmfarm({**people["alice"], "XDG_CONFIG_HOME": str(home)}, "executions")
    assert res.returncode == 3, res.stderr
    assert "renewed the sign-in without an ID token" in res.stderr
    assert f"vmfarm login {server.url}" in res.stderr


def test_api_tokens_are_made_listed_used_and_revoked_from_the_cli(
    server: Server, people: dict[str, dict[str, str]], tmp_path: Path
) -> None:
    name = f"ci-{uuid.uuid4().hex[:6]}"
    made = vmfarm(
        people["alice"], "tokens", "create", "--name", name, "--role", "deployer", "--expires", "1d"
    )
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip()
    assert token.startswith("vmf_") and "shown once" in made.stderr
    # a CI job: no sign-in, the server and the token in its environment
    ci = base_env(
        XDG_CONFIG_HOME=str(tmp_path / "ci"), VMFARM_SERVER=server.url, VMFARM_TOKEN=token
    )
    ex_id = submit_gated(ci, tmp_path)
    res = vmfarm(ci, "status", ex_id, "-o", "json")
    assert res.returncode == 0 and json.loads(res.stdout)["created_by"] == f"token:{name}"
    listed = vmfarm(people["alice"], "tokens", "list", "-o", "json")
    assert listed.returncode == 0 and token not in listed.stdout
    row = next(t for t in json.loads(listed.stdout) if t["name"] == name)
    assert row["last_used_at"] is not None and row["revoked_at"] is None
    text = vmfarm({**people["alice"], "COLUMNS": "250"}, "tokens", "list")  # no cut names
    assert name in text.stdout and token not in text.stdout
    # revoked: refused from then on, with the server's reason
    revoked = vmfarm(people["alice"], "tokens", "revoke", row["id"])
    assert revoked.returncode == 0 and f"token {row['id']} revoked" in revoked.stdout
    res = vmfarm(ci, "status", ex_id)
    assert res.returncode == 3
    assert (
        f"refused: the server did not accept your credentials: API token '{name}' was revoked"
        in (res.stderr)
    )


@dataclass
class Case:
    """A CLI command and the permission the server checks; ``who`` lacks it."""

    args: Callable[[str, Path], list[str]]
    permission: str | None
    who: str = "carol"


def _env_file(tmp: Path) -> str:
    path = tmp / "env.yaml"
    path.write_text(
        "apiVersion: v1\nkind: Environment\nmetadata:\n  name: lab\nspec:\n  type: PreProduction\n"
    )
    return str(path)


def _gate_file(tmp: Path) -> str:
    path = tmp / "gate.yaml"
    path.write_text(gated_pipeline("refused", groups=["deployers"]))
    return str(path)


# Every command of server mode (cli.thin.COMMANDS but login and logout), and what it needs.
CASES: dict[str, Case] = {
    "run": Case(lambda _, t: ["run", _gate_file(t)], "pipeline:execute"),
    "retry": Case(lambda ex, _: ["retry", ex, "--only-failed"], "pipeline:execute"),
    "rollback": Case(lambda ex, _: ["rollback", ex], "pipeline:rollback"),
    "status": Case(lambda ex, _: ["status", ex], "pipeline:view", who="bob"),
    "executions": Case(lambda _, __: ["executions"], "pipeline:view", who="bob"),
    "logs": Case(lambda ex, _: ["logs", ex], "pipeline:view", who="bob"),
    "approve": Case(lambda ex, _: ["approve", ex], "pipeline:approve"),
    "reject": Case(lambda ex, _: ["reject", ex, "-m", "no"], "pipeline:approve"),
    "abort": Case(lambda ex, _: ["abort", ex], "pipeline:abort"),
    "tokens create": Case(
        lambda _, __: ["tokens", "create", "--name", "x", "--role", "viewer"], "token:create"
    ),
    "tokens list": Case(lambda _, __: ["tokens", "list"], "token:view"),
    "tokens revoke": Case(lambda _, __: ["tokens", "revoke", "0" * 32], "token:revoke"),
    "apply": Case(lambda _, t: ["apply", "-f", _env_file(t)], "registry:apply", who="bob"),
    "get": Case(lambda _, __: ["get", "Environment"], "registry:view", who="bob"),
    "history": Case(lambda _, __: ["history", "Environment", "lab"], "registry:view", who="bob"),
    "triggers": Case(lambda _, __: ["triggers"], "registry:view", who="bob"),
}


def test_the_table_names_every_server_mode_command() -> None:
    from cli import thin

    names = {n for n in thin.COMMANDS if n not in thin.EITHER_MODE}
    groups = {n: c for n, c in thin.COMMANDS.items() if hasattr(c, "commands")}
    expected = {n for n in names if n not in groups} | {
        f"{g} {sub}"
        for g, c in groups.items()
        for sub in c.commands  # type: ignore[attr-defined]
    }
    assert set(CASES) == expected


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_command_is_refused_with_the_servers_403_to_someone_without_the_permission(
    server: Server,
    people: dict[str, dict[str, str]],
    tmp_path: Path,
    name: str,
) -> None:
    case = CASES[name]
    ex_id = submit_gated(people["alice"], tmp_path)
    res = vmfarm(people[case.who], *case.args(ex_id, tmp_path))
    assert res.returncode == 3, (name, res.stdout, res.stderr)
    assert res.stderr.startswith("refused: "), res.stderr
    assert case.who in res.stderr
    if case.permission:
        assert case.permission in res.stderr, res.stderr
    # and nothing happened: alice's execution still waits
    status = vmfarm(people["alice"], "status", ex_id, "-o", "json")
    assert json.loads(status.stdout)["status"] == "WAITING"


def test_server_mode_imports_neither_sql_nor_celery(
    server: Server, people: dict[str, dict[str, str]], tmp_path: Path
) -> None:
    # Given one process that runs the commands a user runs in a session, through the server
    gate = tmp_path / "gate.yaml"
    gate.write_text(gated_pipeline("imports", groups=["deployers"]))
    script = f"""
import json, sys
from cli.main import main

def vmfarm(*args):
    try:
        main(list(args))
    except SystemExit as exc:
        assert exc.code in (0, None), (args, exc.code)

vmfarm("run", {str(gate)!r}, "--detach")
vmfarm("executions", "-o", "json")
from cli.remote import connect
ex_id = connect().get("/api/v1/executions", limit=1)[0]["id"]
vmfarm("status", ex_id)
vmfarm("logs", ex_id)
vmfarm("approve", ex_id, "-m", "fine")
vmfarm("status", ex_id, "-o", "json")
vmfarm("tokens", "list")
print(json.dumps(sorted(sys.modules)), file=sys.stderr)
"""
    res = subprocess.run(
        [sys.executable, "-c", script],
        env=people["alice"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    modules = json.loads(res.stderr.strip().splitlines()[-1])
    heavy = [
        m
        for m in modules
        if m.split(".")[0] in ("sqlalchemy", "sqlmodel", "celery", "kombu", "psycopg")
        or m in ("app.db", "app.models", "app.celery", "app.operations")
    ]
    assert heavy == []
    assert "httpx" in modules  # it did talk HTTP


def test_local_only_commands_say_so_in_server_mode(people: dict[str, dict[str, str]]) -> None:
    for args in (["audit"], ["intervene", "x", "Abort"], ["plan", "p.yaml"], ["secrets", "list"]):
        res = vmfarm(people["alice"], *args)
        assert res.returncode == 2, (args, res.stderr)
        assert f"'vmfarm {args[0]}' has no server equivalent" in res.stderr
