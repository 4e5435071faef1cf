"""Looping strategies on the lab: a stage repeated over three regions runs as three stage
iterations, each with its own stage row, its own ledger rows on every host and its own
status line; a matrix step with an exclude runs the combinations the plan shows; and
``maxConcurrency: 1`` holds, measured from the ledger's step start and end times."""

from __future__ import annotations

import json
import sqlite3
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import DATA, base_env, run_vmfarm
from tests.lab.spans import most_in_flight

FILES = [str(DATA / "loops")]
REGIONS = ["us-east-1", "eu-west-1", "ap-south-1"]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return base_env(VMFARM_HOME=str(tmp_path_factory.mktemp("loops") / "home"))


def _db(env: dict[str, str]) -> sqlite3.Connection:
    return sqlite3.connect(Path(env["VMFARM_HOME"]) / "vmfarm.db")


def _t(text: str) -> datetime:
    return datetime.fromisoformat(text)


def _log(lab: Any, ex_id: str, host: int) -> list[str]:
    path = Path(lab.hosts[host].host_dir) / "opt" / "loops" / f"{ex_id}.log"
    return path.read_text().splitlines()


@pytest.fixture(scope="module")
def ran(env: dict[str, str], lab: Any) -> dict[str, Any]:
    # Given the pipeline whose Deploy stage repeats over three regions (maxConcurrency 1; its
    # install step repeats over the stage's hosts one at a time, as Harness writes it), and a
    # Smoke stage with a matrix step (one combination excluded) and a step group run twice
    res = run_vmfarm("run", *FILES, str(lab.infrastructure_file), "-o", "json", env=env)
    assert res.returncode == 0, res.stderr
    report: dict[str, Any] = json.loads(res.stdout)
    return report


def test_a_stage_repeated_over_three_regions_runs_three_iterations_with_their_own_rows(
    env: dict[str, str], lab: Any, ran: dict[str, Any]
) -> None:
    # Then the run has four stages: three iterations of Deploy, then Smoke, all succeeded
    assert ran["status"] == "SUCCEEDED"
    assert [s["identifier"] for s in ran["stages"]] == ["deploy_0", "deploy_1", "deploy_2", "smoke"]
    assert all(s["status"] == "SUCCEEDED" for s in ran["stages"])
    with _db(env) as db:
        stage_rows = db.execute(
            "select stage_index, identifier, name, status from stagerun where execution_id=? "
            "order by stage_index",
            (ran["id"],),
        ).fetchall()
        step_rows = db.execute(
            "select stage_index, step_id, host, status from hoststeprun where execution_id=? "
            "and kind='deploy'",
            (ran["id"],),
        ).fetchall()
    # and each iteration is a stage row of its own, named after its item
    assert stage_rows[:3] == [
        (i, f"deploy_{i}", f"Deploy_{r}", "SUCCEEDED") for i, r in enumerate(REGIONS)
    ]
    # and every iteration has its own ledger row for each step on each host
    hosts = {h.address for h in lab.hosts}
    for i in range(3):
        for step in ("install", "region"):
            rows = [r for r in step_rows if r[0] == i and r[1] == step]
            assert {r[2] for r in rows} == hosts, (i, step)
            assert len(rows) == len(hosts)
            assert {r[3] for r in rows} == {"SUCCEEDED"}
    # and each iteration ran with its own item, on every host, in order
    for n in range(len(lab.hosts)):
        lines = _log(lab, ran["id"], n)
        assert [x for x in lines if x.startswith("region")] == [
            f"region {r} {i}" for i, r in enumerate(REGIONS)
        ]
        # <+repeat.item> of the per-host repeat is the host itself
        assert lines.count(f"install {lab.hosts[n].address}") == 3


