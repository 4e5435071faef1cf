"""Host faults while a pipeline runs, in embedded mode (SQLite ledger, worker in the run process)
on the chaos lab (three leased addresses): a host that hangs, a host whose connection drops during a
Copy, a host whose disk is full.

Every test ends in a definite execution state with every host's outcome recorded, and no
command unit ran more often than the ledger says its step was attempted: each Script unit
appends "<execution id> <unit>" to a file on the host, and the lines are counted against the
attempts in the ``hoststeprun`` table.

Faults are real: SIGSTOP of every process of a host (its sshd listener, the per-connection sshd
processes and the script), SIGKILL of the host's per-connection sshd processes (the TCP
connection drops mid-transfer), a 1 MB tmpfs mounted at the destination inside the host's own
mount namespace (``nsenter``; nothing outside that host sees it).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.chaos.conftest import ChaosTable
from tests.chaos.services import (
    assert_definite,
    assert_units_match_attempts,
    pipeline_file,
    script_unit,
    units_ran,
)
from tests.conftest import REPO, base_env
from tests.waiting import wait_for

RUN_LIMIT = 120.0  # seconds for a run to reach a terminal state (generous: CI is shared)


# --- the pipelines --------------------------------------------------------------------------------


def _units_script(case: str, unit: str, extra: str = "") -> dict[str, Any]:
    """A Script unit that leaves "<execution id> <unit>" in /opt/chaos/<case>/units."""
    return script_unit(f"/opt/chaos/{case}", unit, extra)


def _copy(dest: str) -> dict[str, Any]:
    return {
        "identifier": "copy",
        "type": "Copy",
        "spec": {"sourceType": "Artifact", "destinationPath": dest},
    }


def _files(tmp: Path, steps: list[dict[str, Any]], artifact: Path | None = None) -> Path:
    """Service, environment and pipeline files for ``steps`` (the lab's infrastructure is
    given on the command line)."""
    return pipeline_file(tmp, steps, service="chaos", pipeline="chaos", artifact=artifact)


# --- processes of a lab host ----------------------------------------------------------------------


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{name}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        kids.setdefault(ppid, []).append(int(name))
    return kids


def _descendants(pid: int) -> list[int]:
    kids, out, todo = _children_map(), [], [pid]
    while todo:
        for child in kids.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _listener(host: Any) -> int:
    assert host.pid, f"the lab state has no sshd pid for {host.address}"
    return int(host.pid)


def _signal_all(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _freeze(host: Any) -> list[int]:
    """SIGSTOP the host: its sshd listener first (no new session), then every process under it
    (per-connection sshd, shells, the script), until no new one appears."""
    frozen = [_listener(host)]
    _signal_all(frozen, signal.SIGSTOP)
    for _ in range(5):
        new = [p for p in _descendants(frozen[0]) if p not in frozen]
        if not new:
            break
        _signal_all(new, signal.SIGSTOP)
        frozen += new
    return frozen


def _drop_connections(host: Any) -> list[int]:
    """SIGKILL the host's per-connection sshd processes (and what runs under them): the TCP
    connections drop; the listener keeps accepting new ones."""
    victims = _descendants(_listener(host))
    assert victims, f"{host.address} has no SSH session to drop"
    _signal_all(victims, signal.SIGKILL)
    return victims


def _in_host(host: Any, *argv: str) -> subprocess.CompletedProcess[str]:
    """Run a command inside the host's own mount namespace (where its /opt is)."""
    return subprocess.run(
        ["nsenter", "-t", str(_listener(host)), "-m", "--", *argv],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def _host_path(host: Any, path: str) -> Path:
    """A path as the host sees it (through its mount namespace, mounts inside it included)."""
    return Path(f"/proc/{_listener(host)}/root") / path.lstrip("/")


def _assert_lab_healthy(lab: Any) -> None:
    from app.lab import lab_status

    state = lab_status(root=lab.root)
    down = [h.address for h in state.hosts if not h.alive]
    assert not down, f"chaos lab hosts down before the test: {down}"


# --- running and reading the ledger ---------------------------------------------------------------


def _start(env: dict[str, str], pipeline: Path, lab: Any) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cli.main",
            "run",
            str(pipeline),
            str(lab.infrastructure_file),
            "-o",
            "json",
        ],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _finish(proc: subprocess.Popen[str], limit: float = RUN_LIMIT) -> tuple[int, dict[str, Any]]:
    """Wait for the run to end (it must within ``limit`` seconds); its exit code and report."""
    try:
        out, err = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(
            f"the run did not reach a terminal state within {limit:.0f} s; "
            f"stderr ends with:\n{err[-3000:]}"
        ) from None
    assert "Traceback" not in err, err[-3000:]
    assert out.strip(), f"no report (exit {proc.returncode}); stderr:\n{err[-3000:]}"
    return proc.returncode, dict(json.loads(out))


