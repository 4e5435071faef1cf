"""One retry engine: a retried attempt is recorded in the ledger before it waits and is sent with
a countdown, so nothing (a gate, the reconciler) judges a phase while an attempt is pending, and
no worker thread sleeps between attempts."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from tests.conftest import DATA, Cluster, run_vmfarm

FILES = [str(DATA / "retry_wait")]


def _report(env: dict[str, str], ex_id: str) -> dict[str, Any]:
    res = run_vmfarm("status", ex_id, "-o", "json", env=env)
    assert res.returncode in (0, 1), res.stderr
    return dict(json.loads(res.stdout))


def _poll(check: Callable[[], Any], seconds: float, what: str) -> Any:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _attempts(cluster: Cluster, ex_id: str, host: str) -> list[str]:
    import psycopg

    url = cluster.env["VMFARM_DATABASE_URL"]
    with psycopg.connect(url) as db:
        rows = db.execute(
            "select attempt, status from hoststeprun where execution_id=%s and "
            "host=%s and step_id in ('flaky', '') and step_index=0 "
            "order by attempt",
            (ex_id, host),
        ).fetchall()
    return [f"{a}:{s}" for a, s in rows]


def _finished(report: dict[str, Any]) -> list[datetime]:
    return [
        datetime.fromisoformat(s["finished_at"].rstrip("Z"))
        for h in report["stages"][0]["hosts"]
        for s in h["steps"]
        if s.get("finished_at")
    ]


def test_a_phase_waits_for_a_retry_whose_interval_is_longer_than_the_heartbeat_timeout(
    cluster: Cluster, lab: Any
) -> None:
    # Given a step that fails once on one host and is retried after 20 s, and a reconciler whose
    # heartbeat timeout (1 s) is far shorter than that wait
    flaky = lab.hosts[0].address
    res = cluster.vmfarm(
        "run",
        *FILES,
        str(lab.infrastructure_file),
        "--set",
        f"flaky_host={flaky}",
        "--set",
        "failures=1",
        "--detach",
        "-o",
        "json",
    )
    assert res.returncode == 0, res.stdout + res.stderr
    ex_id = json.loads(res.stdout)["id"]
    impatient = {**cluster.env, "VMFARM_HEARTBEAT_TIMEOUT": "1"}

    # When the first attempt has failed and every other host has finished
    _poll(lambda: "1:FAILED" in _attempts(cluster, ex_id, flaky), 60, "attempt 1 to fail")

    def others_done() -> bool:
        hosts = _report(cluster.env, ex_id)["stages"][0]["hosts"]
        return all(h["status"] == "SUCCEEDED" for h in hosts if h["host"] != flaky)

    _poll(others_done, 60, "the other hosts to finish")
    # and the phase has been quiet for longer than the heartbeat timeout, so that a phase whose
    # hosts were all done would be judged by the reconciler,
    _poll(
        lambda: (
            datetime.utcnow() - max(_finished(_report(cluster.env, ex_id))) > timedelta(seconds=1.5)
        ),
        10,
        "the phase to be quiet for 1.5 s",
    )
    rec = run_vmfarm("reconcile", "-o", "json", env=impatient)
    assert rec.returncode == 0, rec.stderr

    # Then (in one reading of the ledger) the waiting attempt is there, and the phase is not
    # judged
    report = _report(cluster.env, ex_id)
    host = next(h for h in report["stages"][0]["hosts"] if h["host"] == flaky)
    assert (host["steps"][0]["attempt"], host["steps"][0]["status"]) == (2, "PENDING"), host
    assert report["status"] == "RUNNING", (report.get("error"), report["stages"][0]["phases"])
    deploy = [p for p in report["stages"][0]["phases"] if p["kind"] == "deploy"]
    assert deploy and all(p["status"] == "RUNNING" for p in deploy), deploy

    # and the last attempt runs, is recorded, and decides the run
    done = _poll(
        lambda: (
            (r := _report(cluster.env, ex_id))["status"] in ("SUCCEEDED", "FAILED", "ABORTED") and r
        ),
        90,
        "the run to end",
    )
    assert done["status"] == "SUCCEEDED", done.get("error")
    assert _attempts(cluster, ex_id, flaky) == ["1:FAILED", "2:SUCCEEDED"]
    host = next(h for h in lab.hosts if h.address == flaky)
    log = Path(host.host_dir) / "opt" / "fs" / f"{ex_id}.log"
    assert log.read_text().split() == ["try", "try", "after"]
