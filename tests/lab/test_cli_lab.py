"""`vmfarm lab` as a user runs it: up, status, down, through the command line."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from tests.alloc import AddressLease
from tests.conftest import base_env, run_vmfarm


def test_lab_up_status_down_through_the_cli(
    tmp_path: Path, lease_addresses: Callable[[int], AddressLease]
) -> None:
    env = base_env(VMFARM_HOME=str(tmp_path / "home"))
    block = lease_addresses(2)
    none = json.loads(run_vmfarm("lab", "status", "-o", "json", env=env).stdout)
    assert none["mode"] == "none" and none["hosts"] == []

    up = run_vmfarm(
        "lab",
        "up",
        "--hosts",
        "2",
        "--first",
        str(block.first),
        "--regions",
        "a,b",
        "--ssh",
        "-o",
        "json",
        env=env,
    )
    assert up.returncode == 0, up.stderr
    state = json.loads(up.stdout)
    try:
        assert [(h["address"], h["region"], h["alive"]) for h in state["hosts"]] == [
            (block.addresses[0], "a", True),
            (block.addresses[1], "b", True),
        ]
        pids = [h["pid"] for h in state["hosts"]]
        infra = Path(state["infrastructure_file"])
        assert infra == tmp_path / "home" / "lab" / "infrastructure.yaml"
        # The file it writes is a valid static infrastructure for the files that name it.
        assert block.addresses[0] in infra.read_text()
        status = json.loads(run_vmfarm("lab", "status", "-o", "json", env=env).stdout)
        assert [h["alive"] for h in status["hosts"]] == [True, True]
    finally:
        down = run_vmfarm("lab", "down", env=env)
    assert down.returncode == 0 and "stopped" in down.stdout
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or _is_zombie(pid)
    assert os.path.exists(tmp_path / "home" / "lab" / "id_ed25519")  # keys are kept


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z")
    except (OSError, IndexError):
        return True