def _wait_for(
    check: Callable[[], Any],
    seconds: float,
    what: str,
    proc: subprocess.Popen[str] | None = None,
    every: float = 0.05,
) -> Any:
    def done() -> Any:
        got = check()
        if not got and proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(
                f"the run ended (exit {proc.returncode}) before {what}:\n"
                f"{out[-2000:]}\n{err[-2000:]}"
            )
        return got

    return wait_for(done, seconds, what, interval=every)


def _ledger(env: dict[str, str], sql: str, *args: Any) -> list[tuple[Any, ...]]:
    with sqlite3.connect(Path(env["VMFARM_HOME"]) / "vmfarm.db") as db:
        return db.execute(sql, args).fetchall()


def _attempts(env: dict[str, str], ex_id: str, host: str) -> list[tuple[str, int, str, str]]:
    """(step, attempt, status, error_class) of every attempt on ``host``, in order."""
    return [
        (s, a, st, ec or "")
        for s, a, st, ec in _ledger(
            env,
            "select step_id, attempt, status, error_class from hoststeprun where "
            "execution_id=? and host=? and kind='deploy' order by step_index, attempt",
            ex_id,
            host,
        )
    ]


def _units(host: Any, case: str, ex_id: str) -> Counter[str]:
    """How many times each Script unit of this execution ran on ``host``."""
    return units_ran(host, f"/opt/chaos/{case}", ex_id)


def _assert_definite(env: dict[str, str], report: dict[str, Any], lab: Any) -> None:
    """A terminal execution, every lab host with a terminal outcome, no attempt left open."""
    assert_definite(
        report,
        lab,
        _ledger(
            env,
            "select host, step_id, attempt, status from hoststeprun where execution_id=? and "
            "(status='RUNNING' or finished_at is null)",
            report["id"],
        ),
        reason=False,
    )


def _assert_units_match_attempts(
    env: dict[str, str],
    report: dict[str, Any],
    lab: Any,
    case: str,
    step_units: dict[str, list[str]],
) -> None:
    """No unit ran more often than its step was attempted; on a host whose step succeeded in
    its last attempt, every unit of that step ran exactly once in that attempt."""
    for host in lab.hosts:
        assert_units_match_attempts(
            host.address,
            _units(host, case, report["id"]),
            _attempts(env, report["id"], host.address),
            step_units,
        )


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return base_env(VMFARM_HOME=str(tmp_path / "home"), NO_COLOR="1")


