"""What ``vmfarm status``, ``run`` and ``logs`` say about an execution, read back from ledger
rows as the coordinator and the workers record them: discovery is shown as discovery (never as
a failed gate), every attempt of a host's step is shown (text and JSON), and the logs of an
execution that does not exist are an error.

On a temporary SQLite ledger (embedded mode): the execution is recorded from real pipeline
files (``coordinator.submit`` without publishing, on static hosts nothing contacts), then the
rows a run leaves are written as the coordinator and the workers write them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from sqlmodel import select

from app.db import session_scope
from app.models import Execution, HostStepRun, PhaseRun, StageRun, Status, utcnow

REPO = Path(__file__).resolve().parents[2]
GOOD = REPO / "tests" / "data" / "good"
HOSTS = ["127.0.1.201", "127.0.1.202"]
STEPS = ["install", "configure"]


@pytest.fixture
def recorded(ledger: Path) -> Iterator[str]:
    """An execution of tests/data/good (two hosts, steps install and configure), recorded."""
    from app.coordinator import submit

    yield submit([str(GOOD)], inputs={"tag": "1.0"}, publish=False)


def _vmfarm(*args: str) -> Result:
    from cli.main import main

    return CliRunner().invoke(main, list(args))


def _row(ex_id: str, host: str, step: int, attempt: int, status: str, **extra: Any) -> HostStepRun:
    region = "r1" if host == HOSTS[0] else "r2"
    return HostStepRun(
        idem_key=f"{ex_id}:0:0:{host}:{step}:{attempt}",
        execution_id=ex_id,
        stage_index=0,
        phase=0,
        step_index=step,
        step_id=STEPS[step],
        host=host,
        region=region,
        attempt=attempt,
        status=status,
        worker=f"w-{region}@test",
        queue=f"vmfarm.{region}",
        finished_at=utcnow(),
        **extra,
    )


def _ended(ex_id: str, rows: list[HostStepRun], *, discovered: bool = False) -> None:
    """The rows a successful run leaves: (a discovery record,) the phase's passed verdict, the
    host steps, the stage and the execution SUCCEEDED."""
    with session_scope() as s:
        run = s.exec(select(StageRun).where(StageRun.execution_id == ex_id)).one()
        run.phases = [
            {"index": 0, "name": "Phase 1", "hosts": HOSTS, "kind": "deploy", "verify": False}
        ]
        run.status, run.started_at, run.finished_at = Status.SUCCEEDED, utcnow(), utcnow()
        s.add(run)
        if discovered:  # as coordinator.gates.discovery_done records it
            s.add(
                PhaseRun(
                    execution_id=ex_id,
                    stage_index=0,
                    phase=-1,
                    kind="discover",
                    status=Status.SUCCEEDED,
                    hosts=HOSTS,
                    gate_at=utcnow(),
                    verdict={
                        "infrastructures": [
                            {"identifier": "ec2", "region": "r1", "tags": []},
                            {"identifier": "gce", "region": "r2", "tags": []},
                        ],
                        "workers": [
                            {"worker": "w-r1@test", "queue": "vmfarm.r1"},
                            {"worker": "w-r2@test", "queue": "vmfarm.r2"},
                        ],
                        "hosts": 2,
                    },
                )
            )
        s.add(
            PhaseRun(
                execution_id=ex_id,
                stage_index=0,
                phase=0,
                kind="deploy",
                status=Status.SUCCEEDED,
                hosts=HOSTS,
                gate_at=utcnow(),
                verdict={
                    "passed": True,
                    "hosts": 2,
                    "succeeded": 2,
                    "failed": [],
                    "failures": {},
                    "rule": "any failed host fails the stage",
                },
            )
        )
        for r in rows:
            s.add(r)
        ex = s.get(Execution, ex_id)
        assert ex is not None
        ex.status, ex.started_at, ex.finished_at = Status.SUCCEEDED, utcnow(), utcnow()
        s.add(ex)


def _all_passed(ex_id: str) -> list[HostStepRun]:
    return [
        _row(ex_id, h, i, 1, Status.SUCCEEDED, exit_code=0)
        for h in HOSTS
        for i in range(len(STEPS))
    ]


# --- discovery ---------------------------------------------------------------------------------


def test_a_successful_discovered_run_shows_discovery_not_a_failed_gate(recorded: str) -> None:
    _ended(recorded, _all_passed(recorded), discovered=True)
    res = _vmfarm("status", recorded)
    assert res.exit_code == 0, res.output
    assert "FAILED" not in res.stdout and "None" not in res.stdout
    assert (
        "discovery: 2 host(s) listed by w-r1@test (vmfarm.r1), w-r2@test (vmfarm.r2)" in res.stdout
    )
    assert "deploy of Phase 1: passed (2/2 hosts passed" in res.stdout
    shown = json.loads(_vmfarm("status", recorded, "-o", "json").stdout)
    assert shown["stages"][0]["discovery"] == {
        "status": "SUCCEEDED",
        "hosts": 2,
        "error": None,
        "workers": [
            {"worker": "w-r1@test", "queue": "vmfarm.r1"},
            {"worker": "w-r2@test", "queue": "vmfarm.r2"},
        ],
        "infrastructures": [
            {"identifier": "ec2", "region": "r1", "tags": []},
            {"identifier": "gce", "region": "r2", "tags": []},
        ],
    }


def test_a_failed_discovery_says_why(recorded: str) -> None:
    _ended(recorded, [])
    with session_scope() as s:
        s.add(
            PhaseRun(
                execution_id=recorded,
                stage_index=0,
                phase=-1,
                kind="discover",
                status=Status.FAILED,
                hosts=[],
                gate_at=utcnow(),
                verdict={
                    "infrastructures": [{"identifier": "ec2", "region": "r1", "tags": []}],
                    "workers": [{"worker": "w-r1@test", "queue": "vmfarm.r1"}],
                    "hosts": 0,
                    "error": "infrastructure 'ec2': AuthFailure",
                    "error_class": "Authentication",
                },
            )
        )
    res = _vmfarm("status", recorded)
    assert (
        "discovery FAILED on w-r1@test (vmfarm.r1): infrastructure 'ec2': AuthFailure" in res.stdout
    )
    assert "None" not in res.stdout


def test_a_static_stage_shows_no_discovery(recorded: str) -> None:
    _ended(recorded, _all_passed(recorded))
    res = _vmfarm("status", recorded)
    assert "discovery" not in res.stdout
    assert (
        json.loads(_vmfarm("status", recorded, "-o", "json").stdout)["stages"][0]["discovery"]
        is None
    )


def test_a_manual_intervention_shows_who_chose_what_not_a_failed_gate(recorded: str) -> None:
    _ended(recorded, _all_passed(recorded))
    with session_scope() as s:  # as coordinator.actions.intervene records the answer
        s.add(
            PhaseRun(
                execution_id=recorded,
                stage_index=0,
                phase=0,
                kind="mi-deploy",
                status=Status.SUCCEEDED,
                hosts=[HOSTS[0]],
                gate_at=utcnow(),
                verdict={
                    "error": "step check failed",
                    "timeout": "5m",
                    "on_timeout": "Abort",
                    "choices": ["Ignore", "Abort"],
                    "chosen": "Ignore",
                    "by": "oncall",
                    "comment": "known flaky check",
                },
            )
        )
    res = _vmfarm("status", recorded)
    assert "manual intervention: Ignore chosen by oncall (known flaky check)" in res.stdout
    assert "FAILED" not in res.stdout and "None" not in res.stdout


# --- logs --------------------------------------------------------------------------------------


def test_logs_of_an_unknown_execution_is_an_error_as_status_is(recorded: str) -> None:
    for command in ("logs", "status"):
        res = _vmfarm(command, "NO-SUCH-ID")
        assert res.exit_code == 2, (command, res.output)
        assert res.stderr.strip() == "error: no execution 'NO-SUCH-ID'"
        assert res.stdout == ""
    assert _vmfarm("logs", "NO-SUCH-ID", "-o", "json").exit_code == 2
    # An execution that exists but logged nothing (yet) is not an error.
    res = _vmfarm("logs", recorded)
    assert res.exit_code == 0 and "no log output recorded" in res.stderr
    assert json.loads(_vmfarm("logs", recorded, "-o", "json").stdout) == []


# --- attempts ----------------------------------------------------------------------------------


def test_status_shows_every_attempt_of_a_retried_step(recorded: str) -> None:
    # Given: on the first host, install failed with exit 1, then passed on attempt 2 (Retry);
    # configure's worker was lost (the reconciler's DelegateRestart), then it passed.
    first, second = HOSTS
    rows = [
        _row(
            recorded,
            first,
            0,
            1,
            Status.FAILED,
            exit_code=1,
            error_class="Unknown",
            error="exited with code 1",
            failed_unit="prepare",
        ),
        _row(recorded, first, 0, 2, Status.SUCCEEDED, exit_code=0),
        _row(
            recorded,
            first,
            1,
            1,
            Status.FAILED,
            error_class="DelegateRestart",
            error="worker lost: no heartbeat from w-r1@test since 12:00:00 UTC (timeout 30 s)",
        ),
        _row(recorded, first, 1, 2, Status.SUCCEEDED, exit_code=0),
        _row(recorded, second, 0, 1, Status.SUCCEEDED, exit_code=0),
        _row(recorded, second, 1, 1, Status.SUCCEEDED, exit_code=0),
    ]
    _ended(recorded, rows)
    # When status is asked; Then the text names each earlier attempt and how it ended
    res = _vmfarm("status", recorded)
    assert res.exit_code == 0, res.output
    assert (
        f"{first} (r1): step install SUCCEEDED on attempt 2; attempt 1 FAILED (exit 1)"
        in res.stdout
    )
    assert (
        f"{first} (r1): step configure SUCCEEDED on attempt 2; attempt 1 DelegateRestart "
        "(worker lost: no heartbeat from w-r1@test since 12:00:00 UTC (timeout 30 s))" in res.stdout
    )
    assert f"{second} (r2): step" not in res.stdout  # one attempt: nothing more to say
    # and the JSON holds every attempt per host step, in order
    shown = json.loads(_vmfarm("status", recorded, "-o", "json").stdout)
    host = next(h for h in shown["stages"][0]["hosts"] if h["host"] == first)
    assert host["status"] == "SUCCEEDED"
    install, configure = host["steps"]
    assert install["status"] == "SUCCEEDED" and install["attempt"] == 2
    assert [
        (a["attempt"], a["status"], a["exit_code"], a["failed_unit"]) for a in install["attempts"]
    ] == [(1, "FAILED", 1, "prepare"), (2, "SUCCEEDED", 0, None)]
    assert [(a["attempt"], a["error_class"]) for a in configure["attempts"]] == [
        (1, "DelegateRestart"),
        (2, None),
    ]
    assert all(a["worker"] == "w-r1@test" for a in configure["attempts"])
    other = next(h for h in shown["stages"][0]["hosts"] if h["host"] == second)
    assert [len(s["attempts"]) for s in other["steps"]] == [1, 1]
