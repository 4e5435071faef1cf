"""A deployment to lab hosts through the server, with the CLI as people use it: alice submits
and follows over server-sent events, erin approves, alice asks for the status. It reports
what the same deployment reports in local mode (ids, times and who aside, nothing differs),
and it changed the hosts. Then the registry from the CLI (apply, get, history), when the
server has it.

The cluster signs its messages and its region workers hold the SSH key as a secret
(``lab_key``) and the lab's host keys in their own ``~/.ssh/known_hosts``: a submitted file
names neither (the server refuses paths on its machines)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.alloc import Allocator
from tests.conftest import REDIS_BASE, REPO, Cluster, run_vmfarm
from tests.service.conftest import (
    SERVER_RBAC,
    SERVER_USERS,
    Keys,
    Provider,
    Server,
    _secure_cluster,
    _stop,
)
from tests.service.test_cli_server_mode import cli_login

PIPELINE = """\
apiVersion: v1
kind: Service
metadata:
  name: srvlab
spec:
  serviceDefinition:
    type: SSH
---
apiVersion: v1
kind: Pipeline
metadata:
  name: through-the-server
  identifier: srvlab
spec:
  variables:
    - name: tag
      type: String
      value: <+input>
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
                    approvalMessage: Deploy <+pipeline.variables.tag>?
                    approvers:
                      userGroups: [release_managers]
                      minimumCount: 1
    - stage:
        name: Deploy
        identifier: deploy
        type: Deployment
        spec:
          service:
            serviceRef: srvlab
          environment:
            environmentRef: lab
            infrastructureDefinitions:
              - identifier: lab
          execution:
            steps:
              - step:
                  type: Command
                  name: Install
                  identifier: install
                  spec:
                    commandUnits:
                      - identifier: write
                        type: Script
                        spec:
                          shell: Bash
                          source:
                            type: Inline
                            spec:
                              script: |
                                mkdir -p /opt/srvlab
                                echo "<+pipeline.variables.tag> <+pipeline.executionId>" >> /opt/srvlab/runs
                                echo "installed <+pipeline.variables.tag> on <+instance.hostName>"
"""
# The environment is the registry's in server mode (a submitted file may not define it).
ENVIRONMENT = """\
apiVersion: v1
kind: Environment
metadata:
  name: lab
spec:
  type: PreProduction
"""


@pytest.fixture(scope="module")
def lab_cluster(
    pg_url: str,
    lab: Any,
    signing_keys: Keys,
    alloc: Allocator,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Cluster]:
    """The signed cluster, its region workers with the lab's key as the secret lab_key and
    the lab's host keys in their own HOME."""
    home = tmp_path_factory.mktemp("worker-home")
    (home / ".ssh").mkdir(mode=0o700)
    (home / ".ssh" / "known_hosts").write_text(Path(lab.known_hosts_file).read_text())
    worker_env = {"HOME": str(home), "VMFARM_SECRET_LAB_KEY": Path(lab.key_file).read_text()}
    with alloc.redis_db(REDIS_BASE) as b, alloc.redis_db(REDIS_BASE) as r:
        yield from _secure_cluster(
            pg_url, signing_keys, tmp_path_factory, b.url, r.url, worker_env=worker_env
        )


