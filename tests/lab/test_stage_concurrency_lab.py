"""A looped stage whose iterations run side by side, on the lab: three regions with
``maxConcurrency: 3`` deploy at once (their steps overlap in the ledger's times), with 2 never
more than two are in flight (the third starts when one ends), and an iteration that fails rolls
back alone while the others finish and keep their results; every iteration keeps its own rows."""

from __future__ import annotations

import json
import shutil
import sqlite3
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import DATA, base_env, run_vmfarm, vmfarm_in_background
from tests.lab.spans import most_in_flight
from tests.waiting import wait_for

REGIONS = ["us-east-1", "eu-west-1", "ap-south-1"]
CAP = "            maxConcurrency: 3\n"


def _t(text: str) -> datetime:
    return datetime.fromisoformat(text)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return base_env(VMFARM_HOME=str(tmp_path_factory.mktemp("conc") / "home"))


def _files(tmp: Path, cap: int, action: str = "") -> str:
    """tests/data/stage_concurrency with the loop's maxConcurrency ``cap`` (and the stage's
    failure strategy ``action``)."""
    dest = tmp / f"cap{cap}{action}"
    if not dest.exists():
        shutil.copytree(DATA / "stage_concurrency", dest)
        f = dest / "pipeline.yaml"
        text = f.read_text()
        assert text.count(CAP) == 1
        strategy = (
            "        failureStrategies:\n          - onFailure:\n              errors: [AllErrors]\n"
            f"              action:\n                type: {action}\n"
            if action
            else ""
        )
        f.write_text(text.replace(CAP, f"            maxConcurrency: {cap}\n{strategy}"))
    return str(dest)


def _run(
    env: dict[str, str], lab: Any, tmp: Path, cap: int, *sets: str, action: str = ""
) -> dict[str, Any]:
    extra = [a for s in sets for a in ("--set", s)]
    files = _files(tmp, cap, action)
    res = run_vmfarm("run", files, str(lab.infrastructure_file), *extra, "-o", "json", env=env)
    assert res.returncode in (0, 1), res.stderr
    report: dict[str, Any] = json.loads(res.stdout)
    return report


