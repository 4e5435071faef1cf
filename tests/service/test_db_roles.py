"""The ledger's PostgreSQL roles: a region worker writes its step rows and nothing that
decides (executions, audit, tokens); the audit trail is append-only even for the server."""

from __future__ import annotations

import time
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import errors

from tests.conftest import Cluster
from tests.service.conftest import SignedRun, worker_role_url


def _login(pg_url: str, name: str, group: str) -> str:
    """A login role in ``group`` on the migrated ledger (the migration made the roles)."""
    worker_role_url(pg_url)  # migrates the ledger as its owner
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(
            f"DO $$ BEGIN CREATE ROLE {name} LOGIN IN ROLE {group}; "
            "EXCEPTION WHEN duplicate_object THEN NULL; END $$"
        )
    scheme, rest = pg_url.split("://", 1)
    return f"{scheme}://{name}@{rest.split('@', 1)[1]}"


@pytest.fixture
def as_worker(pg_url: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(worker_role_url(pg_url), autocommit=True) as conn:
        yield conn


DENIED_TO_WORKER = [
    "UPDATE execution SET plan = '{}' WHERE id = %(ex)s",
    "UPDATE execution SET status = 'SUCCEEDED' WHERE id = %(ex)s",
    "DELETE FROM execution WHERE id = %(ex)s",
    "UPDATE auditevent SET outcome = 'approved'",
    "DELETE FROM auditevent",
    'INSERT INTO auditevent (at, "user", action, outcome, detail) '
    "VALUES (now(), 'mallory', 'approve', 'approved', '{}')",
    "UPDATE stagerun SET status = 'SUCCEEDED' WHERE execution_id = %(ex)s",
    "UPDATE phaserun SET status = 'SUCCEEDED' WHERE execution_id = %(ex)s",
    "UPDATE instance SET version = 'evil'",
    "SELECT token_hash FROM apitoken",
    "DELETE FROM logchunk",
]


@pytest.mark.parametrize("statement", DENIED_TO_WORKER)
def test_the_worker_role_may_not_change_what_decides_a_run(
    as_worker: psycopg.Connection, signed_run: SignedRun, statement: str
) -> None:
    with pytest.raises(errors.InsufficientPrivilege, match="permission denied"):
        as_worker.execute(statement, {"ex": signed_run.execution_id})


def test_the_worker_role_reads_plans_and_writes_step_rows(
    as_worker: psycopg.Connection, signed_run: SignedRun, secure_cluster: Cluster
) -> None:
    # the signed run's steps were claimed and finished by region workers on this role
    plan = as_worker.execute(
        "SELECT plan FROM execution WHERE id = %s", (signed_run.execution_id,)
    ).fetchone()
    assert plan is not None and plan[0]["stages"]
    done = as_worker.execute(
        "SELECT count(*) FROM hoststeprun WHERE execution_id = %s AND status = 'SUCCEEDED'",
        (signed_run.execution_id,),
    ).fetchone()
    assert done is not None and done[0] > 0
    logs = "\n".join(p.read_text(errors="replace") for p in secure_cluster.logs[:2])
    assert "permission denied" not in logs


def test_the_audit_trail_is_append_only_for_the_server_and_the_owner(pg_url: str) -> None:
    server = _login(pg_url, "vmfarm_test_server", "vmfarm_server")
    with psycopg.connect(server, autocommit=True) as conn:
        row = conn.execute(
            'INSERT INTO auditevent (at, "user", action, outcome, detail) '
            "VALUES (now(), 'alice', 'approve', 'approved', '{}') RETURNING id"
        ).fetchone()
        assert row is not None
        for statement in (
            "UPDATE auditevent SET \"user\" = 'mallory' WHERE id = %(id)s",
            "DELETE FROM auditevent WHERE id = %(id)s",
            "TRUNCATE auditevent",
        ):
            with pytest.raises(errors.InsufficientPrivilege):
                conn.execute(statement, {"id": row[0]})
        # the server may change the rest of the ledger (it is its only writer)
        conn.execute("UPDATE execution SET error = error WHERE false")
    # the owner (a superuser here) is held by the trigger
    with psycopg.connect(pg_url, autocommit=True) as conn:
        with pytest.raises(errors.InsufficientPrivilege, match="append-only"):
            conn.execute("UPDATE auditevent SET \"user\" = 'mallory' WHERE id = %s", (row[0],))
        with pytest.raises(errors.InsufficientPrivilege, match="append-only"):
            conn.execute("DELETE FROM auditevent WHERE id = %s", (row[0],))


def test_the_readonly_role_reads_the_ledger_but_not_token_hashes(pg_url: str) -> None:
    url = _login(pg_url, "vmfarm_test_readonly", "vmfarm_readonly")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT count(*) FROM execution").fetchone()
        conn.execute("SELECT count(*) FROM hoststeprun").fetchone()
        with pytest.raises(errors.InsufficientPrivilege):
            conn.execute("SELECT token_hash FROM apitoken")
        with pytest.raises(errors.InsufficientPrivilege):
            conn.execute("UPDATE execution SET error = 'x' WHERE false")


def test_the_abort_failure_strategy_aborts_through_control(
    secure_cluster: Cluster, lab: object
) -> None:
    # Given a step whose failure strategy is Abort, run by region workers on the worker role
    import json

    from tests.conftest import DATA

    hosts = lab.hosts  # type: ignore[attr-defined]
    res = secure_cluster.vmfarm(
        "run",
        str(DATA / "failure"),
        str(lab.infrastructure_file),  # type: ignore[attr-defined]
        "--set",
        f"flaky_host={hosts[0].address}",
        "--set",
        "failures=9",
        "--set",
        "type=Abort",
        "-o",
        "json",
    )
    # Then the execution is aborted (by the control worker, asked by the region worker)
    report = json.loads(res.stdout)
    assert res.returncode == 1 and report["status"] == "ABORTED", res.stderr
    # (the control worker's log line may come a moment after the run has ended: the phase's
    # gate applies the same strategy, and whichever comes first ends the execution)
    said = f"execution {report['id']}: aborting (failure strategy of {report['id']}:"
    deadline = time.monotonic() + 30
    while (
        said not in secure_cluster.logs[2].read_text(errors="replace")
        and time.monotonic() < deadline
    ):
        time.sleep(0.2)
    assert said in secure_cluster.logs[2].read_text(errors="replace")
    regions = "\n".join(p.read_text(errors="replace") for p in secure_cluster.logs[:2])
    assert "permission denied" not in regions


def test_a_worker_role_meeting_an_old_schema_says_who_must_upgrade_it(pg_url: str) -> None:
    # Given an empty database (a new vmfarm version would find an old schema the same way)
    from sqlalchemy import create_engine

    from app.db import migrate, normalise_url
    from app.errors import ConfigError

    worker_role_url(pg_url)  # the roles and the worker's login exist
    name = f"{pg_url.rsplit('/', 1)[1]}_fresh"
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        url = worker_role_url(pg_url).rsplit("/", 1)[0] + f"/{name}"
        engine = create_engine(normalise_url(url))
        # When a process on the worker role starts, it may not upgrade it: it says so
        try:
            with pytest.raises(
                ConfigError,
                match="may not upgrade it: run any vmfarm command once as the database's owner",
            ):
                migrate(engine)
        finally:
            engine.dispose()
    finally:
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