@pytest.fixture(scope="module")
def lab_server(
    lab_cluster: Cluster,
    oidc: Provider,
    alloc: Allocator,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Server]:
    """``vmfarm server`` on that cluster: its ledger and broker, the server's signing key."""
    root = tmp_path_factory.mktemp("lab-server")
    (root / "rbac.yaml").write_text(SERVER_RBAC)
    (root / "users.yaml").write_text(SERVER_USERS)
    with alloc.port() as leased:
        env = {
            **lab_cluster.env,
            "VMFARM_SERVER_RBAC_FILE": str(root / "rbac.yaml"),
            "VMFARM_SERVER_USERS_FILE": str(root / "users.yaml"),
            "VMFARM_SERVER_ISSUER": oidc.url,
            "VMFARM_SERVER_AUDIENCE": "vmfarm",
            "VMFARM_SERVER_CLI_CLIENT_SECRET": "test-client-secret",
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
            from tests.waiting import wait_for

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
def files(lab: Any, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """The pipeline and the lab's first two hosts, their key a secret (no local path)."""
    root = tmp_path_factory.mktemp("srvlab")
    infra = yaml.safe_load(Path(lab.infrastructure_file).read_text())
    conn = infra["spec"]["spec"]["connection"]
    conn.pop("privateKeyFile")
    conn.pop("knownHostsFile")
    conn["privateKeySecret"] = "lab_key"
    infra["spec"]["spec"]["hosts"] = [
        {"hostname": h.address, "region": h.region} for h in lab.hosts[:2]
    ]
    (root / "pipeline.yaml").write_text(PIPELINE)
    (root / "env.yaml").write_text(ENVIRONMENT)
    (root / "infra.yaml").write_text(yaml.safe_dump(infra))
    return [str(root / "pipeline.yaml"), str(root / "env.yaml"), str(root / "infra.yaml")]


VOLATILE = re.compile(r"(^id$|_id$|_at$|^at$|duration|elapsed|seconds|heartbeat|^by$|_by$)")


def comparable(doc: Any, ids: set[str]) -> Any:
    """A report without what differs from run to run: ids, times, durations, who."""
    if isinstance(doc, dict):
        return {k: comparable(v, ids) for k, v in doc.items() if not VOLATILE.search(k)}
    if isinstance(doc, list):
        return [comparable(v, ids) for v in doc]
    if isinstance(doc, str):
        for ex_id in ids:
            doc = doc.replace(ex_id, "<id>")
    return doc


def _diff(a: Any, b: Any, ids: set[str]) -> str:
    import difflib

    def lines(doc: Any) -> list[str]:
        return json.dumps(comparable(doc, ids), indent=1, sort_keys=True).splitlines()

    return "\n".join(difflib.unified_diff(lines(a), lines(b), lineterm="", n=2))


def _runs_on(lab: Any, ex_id: str) -> int:
    return sum(
        (Path(h.host_dir) / "opt" / "srvlab" / "runs").read_text().count(ex_id)
        for h in lab.hosts[:2]
        if (Path(h.host_dir) / "opt" / "srvlab" / "runs").exists()
    )


def _local(cluster: Cluster, files: list[str], tmp_path: Path) -> tuple[str, dict[str, Any]]:
    """The deployment in local mode: alice submits (detached), erin approves, the status when
    it has ended."""
    from tests.waiting import wait_for

    users = tmp_path / "users.yaml"
    users.write_text("groups:\n  release_managers: [erin]\n")

    def as_(who: str) -> dict[str, str]:
        return {**cluster.env, "VMFARM_USER": who, "VMFARM_USERS_FILE": str(users)}

    res = run_vmfarm("run", *files, "--set", "tag=7.1.0", "--detach", env=as_("alice"))
    assert res.returncode == 0, res.stderr
    ex_id = res.stdout.strip().splitlines()[-1]

    def status() -> dict[str, Any]:
        out = run_vmfarm("status", ex_id, "-o", "json", env=as_("alice"))
        return dict(json.loads(out.stdout))

    wait_for(lambda: status()["status"] == "WAITING", 60, "the local run to wait", interval=0.3)
    res = run_vmfarm("approve", ex_id, "-m", "go", env=as_("erin"))
    assert res.returncode == 0, res.stderr
    wait_for(
        lambda: status()["status"] not in ("RUNNING", "WAITING", "QUEUED", "PENDING"),
        120,
        "the local run to end",
        interval=0.3,
    )
    return ex_id, status()


def test_a_deployment_through_the_server_reports_as_in_local_mode(
    lab_cluster: Cluster,
    lab_server: Server,
    lab: Any,
    files: list[str],
    tmp_path: Path,
) -> None:
    # Given the deployment run in local mode
    local_id, local = _local(lab_cluster, files, tmp_path)
    assert local["status"] == "SUCCEEDED", json.dumps(local)[:3000] + lab_cluster.worker_logs()
    # When alice submits it to the server and follows it (server-sent events) ...
    alice = cli_login(lab_server, "alice", tmp_path / "alice")
    erin = cli_login(lab_server, "erin", tmp_path / "erin")
    # (the server takes the environment and its hosts from its registry: alice applies them)
    applied = run_vmfarm("apply", "-f", files[1], "-f", files[2], env=alice)
    assert applied.returncode == 0, applied.stderr
    run = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "run", files[0], "--set", "tag=7.1.0", "-o", "json"],
        env=alice,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert run.stderr is not None
        told = ""
        for line in run.stderr:
            told += line
            if "is waiting for approval" in line:
                break
        ex_id = told.split("vmfarm approve ")[-1].split()[0] if "vmfarm approve" in told else ""
        assert ex_id, told + run.stderr.read()
        # ... erin approves it, signed in as herself ...
        approved = run_vmfarm("approve", ex_id, "-m", "go", env=erin)
        assert approved.returncode == 0, approved.stderr
        assert f"execution {ex_id}:" in approved.stdout
        out, err = run.communicate(timeout=180)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    # ... the follower ends with the execution: exit 0 and the report on stdout
    assert run.returncode == 0, told + err + lab_cluster.worker_logs()
    followed = json.loads(out)
    status = run_vmfarm("status", ex_id, "-o", "json", env=alice)
    assert status.returncode == 0, status.stderr
    served = json.loads(status.stdout)
    # (server mode adds the registry versions the run used)
    assert {u["kind"] for u in served.pop("registry")} == {"Environment", "Infrastructure"}
    followed.pop("registry", None)
    # Then the server's report is local mode's, ids, times and who aside
    assert served["status"] == "SUCCEEDED"
    ids = {local_id, ex_id}
    assert comparable(served, ids) == comparable(local, ids), _diff(local, served, ids)
    assert comparable(followed, ids) == comparable(served, ids), _diff(served, followed, ids)
    # and who is the signed-in people: alice submitted, erin approved
    assert served["created_by"] == "alice"
    assert "erin" in json.dumps(served["stages"][0])
    # and the hosts ran it, once each
    assert _runs_on(lab, ex_id) == 2 and _runs_on(lab, local_id) == 2
    logs = run_vmfarm("logs", ex_id, "-o", "json", env=alice)
    assert logs.returncode == 0
    assert sorted(c["text"].strip() for c in json.loads(logs.stdout)) == sorted(
        f"installed 7.1.0 on {h.address}" for h in lab.hosts[:2]
    )


def test_apply_get_and_history_from_the_cli(lab_server: Server, tmp_path: Path) -> None:
    alice = cli_login(lab_server, "alice", tmp_path / "alice")
    name = f"reg_{uuid.uuid4().hex[:6]}"  # its identifier: a name with "-" would be "_"
    env_file = tmp_path / "env.yaml"
    env_file.write_text(
        f"apiVersion: v1\nkind: Environment\nmetadata:\n  name: {name}\nspec:\n  type: PreProduction\n"
    )
    # Given alice applies an environment, then a change to it, then the same again
    first = run_vmfarm("apply", "-f", str(env_file), "-o", "json", env=alice)
    assert first.returncode == 0, first.stderr
    applied = json.loads(first.stdout)["applied"]
    assert [(a["kind"], a["id"], a["changed"]) for a in applied] == [("Environment", name, True)]
    env_file.write_text(env_file.read_text().replace("PreProduction", "Production"))
    second = run_vmfarm("apply", "-f", str(tmp_path), env=alice)
    assert second.returncode == 0 and "(changed)" in second.stdout, second.stderr
    third = run_vmfarm("apply", "-f", str(env_file), env=alice)
    assert third.returncode == 0 and "(unchanged)" in third.stdout, third.stderr
    # Then get shows the current version's text, and any earlier one
    now = json.loads(run_vmfarm("get", "Environment", name, "-o", "json", env=alice).stdout)
    assert "Production" in now["text"] and now["author"] == "alice"
    before = run_vmfarm("get", "Environment", name, "--version", str(now["version"] - 1), env=alice)
    assert "PreProduction" in before.stdout
    listed = run_vmfarm("get", "Environment", env=alice)
    assert listed.returncode == 0 and name in listed.stdout
    # and history says who changed what
    hist = run_vmfarm("history", "Environment", name, env=alice)
    assert hist.returncode == 0 and "by alice" in hist.stdout and "Production" in hist.stdout
    # a kind or id that is not there: exit 2
    missing = run_vmfarm("get", "Environment", f"{name}-none", env=alice)
    assert missing.returncode == 2, missing.stderr
