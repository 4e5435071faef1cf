"""Liveness on real services: a region worker killed with SIGKILL mid-step, a region nobody
serves, and `vmfarm abort`. No execution stays RUNNING after its workers are gone."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import DATA, REPO, Cluster, _wait_for_workers, run_vmfarm
from tests.waiting import wait_for

PIPELINE = str(DATA / "liveness" / "pipeline.yaml")
FAST = {"VMFARM_HEARTBEAT_INTERVAL": "0.5", "VMFARM_HEARTBEAT_TIMEOUT": "4"}


def _infra_with(lab: Any, tmp_path: Path, address: str, region: str) -> str:
    """The lab's infrastructure file with one host moved to another region."""
    text = Path(lab.infrastructure_file).read_text()
    old = next(h.region for h in lab.hosts if h.address == address)
    moved = text.replace(
        f"- hostname: {address}\n        region: {old}",
        f"- hostname: {address}\n        region: {region}",
    )
    assert moved != text
    path = tmp_path / f"infra-{region}.yaml"
    path.write_text(moved)
    return str(path)


def _units(lab: Any, address: str, ex_id: str) -> list[str]:
    host = next(h for h in lab.hosts if h.address == address)
    path = Path(host.host_dir) / "opt" / "live" / "units"
    lines = path.read_text().splitlines() if path.exists() else []
    return [line.split(" ", 1)[1] for line in lines if line.startswith(ex_id)]


def _wait(check: Callable[[], Any], seconds: float, what: str) -> Any:
    return wait_for(check, seconds, what, interval=0.3)


def _reconcile_until(env: dict[str, str], action: str, seconds: float = 60) -> list[str]:
    """Run `vmfarm reconcile` until one of its actions contains ``action`` (it does nothing
    until the heartbeat or the dispatch is stale: FAST makes that a few seconds); its actions."""

    def reconciled() -> list[str] | None:
        rec = run_vmfarm("reconcile", "-o", "json", env=env)
        assert rec.returncode == 0, rec.stderr
        actions: list[str] = json.loads(rec.stdout)["actions"]
        return actions if any(action in a for a in actions) else None

    found: list[str] = wait_for(
        reconciled, seconds, f"reconcile to report {action!r}", interval=0.5
    )
    return found


def _report(env: dict[str, str], ex_id: str) -> dict[str, Any]:
    return dict(json.loads(run_vmfarm("status", ex_id, "-o", "json", env=env).stdout))


