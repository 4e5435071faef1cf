"""Workers take work only from the control plane: a task message must carry a signature by a
key whose certificate is in the worker's store. Tried as an attacker who can reach Redis."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from sqlmodel import Session, create_engine, select

from app.canvas import HostStepKey
from app.db import normalise_url
from app.models import HostStepRun
from tests.conftest import REPO, Cluster, base_env
from tests.service.conftest import Keys, SignedRun

UNSIGNED = r"""
import json, sys, uuid
from kombu import Connection, Exchange, Queue

broker, key = sys.argv[1], json.loads(sys.argv[2])
tid = str(uuid.uuid4())
exchange = Exchange("vmfarm", type="direct")
with Connection(broker) as conn:
    conn.Producer().publish(
        [[], {"key": key, "until": key["i"] + 1},
         {"callbacks": None, "errbacks": None, "chain": None, "chord": None}],
        exchange=exchange, routing_key="vmfarm.r1", serializer="json",
        headers={"lang": "py", "task": "vmfarm.run_host", "id": tid, "root_id": tid,
                 "parent_id": None, "group": None, "shadow": None, "eta": None,
                 "expires": None, "retries": 0, "timelimit": [None, None],
                 "argsrepr": "()", "kwargsrepr": "{}", "origin": "attacker@nowhere"},
        declare=[Queue("vmfarm.r1", exchange, routing_key="vmfarm.r1")])
print(tid)
"""

SEND = r"""
import json, sys
from app.celery import app

key = json.loads(sys.argv[1])
print(app.send_task("vmfarm.run_host", kwargs={"key": key, "until": key["i"] + 1}).id)
"""


def _rows(cluster: Cluster, **where: Any) -> list[HostStepRun]:
    eng = create_engine(normalise_url(cluster.env["VMFARM_DATABASE_URL"]))
    try:
        with Session(eng) as s:
            q = select(HostStepRun)
            for k, v in where.items():
                q = q.where(getattr(HostStepRun, k) == v)
            return list(s.exec(q).all())
    finally:
        eng.dispose()


def _wait_for(what: str, check: Any, cluster: Cluster, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise AssertionError(f"{what} did not happen within {timeout}s\n{cluster.worker_logs()}")


def _records(lab: Any, address: str) -> list[str]:
    host = next(h for h in lab.hosts if h.address == address)
    return (Path(host.host_dir) / "opt" / "itest" / "record").read_text().splitlines()


def test_a_signed_run_goes_through_both_regions(
    secure_cluster: Cluster, signed_run: SignedRun, lab: Any
) -> None:
    # The run (a chord per phase: chains continued and gates published by the workers
    # themselves, each with its own key) succeeded on every host through its region
    rows = _rows(secure_cluster, execution_id=signed_run.execution_id, kind="deploy")
    regions = {h.address: h.region for h in lab.hosts}
    assert sorted({r.host for r in rows}) == sorted(regions)
    assert all(r.status == "SUCCEEDED" for r in rows), [(r.host, r.error) for r in rows]
    assert {r.worker for r in rows} == {"s-r1@test", "s-r2@test"}


def test_a_task_published_to_redis_without_a_valid_signature_runs_nothing(
    secure_cluster: Cluster, signed_run: SignedRun, signing_keys: Keys, lab: Any, tmp_path: Path
) -> None:
    from app.signing import init_keys

    # Given a host of region r1 that the signed run deployed to
    [first] = _rows(
        secure_cluster,
        execution_id=signed_run.execution_id,
        region="r1",
        step_index=0,
        kind="deploy",
    )[:1]
    before = _records(lab, first.host)
    key = HostStepKey(
        execution=first.execution_id,
        stage=first.stage_index,
        phase=first.phase,
        host=first.host,
        step=0,
        attempt=91,
        region="r1",
    )
    broker = secure_cluster.env["VMFARM_BROKER_URL"]

    # When an attacker who reaches Redis publishes vmfarm.run_host for it as plain JSON
    out = subprocess.run(
        [sys.executable, "-c", UNSIGNED, broker, json.dumps(key.to_dict())],
        env=base_env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    # and again signed with a key of their own, presented as the server's certificate
    attacker = init_keys(tmp_path / "attacker", "server")
    forged = {
        **secure_cluster.env,
        "VMFARM_SECURITY_KEY": str(attacker.key),
        "VMFARM_SECURITY_CERTIFICATE": str(signing_keys.root / "server.pem"),
    }
    forged_key = {**key.to_dict(), "a": 92}
    out = subprocess.run(
        [sys.executable, "-c", SEND, json.dumps(forged_key)],
        env=forged,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr

    # Then the region's worker refuses both, saying so with the queue and the task
    log = secure_cluster.logs[0]  # s-r1
    refusal = "refused a message on queue vmfarm.r1 for task vmfarm.run_host"
    _wait_for(
        "two refusals in the r1 worker's log",
        lambda: log.read_text(errors="replace").count(refusal) >= 2,
        secure_cluster,
    )
    text = log.read_text(errors="replace")
    assert "not signed" in text and "signature does not verify" in text

    # When the control plane sends the same work, signed with its key
    signed_key = {**key.to_dict(), "a": 93}
    out = subprocess.run(
        [sys.executable, "-c", SEND, json.dumps(signed_key)],
        env=secure_cluster.env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    # Then that one runs (the worker could run it: the refusals were the signature's)
    idem = HostStepKey.from_dict(signed_key).idem
    _wait_for(
        "the signed step",
        lambda: any(r.status == "SUCCEEDED" for r in _rows(secure_cluster, idem_key=idem)),
        secure_cluster,
    )
    # and nothing of the refused ones ran: no ledger row, one new line on the host
    for attempt in (91, 92):
        assert (
            _rows(
                secure_cluster, idem_key=HostStepKey.from_dict({**key.to_dict(), "a": attempt}).idem
            )
            == []
        )
    assert len(_records(lab, first.host)) == len(before) + 1
