"""`vmfarm flower`'s refusals through the command line (no credentials, credentials on the
command line, no broker), and `docker compose config` on the compose file when a client is
installed. The compose file's structure is checked in tests/unit/test_compose.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import REPO, base_env

COMPOSE = REPO / "docker-compose.yml"
VMFARM = [sys.executable, "-c", "import sys; from cli.main import main; "
          "from cli import service_cmd; service_cmd.register(main); sys.argv[0] = 'vmfarm'; "
          "main()"]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())  # merge keys (<<) resolved as compose does
    assert isinstance(data, dict)
    return data


def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return dict(compose["services"])


def _compose_client() -> list[str] | None:
    for cmd in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(cmd[0]) is None:
            continue
        if subprocess.run([*cmd, "version"], capture_output=True, timeout=60).returncode == 0:
            return cmd
    return None


def test_docker_compose_config_accepts_the_file_when_a_client_is_installed(
        compose: dict[str, Any], tmp_path: Path) -> None:
    client = _compose_client()
    # Always: the file is plain YAML with the compose top-level keys only.
    assert set(compose) <= {"services", "volumes", "networks", "secrets", "configs", "name"} | {
        k for k in compose if k.startswith("x-")}
    if client is None:
        return  # no docker compose client on this machine: the structural checks above stand
    env = {**os.environ, "FLOWER_BASIC_AUTH": "admin:secret"}
    res = subprocess.run([*client, "-f", str(COMPOSE), "config"], capture_output=True,
                         text=True, env=env, timeout=120, cwd=REPO)
    assert res.returncode == 0, res.stderr
    rendered = yaml.safe_load(res.stdout)
    assert set(rendered["services"]) == set(services(compose))
    assert rendered["services"]["flower"]["environment"]["FLOWER_BASIC_AUTH"] == "admin:secret"
    env.pop("FLOWER_BASIC_AUTH")
    res = subprocess.run([*client, "-f", str(COMPOSE), "config"], capture_output=True,
                         text=True, env=env, timeout=120, cwd=REPO)
    assert res.returncode != 0 and "FLOWER_BASIC_AUTH" in res.stderr


# --- vmfarm flower --------------------------------------------------------------------------------


def test_vmfarm_flower_refuses_to_start_without_credentials_or_broker(tmp_path: Path) -> None:
    # Refused before the broker is reached: nothing listens at this URL (a closed port).
    env = base_env(VMFARM_BROKER_URL="redis://127.0.0.1:1/0", VMFARM_HOME=str(tmp_path))
    for extra, args, says in (({}, [], "set FLOWER_BASIC_AUTH"),
                              ({"FLOWER_BASIC_AUTH": "admin"}, [], "is not user:password"),
                              ({"FLOWER_BASIC_AUTH": "a:b"}, ["--basic-auth=a:b"],
                               "not on the command line")):
        res = subprocess.run([*VMFARM, "flower", *args], env={**env, **extra}, cwd=REPO,
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 2 and says in res.stderr, res.stderr
    res = subprocess.run([*VMFARM, "flower"], env=base_env(VMFARM_HOME=str(tmp_path),
                                                           FLOWER_BASIC_AUTH="a:b"),
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "needs a broker" in res.stderr
