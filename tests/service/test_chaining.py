"""Pipeline chaining through the server, with real Celery workers (a signed cluster on Redis
and PostgreSQL, region workers holding the lab's key as a secret) and real lab hosts: the
child pipeline comes from the server's registry, the parent runs it and goes on; an abort of
the parent aborts its child; and a user who may run the parent but not the child is refused
before anything is recorded."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.alloc import Allocator
from tests.conftest import DATA, REPO, Cluster, run_vmfarm
from tests.console_signin import console_sign_in
from tests.service.conftest import SERVER_RBAC, SERVER_USERS, Provider, Server, _stop
from tests.service.test_cli_server_lab import lab_cluster  # noqa: F401  (a fixture)
from tests.service.test_cli_server_mode import cli_login
from tests.waiting import wait_for

# carol may run pipelines, and deploy nowhere: the parent deploys nothing itself, its child
# deploys to the lab environment.
RBAC = SERVER_RBAC.replace(
    "  console-reader:",
    "  chain-starter: [pipeline:execute, pipeline:view, environment:view]\n  console-reader:",
).replace(
    "  - role: viewer\n    users: [carol]",
    "  - role: chain-starter\n    users: [carol]",
)
ENVIRONMENT = (
    "apiVersion: v1\nkind: Environment\nmetadata:\n  name: lab\nspec:\n  type: PreProduction\n"
)


@pytest.fixture(scope="module")
def chain_server(
    lab_cluster: Cluster,  # noqa: F811
    oidc: Provider,
    alloc: Allocator,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Server]:
    """``vmfarm server`` on the lab cluster, with carol's scoped binding."""
    root = tmp_path_factory.mktemp("chain-server")
    (root / "rbac.yaml").write_text(RBAC)
    (root / "users.yaml").write_text(SERVER_USERS)
    with alloc.port() as leased:
        env = {
            **lab_cluster.env,
            "VMFARM_SERVER_RBAC_FILE": str(root / "rbac.yaml"),
            "VMFARM_SERVER_USERS_FILE": str(root / "users.yaml"),
            "VMFARM_SERVER_ISSUER": oidc.url,
            "VMFARM_SERVER_AUDIENCE": "vmfarm",
            "VMFARM_SERVER_CLI_CLIENT_SECRET": "test-client-secret",
            "VMFARM_SERVER_CONSOLE_CLIENT_SECRET": "test-client-secret",
        }
        log = root / "server.log"
        with log.open("wb") as fh:
            proc = subprocess.Popen(
                [sys.executable, "-m", "cli.main", "server", "--port", str(leased.port)],
                env=env,
                cwd=REPO,
                stdout=fh,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        url = f"http://127.0.0.1:{leased.port}"
        try:

            def healthy() -> bool:
                if proc.poll() is not None:
                    raise AssertionError(f"the server stopped: {log.read_text()}")
                try:
                    return httpx.get(url + "/api/health", timeout=2).status_code == 200
                except httpx.HTTPError:
                    return False

            wait_for(healthy, 60, "the server to answer", interval=0.2)
            yield Server(url, proc, log, oidc)
        finally:
            _stop([proc])


@pytest.fixture(scope="module")
def people(chain_server: Server, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("chain-people")
    return {who: cli_login(chain_server, who, root / who) for who in ("alice", "carol")}


@pytest.fixture(scope="module")
def applied(people: dict[str, Any], lab: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """alice applies the environment, the lab's first two hosts (their key a secret), the
    service and the child pipeline to the registry; returns the parent's file."""
    root = tmp_path_factory.mktemp("chain-files")
    infra = yaml.safe_load(Path(lab.infrastructure_file).read_text())
    conn = infra["spec"]["spec"]["connection"]
    conn.pop("privateKeyFile")
    conn.pop("knownHostsFile")
    conn["privateKeySecret"] = "lab_key"
    infra["spec"]["spec"]["hosts"] = [
        {"hostname": h.address, "region": h.region} for h in lab.hosts[:2]
    ]
    (root / "env.yaml").write_text(ENVIRONMENT)
    (root / "infra.yaml").write_text(yaml.safe_dump(infra))
    args = ["apply", "-f", str(root / "env.yaml"), "-f", str(root / "infra.yaml")]
    args += ["-f", str(DATA / "chain" / "service.yaml"), "-f", str(DATA / "chain" / "child.yaml")]
    res = run_vmfarm(*args, env=people["alice"])
    assert res.returncode == 0, res.stderr
    return DATA / "chain" / "parent.yaml"


def _status(env: dict[str, str], ex_id: str) -> dict[str, Any]:
    res = run_vmfarm("status", ex_id, "-o", "json", env=env)
    assert res.returncode == 0, res.stderr
    return dict(json.loads(res.stdout))


def _until(
    env: dict[str, str], ex_id: str, done: Any, what: str, cluster: Cluster
) -> dict[str, Any]:
    last: dict[str, Any] = {}

    def check() -> dict[str, Any] | None:
        last.clear()
        last.update(_status(env, ex_id))
        return dict(last) if done(last) else None

    report: dict[str, Any] = wait_for(
        check,
        120,
        what,
        interval=0.3,
        explain=lambda: json.dumps(last)[:3000] + cluster.worker_logs(),
    )
    return report


ENDED = {"SUCCEEDED", "FAILED", "ABORTED"}


def _runs_on(lab: Any, ex_id: str) -> int:
    return sum(
        (Path(h.host_dir) / "opt" / "chain" / "runs").read_text().count(ex_id)
        for h in lab.hosts[:2]
        if (Path(h.host_dir) / "opt" / "chain" / "runs").exists()
    )


def test_the_parent_runs_the_child_from_the_registry_then_goes_on(
    lab_cluster: Cluster,  # noqa: F811
    chain_server: Server,
    people: dict[str, Any],
    applied: Path,
    lab: Any,
) -> None:
    # Given the child is the registry's; alice submits the parent's file only
    alice = people["alice"]
    res = run_vmfarm("run", str(applied), "--detach", env=alice)
    assert res.returncode == 0, res.stderr
    ex_id = res.stdout.strip().splitlines()[-1]
    # Then the parent ends SUCCEEDED after its child did, and went on to its last stage
    report = _until(alice, ex_id, lambda r: r["status"] in ENDED, "the parent", lab_cluster)
    assert report["status"] == "SUCCEEDED", report.get("error")
    child_stage, after = report["stages"]
    assert after["status"] == "SUCCEEDED"
    child_id = child_stage["child_execution"]["id"]
    child = _status(alice, child_id)
    assert child["status"] == "SUCCEEDED" and child["pipeline"] == "child_deploy"
    assert child["parent"] == {"id": ex_id, "stage": "child"}
    # and the child's deployment ran on both hosts, by the region workers
    assert _runs_on(lab, child_id) == 2
    # and the console links the parent's stage to its child, and the child to its parent
    console = console_sign_in(chain_server.url, "alice")
    page = console.get(f"/console/executions/{ex_id}?stage=0")
    assert page.status_code == 200
    assert f'href="/console/executions/{child_id}"' in page.text
    page = console.get(f"/console/executions/{child_id}")
    assert page.status_code == 200 and f'href="/console/executions/{ex_id}"' in page.text


def test_aborting_the_parent_aborts_its_child(
    lab_cluster: Cluster,  # noqa: F811
    people: dict[str, Any],
    applied: Path,
) -> None:
    # Given a parent whose child's install step takes a while
    alice = people["alice"]
    res = run_vmfarm("run", str(applied), "--set", "pause=15", "--detach", env=alice)
    assert res.returncode == 0, res.stderr
    ex_id = res.stdout.strip().splitlines()[-1]
    running = _until(
        alice,
        ex_id,
        lambda r: (r["stages"][0].get("child_execution") or {}).get("status") == "RUNNING",
        "the child to run",
        lab_cluster,
    )
    child_id = running["stages"][0]["child_execution"]["id"]
    # When alice aborts the parent
    res = run_vmfarm("abort", ex_id, env=alice)
    assert res.returncode == 0, res.stderr
    # Then both end ABORTED, and the stage after the chain never ran
    parent = _until(alice, ex_id, lambda r: r["status"] in ENDED, "the parent", lab_cluster)
    assert parent["status"] == "ABORTED"
    assert parent["stages"][1]["status"] == "SKIPPED"
    child = _until(alice, child_id, lambda r: r["status"] in ENDED, "the child", lab_cluster)
    assert child["status"] == "ABORTED", child.get("error")


def test_running_the_chain_needs_permission_to_run_the_child(
    people: dict[str, Any], applied: Path
) -> None:
    # Given carol may run pipelines but deploy nowhere: the parent deploys nothing of its own,
    # its child deploys to the lab environment
    carol = people["carol"]
    res = run_vmfarm("run", str(applied), "--detach", env=carol)
    # Then the server refuses her (403: exit 3), naming the permission and the child's stage
    assert res.returncode == 3, res.stdout + res.stderr
    assert "environment:deploy:non-production" in res.stderr, res.stderr
    assert "child → child_deploy/deploy" in res.stderr, res.stderr
    # and nothing was recorded for her
    listed = run_vmfarm("executions", "-o", "json", env=people["alice"])
    assert listed.returncode == 0, listed.stderr
    assert not [e for e in json.loads(listed.stdout) if e.get("created_by") == "carol"]
