"""End to end on real services: Redis broker, PostgreSQL ledger, two region worker processes
(vmfarm.r1, vmfarm.r2), a control worker, and six sshd lab hosts split over the two regions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sqlmodel import Session, create_engine, select

from app.db import normalise_url
from app.models import Execution, HostStepRun, Instance, LogChunk
from tests.conftest import DATA, Cluster
from tests.waiting import wait_for

PIPELINE = str(DATA / "itest" / "pipeline.yaml")


def _rows(cluster: Cluster, execution_id: str) -> list[HostStepRun]:
    eng = create_engine(normalise_url(cluster.env["VMFARM_DATABASE_URL"]))
    with Session(eng) as s:
        rows = list(
            s.exec(
                select(HostStepRun).where(
                    HostStepRun.execution_id == execution_id, HostStepRun.kind == "deploy"
                )
            )
        )
    eng.dispose()
    return rows


def _execution_id(stderr: str) -> str:
    for line in stderr.splitlines():
        if line.startswith("execution "):
            return line.split()[1]
    raise AssertionError(f"no execution id in: {stderr}")


def _host_file(lab: Any, address: str, rel: str) -> Path:
    host = next(h for h in lab.hosts if h.address == address)
    return Path(host.host_dir) / "opt" / rel


def test_pipeline_runs_on_every_host_through_its_region_queue(cluster: Cluster, lab: Any) -> None:
    # Given six lab hosts in regions r1 and r2 and one worker per region
    # When the pipeline runs with Redis, PostgreSQL and the workers
    res = cluster.vmfarm("run", PIPELINE, str(lab.infrastructure_file), "--set", "tag=2.0.1")
    assert res.returncode == 0, res.stdout + res.stderr + cluster.worker_logs()
    ex_id = _execution_id(res.stderr)

    # Then every step ran on every host, through the queue of that host's region
    rows = _rows(cluster, ex_id)
    regions = {h.address: h.region for h in lab.hosts}
    assert sorted({r.host for r in rows}) == sorted(regions)
    assert len(rows) == 2 * len(regions)
    for r in rows:
        assert r.status == "SUCCEEDED", (r.host, r.step_id, r.error, r.stderr_tail)
        assert r.queue == f"vmfarm.{regions[r.host]}"
        assert r.worker == f"w-{regions[r.host]}@test"
    # and the hosts themselves hold the evidence, each in its own private /opt
    for h in lab.hosts:
        record = _host_file(lab, h.address, "itest/record").read_text().splitlines()
        mine = [line for line in record if line.startswith(ex_id)]
        assert mine == [f"{ex_id} {h.address} {h.address} {h.region} itest-marker"]
        # the artifact was copied and unpacked; the output variable reached the next step
        assert _host_file(lab, h.address, "itest/itest_app-2.0.1.tar.gz").is_file()
        checked = _host_file(lab, h.address, "itest/checked").read_text().splitlines()
        assert f"{ex_id} {h.address}" in checked

    # and status --output json reports each host's outcome and version
    st = cluster.vmfarm("status", ex_id, "--output", "json")
    assert st.returncode == 0, st.stderr
    report = json.loads(st.stdout)
    assert report["status"] == "SUCCEEDED"
    hosts = {h["host"]: h for h in report["stages"][0]["hosts"]}
    assert set(hosts) == set(regions)
    for addr, h in hosts.items():
        assert h["status"] == "SUCCEEDED"
        assert h["region"] == regions[addr]
        assert h["version"] == "2.0.1"
        assert [s["status"] for s in h["steps"]] == ["SUCCEEDED", "SUCCEEDED"]

    # and logs were stored in batches, readable per host
    logs = cluster.vmfarm("logs", ex_id, "--host", lab.hosts[0].address)
    assert f"recorded on {lab.hosts[0].address}" in logs.stdout
    assert "payload of the integration test artifact" in logs.stdout


def test_one_failing_host_fails_the_run_and_keeps_every_other_result(
    cluster: Cluster, lab: Any
) -> None:
    bad = lab.hosts[2].address
    res = cluster.vmfarm(
        "run",
        PIPELINE,
        str(lab.infrastructure_file),
        "--set",
        "tag=2.0.2",
        "--set",
        f"fail_host={bad}",
    )
    assert res.returncode == 1, res.stdout + res.stderr
    ex_id = _execution_id(res.stderr)
    rows = {(r.host, r.step_id): r for r in _rows(cluster, ex_id)}
    failed = rows[(bad, "check")]
    assert failed.status == "FAILED"
    assert failed.failed_unit == "check"
    assert failed.exit_code == 3
    assert "boom" in (failed.stderr_tail or "")
    for h in lab.hosts:
        if h.address != bad:
            assert rows[(h.address, "record")].status == "SUCCEEDED"
            assert rows[(h.address, "check")].status == "SUCCEEDED"
    # The CLI names the host, the unit, the exit code and the stderr tail.
    assert (
        f"{bad} ({lab.hosts[2].region}): step check, unit check, exit 3: boom: {bad} was "
        "told to fail"
    ) in res.stdout
    report = json.loads(cluster.vmfarm("status", ex_id, "--output", "json").stdout)
    assert report["status"] == "FAILED"
    statuses = {h["host"]: h["status"] for h in report["stages"][0]["hosts"]}
    assert statuses.pop(bad) == "FAILED"
    assert set(statuses.values()) == {"SUCCEEDED"}


def test_duplicate_delivery_runs_the_commands_once(
    cluster: Cluster, lab: Any, in_process_app: Any
) -> None:
    from tasks.deploy import run_step

    res = cluster.vmfarm("run", PIPELINE, str(lab.infrastructure_file), "--set", "tag=2.0.3")
    assert res.returncode == 0, res.stdout + res.stderr
    ex_id = _execution_id(res.stderr)
    host = lab.hosts[1]
    row = next(r for r in _rows(cluster, ex_id) if r.host == host.address and r.step_index == 0)
    key = {"e": ex_id, "s": 0, "p": 0, "h": host.address, "i": 0, "a": 1, "region": host.region}
    # The same message delivered again, twice, to the region's worker.
    results = [run_step.apply_async(kwargs={"key": key}).get(timeout=60) for _ in range(2)]
    assert all(r["duplicate"] and r["status"] == "SUCCEEDED" for r in results)
    record = _host_file(lab, host.address, "itest/record").read_text().splitlines()
    assert len([line for line in record if line.startswith(ex_id)]) == 1
    assert len([r for r in _rows(cluster, ex_id) if r.idem_key == row.idem_key]) == 1


def test_ledger_records_instances_and_batched_logs(cluster: Cluster, lab: Any) -> None:
    first = cluster.vmfarm("run", PIPELINE, str(lab.infrastructure_file), "--set", "tag=3.0.0")
    second = cluster.vmfarm("run", PIPELINE, str(lab.infrastructure_file), "--set", "tag=3.0.1")
    assert first.returncode == 0 and second.returncode == 0, second.stdout + second.stderr
    eng = create_engine(normalise_url(cluster.env["VMFARM_DATABASE_URL"]))
    with Session(eng) as s:
        inst = list(s.exec(select(Instance).where(Instance.service == "itest_app")))
        ex = s.get(Execution, _execution_id(second.stderr))
        n_chunks = len(list(s.exec(select(LogChunk))))
        n_rows = len(list(s.exec(select(HostStepRun))))
    eng.dispose()
    assert ex is not None and ex.status == "SUCCEEDED"
    assert {i.host for i in inst} == {h.address for h in lab.hosts}
    assert {(i.version, i.previous_version) for i in inst} == {("3.0.1", "3.0.0")}
    # One or two chunks per host step (a chunk per unit and stream), not one per line.
    assert n_chunks <= 4 * n_rows


def test_work_that_expired_in_a_queue_fails_its_host_instead_of_hanging(
    cluster: Cluster, lab: Any, tmp_path: Path
) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import REPO

    # Given one host in region r3, where no worker runs yet, and steps that expire after 2 s
    late = lab.hosts[5].address
    infra = (
        Path(lab.infrastructure_file)
        .read_text()
        .replace(
            f"- hostname: {late}\n        region: r2", f"- hostname: {late}\n        region: r3"
        )
    )
    assert "region: r3" in infra
    path = tmp_path / "infra.yaml"
    path.write_text(infra)
    env = {**cluster.env, "VMFARM_DISPATCH_EXPIRES": "2"}
    from tests.conftest import run_vmfarm

    sub = run_vmfarm("run", PIPELINE, str(path), "--set", "tag=4.0.0", "--detach", env=env)
    assert sub.returncode == 0, sub.stderr
    ex_id = sub.stdout.strip().splitlines()[-1]
    # When a worker for r3 starts only after the step expired (the behaviour under test: the
    # broker's message carries an absolute expiry time, 2 s after dispatch, that only the real
    # clock can pass; 4 s is past it whenever the dispatch happened during `run --detach`)
    time.sleep(4)
    log = tmp_path / "w-r3.log"
    with log.open("wb") as fh:
        worker = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "worker", "--region", "r3", "-n", "w-r3@test"],
            env=env,
            cwd=REPO,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def ended() -> dict[str, Any] | None:
        got: dict[str, Any] = json.loads(cluster.vmfarm("status", ex_id, "-o", "json").stdout)
        return got if got["status"] in ("SUCCEEDED", "FAILED") else None

    try:
        report: dict[str, Any] = wait_for(
            ended, 60, "the execution to end", interval=0.5, explain=lambda: log.read_text()[-3000:]
        )
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(timeout=30)
    # Then the stale work did not run, that host failed, and the execution ended
    assert report["status"] == "FAILED", log.read_text()[-3000:]
    hosts = {h["host"]: h for h in report["stages"][0]["hosts"]}
    lost = hosts.pop(late)
    assert lost["status"] == "FAILED"
    assert "expired" in (lost["steps"][0]["error"] or "")
    assert lost["steps"][0]["error_class"] == "Timeout"
    assert [s["status"] for s in lost["steps"]] == ["FAILED", "SKIPPED"]
    assert {h["status"] for h in hosts.values()} == {"SUCCEEDED"}
    record = _host_file(lab, late, "itest/record").read_text()
    assert ex_id not in record


def test_a_second_copy_of_a_running_host_message_leaves_the_later_steps_to_the_first(
    cluster: Cluster, lab: Any, in_process_app: Any, tmp_path: Path
) -> None:
    """A message delivered twice (a publish sent again after Redis cut it, a redelivery) while
    the first copy still runs the host's first step: the copy must not run the host's second
    step before the first step has ended on that host (it would find no artifact there)."""
    from tasks.deploy import run_host

    slow = tmp_path / "slow.yaml"
    # The same pipeline with a slow first step (its artifact read from where it lives)
    text = (
        Path(PIPELINE).read_text().replace("path: ./payload", f"path: {DATA / 'itest' / 'payload'}")
    )
    assert text.count('mkdir -p "$DIR"\n') == 1
    slow.write_text(text.replace('mkdir -p "$DIR"\n', "sleep 6\n" + " " * 32 + 'mkdir -p "$DIR"\n'))
    sub = cluster.vmfarm(
        "run", str(slow), str(lab.infrastructure_file), "--set", "tag=5.0.0", "--detach"
    )
    assert sub.returncode == 0, sub.stdout + sub.stderr
    ex_id = sub.stdout.strip().splitlines()[-1]
    host = lab.hosts[0]

    def first_step_running() -> bool:
        return any(
            r.host == host.address and r.step_index == 0 and r.status == "RUNNING"
            for r in _rows(cluster, ex_id)
        )

    wait_for(first_step_running, timeout=60, what="the host's first step to start")
    key = {"e": ex_id, "s": 0, "p": 0, "h": host.address, "i": 0, "a": 1, "region": host.region}

    copy = run_host.apply_async(kwargs={"key": key, "until": 2}).get(timeout=60)

    assert copy.get("duplicate") and copy["status"] == "RUNNING", copy

    def ended() -> bool:
        report = json.loads(cluster.vmfarm("status", ex_id, "--output", "json").stdout)
        return report["status"] in ("SUCCEEDED", "FAILED", "ABORTED")

    wait_for(ended, timeout=120, what="the execution to end")
    report = json.loads(cluster.vmfarm("status", ex_id, "--output", "json").stdout)
    assert report["status"] == "SUCCEEDED", report
    rows = sorted(
        (r for r in _rows(cluster, ex_id) if r.host == host.address), key=lambda r: r.step_index
    )
    assert [(r.step_index, r.status) for r in rows] == [(0, "SUCCEEDED"), (1, "SUCCEEDED")]
    assert rows[0].finished_at is not None and rows[1].started_at >= rows[0].finished_at
    checked = _host_file(lab, host.address, "itest/checked").read_text().splitlines()
    assert len([line for line in checked if line.startswith(ex_id)]) == 1
