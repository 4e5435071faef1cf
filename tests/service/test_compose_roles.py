"""docker/postgres/10-vmfarm-roles.sh, the login roles the compose file's region workers and
server use, run for real against the test PostgreSQL (twice: the image runs it once, people
run it again). The lab's PostgreSQL trusts 127.0.0.1, so the passwords are not checked here;
what is checked is what the roles may do."""

from __future__ import annotations

import os
import subprocess
from urllib.parse import urlsplit

import psycopg
import pytest
from psycopg import errors

from tests.conftest import REPO
from tests.service.conftest import worker_role_url

SCRIPT = REPO / "docker" / "postgres" / "10-vmfarm-roles.sh"


def _run_script(pg_url: str, worker_pw: str) -> subprocess.CompletedProcess[str]:
    parts = urlsplit(pg_url.replace("+psycopg", ""))
    env = {
        "PATH": os.environ["PATH"],
        "PGHOST": parts.hostname or "127.0.0.1",
        "PGPORT": str(parts.port or 5432),
        "POSTGRES_USER": parts.username or "postgres",
        "POSTGRES_DB": parts.path.lstrip("/"),
        "POSTGRES_WORKER_PASSWORD": worker_pw,
        "POSTGRES_SERVER_PASSWORD": "server-pw-9",
    }
    return subprocess.run(["sh", str(SCRIPT)], env=env, capture_output=True, text=True)


def _as(pg_url: str, role: str) -> str:
    scheme, rest = pg_url.split("://", 1)
    return f"{scheme}://{role}@{rest.split('@', 1)[1]}"


def test_the_login_roles_are_made_members_of_their_groups_and_it_can_run_again(
    pg_url: str,
) -> None:
    worker_role_url(pg_url)  # the ledger migrated by its owner: the group roles and grants
    hostile = "pw'; DROP TABLE execution; --"
    for _ in range(2):
        res = _run_script(pg_url, hostile)
        assert res.returncode == 0, res.stderr
        assert hostile not in res.stdout + res.stderr  # the password is never echoed
    with psycopg.connect(pg_url, autocommit=True) as conn:
        members = dict(
            conn.execute(
                "SELECT r.rolname, m.rolname FROM pg_auth_members a "
                "JOIN pg_roles r ON r.oid = a.member JOIN pg_roles m ON m.oid = a.roleid "
                "WHERE r.rolname IN ('vmfarm_region', 'vmfarm_api')"
            ).fetchall()
        )
        assert members == {"vmfarm_region": "vmfarm_worker", "vmfarm_api": "vmfarm_server"}
        assert conn.execute("SELECT to_regclass('execution')").fetchone() == ("execution",)


def test_a_missing_password_stops_the_script_naming_it(pg_url: str) -> None:
    parts = urlsplit(pg_url.replace("+psycopg", ""))
    res = subprocess.run(
        ["sh", str(SCRIPT)],
        env={"PATH": os.environ["PATH"], "PGHOST": parts.hostname or "127.0.0.1"},
        capture_output=True,
        text=True,
    )
    assert res.returncode != 0
    assert "POSTGRES_WORKER_PASSWORD" in res.stderr


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE execution SET plan = '{}'",
        "DELETE FROM execution",
        "UPDATE auditevent SET outcome = 'approved'",
        "SELECT token_hash FROM apitoken",
    ],
)
def test_the_region_login_may_not_change_what_decides_a_run(pg_url: str, statement: str) -> None:
    worker_role_url(pg_url)
    assert _run_script(pg_url, "w").returncode == 0
    with (
        psycopg.connect(_as(pg_url, "vmfarm_region"), autocommit=True) as conn,
        pytest.raises(errors.InsufficientPrivilege, match="permission denied"),
    ):
        conn.execute(statement)


def test_the_server_login_cannot_rewrite_the_audit_trail(pg_url: str) -> None:
    worker_role_url(pg_url)
    assert _run_script(pg_url, "w").returncode == 0
    with psycopg.connect(_as(pg_url, "vmfarm_api"), autocommit=True) as conn:
        conn.execute("SELECT count(*) FROM execution")  # it reads and writes the ledger
        with pytest.raises(errors.DatabaseError):
            conn.execute("UPDATE auditevent SET outcome = 'approved'")