def _rows(env: dict[str, str], ex_id: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(Path(env["VMFARM_HOME"]) / "vmfarm.db") as db:
        return db.execute(
            "select stage_index, kind, step_id, host, status, started_at, finished_at "
            "from hoststeprun where execution_id=?",
            (ex_id,),
        ).fetchall()


def _spans(rows: list[tuple[Any, ...]]) -> dict[int, tuple[datetime, datetime]]:
    """Each iteration's deploy steps: from its first step's start to its last one's end."""
    out: dict[int, tuple[datetime, datetime]] = {}
    for stage, kind, _, _, _, a, b in rows:
        if kind != "deploy" or stage > 2:
            continue
        lo, hi = out.get(stage, (_t(a), _t(b)))
        out[stage] = (min(lo, _t(a)), max(hi, _t(b)))
    return out


def _log(lab: Any, ex_id: str, host: int) -> list[str]:
    path = Path(lab.hosts[host].host_dir) / "opt" / "conc" / f"{ex_id}.log"
    return path.read_text().splitlines()


@pytest.fixture(scope="module")
def tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("conc_files")


def test_three_iterations_with_max_concurrency_3_deploy_at_once(
    env: dict[str, str], lab: Any, tmp: Path
) -> None:
    # Given the stage repeated over three regions, maxConcurrency 3, each step sleeping 2 s
    report = _run(env, lab, tmp, 3)
    # Then the run succeeded: the three iterations, then the stage after the loop
    assert report["status"] == "SUCCEEDED", report.get("error")
    assert [(s["identifier"], s["status"]) for s in report["stages"]] == [
        ("deploy_0", "SUCCEEDED"),
        ("deploy_1", "SUCCEEDED"),
        ("deploy_2", "SUCCEEDED"),
        ("after", "SUCCEEDED"),
    ]
    rows = _rows(env, report["id"])
    # and every iteration has its own row on every host
    hosts = {h.address for h in lab.hosts}
    for i in range(3):
        mine = [r for r in rows if r[0] == i and r[1] == "deploy"]
        assert sorted(r[3] for r in mine) == sorted(hosts), i
        assert {r[4] for r in mine} == {"SUCCEEDED"}
    # and the three iterations were in flight at one instant: each one's first step started
    # before any of the others' last step ended (one after another, they could not)
    spans = _spans(rows)
    assert max(a for a, _ in spans.values()) < min(b for _, b in spans.values()), spans
    assert most_in_flight(list(spans.values())) == 3
    # and the stage after the loop started once all three had ended
    after = min(_t(r[5]) for r in rows if r[0] == 3)
    assert after >= max(b for _, b in spans.values())
    # and each host ran each region's work once, with its own item
    for n in range(len(lab.hosts)):
        work = sorted(x for x in _log(lab, report["id"], n) if x.startswith("work"))
        assert work == sorted(f"work {r} deploy_{i}" for i, r in enumerate(REGIONS))


def test_max_concurrency_2_never_has_more_than_two_iterations_in_flight(
    env: dict[str, str], lab: Any, tmp: Path
) -> None:
    # Given the same stage with maxConcurrency 2
    report = _run(env, lab, tmp, 2)
    assert report["status"] == "SUCCEEDED", report.get("error")
    spans = _spans(_rows(env, report["id"]))
    assert sorted(spans) == [0, 1, 2]
    # Then two iterations ran side by side, never three: the third started when one of the
    # first two had ended
    assert most_in_flight(list(spans.values())) == 2, spans
    assert spans[1][0] < spans[0][1]  # the first two overlapped
    assert spans[2][0] >= min(spans[0][1], spans[1][1])


def test_a_failed_iteration_rolls_back_alone_and_the_others_keep_their_results(
    env: dict[str, str], lab: Any, tmp: Path
) -> None:
    # Given maxConcurrency 3 and the eu-west-1 iteration's step failing at once on every host
    # (the stage's failure strategy is the default: roll the stage back)
    report = _run(env, lab, tmp, 3, "fail_in=eu-west-1", "seconds=3")
    # Then the execution failed: eu-west-1 rolled back, the other two finished and succeeded,
    # and the stage after the loop did not start
    assert report["status"] == "FAILED"
    status = {s["identifier"]: s["status"] for s in report["stages"]}
    assert status == {
        "deploy_0": "SUCCEEDED",
        "deploy_1": "ROLLED_BACK",
        "deploy_2": "SUCCEEDED",
        "after": "SKIPPED",
    }
    assert "stage 'deploy_1'" in report["error"]
    assert "rolled back 6 host(s)" in report["error"]
    rows = _rows(env, report["id"])
    # and only the failed iteration has rollback rows (its Undo step, on each of its hosts)
    undo = [r for r in rows if r[1] == "rollback"]
    assert {r[0] for r in undo} == {1}
    assert sorted(r[3] for r in undo) == sorted(h.address for h in lab.hosts)
    assert {r[4] for r in undo} == {"SUCCEEDED"}
    # and the others ran side by side with it, finished after it failed, and kept their rows
    spans = _spans(rows)
    failed_at = max(_t(r[6]) for r in rows if r[0] == 1 and r[1] == "deploy")
    for i in (0, 2):
        assert spans[i][0] < failed_at < spans[i][1], (i, spans, failed_at)
        assert {r[4] for r in rows if r[0] == i and r[1] == "deploy"} == {"SUCCEEDED"}
    # and on every host: each region's work, the undo of eu-west-1 only, no stage after
    for n in range(len(lab.hosts)):
        lines = _log(lab, report["id"], n)
        assert sorted(x for x in lines if x.startswith("work")) == sorted(
            f"work {r} deploy_{i}" for i, r in enumerate(REGIONS)
        )
        assert [x for x in lines if x.startswith("undo")] == ["undo eu-west-1 deploy_1"]
        assert not [x for x in lines if x.startswith("after")]


@pytest.mark.parametrize(
    ("action", "outcome", "others"),
    [("MarkAsFailure", "FAILED", "SUCCEEDED"), ("Abort", "ABORTED", "ABORTED")],
)
def test_a_failed_iteration_under_mark_as_failure_or_abort(
    env: dict[str, str], lab: Any, tmp: Path, action: str, outcome: str, others: str
) -> None:
    # Given maxConcurrency 3, the stage's failure strategy `action`, and eu-west-1 failing
    report = _run(env, lab, tmp, 3, "fail_in=eu-west-1", "seconds=3", action=action)
    # Then MarkAsFailure fails that iteration alone (the others finish and succeed, the run
    # ends FAILED); Abort ends the run at once, every iteration in flight aborted; neither
    # rolls anything back, and the stage after the loop never starts
    assert report["status"] == outcome, report.get("error")
    assert {s["identifier"]: s["status"] for s in report["stages"]} == {
        "deploy_0": others,
        "deploy_1": outcome,
        "deploy_2": others,
        "after": "SKIPPED",
    }
    said = "stage 'deploy_1'" if action == "MarkAsFailure" else "aborted by failure strategy"
    assert said in report["error"]
    rows = _rows(env, report["id"])
    assert not [r for r in rows if r[1] == "rollback"]
    assert not [r for r in rows if r[0] == 3]


def test_abort_with_rollback_stops_every_iteration_in_flight_and_rolls_each_back(
    env: dict[str, str], lab: Any, tmp: Path
) -> None:
    # Given maxConcurrency 2 and steps that take 4 s, running in the background
    args = ["run", _files(tmp, 2), str(lab.infrastructure_file), "--set", "seconds=4", "-o", "json"]
    with vmfarm_in_background(*args, env=env) as proc:
        db = Path(env["VMFARM_HOME"]) / "vmfarm.db"

        def both_running() -> str | None:
            if not db.exists():
                return None  # the run has not created its ledger yet
            try:
                with sqlite3.connect(db) as c:
                    row = c.execute(
                        "select id from execution where status='RUNNING' and pipeline='conc'"
                    ).fetchone()
                    running = c.execute(
                        "select distinct stage_index from hoststeprun where execution_id=? "
                        "and status='RUNNING'",
                        (row[0] if row else "",),
                    ).fetchall()
            except sqlite3.OperationalError:  # created, its tables not yet
                return None
            return str(row[0]) if row and {r[0] for r in running} == {0, 1} else None

        # When both first iterations are running and the run is aborted with a rollback
        ex_id = wait_for(both_running, 60, "two iterations in flight", interval=0.1)
        res = run_vmfarm("abort", ex_id, "--rollback", env=env)
        assert res.returncode == 0 and "roll back" in res.stdout, res.stdout + res.stderr
        out, errs = proc.communicate(timeout=120)
    report = json.loads(out)
    assert proc.returncode == 1, errs
    # Then both iterations in flight stopped and rolled back; the third and the stage after
    # never started
    assert report["status"] == "ABORTED"
    assert {s["identifier"]: s["status"] for s in report["stages"]} == {
        "deploy_0": "ROLLED_BACK",
        "deploy_1": "ROLLED_BACK",
        "deploy_2": "SKIPPED",
        "after": "SKIPPED",
    }
    rows = _rows(env, ex_id)
    assert {r[0] for r in rows if r[1] == "deploy"} == {0, 1}
    # and each rolled back the hosts it had changed, with its own rollback rows
    for i in (0, 1):
        mine = [r for r in rows if r[0] == i and r[1] == "deploy"]
        touched = {r[3] for r in mine if r[4] in ("SUCCEEDED", "ABORTED")}
        assert {r[4] for r in mine} - {"SUCCEEDED", "ABORTED"} <= {"SKIPPED"}, mine
        undone = {r[3] for r in rows if r[0] == i and r[1] == "rollback"}
        assert undone and undone == touched, (i, touched, undone)
