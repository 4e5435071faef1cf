"""`vmfarm flower` for real, on Redis databases leased from the allocator, behind basic auth.
The compose file and the images are checked in tests/unit/test_compose.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from base64 import b64encode
from collections.abc import Callable
from pathlib import Path

from tests.conftest import base_env
from tests.waiting import wait_for

VMFARM = [
    sys.executable,
    "-c",
    "import sys; from cli.main import main; sys.argv[0] = 'vmfarm'; main()",
]


# --- vmfarm flower --------------------------------------------------------------------------------


def _get(url: str, auth: str | None = None) -> int:
    req = urllib.request.Request(url)
    if auth:
        req.add_header("Authorization", "Basic " + b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def test_vmfarm_flower_serves_the_app_behind_basic_auth(
    tmp_path: Path, free_port: Callable[[], int], redis_db: Callable[[], str]
) -> None:
    port = free_port()
    env = base_env(
        VMFARM_BROKER_URL=redis_db(),
        VMFARM_RESULT_BACKEND=redis_db(),
        VMFARM_HOME=str(tmp_path),
        FLOWER_BASIC_AUTH="admin:s3cret",
    )
    log = tmp_path / "flower.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen(
            [*VMFARM, "flower", "--port", str(port)],
            env=env,
            cwd=tmp_path,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        assert proc.poll() is None, log.read_text()
        try:
            return _get(f"{base}/healthcheck") == 200
        except OSError:
            return False

    try:
        wait_for(
            healthy, 90, "flower to answer its health check", interval=0.3, explain=log.read_text
        )
        assert _get(f"{base}/") == 401
        assert _get(f"{base}/", "admin:wrong") == 401
        assert _get(f"{base}/", "admin:s3cret") == 200
        assert _get(f"{base}/api/workers", "admin:s3cret") == 200
        argv = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        assert b"s3cret" not in argv  # the password is not on the command line
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
