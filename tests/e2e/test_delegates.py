"""`vmfarm worker`, `vmfarm workers` and `vmfarm hosts` where they need no broker, as a user runs
them: refused tags, unknown queue depths without Redis, the hosts of a pipeline's
infrastructures and bad input (exit 2). Tags and routing are in tests/unit/test_delegates.py,
the real worker fleet in tests/service/test_delegates.py.
"""

from __future__ import annotations

import json
from pathlib import Path

from app.celery import CONTROL_QUEUE
from tests.conftest import DATA, base_env, run_vmfarm

GPU, PLAIN = "w-gpu@delegates", "w-plain@delegates"


# --- names and routing (no services) --------------------------------------------------------------


# --- command line ---------------------------------------------------------------------------------


def test_worker_tags_are_validated(tmp_path: Path) -> None:
    # Refused before the broker is reached: nothing listens at this URL (a closed port).
    env = base_env(VMFARM_HOME=str(tmp_path), VMFARM_BROKER_URL="redis://127.0.0.1:1/0")
    for args, says in (
        (["--region", "rz", "--tags", "GPU"], "invalid worker tag"),
        (["--region", "rz", "--tags", "a,b,c,d,e,f,g"], "at most 6"),
        (["--control", "--tags", "gpu"], "give --region"),
    ):
        res = run_vmfarm("worker", *args, env=env, timeout=60)
        assert res.returncode == 2 and says in res.stderr, res.stderr


def test_workers_without_a_redis_broker_shows_unknown_depths(tmp_path: Path) -> None:
    env = base_env(VMFARM_HOME=str(tmp_path))
    res = run_vmfarm("workers", "-o", "json", env=env)
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["broker"] == "other" and report["workers"] == []
    assert {q["name"]: q["depth"] for q in report["queues"]} == {CONTROL_QUEUE: None}


def test_hosts_lists_the_hosts_of_a_pipelines_infrastructures(tmp_path: Path) -> None:
    env = base_env(VMFARM_HOME=str(tmp_path))
    good = str(DATA / "good")
    text = run_vmfarm("hosts", good, env=env)
    assert text.returncode == 0, text.stderr
    assert "test_hosts" in text.stdout and "static" in text.stdout
    assert "127.0.1.201" in text.stdout and "127.0.1.202" in text.stdout

    res = run_vmfarm("hosts", good, "--infra", "test_hosts", "-o", "json", env=env)
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["pipeline"] == "hello"
    [infra] = data["infrastructures"]
    assert (infra["identifier"], infra["provider"], infra["region"], infra["stages"]) == (
        "test_hosts",
        "static",
        "r1",
        ["deploy"],
    )
    assert [(h["name"], h["address"], h["region"]) for h in infra["hosts"]] == [
        ("127.0.1.201", "127.0.1.201", "r1"),
        ("127.0.1.202", "127.0.1.202", "r2"),
    ]
    assert {"public_ip", "private_ip", "slot"} <= set(infra["hosts"][0])


def test_hosts_refuses_bad_input_with_exit_2(tmp_path: Path) -> None:
    env = base_env(VMFARM_HOME=str(tmp_path))
    bad = DATA / "bad" / "infra_no_hosts.yaml"
    res = run_vmfarm("hosts", str(bad), env=env)
    assert res.returncode == 2
    assert f"{bad}:" in res.stderr and "needs at least one host" in res.stderr
    res = run_vmfarm("hosts", str(DATA / "good"), "--infra", "nope", env=env)
    assert res.returncode == 2 and "no infrastructure 'nope'" in res.stderr
    res = run_vmfarm("hosts", str(tmp_path / "missing.yaml"), env=env)
    assert res.returncode == 2 and "no such file" in res.stderr
