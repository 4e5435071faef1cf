"""Rolling and canary deployments on 8 real sshd lab hosts, judged from the SQL ledger."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import DATA, base_env, run_vmfarm
from tests.waiting import wait_for

STRAT = DATA / "strategies"


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return base_env(VMFARM_HOME=str(tmp_path / "home"))


def _db(env: dict[str, str]) -> sqlite3.Connection:
    conn = sqlite3.connect(Path(env["VMFARM_HOME"]) / "vmfarm.db")
    conn.row_factory = sqlite3.Row
    return conn


def _t(text: str) -> datetime:
    return datetime.fromisoformat(text)


def test_rolling_phases_wait_for_the_previous_gate(lab8: Any, env: dict[str, str]) -> None:
    # Given 8 hosts and a rolling strategy of 25%, 50%, 100% with at most 2 hosts in flight
    res = run_vmfarm(
        "run",
        str(STRAT / "service.yaml"),
        str(STRAT / "rolling.yaml"),
        str(lab8.infrastructure_file),
        "--set",
        "tag=5.0.0",
        "-o",
        "json",
        env=env,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr
    report = json.loads(res.stdout)
    hosts = report["stages"][0]["hosts"]
    assert {h["version"] for h in hosts} == {"5.0.0"} and len(hosts) == 8
    with _db(env) as db:
        phases = db.execute(
            "select phase, kind, status, hosts, gate_at from phaserun order by phase"
        ).fetchall()
        rows = db.execute(
            "select host, phase, step_index, started_at, finished_at from hoststeprun"
        ).fetchall()
    # Then the batches are 2, 4 and the remaining 2 hosts, in inventory order
    order = [h.address for h in lab8.hosts]
    assert [json.loads(p["hosts"]) for p in phases] == [order[:2], order[2:6], order[6:]]
    assert all(p["kind"] == "deploy" and p["status"] == "SUCCEEDED" for p in phases)
    # and no host of phase k+1 started before the gate of phase k had passed
    for k in range(len(phases) - 1):
        later = [_t(r["started_at"]) for r in rows if r["phase"] == k + 1]
        assert min(later) > _t(phases[k]["gate_at"])
    # and at most 2 hosts were in flight at once (maxConcurrency)
    spans = {}
    for r in rows:
        a, b = _t(r["started_at"]), _t(r["finished_at"])
        lo, hi = spans.get(r["host"], (a, b))
        spans[r["host"]] = (min(lo, a), max(hi, b))
    for host, (start, _) in spans.items():
        in_flight = [h for h, (a, b) in spans.items() if a <= start < b]
        assert len(in_flight) <= 2, (host, in_flight)


def test_canary_with_a_broken_build_never_reaches_the_primary_phase(
    lab8: Any, env: dict[str, str]
) -> None:
    # Given a build whose health endpoint answers 503 {"status": "DOWN"}
    broken = STRAT / "broken-app"
    res = run_vmfarm(
        "run",
        str(STRAT / "service.yaml"),
        str(STRAT / "canary.yaml"),
        str(lab8.infrastructure_file),
        "--set",
        "tag=6.6.6",
        "--set",
        f"path={broken}",
        env=env,
        timeout=300,
    )
    # Then the run fails, the canary hosts are named with the check and its numbers
    assert res.returncode == 1, res.stdout + res.stderr
    canary = [h.address for h in lab8.hosts[:2]]  # 25% of 8, inventory order
    assert "verification of Canary: FAILED (0/2 hosts passed" in res.stdout
    for host in canary:
        line = next(x for x in res.stdout.splitlines() if x.strip().startswith(f"{host}:"))
        assert "health check" in line and "503" in line
    with _db(env) as db:
        started = db.execute("select distinct phase from hoststeprun").fetchall()
        verdict = json.loads(
            db.execute("select verdict from phaserun where kind='verify'").fetchone()["verdict"]
        )
    # and the primary phase never started
    assert [r["phase"] for r in started] == [0]
    assert verdict["passed"] is False and sorted(verdict["failed"]) == sorted(canary)
    for host in canary:
        assert verdict["checks"][host]["results"]["health"]["status_code"] == 503
    # and `status` shows the same verdict
    st = run_vmfarm("status", _exec_id(res.stderr), env=env)
    assert "verification of Canary: FAILED" in st.stdout


def test_canary_that_passes_its_gate_goes_on_to_every_host(lab8: Any, env: dict[str, str]) -> None:
    res = run_vmfarm(
        "run",
        str(STRAT / "service.yaml"),
        str(STRAT / "canary.yaml"),
        str(lab8.infrastructure_file),
        "--set",
        "tag=7.0.0",
        "-o",
        "json",
        env=env,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr
    report = json.loads(res.stdout)
    stage = report["stages"][0]
    assert {h["version"] for h in stage["hosts"]} == {"7.0.0"}
    check = next(p for p in stage["phases"] if p["kind"] == "verify")
    assert check["verdict"]["passed"] is True
    for numbers in check["verdict"]["checks"].values():
        probe = numbers["results"]["probe"]
        assert probe["requests"] > 0 and probe["error_rate"] == 0
        assert numbers["results"]["health"]["status_code"] == 200


def answered(seen: list[str], count: int = 20) -> None:
    """Wait until the client thread has had ``count`` more answers than it has now."""
    mark = len(seen)
    wait_for(lambda: len(seen) >= mark + count, 30, f"{count} more answers through the LB")


def _exec_id(stderr: str) -> str:
    return next(line.split()[1] for line in stderr.splitlines() if line.startswith("execution "))


def test_blue_green_moves_traffic_with_no_failed_request(
    lab8: Any, free_port: Callable[[], int]
) -> None:
    import shutil
    import tempfile
    import threading
    import time
    import urllib.request

    from app.traffic import traffic_switch_from_spec

    # A short home: HAProxy's UNIX sockets live under it (paths are limited to ~100 bytes).
    home = tempfile.mkdtemp(prefix="vf-bg-", dir="/tmp")
    env = base_env(VMFARM_HOME=home)

    lb = f"127.0.0.1:{free_port()}"
    files = [
        str(STRAT / "service.yaml"),
        str(STRAT / "bluegreen.yaml"),
        str(lab8.infrastructure_file),
    ]
    blue = [h.address for h in lab8.hosts[:4]]
    green = [h.address for h in lab8.hosts[4:]]
    try:
        # Given a first blue-green deployment: version 1 goes to the green set, which goes live
        first = run_vmfarm(
            "run",
            *files,
            "--set",
            "tag=1.0.0",
            "--set",
            f"lb={lb}",
            "-o",
            "json",
            env=env,
            timeout=300,
        )
        assert first.returncode == 0, first.stdout[-3000:] + first.stderr
        phases = json.loads(first.stdout)["stages"][0]["plan"]
        assert [(p["kind"], p["hosts"]) for p in phases] == [("deploy", green), ("switch", green)]

        # When version 2 goes out while a client keeps calling the load balancer
        seen: list[str] = []
        stop = threading.Event()

        def client() -> None:
            deadline = time.monotonic() + 240
            while not stop.is_set() and time.monotonic() < deadline:
                try:
                    with urllib.request.urlopen(f"http://{lb}/", timeout=5) as resp:
                        seen.append(json.loads(resp.read())["version"])
                except Exception as exc:  # every failure counts
                    seen.append(f"error: {exc!r}")
                stop.wait(0.01)  # the client's pace: about a hundred calls a second

        loop = threading.Thread(target=client)
        loop.start()
        try:
            second = run_vmfarm(
                "run",
                *files,
                "--set",
                "tag=2.0.0",
                "--set",
                f"lb={lb}",
                "-o",
                "json",
                env=env,
                timeout=300,
            )
            answered(seen)  # and a few more calls after the run
        finally:
            stop.set()
            loop.join()
        assert second.returncode == 0, second.stdout[-3000:] + second.stderr
        stage = json.loads(second.stdout)["stages"][0]
        # Then version 2 went to the blue set (the one without traffic), then traffic moved
        assert [(p["kind"], p["hosts"]) for p in stage["plan"]] == [
            ("deploy", blue),
            ("switch", blue),
        ]
        # and the client saw only the old version, then only the new one, and no error
        assert [v for v in seen if v.startswith("error")] == []
        switch_at = seen.index("2.0.0")
        assert switch_at > 0 and set(seen[:switch_at]) == {"1.0.0"}
        assert set(seen[switch_at:]) == {"2.0.0"}, "traffic went back to the old version"
        # and the old set still runs version 1, ready for a traffic rollback
        with urllib.request.urlopen(f"http://{green[0]}:8080/health", timeout=5) as resp:
            assert json.loads(resp.read())["version"] == "1.0.0"
        assert len(seen) > 50

        # When version 2 is rolled back while the client keeps calling
        v2 = json.loads(second.stdout)["id"]
        planned = run_vmfarm("rollback", v2, "--plan", "-o", "json", env=env)
        assert planned.returncode == 0, planned.stderr
        preview = json.loads(planned.stdout)
        assert preview["stages"][0]["phases_in_order"][0]["hosts"] == green
        seen.clear()
        stop.clear()
        loop = threading.Thread(target=client)
        loop.start()
        try:
            undo = run_vmfarm("rollback", v2, "-o", "json", env=env, timeout=300)
            answered(seen)
        finally:
            stop.set()
            loop.join()
        assert undo.returncode == 0, undo.stdout[-3000:] + undo.stderr
        # Then traffic went back to the green set (still on 1.0) without a failed request,
        # and nothing was redeployed: blue stands by with 2.0
        assert [v for v in seen if v.startswith("error")] == []
        back_at = seen.index("1.0.0")
        assert set(seen[back_at:]) == {"1.0.0"} and len(seen) > back_at + 5
        hosts = {h["host"]: h for h in json.loads(undo.stdout)["stages"][0]["hosts"]}
        assert all(hosts[b]["rollback"]["status"] == "SKIPPED" for b in blue)
        with urllib.request.urlopen(f"http://{blue[0]}:8080/health", timeout=5) as resp:
            assert json.loads(resp.read())["version"] == "2.0.0"
    finally:
        switch = traffic_switch_from_spec(
            {"type": "Local", "name": "bgtest", "listen": lb},
            state_dir=Path(env["VMFARM_HOME"]) / "traffic",
        )
        switch.stop()  # type: ignore[attr-defined]
        shutil.rmtree(home, ignore_errors=True)


def test_failure_budget_lets_one_host_fail_but_not_two(lab8: Any, env: dict[str, str]) -> None:
    files = [
        str(STRAT / "service.yaml"),
        str(STRAT / "budget.yaml"),
        str(lab8.infrastructure_file),
        "--set",
        "tag=8.0.0",
    ]
    one = lab8.hosts[1].address
    ok = run_vmfarm("run", *files, "--set", f"bad_hosts={one}", "-o", "json", env=env)
    # One failed host is within the budget: the stage goes on to the second phase and passes
    assert ok.returncode == 0, ok.stdout[-2000:] + ok.stderr
    stage = json.loads(ok.stdout)["stages"][0]
    statuses = {h["host"]: h["status"] for h in stage["hosts"]}
    assert statuses.pop(one) == "FAILED" and set(statuses.values()) == {"SUCCEEDED"}
    failed_step = next(h for h in stage["hosts"] if h["host"] == one)["steps"][1]
    assert failed_step["error_class"] == "Verification"
    assert "not ready: disk full" in failed_step["error"]
    assert [p["verdict"]["rule"] for p in stage["phases"]] == [
        "at most 1 of 8 host(s) may fail in the stage; 1 failed so far",
        "at most 1 of 8 host(s) may fail in the stage; 1 failed so far",
    ]

    # A second failed host, in the second phase, exceeds it: the stage fails there
    two = lab8.hosts[5].address
    bad = run_vmfarm("run", *files, "--set", f"bad_hosts={one} {two}", "-o", "json", env=env)
    assert bad.returncode == 1, bad.stdout[-2000:] + bad.stderr
    phases = [p for p in json.loads(bad.stdout)["stages"][0]["phases"] if p["kind"] == "deploy"]
    assert [p["status"] for p in phases] == ["SUCCEEDED", "FAILED"]
    assert phases[1]["verdict"]["failed"] == [two]
    assert phases[1]["verdict"]["rule"].endswith("2 failed so far")
