"""docker-compose.yml rendered by the real compose client (`docker compose config` or
Debian's `docker-compose config`) with the committed .env.example: every service has a
healthcheck, one image is built once, the stack's secrets come from .env and none is written
in the file, and each process gets the settings it needs (and only those)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.unit.metric_names import REPO, tool

COMPOSE = REPO / "docker-compose.yml"
EXAMPLE = REPO / ".env.example"
SECRET_KEY = re.compile(r"PASSWORD|SECRET|_KEY$|TOKEN|AUTH|WEBHOOK", re.I)
REGION_WORKERS = ("worker-us-east-1", "worker-eu-west-1")


def _client() -> list[str]:
    if (
        shutil.which("docker")
        and subprocess.run(
            ["docker", "compose", "version"], capture_output=True, timeout=60
        ).returncode
        == 0
    ):
        return ["docker", "compose"]
    return [tool("docker-compose")]  # Debian's package docker-compose


def _env_file(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def _render(env_file: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    # Nothing from this process's environment may fill the file in: only the env file.
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in _env_file(EXAMPLE) and not k.startswith(("VMFARM_", "COMPOSE_"))
    }
    return subprocess.run(
        [
            *_client(),
            "--env-file",
            str(env_file),
            "-f",
            str(COMPOSE),
            "--project-directory",
            str(REPO),
            "config",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
    )


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    res = _render(EXAMPLE, tmp_path_factory.mktemp("compose"))
    assert res.returncode == 0, res.stderr
    data = yaml.safe_load(res.stdout)
    assert isinstance(data, dict)
    return data


def test_compose_config_accepts_the_file_with_the_example_env(rendered: dict[str, Any]) -> None:
    assert set(rendered["services"]) >= {
        "redis",
        "postgres",
        "control",
        "metrics",
        "flower",
        "prometheus",
        "grafana",
        *REGION_WORKERS,
    }


def test_every_service_has_a_healthcheck(rendered: dict[str, Any]) -> None:
    from app.health import ROLES

    for name, svc in rendered["services"].items():
        check = svc.get("healthcheck") or {}
        assert check.get("test") and not check.get("disable"), f"{name} has no healthcheck"
        test = check["test"]
        if "app.health" in test:  # our own check: a role app.health knows
            assert test[test.index("app.health") + 1] in ROLES, name


def test_one_image_is_built_once_and_reused(rendered: dict[str, Any]) -> None:
    by_image: dict[str, list[str]] = {}
    for name, svc in rendered["services"].items():
        if "build" in svc:
            by_image.setdefault(svc["image"], []).append(name)
    assert by_image == {"vmfarm:latest": ["control"], "vmfarm-sshd:latest": ["target-1"]}
    for name, svc in rendered["services"].items():
        if svc.get("image") in by_image and "build" not in svc:
            assert svc.get("pull_policy") == "never", name  # never pulled: built here


def test_no_secret_value_is_written_in_the_compose_file(rendered: dict[str, Any]) -> None:
    raw = COMPOSE.read_text()
    example = _env_file(EXAMPLE)
    secrets = {k: v for k, v in example.items() if SECRET_KEY.search(k) and v}
    assert {
        "POSTGRES_PASSWORD",
        "POSTGRES_WORKER_PASSWORD",
        "POSTGRES_SERVER_PASSWORD",
        "REDIS_PASSWORD",
        "REDIS_WORKER_PASSWORD",
        "REDIS_FLOWER_PASSWORD",
        "FLOWER_BASIC_AUTH",
        "GRAFANA_ADMIN_PASSWORD",
    } <= set(secrets)
    for key, value in secrets.items():
        assert value not in raw, f"the example value of {key} is written in the file"
        assert value.startswith(("change-me", "admin:change-me")), f"{key}: a real value?"
    # Every secret-looking setting and every URL with credentials is a ${VARIABLE} reference.
    data = yaml.safe_load(raw)
    for name, svc in data["services"].items():
        env = svc.get("environment") or {}
        assert isinstance(env, dict), name
        for key, value in env.items():
            text = str(value)
            # VMFARM_SECURITY_KEY names the mounted key file, not a secret value
            is_path = text.startswith("/run/vmfarm/keys/")
            if SECRET_KEY.search(key) and key != "GF_SECURITY_ADMIN_USER" and not is_path:
                assert text == "" or text.startswith("${"), (name, key)
            for userinfo in re.findall(r"://([^/@\s]*)@", text):
                assert ":${" in userinfo, (name, key, "a password written in a URL")
    # The old fixed password is gone; the example's values reach the services.
    assert "vmfarm:vmfarm@" not in raw
    control = rendered["services"]["control"]["environment"]
    assert control["VMFARM_DATABASE_URL"] == (
        f"postgresql://vmfarm:{example['POSTGRES_PASSWORD']}@postgres:5432/vmfarm"
    )
    assert (
        control["VMFARM_BROKER_URL"] == f"redis://vmfarm:{example['REDIS_PASSWORD']}@redis:6379/0"
    )
    region = rendered["services"]["worker-us-east-1"]["environment"]
    assert region["VMFARM_BROKER_URL"] == (
        f"redis://worker:{example['REDIS_WORKER_PASSWORD']}@redis:6379/0"
    )
    assert region["VMFARM_DATABASE_URL"] == (
        f"postgresql://vmfarm_region:{example['POSTGRES_WORKER_PASSWORD']}@postgres:5432/vmfarm"
    )
    assert (
        rendered["services"]["postgres"]["environment"]["POSTGRES_PASSWORD"]
        == example["POSTGRES_PASSWORD"]
    )
    assert (
        rendered["services"]["redis"]["environment"]["REDIS_PASSWORD"] == example["REDIS_PASSWORD"]
    )
    for key in ("REDIS_WORKER_PASSWORD", "REDIS_FLOWER_PASSWORD"):
        assert rendered["services"]["redis"]["environment"][key] == example[key]
    # No password on a command line (the ACL file is written from the environment).
    assert not any(
        v in " ".join(rendered["services"]["redis"]["command"]) for v in example.values() if v
    )


def test_a_missing_password_stops_compose_naming_it(tmp_path: Path) -> None:
    partial = tmp_path / "partial.env"
    partial.write_text(
        "".join(f"{k}={v}\n" for k, v in _env_file(EXAMPLE).items() if k != "POSTGRES_PASSWORD")
    )
    res = _render(partial, tmp_path)
    assert res.returncode != 0 and "POSTGRES_PASSWORD" in res.stderr


def test_each_process_gets_the_settings_it_uses(rendered: dict[str, Any]) -> None:
    services = rendered["services"]
    # Notifications are sent by the control worker.
    notify = (
        "VMFARM_SMTP_HOST",
        "VMFARM_SMTP_PORT",
        "VMFARM_SMTP_FROM",
        "VMFARM_SMTP_USER",
        "VMFARM_SMTP_PASSWORD",
        "SLACK_WEBHOOK_URL",
        "DEPLOY_WEBHOOK_URL",
    )
    for key in notify:
        assert key in services["control"]["environment"], key
    # Secrets are resolved by the region workers (and the autoscaler's workers).
    for name in (*REGION_WORKERS, "autoscaler"):
        assert "VMFARM_SECRETS_KEY" in services[name]["environment"], name
    for name in ("control", "flower", "metrics"):
        env = services[name]["environment"]
        assert "VMFARM_SECRETS_KEY" not in env, name
        if name != "control":
            assert not set(notify) & set(env), name
    assert "FLOWER_BASIC_AUTH" in services["flower"]["environment"]


def test_prometheus_and_grafana_get_the_rules_and_the_dashboard(rendered: dict[str, Any]) -> None:
    def mounts(name: str) -> dict[str, str]:
        out = {}
        for v in rendered["services"][name]["volumes"]:
            if isinstance(v, dict):
                out[v["target"]] = v.get("source", "")
            else:
                src, dst = v.split(":")[:2]
                out[dst] = src
        return out

    prom = mounts("prometheus")
    conf_dir = Path(prom["/etc/prometheus"])
    assert (conf_dir / "prometheus.yml").is_file() and (conf_dir / "alerts.yaml").is_file()
    config = yaml.safe_load((conf_dir / "prometheus.yml").read_text())
    assert config["rule_files"] == ["alerts.yaml"]
    targets = {
        t for job in config["scrape_configs"] for c in job["static_configs"] for t in c["targets"]
    }
    assert "metrics:9464" in targets
    assert "9464" in " ".join(rendered["services"]["metrics"]["command"])
    graf = mounts("grafana")
    assert (
        Path(graf["/etc/grafana/dashboards/vmfarm.json"])
        == REPO / "configs" / "grafana" / "vmfarm.json"
    )
    assert (Path(graf["/etc/grafana/provisioning"]) / "dashboards" / "vmfarm.yaml").is_file()