@pytest.fixture(scope="module")
def big_artifact(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A 20 MB incompressible file (a Local artifact) and its sha256."""
    path = tmp_path_factory.mktemp("artifact") / "payload.bin"
    data = os.urandom(20 * 1024 * 1024)
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _temp_files(folder: Path) -> list[str]:
    """Copy's temporary files (``.<name>.vmfarm-<id>.tmp``) left in ``folder``."""
    return sorted(p.name for p in folder.glob(".*.vmfarm-*.tmp")) if folder.is_dir() else []


# --- the faults -----------------------------------------------------------------------------------


def test_a_host_that_hangs_fails_with_timeout_and_the_others_succeed(
    env: dict[str, str], chaos_lab: Any, chaos_table: ChaosTable, tmp_path: Path
) -> None:
    lab, case = chaos_lab, "hang"
    _assert_lab_healthy(lab)
    victim, others = lab.hosts[0], lab.hosts[1:]
    steps = [
        {
            "type": "Command",
            "name": "Work",
            "identifier": "work",
            "timeout": "5s",
            "spec": {
                "commandUnits": [
                    _units_script(case, "first", "sleep 2\n"),
                    _units_script(case, "second"),
                ]
            },
        },
        {
            "type": "Command",
            "name": "After",
            "identifier": "after",
            "spec": {"commandUnits": [_units_script(case, "after")]},
        },
    ]
    proc = _start(env, _files(tmp_path, steps), lab)
    frozen: list[int] = []
    outcome, seconds = "no fault injected", None
    try:
        # When the victim's step is running (its first unit has started) the host freezes
        units = Path(victim.host_dir) / "opt" / "chaos" / case / "units"
        _wait_for(
            lambda: units.exists() and " first" in units.read_text(),
            60,
            "the victim's first unit to start",
            proc,
        )
        frozen = _freeze(victim)
        fault_at = time.monotonic()
        code, report = _finish(proc)
        seconds = time.monotonic() - fault_at
        hosts = {h["host"]: h for h in report["stages"][0]["hosts"]}
        lost = hosts[victim.address]
        outcome = (
            f"{report['status']}; {victim.address} {lost['status']} "
            f"{lost['steps'][0]['error_class']}; others "
            + ", ".join(sorted({hosts[h.address]["status"] for h in others}))
        )
    finally:
        _signal_all(frozen, signal.SIGCONT)
        chaos_table.add(
            f"host hangs (SIGSTOP of its {len(frozen)} processes) during a step with timeout 5s",
            outcome,
            seconds,
        )
    # Then the host fails with Timeout, the others succeed, and the execution fails
    assert code == 1 and report["status"] == "FAILED", report["status"]
    _assert_definite(env, report, lab)
    assert _attempts(env, report["id"], victim.address) == [
        ("work", 1, "FAILED", "Timeout"),
        ("after", 1, "SKIPPED", ""),
    ]
    assert lost["status"] == "FAILED"  # (which unit: see the last test)
    assert "did not finish within" in lost["steps"][0]["error"], lost["steps"][0]["error"]
    for h in others:
        assert hosts[h.address]["status"] == "SUCCEEDED", hosts[h.address]
        assert _units(h, case, report["id"]) == {"first": 1, "second": 1, "after": 1}
    # and the frozen host's first unit ran once; nothing after it ran there
    assert _units(victim, case, report["id"]) == {"first": 1}
    _assert_units_match_attempts(
        env, report, lab, case, {"work": ["first", "second"], "after": ["after"]}
    )
    # and once thawed, the host serves SSH again
    _wait_for(lambda: _in_host(victim, "true").returncode == 0, 30, "the host to thaw")
    _assert_lab_healthy(lab)


def test_a_connection_dropped_during_copy_is_retried_and_leaves_no_partial_file(
    env: dict[str, str],
    chaos_lab: Any,
    chaos_table: ChaosTable,
    tmp_path: Path,
    big_artifact: tuple[Path, str],
) -> None:
    lab, case = chaos_lab, "drop"
    _assert_lab_healthy(lab)
    victim = lab.hosts[1]
    artifact, sha = big_artifact
    dest = f"/opt/chaos/{case}/dest"
    steps = [
        {
            "type": "Command",
            "name": "Deploy",
            "identifier": "deploy",
            "timeout": "90s",
            "failureStrategies": [
                {
                    "onFailure": {
                        "errors": ["Connectivity"],
                        "action": {
                            "type": "Retry",
                            "spec": {"retryCount": 1, "retryIntervals": ["1s"]},
                        },
                    }
                }
            ],
            "spec": {
                "commandUnits": [
                    _units_script(case, "before"),
                    _copy(dest),
                    _units_script(case, "after"),
                ]
            },
        }
    ]
    proc = _start(env, _files(tmp_path, steps, artifact), lab)
    folder = Path(victim.host_dir) / "opt" / "chaos" / case / "dest"
    outcome, seconds, dropped = "no fault injected", None, []
    try:
        # When the artifact is being written on the victim (its temporary file is growing)
        def copying() -> bool:
            return (
                any(p.stat().st_size > 0 for p in folder.glob(".*.vmfarm-*.tmp"))
                if folder.is_dir()
                else False
            )

        _wait_for(copying, 60, "the Copy to start writing on the victim", proc, every=0.01)
        # its SSH connection drops (the per-connection sshd processes are killed)
        dropped = _drop_connections(victim)
        fault_at = time.monotonic()
        code, report = _finish(proc)
        seconds = time.monotonic() - fault_at
        tries = _attempts(env, report["id"], victim.address)
        outcome = (
            f"{report['status']}; {victim.address} attempts "
            + ", ".join(f"{a}:{s}{'/' + e if e else ''}" for _, a, s, e in tries)
            + f"; destination intact; stale temp files beside it: "
            f"{len(_temp_files(folder))}"
        )
    finally:
        chaos_table.add(
            f"SSH connection dropped (SIGKILL of {len(dropped)} sshd session "
            "processes) during Copy of a 20 MB artifact; Retry on Connectivity",
            outcome,
            seconds,
        )
    # Then the first attempt failed as Connectivity in the Copy, the retry succeeded
    assert code == 0 and report["status"] == "SUCCEEDED", report
    _assert_definite(env, report, lab)
    assert tries == [("deploy", 1, "FAILED", "Connectivity"), ("deploy", 2, "SUCCEEDED", "")], tries
    failed_unit, error = _ledger(
        env,
        "select failed_unit, error from hoststeprun where execution_id=? and host=? and attempt=1",
        report["id"],
        victim.address,
    )[0]
    assert failed_unit == "copy" and "dropped" in error, (failed_unit, error)
    # and each unit ran once per attempt that reached it: "before" twice, "after" once
    assert _units(victim, case, report["id"]) == {"before": 2, "after": 1}
    for h in lab.hosts:
        if h is not victim:
            assert _attempts(env, report["id"], h.address) == [("deploy", 1, "SUCCEEDED", "")]
            assert _units(h, case, report["id"]) == {"before": 1, "after": 1}
    _assert_units_match_attempts(env, report, lab, case, {"deploy": ["before", "after"]})
    # and every host holds the whole artifact at the destination: never a partial file there
    name = report["stages"][0].get("artifact", {}).get("fileName") or "chaos-1.0.tar.gz"
    for h in lab.hosts:
        got = Path(h.host_dir) / "opt" / "chaos" / case / "dest" / name
        assert got.is_file() and _sha256(got) == sha, f"{h.address}: {got} is not the artifact"
    _assert_lab_healthy(lab)


def test_a_full_disk_fails_the_copy_on_that_host_only(
    env: dict[str, str], chaos_lab: Any, chaos_table: ChaosTable, tmp_path: Path
) -> None:
    lab, case = chaos_lab, "full"
    _assert_lab_healthy(lab)
    victim = lab.hosts[2]
    artifact = tmp_path / "payload.bin"
    data = os.urandom(3 * 1024 * 1024)  # 3 MB into a 1 MB file system
    artifact.write_bytes(data)
    dest = f"/opt/chaos/{case}/dest"
    steps = [
        {
            "type": "Command",
            "name": "Deploy",
            "identifier": "deploy",
            "timeout": "60s",
            "spec": {
                "commandUnits": [
                    _units_script(case, "before"),
                    _copy(dest),
                    _units_script(case, "after"),
                ]
            },
        }
    ]
    pipeline = _files(tmp_path, steps, artifact)
    # Given the victim's destination is a 1 MB file system (in the host's mount namespace only)
    mounted = _in_host(
        victim, "sh", "-c", f"mkdir -p {dest} && mount -t tmpfs -o size=1m vmfarm-chaos-full {dest}"
    )
    assert mounted.returncode == 0, f"cannot mount a tmpfs on the host: {mounted.stderr}"
    outcome, seconds = "no result", None
    try:
        assert (Path(victim.host_dir) / "opt" / "chaos" / case / "dest").is_dir()
        fault_at = time.monotonic()  # the disk is full from the start
        code, report = _finish(_start(env, pipeline, lab))
        seconds = time.monotonic() - fault_at
        hosts = {h["host"]: h for h in report["stages"][0]["hosts"]}
        lost = hosts[victim.address]["steps"][0]
        left = _temp_files(_host_path(victim, dest))
        outcome = (
            f"{report['status']}; {victim.address} {lost['status']} "
            f"{lost['error_class']} in unit {lost['failed_unit']}; "
            f"temp files left on the full disk: {len(left)}"
        )
    finally:
        chaos_table.add(
            "full disk (1 MB tmpfs at the Copy destination) for a 3 MB artifact", outcome, seconds
        )
        _in_host(victim, "umount", dest)
    # Then the Copy fails on that host with an error naming the host and the destination
    assert code == 1 and report["status"] == "FAILED", report["status"]
    _assert_definite(env, report, lab)
    assert _attempts(env, report["id"], victim.address) == [("deploy", 1, "FAILED", "Unknown")]
    assert lost["failed_unit"] == "copy", lost
    assert victim.address in lost["error"] and dest in lost["error"], lost["error"]
    assert _units(victim, case, report["id"]) == {"before": 1}
    # and nothing else is affected: the other hosts got the whole file and ran every unit
    for h in lab.hosts:
        if h is victim:
            continue
        assert hosts[h.address]["status"] == "SUCCEEDED", hosts[h.address]
        assert _units(h, case, report["id"]) == {"before": 1, "after": 1}
        files = list((Path(h.host_dir) / "opt" / "chaos" / case / "dest").iterdir())
        assert [f.name for f in files if not f.name.startswith(".")] and all(
            _sha256(f) == hashlib.sha256(data).hexdigest() for f in files
        ), files
    _assert_units_match_attempts(env, report, lab, case, {"deploy": ["before", "after"]})
    _assert_lab_healthy(lab)


# --- bugs the faults above found (fixed; these keep them fixed) ----------------------------------


def test_a_copy_that_fails_on_the_host_removes_its_temporary_file(
    chaos_lab: Any, tmp_path: Path
) -> None:
    from app.connectors.ssh import SSHConnector
    from app.errors import TransferError

    victim = chaos_lab.hosts[2]
    target = next(t for t in chaos_lab.targets() if t.hostname == victim.address)
    local = tmp_path / "payload.bin"
    local.write_bytes(os.urandom(3 * 1024 * 1024))
    dest = "/opt/chaos/full-put"
    mounted = _in_host(
        victim, "sh", "-c", f"mkdir -p {dest} && mount -t tmpfs -o size=1m vmfarm-chaos-put {dest}"
    )
    assert mounted.returncode == 0, f"cannot mount a tmpfs on the host: {mounted.stderr}"
    conn = SSHConnector(target)
    try:
        with pytest.raises(TransferError) as caught:
            conn.put(str(local), f"{dest}/app.bin")
        assert victim.address in str(caught.value)
        left = _temp_files(_host_path(victim, dest))
    finally:
        conn.close()
        _in_host(victim, "umount", dest)
    assert left == [], f"partial temporary files left on the full disk: {left}"


def test_a_script_unit_that_times_out_is_named_in_the_ledger(
    env: dict[str, str], chaos_lab: Any, tmp_path: Path
) -> None:
    steps = [
        {
            "type": "Command",
            "name": "Slow",
            "identifier": "slow",
            "timeout": "2s",
            "spec": {
                "commandUnits": [
                    _units_script("slow", "quick"),
                    _units_script("slow", "sleepy", "sleep 30\n"),
                ]
            },
        }
    ]
    code, report = _finish(_start(env, _files(tmp_path, steps), chaos_lab))
    assert code == 1 and report["status"] == "FAILED"
    _assert_definite(env, report, chaos_lab)
    rows = _ledger(
        env,
        "select host, error_class, failed_unit from hoststeprun where execution_id=?",
        report["id"],
    )
    assert {(ec, fu) for _, ec, fu in rows} == {("Timeout", "sleepy")}, rows
