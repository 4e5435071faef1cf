"""`vmfarm plan`: a dry run that shows everything a run would do, and does none of it."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from tests.conftest import DATA, base_env, run_vmfarm

STRAT = DATA / "strategies"
FILES = [str(STRAT / "service.yaml"), str(STRAT / "canary.yaml"), str(STRAT / "paper-infra.yaml")]


def test_plan_shows_regions_phases_and_rendered_units_without_running(tmp_path: Path) -> None:
    env = base_env(VMFARM_HOME=str(tmp_path / "home"))
    res = run_vmfarm("plan", *FILES, "--set", "tag=1.2.3+build~7", "-o", "json", env=env)
    assert res.returncode == 0, res.stderr
    (stage,) = json.loads(res.stdout)["stages"]
    assert stage["hosts_by_region"] == {
        "r1": ["127.0.1.231", "127.0.1.233"],
        "r2": ["127.0.1.232", "127.0.1.234"],
    }
    assert [(p["name"], p["hosts"], p["verify"]) for p in stage["phases"]] == [
        ("Canary", ["127.0.1.231"], True),
        ("Primary", ["127.0.1.232", "127.0.1.233", "127.0.1.234"], False),
    ]
    deploy = stage["steps"][0]
    start = next(u for u in deploy["units"] if u["identifier"] == "start")
    assert stage["rendered_for"] == "127.0.1.231"
    assert "printf 'listen=%s\\nport=8080\\nversion=%s\\n' 127.0.1.231" in start["script"]
    assert deploy["environment"]["VERSION"] == "1.2.3+build~7"
    copy = next(u for u in deploy["units"] if u["type"] == "Copy")
    assert copy["destination"] == "/opt/web/incoming/web-1.2.3_build_7.tar.gz"
    assert "fails the stage" in stage["on_failure"]
    # nothing was recorded (and the hosts above do not exist: nothing was contacted)
    db = tmp_path / "home" / "vmfarm.db"
    if db.exists():
        with sqlite3.connect(db) as conn:
            assert conn.execute("select count(*) from execution").fetchone() == (0,)


def test_plan_text_names_the_gate_and_refuses_bad_input(tmp_path: Path) -> None:
    env = base_env(VMFARM_HOME=str(tmp_path / "home"))
    res = run_vmfarm("plan", *FILES, "--set", "tag=1.2.3", env=env)
    assert res.returncode == 0, res.stderr
    assert "Canary: deploy to 1 host(s): 127.0.1.231 -> verification gate" in res.stdout
    assert "region r2 (queue vmfarm.r2): 2 host(s)" in res.stdout
    assert "[start] script:" in res.stdout
    missing = run_vmfarm("plan", *FILES, env=env)
    assert missing.returncode == 2 and "runtime input <+input> has no value" in missing.stderr
    hostile = run_vmfarm("plan", *FILES, "--set", "tag=1.2.3; reboot", env=env)
    assert (
        hostile.returncode == 2
        and "artifact tag '1.2.3; reboot' is not a version" in hostile.stderr
    )
