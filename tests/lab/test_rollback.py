"""Rollback on the lab: a failing step's Retry then StageRollback returns every host the stage
changed to its previous version (phases in reverse order); `vmfarm rollback` undoes a successful
run; a failing rollback ends ROLLBACK_FAILED; ManualIntervention waits, then its post-timeout
action applies. Versions are read from files on the hosts and from the Instance ledger."""

from __future__ import annotations

import contextlib
import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import DATA, base_env, run_vmfarm, vmfarm_in_background
from tests.waiting import wait_for

RB = [str(DATA / "rollback" / "service.yaml"), str(DATA / "rollback" / "pipeline.yaml")]
RB_MI = [str(DATA / "rollback" / "service.yaml"), str(DATA / "rollback_mi" / "pipeline.yaml")]


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return base_env(VMFARM_HOME=str(tmp_path / "home"))


@pytest.fixture(autouse=True)
def clean_hosts(lab: Any) -> None:
    for h in lab.hosts:
        for f in ("version", "history"):
            p = Path(h.host_dir) / "opt" / "rb" / f
            if p.exists():
                p.unlink()


def _run(
    env: dict[str, str], lab: Any, files: list[str], version: str, *extra: str
) -> tuple[int, dict[str, Any]]:
    res = run_vmfarm(
        "run",
        *files,
        str(lab.infrastructure_file),
        "--set",
        f"tag={version}",
        *extra,
        "-o",
        "json",
        env=env,
    )
    assert res.stdout.strip(), res.stderr
    return res.returncode, json.loads(res.stdout)


def _on_host(lab: Any, i: int, name: str) -> list[str]:
    p = Path(lab.hosts[i].host_dir) / "opt" / "rb" / name
    return p.read_text().splitlines() if p.exists() else []


def _ledger(env: dict[str, str], sql: str, *args: Any) -> list[tuple[Any, ...]]:
    with sqlite3.connect(Path(env["VMFARM_HOME"]) / "vmfarm.db") as db:
        return db.execute(sql, args).fetchall()


def _instances(env: dict[str, str]) -> dict[str, str]:
    return dict(_ledger(env, "select host, version from instance where service='rbapp'"))