@pytest.fixture
def worker_r5(cluster: Cluster, tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    env = {**cluster.env, **FAST}
    with (tmp_path / "w-r5.log").open("wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cli.main",
                "worker",
                "--region",
                "r5",
                "-c",
                "4",
                "-n",
                "w-r5@test",
            ],
            env=env,
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    yield proc
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_a_worker_killed_mid_step_fails_its_host_instead_of_hanging(
    cluster: Cluster, lab: Any, tmp_path: Path, worker_r5: subprocess.Popen[bytes]
) -> None:
    # Given one host served by a region worker of its own, running a long unit
    victim = lab.hosts[3].address
    env = {**cluster.env, **FAST}
    infra = _infra_with(lab, tmp_path, victim, "r5")
    sub = run_vmfarm(
        "run",
        PIPELINE,
        infra,
        "--set",
        f"slow_host={victim}",
        "--set",
        "slow_seconds=60",
        "--detach",
        env=env,
    )
    assert sub.returncode == 0, sub.stderr
    ex_id = sub.stdout.strip().splitlines()[-1]
    _wait(lambda: _units(lab, victim, ex_id) == ["first"], 60, "the long unit to start")
    # When its worker is killed with SIGKILL mid-unit (no errback can run)
    os.killpg(worker_r5.pid, signal.SIGKILL)
    worker_r5.wait()
    # Then, once its heartbeat is stale, the reconciler fails that host as DelegateRestart
    # and the execution ends instead of staying RUNNING
    _reconcile_until(env, "worker lost")
    report = _wait(
        lambda: (r := _report(env, ex_id))["status"] in ("FAILED",) and r,
        60,
        "the execution to end",
    )
    hosts = {h["host"]: h for h in report["stages"][0]["hosts"]}
    lost = hosts.pop(victim)
    assert lost["status"] == "FAILED"
    assert lost["steps"][0]["error_class"] == "DelegateRestart"
    assert "worker lost" in lost["steps"][0]["error"]
    assert {h["status"] for h in hosts.values()} == {"SUCCEEDED"}
    # and the killed unit ran once, for the one recorded attempt; nothing after it ran
    assert lost["steps"][0]["attempt"] == 1
    assert _units(lab, victim, ex_id) == ["first"]


def test_work_for_a_region_without_any_worker_fails_instead_of_waiting(
    cluster: Cluster, lab: Any, tmp_path: Path
) -> None:
    orphan = lab.hosts[4].address
    env = {**cluster.env, **FAST, "VMFARM_DISPATCH_EXPIRES": "1"}
    infra = _infra_with(lab, tmp_path, orphan, "r6")
    sub = run_vmfarm("run", PIPELINE, infra, "--detach", env=env)
    assert sub.returncode == 0, sub.stderr
    ex_id = sub.stdout.strip().splitlines()[-1]
    # Every other host finishes; this one's messages sit in vmfarm.r6, which nobody consumes
    _wait(
        lambda: (
            sum(h["status"] == "SUCCEEDED" for h in _report(env, ex_id)["stages"][0]["hosts"]) == 5
        ),
        60,
        "the other hosts",
    )
    # Once past dispatch expiry + heartbeat timeout, the reconciler fails that host
    _reconcile_until(env, f"{orphan}: no worker took its steps")
    report = _wait(
        lambda: (r := _report(env, ex_id))["status"] == "FAILED" and r, 30, "the execution to end"
    )
    lost = next(h for h in report["stages"][0]["hosts"] if h["host"] == orphan)
    assert lost["steps"][0]["error_class"] == "Timeout"
    assert "no worker took the steps" in lost["steps"][0]["error"]
    assert _units(lab, orphan, ex_id) == []


def test_abort_stops_hosts_at_their_next_unit_and_sends_no_new_work(
    cluster: Cluster, lab: Any
) -> None:
    sub = cluster.vmfarm(
        "run",
        PIPELINE,
        str(lab.infrastructure_file),
        "--set",
        "slow_host=all",
        "--set",
        "slow_seconds=4",
        "--detach",
    )
    assert sub.returncode == 0, sub.stderr
    ex_id = sub.stdout.strip().splitlines()[-1]
    first = lab.hosts[0].address
    _wait(lambda: _units(lab, first, ex_id) == ["first"], 60, "the first unit to start")
    res = cluster.vmfarm("abort", ex_id)
    assert res.returncode == 0 and "aborted" in res.stdout

    def all_stopped() -> dict[str, Any] | None:
        r = _report(cluster.env, ex_id)
        return r if all(h["status"] == "ABORTED" for h in r["stages"][0]["hosts"]) else None

    report = _wait(all_stopped, 60, "every host to stop")
    assert report["status"] == "ABORTED"
    for h in lab.hosts:
        # the running unit finished; the next unit and the next step never ran
        assert _units(lab, h.address, ex_id) == ["first"]
    again = cluster.vmfarm("abort", ex_id)
    assert "already ended: ABORTED" in again.stdout


ROLLING = str(DATA / "liveness" / "rolling.yaml")


@pytest.fixture
def r7_workers(cluster: Cluster, tmp_path: Path) -> Iterator[Callable[[str], Any]]:
    """Start region r7 workers on demand (their own processes, fast heartbeats)."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(name: str) -> subprocess.Popen[bytes]:
        with (tmp_path / f"{name}.log").open("wb") as log:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "cli.main",
                    "worker",
                    "--region",
                    "r7",
                    "-c",
                    "4",
                    "-n",
                    f"{name}@test",
                ],
                env={**cluster.env, **FAST},
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _second_phase_in_r7(lab: Any, tmp_path: Path) -> str:
    text = Path(lab.infrastructure_file).read_text()
    for h in lab.hosts[3:]:
        old = f"- hostname: {h.address}\n        region: {h.region}"
        assert old in text
        text = text.replace(old, f"- hostname: {h.address}\n        region: r7")
    path = tmp_path / "infra-r7.yaml"
    path.write_text(text)
    return str(path)


def _kill_the_worker_running(
    env: dict[str, str], ex_id: str, host: str, workers: dict[str, subprocess.Popen[bytes]]
) -> str:
    def running_on() -> str | None:
        r = _report(env, ex_id)
        stage = r["stages"][0]
        others = [h for h in stage["hosts"][3:] if h["host"] != host]
        step = next(h for h in stage["hosts"] if h["host"] == host)["steps"][0]
        done = all(h["status"] == "SUCCEEDED" for h in others)
        return str(step["worker"]) if step["status"] == "RUNNING" and done else None

    name = str(_wait(running_on, 90, "the slow step to run, the other hosts to finish"))
    proc = workers[name.split("@")[0]]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return name


def _attempts(env: dict[str, str], ex_id: str, host: str) -> list[tuple[int, str, str]]:
    from sqlmodel import Session, create_engine, select

    from app.db import normalise_url
    from app.models import HostStepRun

    eng = create_engine(normalise_url(env["VMFARM_DATABASE_URL"]))
    with Session(eng) as s:
        rows = s.exec(
            select(HostStepRun)
            .where(
                HostStepRun.execution_id == ex_id,
                HostStepRun.host == host,
                HostStepRun.step_id == "work",
            )
            .order_by(HostStepRun.attempt)
        ).all()  # type: ignore[arg-type]
        out = [(r.attempt, r.status, str(r.worker)) for r in rows]
    eng.dispose()
    return out


def test_a_lost_worker_s_step_is_retried_on_another_worker_of_its_region(
    cluster: Cluster, lab: Any, tmp_path: Path, r7_workers: Callable[[str], Any]
) -> None:
    workers = {n: r7_workers(n) for n in ("w-r7a", "w-r7b")}
    _wait_for_workers({**cluster.env}, ["w-r7a@test", "w-r7b@test"])
    env = {**cluster.env, **FAST}
    victim = lab.hosts[4].address
    sub = run_vmfarm(
        "run",
        ROLLING,
        _second_phase_in_r7(lab, tmp_path),
        "--set",
        f"slow_host={victim}",
        "--detach",
        env=env,
    )
    assert sub.returncode == 0, sub.stderr
    ex_id = sub.stdout.strip().splitlines()[-1]
    killed = _kill_the_worker_running(env, ex_id, victim, workers)
    # Once past the heartbeat timeout, the reconciler retries the step on the other worker
    _reconcile_until(env, "retrying as attempt 2 on queue vmfarm.r7")
    report = _wait(
        lambda: (r := _report(env, ex_id))["status"] in ("SUCCEEDED", "FAILED", "ABORTED") and r,
        90,
        "the execution to end",
    )
    assert report["status"] == "SUCCEEDED", report.get("error")
    attempts = _attempts(env, ex_id, victim)
    assert [(a, st) for a, st, _ in attempts] == [(1, "FAILED"), (2, "SUCCEEDED")]
    assert attempts[0][2] == killed and attempts[1][2] != killed  # the other worker took it
    # Every unit ran once per recorded attempt: the killed unit once, then the new attempt.
    assert _units(lab, victim, ex_id) == ["first", "first", "second", "after"]
    assert all(h["status"] == "SUCCEEDED" for h in report["stages"][0]["hosts"])


def test_a_lost_worker_with_no_other_worker_ends_as_the_strategy_says(
    cluster: Cluster, lab: Any, tmp_path: Path, r7_workers: Callable[[str], Any]
) -> None:
    workers = {"w-r7c": r7_workers("w-r7c")}
    _wait_for_workers({**cluster.env}, ["w-r7c@test"])
    env = {**cluster.env, **FAST}
    victim = lab.hosts[5].address
    sub = run_vmfarm(
        "run",
        ROLLING,
        _second_phase_in_r7(lab, tmp_path),
        "--set",
        f"slow_host={victim}",
        "--detach",
        env=env,
    )
    assert sub.returncode == 0, sub.stderr
    ex_id = sub.stdout.strip().splitlines()[-1]
    _kill_the_worker_running(env, ex_id, victim, workers)
    _reconcile_until(env, "worker lost")
    # Retry needs a live worker on vmfarm.r7: none, so onRetryFailure (Abort) applies.
    report = _wait(
        lambda: (r := _report(env, ex_id))["status"] in ("SUCCEEDED", "FAILED", "ABORTED") and r,
        30,
        "the execution to end",
    )
    assert report["status"] == "ABORTED", report.get("error")
    attempts = _attempts(env, ex_id, victim)
    assert [(a, st) for a, st, _ in attempts] == [(1, "FAILED")]
    assert _units(lab, victim, ex_id) == ["first"]
