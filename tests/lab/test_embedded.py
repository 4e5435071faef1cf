"""The embedded default: no broker configured, SQLite ledger, a real Celery worker inside the
``vmfarm run`` process; the demo pipeline of configs/demo on real sshd lab hosts.
"""

from __future__ import annotations

import json
import sqlite3
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.alloc import AddressLease
from tests.conftest import REPO, base_env, run_vmfarm

DEMO = str(REPO / "configs" / "demo")


@pytest.fixture
def embedded_env(tmp_path: Path) -> dict[str, str]:
    return base_env(VMFARM_HOME=str(tmp_path / "home"))


def _health(address: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://{address}:8080/health", timeout=5) as resp:
        return dict(json.loads(resp.read()))


def test_demo_pipeline_deploys_and_redeploys_every_lab_host(
    embedded_env: dict[str, str], lab: Any
) -> None:
    # Given the lab and no broker (embedded mode)
    first = run_vmfarm(
        "run", DEMO, str(lab.infrastructure_file), "--set", "tag=1.0.0", env=embedded_env
    )
    assert first.returncode == 0, first.stdout + first.stderr
    # Then every host serves the new version on its own address
    for h in lab.hosts:
        assert _health(h.address) == {"status": "UP", "version": "1.0.0"}

    # When a new version is deployed
    second = run_vmfarm(
        "run",
        DEMO,
        str(lab.infrastructure_file),
        "--set",
        "tag=1.1.0",
        "--output",
        "json",
        env=embedded_env,
    )
    assert second.returncode == 0, second.stdout + second.stderr
    report = json.loads(second.stdout)
    # Then the ledger knows what ran before, and the old app was stopped and replaced
    hosts = report["stages"][0]["hosts"]
    assert {(h["version"], h["previous_version"]) for h in hosts} == {("1.1.0", "1.0.0")}
    for h in lab.hosts:
        assert _health(h.address)["version"] == "1.1.0"
    deploy_outputs = [h["steps"][0]["outputs"] for h in hosts]
    assert deploy_outputs == [{"previous_version": "1.0.0"}] * len(hosts)

    # And everything was written to the SQLite ledger under VMFARM_HOME
    db = Path(embedded_env["VMFARM_HOME"]) / "vmfarm.db"
    with sqlite3.connect(db) as conn:
        statuses = conn.execute("select status from execution order by created_at").fetchall()
    assert statuses == [("SUCCEEDED",), ("SUCCEEDED",)]
    logs = run_vmfarm("logs", report["id"], "--host", lab.hosts[0].address, env=embedded_env)
    assert f"started version 1.1.0 on {lab.hosts[0].address}:8080" in logs.stdout


def test_a_host_that_cannot_be_reached_fails_alone(
    embedded_env: dict[str, str],
    lab: Any,
    tmp_path: Path,
    lease_addresses: Callable[[int], AddressLease],
) -> None:
    # Given the lab's infrastructure plus one (leased) address where no sshd listens
    gone = lease_addresses(1).addresses[0]
    first = lab.hosts[0].address
    infra = Path(lab.infrastructure_file).read_text()
    infra = infra.replace(
        f"      - hostname: {first}\n",
        f"      - hostname: {gone}\n        region: r1\n      - hostname: {first}\n",
        1,
    )
    assert gone in infra
    path = tmp_path / "infra.yaml"
    path.write_text(infra)
    res = run_vmfarm(
        "run", DEMO, str(path), "--set", "tag=2.0.0", "--output", "json", env=embedded_env
    )
    assert res.returncode == 1, res.stdout + res.stderr
    hosts = {h["host"]: h for h in json.loads(res.stdout)["stages"][0]["hosts"]}
    dead = hosts.pop(gone)
    assert dead["status"] == "FAILED"
    assert dead["steps"][0]["error_class"] == "Connectivity"
    assert gone in dead["steps"][0]["error"]
    assert {h["status"] for h in hosts.values()} == {"SUCCEEDED"}


def test_detach_needs_a_broker(embedded_env: dict[str, str], lab: Any) -> None:
    res = run_vmfarm("run", DEMO, str(lab.infrastructure_file), "--detach", env=embedded_env)
    assert res.returncode == 2
    assert "VMFARM_BROKER_URL" in res.stderr


def test_on_delegate_steps_run_on_the_worker_once_per_host(
    embedded_env: dict[str, str], lab: Any, tmp_path: Path
) -> None:
    out = tmp_path / "delegate.txt"
    res = run_vmfarm(
        "run",
        str(REPO / "tests/data/delegate/pipeline.yaml"),
        str(lab.infrastructure_file),
        "--set",
        f"out_file={out}",
        env=embedded_env,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    # The file is on this machine (the worker's), not in any host's private filesystem,
    # and the host's own output variable reached the delegate step for that host.
    lines = sorted(out.read_text().splitlines())
    assert lines == sorted(
        f"{h.address} host-said={h.address} delegate-sees=unset" for h in lab.hosts
    )


def test_sandbox_hosts_run_the_demo_without_sshd(
    embedded_env: dict[str, str], tmp_path: Path, lease_addresses: Callable[[int], AddressLease]
) -> None:
    """What `scripts/demo` falls back to where root or sshd is missing."""
    from app.lab import lab_down, lab_up

    # The demo app listens on each host's address: leased, like a lab's.
    state = lab_up(2, root=tmp_path / "sandbox", sandbox=True, first=lease_addresses(2).first)
    try:
        res = run_vmfarm(
            "run", DEMO, str(state.infrastructure_file), "--set", "tag=3.0.0", env=embedded_env
        )
        assert res.returncode == 0, res.stdout + res.stderr
        for h in state.hosts:
            assert _health(h.address) == {"status": "UP", "version": "3.0.0"}
            # each sandbox host has its own /opt
            version = Path(str(h.sandbox_root)) / "opt/demo/releases/3.0.0/VERSION"
            assert version.read_text() == "3.0.0\n"
    finally:
        lab_down(root=tmp_path / "sandbox")
