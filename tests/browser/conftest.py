"""Fixtures of the browser lane: headless Chromium (Debian's chromium and chromium-driver,
driven by selenium) against a real ``vmfarm server`` with its console, a real OIDC provider,
real region and control workers and the sshd lab hosts.

The workers read the lab's SSH key from the secrets store (``VMFARM_SECRET_LAB_KEY``: a
submitted file may not name a key file) and its host keys from ``$HOME/.ssh/known_hosts``,
with HOME a folder of the test's own (never the user's ``~/.ssh``). Screenshots of each page
go to tests/browser/artifacts/ (gitignored)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.alloc import Allocator
from tests.conftest import REDIS_BASE, REPO, _stop, _wait_for_workers, base_env
from tests.service.conftest import Provider, start_provider

ARTIFACTS = Path(__file__).parent / "artifacts"

RBAC = """
roles:
  deployer: [pipeline:execute, pipeline:view, pipeline:abort, "environment:*", "registry:*"]
  approver: [pipeline:view, pipeline:approve, "environment:view"]
  viewer: [pipeline:view, "environment:view"]
  reader: [fleet:view, audit:view]
bindings:
  - role: deployer
    groups: [deployers]
  - role: approver
    groups: [approvers]
  - role: viewer
    groups: [viewers]
  - role: reader
    groups: [deployers, approvers, viewers]
"""


@dataclass
class Console:
    url: str
    oidc: Provider
    lab: Any
    infrastructure: str  # the lab's Infrastructure as a submission may carry it
    logs: list[Path]

    def server_log(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-4000:]}"
            for p in self.logs
            if p.exists()
        )


def _submittable_infrastructure(lab: Any) -> str:
    """The lab's Infrastructure with the key read from the secrets store and host keys from
    the workers' known_hosts (a submission names no file on the workers' machines)."""
    infra = yaml.safe_load(Path(lab.infrastructure_file).read_text())
    conn = infra["spec"]["spec"]["connection"]
    conn.pop("privateKeyFile", None)
    conn.pop("knownHostsFile", None)
    conn["privateKeySecret"] = "lab_key"
    return yaml.safe_dump(infra, sort_keys=False)


@pytest.fixture(scope="session")
def console(
    pg_url: str, lab: Any, alloc: Allocator, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Console]:
    """The server (console on), its own OIDC provider (dana: deployers, ada: approvers,
    vic: viewers), and workers for regions r1, r2 and control, on Redis databases of their
    own."""
    import httpx

    root = tmp_path_factory.mktemp("console")
    home = root / "home"
    (home / ".ssh").mkdir(parents=True)
    shutil.copy(lab.known_hosts_file, home / ".ssh" / "known_hosts")
    (root / "rbac.yaml").write_text(RBAC)
    with (
        alloc.port() as oidc_port,
        alloc.port() as port,
        alloc.redis_db(REDIS_BASE) as broker,
        alloc.redis_db(REDIS_BASE) as results,
    ):
        oidc = start_provider(
            root,
            [
                {"sub": "dana", "groups": ["deployers"]},
                {"sub": "ada", "groups": ["approvers"]},
                {"sub": "vic", "groups": ["viewers"]},
            ],
            port=oidc_port.port,
        )
        env = base_env(
            VMFARM_DATABASE_URL=pg_url,
            VMFARM_BROKER_URL=broker.url,
            VMFARM_RESULT_BACKEND=results.url,
            VMFARM_HOME=str(root / "vmfarm"),
            HOME=str(home),
        )
        procs, logs = [], []
        specs = [
            ("b-r1@test", ["--region", "r1", "-c", "4"]),
            ("b-r2@test", ["--region", "r2", "-c", "4"]),
            ("b-control@test", ["--control", "-c", "2"]),
        ]
        key = Path(lab.key_file).read_text()
        for name, args in specs:
            log = root / f"{name.split('@')[0]}.log"
            logs.append(log)
            with log.open("wb") as fh:
                procs.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "cli.main", "worker", "-n", name, *args],
                        env={**env, "VMFARM_SECRET_LAB_KEY": key},
                        cwd=REPO,
                        stdout=fh,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
        server_env = {
            **env,
            "VMFARM_SERVER_RBAC_FILE": str(root / "rbac.yaml"),
            "VMFARM_SERVER_ISSUER": oidc.url,
            "VMFARM_SERVER_AUDIENCE": "vmfarm",
            "VMFARM_SERVER_CONSOLE_CLIENT_SECRET": "test-client-secret",
        }
        log = root / "server.log"
        logs.append(log)
        with log.open("wb") as fh:
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "cli.main", "server", "--port", str(port.port)],
                    env=server_env,
                    cwd=REPO,
                    stdout=fh,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        url = f"http://127.0.0.1:{port.port}"
        try:
            _wait_for_workers(env, [n for n, _ in specs])
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    if httpx.get(url + "/api/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
            else:
                raise AssertionError("the server did not become healthy")
            yield Console(url, oidc, lab, _submittable_infrastructure(lab), logs)
        except AssertionError:
            raise AssertionError(
                "\n".join(p.read_text(errors="replace")[-3000:] for p in logs if p.exists())
            ) from None
        finally:
            _stop(procs)
            _stop([oidc.proc])


@pytest.fixture
def browser() -> Iterator[Callable[[], Any]]:
    """A factory of headless Chromium sessions (each its own profile: its own cookies)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    made: list[Any] = []

    def make() -> Any:
        options = webdriver.ChromeOptions()
        options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
        for arg in (
            "--headless=new",
            "--no-sandbox",
            "--disable-dev-shm-usage",
            "--disable-gpu",
            "--window-size=1366,900",
        ):
            options.add_argument(arg)
        driver = webdriver.Chrome(
            service=Service(shutil.which("chromedriver") or "/usr/bin/chromedriver"),
            options=options,
        )
        driver.set_page_load_timeout(30)
        made.append(driver)
        return driver

    yield make
    for d in made:
        d.quit()


def screenshot(driver: Any, name: str) -> Path:
    """Keep what the page looked like (tests/browser/artifacts/NAME.png)."""
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    driver.save_screenshot(str(path))
    return path