def test_a_matrix_with_an_exclude_runs_what_the_plan_shows(
    env: dict[str, str], lab: Any, ran: dict[str, Any]
) -> None:
    # Given what the plan says the Smoke stage's looped steps are
    plan = run_vmfarm("plan", *FILES, str(lab.infrastructure_file), "-o", "json", env=env)
    assert plan.returncode == 0, plan.stderr
    (smoke,) = [s for s in json.loads(plan.stdout)["stages"] if s["identifier"] == "smoke"]
    planned = [s["identifier"] for s in smoke["steps"]]
    assert planned == ["probe_0_0", "probe_0_1", "probe_1_0", "again_0", "again_1"]
    # Then the run's ledger has exactly those steps on every host, each succeeded
    with _db(env) as db:
        rows = db.execute(
            "select host, step_id, status from hoststeprun where execution_id=? and "
            "stage_index=3 order by host, step_index",
            (ran["id"],),
        ).fetchall()
    for h in lab.hosts:
        assert [(s, st) for host, s, st in rows if host == h.address] == [
            (s, "SUCCEEDED") for s in planned
        ]
    # and each host ran the combinations with their values, the excluded one never
    for n in range(len(lab.hosts)):
        lines = _log(lab, ran["id"], n)
        assert [x for x in lines if x.startswith(("probe", "again"))] == [
            "probe health 8080",
            "probe health 8081",
            "probe ready 8080",
            "again 0/2 _0",
            "again 1/2 _1",
        ]


def test_max_concurrency_holds_by_the_ledger_times(
    env: dict[str, str], lab: Any, ran: dict[str, Any]
) -> None:
    with _db(env) as db:
        rows = db.execute(
            "select stage_index, step_id, host, started_at, finished_at from hoststeprun "
            "where execution_id=? and kind='deploy'",
            (ran["id"],),
        ).fetchall()
    spans: dict[int, list[tuple[datetime, datetime]]] = {}
    for stage, _, _, a, b in rows:
        spans.setdefault(stage, []).append((_t(a), _t(b)))
    # Then stage iterations never overlap (maxConcurrency: 1): each one's steps all ended
    # before the next one's first step started
    for i in range(2):
        assert max(b for _, b in spans[i]) <= min(a for a, _ in spans[i + 1]), i
    # and within an iteration, the install step (repeat over the hosts, maxConcurrency 1)
    # ran on one host at a time
    for i in range(3):
        install = [(_t(a), _t(b)) for s, step, _, a, b in rows if s == i and step == "install"]
        assert len(install) == len(lab.hosts)
        assert most_in_flight(install) == 1, i
    # and a host's items of the matrix step ran one after another
    for h in lab.hosts:
        probes = [
            (_t(a), _t(b))
            for s, step, host, a, b in rows
            if s == 3 and host == h.address and step.startswith("probe")
        ]
        assert len(probes) == 3
        assert most_in_flight(probes) == 1


def test_status_shows_a_line_per_stage_iteration(
    env: dict[str, str], lab: Any, ran: dict[str, Any]
) -> None:
    res = run_vmfarm("status", ran["id"], env=env)
    assert res.returncode == 0, res.stderr
    for i, region in enumerate(REGIONS):
        line = next(x for x in res.stdout.splitlines() if f"deploy_{i}" in x)
        assert "SUCCEEDED" in line, line
        assert f"[repeat {i + 1}/3: {region}]" in line, line


def test_a_failed_iteration_fails_alone_and_the_later_ones_do_not_start(
    env: dict[str, str], lab: Any
) -> None:
    # Given the eu-west-1 iteration's step fails on every host (and the stage's failure
    # strategy is the default: roll the stage back, stop the pipeline)
    res = run_vmfarm(
        "run",
        *FILES,
        str(lab.infrastructure_file),
        "--set",
        "fail_in=eu-west-1",
        "-o",
        "json",
        env=env,
    )
    assert res.returncode == 1, res.stderr
    report = json.loads(res.stdout)
    # Then the first iteration succeeded, the second failed (and rolled back) with its own
    # rows, and the third and the stage after are SKIPPED: neither ran a step
    status = {s["identifier"]: s["status"] for s in report["stages"]}
    assert status["deploy_0"] == "SUCCEEDED"
    assert status == {
        "deploy_0": "SUCCEEDED",
        "deploy_1": "ROLLED_BACK",
        "deploy_2": "SKIPPED",
        "smoke": "SKIPPED",
    }
    assert "stage 'deploy_1'" in report["error"]
    with _db(env) as db:
        rows = db.execute(
            "select stage_index, step_id, status from hoststeprun where execution_id=? "
            "and kind='deploy'",
            (report["id"],),
        ).fetchall()
    assert {r[0] for r in rows} == {0, 1}
    assert {r[2] for r in rows if r[0] == 1 and r[1] == "region"} == {"FAILED"}
    assert {r[2] for r in rows if r[0] == 0} == {"SUCCEEDED"}
