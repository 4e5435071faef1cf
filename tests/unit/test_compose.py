"""docker-compose.yml and the images, and `vmfarm flower`'s refusals.

There is no Docker engine here: the compose file is checked structurally (services, builds,
environment, dependencies, mounts), every vmfarm command in it is parsed by the real click
command, the files it mounts and points at are loaded as vmfarm would, and `docker compose
config` (or `docker-compose config`) also validates it when a client is installed. Flower runs
for real in tests/service/test_compose.py.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

from app.autoscale import load_config
from app.schedules import load_schedules
from cli.commands import fleet
from cli.commands import service as service_cmd
from tests.conftest import REPO, base_env, run_vmfarm

COMPOSE = REPO / "docker-compose.yml"
IMAGE_ROOT = "/srv/vmfarm"
REGIONS = {"worker-us-east-1": "us-east-1", "worker-eu-west-1": "eu-west-1"}
TARGETS = ["target-1", "target-2", "target-3"]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())  # merge keys (<<) resolved as compose does
    assert isinstance(data, dict)
    return data


def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return dict(compose["services"])


def vmfarm_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in services(compose).items() if s.get("image") == "vmfarm:latest"}


def parse(command: click.Command, args: list[str]) -> dict[str, Any]:
    """Parse ``args`` as click would for ``vmfarm <command>``, without running it."""
    ctx = command.make_context(command.name or "vmfarm", list(args))
    return dict(ctx.params)


def split_mount(mount: str) -> list[str]:
    """``src:dst[:mode]`` of a short volume syntax, ``${VAR:-default}`` in src kept whole."""
    src = ""
    m = re.match(r"^(\$\{[^}]*\})", mount)
    if m:
        src, mount = m.group(1), mount[m.end() :]
    first, *rest = mount.split(":")
    return [src + first, *rest]


def in_repo(container_path: str) -> Path:
    """A path under the image's /srv/vmfarm/configs as the repository's (it is mounted)."""
    assert container_path.startswith(f"{IMAGE_ROOT}/configs/"), container_path
    return REPO / container_path[len(IMAGE_ROOT) + 1 :]


def test_the_services_are_there_with_their_images(compose: dict[str, Any]) -> None:
    assert set(services(compose)) == {
        "redis",
        "postgres",
        "server",
        "control",
        "flower",
        "autoscaler",
        "metrics",
        "prometheus",
        "grafana",
        *REGIONS,
        *TARGETS,
    }
    assert services(compose)["redis"]["image"].startswith("redis:")
    assert services(compose)["postgres"]["image"].startswith("postgres:")
    ours = vmfarm_services(compose)
    assert set(ours) == {"server", "control", "flower", "autoscaler", "metrics", *REGIONS}
    # One image built once (by control), reused by the others without a pull.
    assert ours["control"]["build"]["context"] == "." and (REPO / "Dockerfile").is_file()
    for name, svc in ours.items():
        if name != "control":
            assert "build" not in svc and svc["pull_policy"] == "never", name
    for name in TARGETS:
        svc = services(compose)[name]
        assert svc["image"] == "vmfarm-sshd:latest" and svc["hostname"] == name
        assert ("build" in svc) == (name == "target-1"), name
    assert services(compose)["target-1"]["build"] == "docker/sshd"
    assert (REPO / "docker" / "sshd" / "Dockerfile").is_file()
    # Only the optional autoscaler is behind a profile.
    assert [n for n, s in services(compose).items() if s.get("profiles")] == ["autoscaler"]


# Who each vmfarm service is to Redis (its ACL user and password variable) and PostgreSQL (its
# login role and password variable), and which signing key it holds (None: it signs nothing).
IDENTITIES: dict[str, tuple[str, str, str, str, str | None]] = {
    "server": ("vmfarm", "REDIS_PASSWORD", "vmfarm_api", "POSTGRES_SERVER_PASSWORD", "server"),
    "control": ("vmfarm", "REDIS_PASSWORD", "vmfarm", "POSTGRES_PASSWORD", "control"),
    "metrics": ("vmfarm", "REDIS_PASSWORD", "vmfarm", "POSTGRES_PASSWORD", None),
    "flower": ("flower", "REDIS_FLOWER_PASSWORD", "vmfarm", "POSTGRES_PASSWORD", None),
    "autoscaler": (
        "worker", "REDIS_WORKER_PASSWORD", "vmfarm_region", "POSTGRES_WORKER_PASSWORD",
        "autoscaler",
    ),
    **{
        name: (
            "worker", "REDIS_WORKER_PASSWORD", "vmfarm_region", "POSTGRES_WORKER_PASSWORD",
            f"region-{region}",
        )
        for name, region in REGIONS.items()
    },
}  # fmt: skip


def test_vmfarm_services_share_one_environment_and_wait_for_their_stores(
    compose: dict[str, Any],
) -> None:
    every = services(compose)
    assert set(IDENTITIES) == set(vmfarm_services(compose))
    for name, svc in vmfarm_services(compose).items():
        env = svc["environment"]
        user, redis_pw, role, pg_pw, _ = IDENTITIES[name]
        # Passwords come from .env (tests/unit/test_compose_config.py renders them).
        for key, db in (("VMFARM_BROKER_URL", 0), ("VMFARM_RESULT_BACKEND", 1)):
            assert re.fullmatch(
                rf"redis://{user}:\$\{{{redis_pw}:\?.+\}}@redis:6379/{db}", env[key]
            ), (name, key, env[key])
        assert re.fullmatch(
            rf"postgresql://{role}:\$\{{{pg_pw}:\?.+\}}@postgres:5432/vmfarm",
            env["VMFARM_DATABASE_URL"],
        ), (name, env["VMFARM_DATABASE_URL"])
        assert env["VMFARM_HOME"] == "/var/lib/vmfarm"
        deps = svc["depends_on"]
        assert deps["redis"] == {"condition": "service_healthy"}, name
        if name != "flower":
            assert deps["postgres"] == {"condition": "service_healthy"}, name
        for dep in deps:
            assert "healthcheck" in every[dep], f"{name} waits for {dep}, which has none"
        assert svc.get("init") is True and "container_name" not in svc
        mounts = {split_mount(m)[1]: m for m in svc["volumes"]}
        assert mounts[f"{IMAGE_ROOT}/configs"].endswith(":ro")
        if name != "server":  # the server runs nothing over SSH and keeps no state
            assert mounts["/home/vmfarm/.ssh"].endswith(":ro")
            assert "/var/lib/vmfarm" in mounts
    assert set(compose["volumes"]) >= {"redis-data", "postgres-data", "vmfarm-home"}


def test_each_signing_process_mounts_only_its_own_key(compose: dict[str, Any]) -> None:
    for name, svc in vmfarm_services(compose).items():
        key = IDENTITIES[name][4]
        env = svc["environment"]
        mounted = [split_mount(m) for m in svc["volumes"]]
        keys = sorted(dst for _, dst, *_ in mounted if dst.endswith((".key", ".pem")))
        if key is None:  # no key: it publishes nothing a worker would run
            assert keys == [], name
            assert not any(k.startswith("VMFARM_SECURITY_") for k in env), name
            continue
        assert keys == [f"/run/vmfarm/keys/{key}.key", f"/run/vmfarm/keys/{key}.pem"], name
        assert env["VMFARM_SECURITY_KEY"] == f"/run/vmfarm/keys/{key}.key", name
        assert env["VMFARM_SECURITY_CERTIFICATE"] == f"/run/vmfarm/keys/{key}.pem", name
        assert env["VMFARM_SECURITY_CERT_STORE"] == "/run/vmfarm/keys/certs", name
        for src, dst, *mode in mounted:
            if dst.startswith("/run/vmfarm/keys"):
                assert mode == ["ro"], (name, dst)
                assert src.startswith("${VMFARM_KEYS_DIR:-./.vmfarm/keys}/"), (name, src)


def test_the_ssh_targets_share_a_network_only_with_the_region_workers(
    compose: dict[str, Any],
) -> None:
    assert compose["networks"]["targets"] == {"internal": True}
    on_targets = {n for n, s in services(compose).items() if "targets" in s.get("networks", [])}
    assert on_targets == {*TARGETS, *REGIONS, "autoscaler"}
    for name in TARGETS:
        assert services(compose)[name]["networks"] == ["targets"], name
    for name in ("redis", "postgres", "server", "control", "flower", "metrics"):
        assert "targets" not in services(compose)[name]["networks"], name
        assert "backend" in services(compose)[name]["networks"], name


def test_redis_starts_with_the_acl_users_and_postgres_makes_the_login_roles(
    compose: dict[str, Any],
) -> None:
    redis_svc = services(compose)["redis"]
    assert redis_svc["command"] == ["sh", "/etc/vmfarm-redis/start.sh"]
    assert "./docker/redis:/etc/vmfarm-redis:ro" in redis_svc["volumes"]
    start = (REPO / "docker" / "redis" / "start.sh").read_text()
    assert "--aclfile /data/users.acl" in start and "requirepass" not in start
    assert set(redis_svc["environment"]) == {
        "REDIS_PASSWORD",
        "REDIS_WORKER_PASSWORD",
        "REDIS_FLOWER_PASSWORD",
    }
    pg = services(compose)["postgres"]
    assert "./docker/postgres:/docker-entrypoint-initdb.d:ro" in pg["volumes"]
    assert (REPO / "docker" / "postgres" / "10-vmfarm-roles.sh").is_file()
    assert {"POSTGRES_WORKER_PASSWORD", "POSTGRES_SERVER_PASSWORD"} <= set(pg["environment"])


def test_the_server_is_published_on_localhost_with_its_settings(compose: dict[str, Any]) -> None:
    svc = services(compose)["server"]
    assert svc["command"][:1] == ["server"] and "--host" in svc["command"]
    assert svc["ports"] == ["127.0.0.1:8000:8000"]
    assert "/api/health" in " ".join(svc["healthcheck"]["test"])
    env = svc["environment"]
    for key in ("VMFARM_SERVER_ISSUER", "VMFARM_SERVER_AUDIENCE", "VMFARM_SERVER_RBAC_FILE"):
        assert env[key].startswith("${" + key), key
    rbac = env["VMFARM_SERVER_RBAC_FILE"].split(":-", 1)[1].rstrip("}")
    assert in_repo(rbac).is_file()


def test_every_worker_command_is_a_valid_vmfarm_worker_invocation(compose: dict[str, Any]) -> None:
    beats = []
    for name, svc in vmfarm_services(compose).items():
        cmd = svc["command"]
        if cmd[0] != "worker":
            continue
        params = parse(fleet.worker, cmd[1:])
        if params["beat"]:
            beats.append(name)
        if name == "control":
            assert params["control"] and params["regions"] == ()
        else:
            assert params["regions"] == (REGIONS[name],) and not params["control"], name
            assert "ports" not in svc  # scalable: --scale worker-us-east-1=3
    assert beats == ["control"]  # exactly one beat
    with pytest.raises(click.UsageError):  # the parse is real: a bad option fails
        parse(fleet.worker, ["--region", "us-east-1", "--no-such-option"])


def test_flower_and_the_autoscaler_commands_parse_and_point_at_real_files(
    compose: dict[str, Any],
) -> None:
    every = services(compose)
    fl = every["flower"]
    params = parse(service_cmd.flower, fl["command"][1:])
    assert fl["command"][0] == "flower"
    assert (params["address"], params["port"], params["no_auth"]) == ("0.0.0.0", 5555, False)
    assert re.fullmatch(r"\$\{FLOWER_BASIC_AUTH:\?.+\}", fl["environment"]["FLOWER_BASIC_AUTH"])
    assert fl["ports"] == ["127.0.0.1:5555:5555"]

    auto = every["autoscaler"]
    assert auto["command"][0] == "autoscale"
    params = parse(service_cmd.autoscale, auto["command"][1:])
    cfg = load_config(in_repo(str(params["config_path"])))
    assert {p.region for p in cfg.policies} == set(REGIONS.values())


def test_the_targets_get_the_public_key_and_the_example_pipeline_targets_them(
    compose: dict[str, Any], tmp_path: Path
) -> None:
    for name in TARGETS:
        [mount] = services(compose)[name]["volumes"]
        src, dst, mode = split_mount(mount)
        assert src.endswith("/id_ed25519.pub") and dst == "/etc/vmfarm/authorized_keys"
        assert mode == "ro"
    env = base_env(VMFARM_HOME=str(tmp_path))
    pipeline_dir = REPO / "configs" / "compose" / "pipeline"
    res = run_vmfarm("validate", str(pipeline_dir), env=env)
    assert res.returncode == 0, res.stderr
    res = run_vmfarm("plan", str(pipeline_dir), "--set", "tag=1.0.1", "-o", "json", env=env)
    assert res.returncode == 0, res.stderr
    [stage] = json.loads(res.stdout)["stages"]
    assert stage["hosts_by_region"] == {
        "us-east-1": ["target-1", "target-2"],
        "eu-west-1": ["target-3"],
    }
    assert set(stage["hosts_by_region"]) == set(REGIONS.values())
    infra = yaml.safe_load((pipeline_dir / "infrastructure.yaml").read_text())
    conn = infra["spec"]["spec"]["connection"]
    assert conn["user"] == "deploy" and conn["privateKeyFile"].startswith("/home/vmfarm/.ssh/")
    assert conn["knownHostsFile"].startswith("/var/lib/vmfarm/")


def test_the_schedules_file_compose_points_at_loads(compose: dict[str, Any]) -> None:
    value = services(compose)["control"]["environment"]["VMFARM_SCHEDULES_FILE"]
    m = re.fullmatch(r"\$\{VMFARM_SCHEDULES_FILE-(.+)\}", value)
    assert m, value
    loaded = load_schedules(in_repo(m.group(1)))
    assert loaded and all(Path(f).exists() for s in loaded for f in s.files)
    assert {s.pipeline for s in loaded} == {"compose_demo"}


def test_the_dockerfiles_install_what_they_run() -> None:
    main = (REPO / "Dockerfile").read_text()
    assert re.search(r'^ENTRYPOINT \["vmfarm"\]$', main, re.M)
    assert re.search(r"^USER vmfarm$", main, re.M)
    import tomllib

    packages = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"
    ]["find"]["include"]
    for pkg in packages:
        name = pkg.rstrip("*")
        assert re.search(rf"^COPY {name} \./{name}$", main, re.M), name
    # Terraform steps run on the control and region workers: git and the terraform extra
    assert re.search(r"install -y .*\bgit\b", main)
    assert "['optional-dependencies']['terraform']" in main
    sshd_dir = REPO / "docker" / "sshd"
    sshd = (sshd_dir / "Dockerfile").read_text()
    assert re.search(r"^FROM debian:", sshd, re.M)
    assert "openssh-server" in sshd and "python3" in sshd
    assert "PasswordAuthentication no" in sshd and "PermitRootLogin no" in sshd
    entry = sshd_dir / "entrypoint.sh"
    assert "COPY entrypoint.sh" in sshd and os.access(entry, os.X_OK)
    assert subprocess.run(["sh", "-n", str(entry)]).returncode == 0
    assert "/etc/vmfarm/authorized_keys" in entry.read_text()


# --- vmfarm flower --------------------------------------------------------------------------------
