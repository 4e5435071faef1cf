"""`vmfarm flower`'s refusals through the command line (no credentials, credentials on the
command line, no broker), and `docker compose config` on the compose file when a client is
installed. The compose file's structure is checked in tests/unit/test_compose.py.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import REPO, base_env

COMPOSE = REPO / "docker-compose.yml"
VMFARM = [
    sys.executable,
    "-c",
    "import sys; from cli.main import main; sys.argv[0] = 'vmfarm'; main()",
]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())  # merge keys (<<) resolved as compose does
    assert isinstance(data, dict)
    return data


def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return dict(compose["services"])


def test_vmfarm_flower_refuses_to_start_without_credentials_or_broker(tmp_path: Path) -> None:
    # Refused before the broker is reached: nothing listens at this URL (a closed port).
    env = base_env(VMFARM_BROKER_URL="redis://127.0.0.1:1/0", VMFARM_HOME=str(tmp_path))
    for extra, args, says in (
        ({}, [], "set FLOWER_BASIC_AUTH"),
        ({"FLOWER_BASIC_AUTH": "admin"}, [], "is not user:password"),
        ({"FLOWER_BASIC_AUTH": "a:b"}, ["--basic-auth=a:b"], "not on the command line"),
    ):
        res = subprocess.run(
            [*VMFARM, "flower", *args],
            env={**env, **extra},
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert res.returncode == 2 and says in res.stderr, res.stderr
    res = subprocess.run(
        [*VMFARM, "flower"],
        env=base_env(VMFARM_HOME=str(tmp_path), FLOWER_BASIC_AUTH="a:b"),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 2 and "needs a broker" in res.stderr
