"""A Custom stage alone, run as a user runs it (embedded mode, the `vmfarm` command in a
subprocess): secrets in a ShellScript's environment and in an Http step's header reach their
targets and never the log, the ledger or the CLI's output."""

from __future__ import annotations

import json
import secrets
import sqlite3
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.alloc import Allocator
from tests.conftest import base_env, run_vmfarm
from tests.fakes.status_server import StatusServer


@pytest.fixture
def echoing(alloc: Allocator) -> Iterator[StatusServer]:
    """Answers 200 'status: UP' and the request's Authorization header back."""
    with alloc.port() as lease, StatusServer(lease.port, echo="Authorization") as server:
        yield server


def test_secrets_of_custom_steps_reach_their_targets_and_are_masked_everywhere(
    tmp_path: Path, echoing: StatusServer
) -> None:
    token = f"tok-{secrets.token_hex(8)}"
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(
        textwrap.dedent(f"""\
        apiVersion: v1
        kind: Pipeline
        metadata:
          name: secret_checks
        spec:
          stages:
            - stage:
                name: Checks
                identifier: checks
                type: Custom
                spec:
                  execution:
                    steps:
                      - step:
                          type: ShellScript
                          name: Use
                          identifier: use
                          spec:
                            shell: Bash
                            onDelegate: true
                            source:
                              type: Inline
                              spec:
                                script: |
                                  echo "token is $TOKEN"
                                  test "$TOKEN" = "{token[:4]}$(echo {token[4:]})"
                            environmentVariables:
                              - name: TOKEN
                                type: Secret
                                value: <+secrets.getValue("deploy_token")>
                      - step:
                          type: Http
                          name: Call
                          identifier: call
                          spec:
                            url: {echoing.url}
                            method: GET
                            headers:
                              - key: Authorization
                                value: Bearer <+secrets.getValue("deploy_token")>
                            assertion: <+httpResponseCode> == 200
        """)
    )
    env = base_env(
        VMFARM_HOME=str(tmp_path / "home"), VMFARM_SECRETS="env", VMFARM_SECRET_DEPLOY_TOKEN=token
    )
    res = run_vmfarm("run", str(pipeline), "-o", "json", env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    report = json.loads(res.stdout)
    assert report["status"] == "SUCCEEDED"
    # The Http step sent the real value; the ShellScript's test of it passed
    assert echoing.headers[0]["Authorization"] == f"Bearer {token}"
    logs = run_vmfarm("logs", report["id"], env=env)
    assert "token is ***" in logs.stdout
    assert "Bearer ***" in logs.stdout  # the echoed header, in the response body
    status = run_vmfarm("status", report["id"], "-o", "json", env=env)
    with sqlite3.connect(Path(env["VMFARM_HOME"]) / "vmfarm.db") as db:
        rows = "\n".join(
            str(r)
            for table in ("logchunk", "hoststeprun", "execution")
            for r in db.execute(f"select * from {table}").fetchall()
        )
    for seen in (res.stdout, res.stderr, logs.stdout, logs.stderr, status.stdout, rows):
        assert token not in seen