def test_retry_then_stage_rollback_restores_every_changed_host(
    env: dict[str, str], lab: Any
) -> None:
    addrs = [h.address for h in lab.hosts]
    code, first = _run(env, lab, RB, "1.0")
    assert code == 0, first
    # 2.0 fails its check on the fifth host (second phase) every time.
    code, report = _run(env, lab, RB, "2.0", "--set", f"bad_host={addrs[4]}")
    assert code == 1
    assert report["status"] == "FAILED" and "rolled back 6 host(s)" in report["error"]
    attempts = _ledger(
        env,
        "select attempt, status from hoststeprun where execution_id=? and "
        "host=? and step_id='check' and kind='deploy' order by attempt",
        report["id"],
        addrs[4],
    )
    assert attempts == [(1, "FAILED"), (2, "FAILED"), (3, "FAILED")]  # two retries
    stage = report["stages"][0]
    assert stage["status"] == "ROLLED_BACK"
    # Every host is back on 1.0: on disk and in the ledger.
    assert [_on_host(lab, i, "version") for i in range(6)] == [["1.0"]] * 6
    assert _instances(env) == {a: "1.0" for a in addrs}
    assert all(h["rollback"]["status"] == "ROLLED_BACK" for h in stage["hosts"])
    # A host of the first phase was changed by 2.0 and got 1.0's steps again.
    assert _on_host(lab, 0, "history") == [
        "install 1.0",
        "check 1.0",
        "install 2.0",
        "check 2.0",
        "install 1.0",
        "check 1.0",
    ]
    # Phases rolled back in reverse order: the second phase first.
    rb = [p for p in stage["phases"] if p["kind"] == "rollback"]
    assert [p["phase"] for p in sorted(rb, key=lambda p: p["dispatched_at"])] == [1, 0]

    # `vmfarm rollback` of a successful run: 3.0 everywhere, then back to 1.0.
    code, third = _run(env, lab, RB, "3.0")
    assert code == 0 and _instances(env) == {a: "3.0" for a in addrs}
    res = run_vmfarm("rollback", third["id"], "--plan", "-o", "json", env=env)
    assert res.returncode == 0, res.stderr
    preview = json.loads(res.stdout)
    assert {(h["host"], h["from"], h["to"]) for h in preview["stages"][0]["hosts"]} == {
        (a, "3.0", "1.0") for a in addrs
    }
    assert _on_host(lab, 0, "version") == ["3.0"]  # --plan ran nothing
    res = run_vmfarm("rollback", third["id"], "-o", "json", env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    undo = json.loads(res.stdout)
    assert undo["status"] == "SUCCEEDED" and undo["inputs"]["rollback_of"] == third["id"]
    assert [_on_host(lab, i, "version") for i in range(6)] == [["1.0"]] * 6
    assert _instances(env) == {a: "1.0" for a in addrs}
    # Nothing older is recorded now: a second rollback is refused, exit 2.
    res = run_vmfarm("rollback", third["id"], env=env)
    assert res.returncode == 2 and "error:" in res.stderr


def test_a_first_deployment_has_nothing_to_roll_back_to(env: dict[str, str], lab: Any) -> None:
    addrs = [h.address for h in lab.hosts]
    code, report = _run(env, lab, RB, "1.0", "--set", f"bad_host={addrs[1]}")
    assert code == 1 and report["status"] == "FAILED"
    stage = report["stages"][0]
    # Only the first phase ran; its hosts stay as they are, and the report says why.
    changed = [h for h in stage["hosts"] if h["rollback"]]
    assert {h["host"] for h in changed} == set(addrs[:3])
    assert all(
        h["rollback"]["status"] == "SKIPPED" and "first deployment" in h["rollback"]["reason"]
        for h in changed
    )
    assert [_on_host(lab, i, "version") for i in range(6)] == [["1.0"]] * 3 + [[]] * 3


def test_manual_intervention_times_out_into_its_post_timeout_action(
    env: dict[str, str], lab: Any
) -> None:
    addrs = [h.address for h in lab.hosts]
    code, report = _run(env, lab, RB_MI, "1.0", "--set", f"bad_host={addrs[0]}")
    assert code == 1
    assert report["status"] == "ABORTED"
    assert "manual intervention: Abort after the 5s timeout" in report["error"]
    # The second phase never started and nothing was rolled back.
    assert [_on_host(lab, i, "version") for i in range(3, 6)] == [[]] * 3


def test_a_person_answers_a_manual_intervention(env: dict[str, str], lab: Any) -> None:
    addrs = [h.address for h in lab.hosts]
    args = [
        "run",
        *RB_MI,
        str(lab.infrastructure_file),
        "--set",
        "tag=1.0",
        "--set",
        f"bad_host={addrs[0]}",
        "--set",
        "timeout=5m",
        "-o",
        "json",
    ]
    with vmfarm_in_background(*args, env=env) as proc:

        def waiting() -> str | None:
            rows: list[tuple[Any, ...]] = []
            # The CLI creates the ledger's file, then its tables.
            with contextlib.suppress(sqlite3.OperationalError):
                rows = _ledger(env, "select id, status from execution")
            return str(rows[0][0]) if rows and rows[0][1] == "WAITING" else None

        ex_id = wait_for(waiting, 120, "the execution to wait for an intervention", interval=0.5)
        shown = run_vmfarm("status", ex_id, env=env)
        assert "waiting for a manual intervention" in shown.stdout
        res = run_vmfarm(
            "intervene",
            ex_id,
            "Ignore",
            "-m",
            "known flaky check",
            env={**env, "VMFARM_USER": "oncall"},
        )
        assert res.returncode == 0, res.stderr
        assert "Ignore chosen by oncall" in res.stdout
        out, errs = proc.communicate(timeout=120)
    report = json.loads(out)
    assert proc.returncode == 0, errs
    assert report["status"] == "SUCCEEDED"
    # The failure was ignored: the second phase ran.
    assert [_on_host(lab, i, "version") for i in range(6)] == [["1.0"]] * 6


RB_STEPS = [str(DATA / "rollback" / "service.yaml"), str(DATA / "rollback_steps" / "pipeline.yaml")]


def test_rollback_steps_run_on_changed_hosts_and_a_failure_ends_rollback_failed(
    env: dict[str, str], lab: Any
) -> None:
    addrs = [h.address for h in lab.hosts]
    code, first = _run(env, lab, RB_STEPS, "1.0")
    assert code == 0, first
    # 2.0 fails on the second host (first phase); restoring fails on the first host.
    res = run_vmfarm(
        "run",
        *RB_STEPS,
        str(lab.infrastructure_file),
        "--set",
        "tag=2.0",
        "--set",
        f"bad_host={addrs[1]}",
        "--set",
        f"stuck_host={addrs[0]}",
        env=env,
    )
    assert res.returncode == 1
    ex_id = res.stderr.split("execution ")[1].split()[0]
    report = json.loads(run_vmfarm("status", ex_id, "-o", "json", env=env).stdout)
    assert report["status"] == "ROLLBACK_FAILED"
    stage = report["stages"][0]
    assert stage["status"] == "ROLLBACK_FAILED"
    rb = {h["host"]: h["rollback"] for h in stage["hosts"]}
    # The first phase's hosts ran the rollbackSteps with the version they had before.
    assert rb[addrs[1]]["status"] == rb[addrs[2]]["status"] == "ROLLED_BACK"
    assert rb[addrs[0]]["status"] == "ROLLBACK_FAILED"
    assert rb[addrs[0]]["step"] == "restore" and "exited with code 4" in rb[addrs[0]]["error"]
    assert all(rb[a] is None for a in addrs[3:])  # never touched: nothing to undo
    assert _on_host(lab, 1, "history")[-1] == "restore 1.0"
    assert [_on_host(lab, i, "version") for i in range(3)] == [["2.0"], ["1.0"], ["1.0"]]
    assert _instances(env) == {addrs[0]: "2.0", **{a: "1.0" for a in addrs[1:]}}
    # The person reading the output is told which host did not roll back, and why.
    assert f"rollback of {addrs[0]}: step restore failed" in res.stdout
    assert "the rollback failed on some hosts" in res.stdout


def test_abort_with_rollback_stops_the_stage_then_rolls_back(env: dict[str, str], lab: Any) -> None:
    addrs = [h.address for h in lab.hosts]
    code, first = _run(env, lab, RB_STEPS, "1.0")
    assert code == 0, first
    args = [
        "run",
        *RB_STEPS,
        str(lab.infrastructure_file),
        "--set",
        "tag=2.0",
        "--set",
        "settle_seconds=3",
        "-o",
        "json",
    ]
    with vmfarm_in_background(*args, env=env) as proc:
        wait_for(lambda: _on_host(lab, 0, "version") == ["2.0"], 60, "2.0 to start", interval=0.2)
        ex_id = _ledger(env, "select id from execution order by created_at desc")[0][0]
        res = run_vmfarm("abort", ex_id, "--rollback", env=env)
        assert res.returncode == 0 and "roll back" in res.stdout, res.stdout + res.stderr
        out, errs = proc.communicate(timeout=120)
    report = json.loads(out)
    assert proc.returncode == 1, errs
    assert report["status"] == "ABORTED" and report["stages"][0]["status"] == "ROLLED_BACK"
    # The first phase was running: its hosts went back to 1.0; the second never started.
    assert [_on_host(lab, i, "version") for i in range(6)] == [["1.0"]] * 6
    assert _on_host(lab, 3, "history") == ["install 1.0", "check 1.0"]
    assert _instances(env) == {a: "1.0" for a in addrs}


def test_rollback_reports_say_what_happened(env: dict[str, str], lab: Any) -> None:
    addrs = [h.address for h in lab.hosts]
    code, first = _run(env, lab, RB, "1.0")
    assert code == 0, first
    code, third = _run(env, lab, RB, "3.0")
    assert code == 0, third
    res = run_vmfarm("rollback", third["id"], "-o", "json", env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    undo = json.loads(res.stdout)
    # The rollback execution shows the hosts it rolled back, with their real states and the
    # steps it ran on them (not every host SKIPPED).
    hosts = undo["stages"][0]["hosts"]
    assert {h["host"]: (h["status"], h["version"]) for h in hosts} == {
        a: ("ROLLED_BACK", "1.0") for a in addrs
    }
    assert all([s["status"] for s in h["steps"]] == ["SUCCEEDED", "SUCCEEDED"] for h in hosts)
    shown = run_vmfarm("status", undo["id"], env=env)
    assert "SKIPPED" not in shown.stdout and shown.stdout.count("ROLLED_BACK") >= 6
    executions = len(json.loads(run_vmfarm("executions", "-o", "json", env=env).stdout))

    # A second rollback of the same run names the rollback that already undid it.
    res = run_vmfarm("rollback", third["id"], env=env)
    assert res.returncode == 2
    assert (
        f"execution {third['id']} was rolled back already by execution {undo['id']}" in res.stderr
    ), res.stderr
    assert "deployed after" not in res.stderr
    assert run_vmfarm("rollback", third["id"], "--plan", env=env).stderr == res.stderr

    # The run 1.0 came from has nothing older recorded: refused, nothing recorded.
    for extra in ((), ("--plan",)):
        res = run_vmfarm("rollback", first["id"], *extra, env=env)
        assert res.returncode == 2, res.stdout + res.stderr
        assert f"execution {first['id']} has no host to roll back" in res.stderr
        assert "no earlier version recorded" in res.stderr

    # A rollback is not rolled back: --plan and the rollback refuse it alike, exit 2.
    refusals = [run_vmfarm("rollback", undo["id"], *extra, env=env) for extra in ((), ("--plan",))]
    assert [r.returncode for r in refusals] == [2, 2]
    assert refusals[0].stderr == refusals[1].stderr
    assert f"execution {undo['id']} is a rollback (of {third['id']})" in refusals[0].stderr
    assert len(json.loads(run_vmfarm("executions", "-o", "json", env=env).stdout)) == executions
    assert [_on_host(lab, i, "version") for i in range(6)] == [["1.0"]] * 6
