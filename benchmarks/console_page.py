#!/usr/bin/env python3
"""The console's execution page of a large run: how long it takes to load, and whether what a
person needs first fits one screen.

    benchmarks/console_page.py [--hosts 500] [--repeat 10] [--json FILE] [--screenshot FILE]

Runs a rolling stage on N hosts with no-op connections (every process with
VMFARM_TEST_CONNECTION=noop: nothing is contacted; a pipeline file cannot ask for it) on Redis
+ PostgreSQL with a control worker and two region workers, then starts ``vmfarm server`` with
its console and a real OIDC provider (oidc-provider-mock), signs in, and measures:

- ``server_ms``: GET /console/executions/{id} as the signed-in person, over HTTP (min, median,
  max of ``--repeat``), with the page's size in bytes;
- ``browser_ms``: the same page in headless Chromium (Debian's chromium and chromium-driver,
  1366x768): navigation start to the load event (median of 3 loads);
- ``above_the_fold``: whether the status, the counts per status and per step and the failures
  by error end within the first 768 pixels (each element's bottom edge is reported).

Needs Redis on 127.0.0.1:6379 (two databases and two ports leased from tests/alloc.py, so a
test run on the same machine is never disturbed) and PostgreSQL on 127.0.0.1:5432 (creates
the database vmfarm_console_bench, dropped at the end). Run by hand; not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

from scale import PY, files  # noqa: E402

DB = "vmfarm_console_bench"
RBAC = """
roles:
  reader: [pipeline:view, "environment:view", fleet:view, audit:view]
bindings:
  - role: reader
    users: ["*"]
"""


def psql(sql: str, db: str = DB) -> str:
    return subprocess.run(
        ["psql", "-h", "127.0.0.1", "-U", "postgres", "-d", db, "-XAtc", sql],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


def wait_http(url: str, timeout: float = 60) -> None:
    import httpx

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{url} did not answer within {timeout:g} s")


def spawn(cmd: list[str], *, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as fh:
        return subprocess.Popen(
            cmd, env=env, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
        )


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)


def browser_load(url: str, cookie: str, shot: Path | None) -> dict[str, Any]:
    """Load ``url`` in headless Chromium three times: load-event times and the fold check."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--window-size=1366,900",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(
        service=Service(shutil.which("chromedriver") or "/usr/bin/chromedriver"), options=options
    )
    try:
        # A laptop's screen: the viewport itself is 1366x768 (the window's frame aside).
        driver.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride",
            {"width": 1366, "height": 768, "deviceScaleFactor": 1, "mobile": False},
        )
        base = url.split("/console/")[0]
        driver.get(base + "/console/static/console.css")
        driver.add_cookie({"name": "vmfarm_console", "value": cookie, "path": "/"})
        times = []
        for _ in range(3):
            driver.get(url)
            times.append(
                driver.execute_script(
                    "const t = performance.getEntriesByType('navigation')[0];"
                    "return t.loadEventEnd - t.startTime;"
                )
            )
        fold = driver.execute_script("return window.innerHeight;")
        bottoms = {
            el: driver.execute_script(
                "const e = document.getElementById(arguments[0]);"
                "return e ? e.getBoundingClientRect().bottom : null;",
                el,
            )
            for el in ("execution-status", "host-counts", "step-counts", "failures")
        }
        if shot:
            driver.save_screenshot(str(shot))
    finally:
        driver.quit()
    return {
        "browser_ms": round(statistics.median(times), 1),
        "browser_ms_all": [round(t, 1) for t in times],
        "viewport_height": fold,
        "bottoms": bottoms,
        "above_the_fold": all(b is not None and b <= fold for b in bottoms.values()),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hosts", type=int, default=500)
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--screenshot", type=Path, default=None)
    args = ap.parse_args()

    import httpx

    from tests.alloc import Allocator
    from tests.console_signin import console_sign_in

    alloc = Allocator()
    broker = alloc.redis_db("redis://127.0.0.1:6379")
    results = alloc.redis_db("redis://127.0.0.1:6379")
    oidc_port, port = alloc.port().port, alloc.port().port
    root = Path(tempfile.mkdtemp(prefix="vmfarm-console-bench-"))
    psql(f"DROP DATABASE IF EXISTS {DB}", db="postgres")
    psql(f"CREATE DATABASE {DB}", db="postgres")
    env = {k: v for k, v in os.environ.items() if not k.startswith("VMFARM_")}
    env.update(
        VMFARM_HOME=str(root / "home"),
        PYTHONPATH=str(REPO),
        VMFARM_BROKER_URL=broker.url,
        VMFARM_RESULT_BACKEND=results.url,
        VMFARM_DATABASE_URL=f"postgresql://postgres@127.0.0.1:5432/{DB}",
        VMFARM_TEST_CONNECTION="noop",
    )
    spec = files(root, args.hosts, 2, "20%", None)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for name, extra in (
            ("control", ["--control"]),
            ("r1", ["--region", "r1", "-c", "32"]),
            ("r2", ["--region", "r2", "-c", "32"]),
        ):
            procs.append(
                spawn(
                    [
                        PY,
                        "-m",
                        "cli.main",
                        "worker",
                        *extra,
                        "-n",
                        f"cb-{name}@bench",
                        "-l",
                        "WARNING",
                    ],
                    env=env,
                    log=root / f"{name}.log",
                )
            )
        run = subprocess.run(
            [PY, "-m", "cli.main", "run", str(spec), "-o", "json"],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=1800,
        )
        if run.returncode != 0:
            print(run.stdout[-2000:], run.stderr[-2000:], file=sys.stderr)
            return 1
        ex_id = json.loads(run.stdout)["id"]
        procs.append(
            spawn(
                [PY, "-m", "oidc_provider_mock", "-p", str(oidc_port), "-H", "127.0.0.1"],
                env=env,
                log=root / "oidc.log",
            )
        )
        oidc = f"http://127.0.0.1:{oidc_port}"
        wait_http(oidc + "/.well-known/openid-configuration")
        (root / "rbac.yaml").write_text(RBAC)
        procs.append(
            spawn(
                [PY, "-m", "cli.main", "server", "--port", str(port), "--log-level", "warning"],
                env={
                    **env,
                    "VMFARM_SERVER_RBAC_FILE": str(root / "rbac.yaml"),
                    "VMFARM_SERVER_ISSUER": oidc,
                    "VMFARM_SERVER_AUDIENCE": "vmfarm",
                    "VMFARM_SERVER_CONSOLE_CLIENT_SECRET": "bench",
                },
                log=root / "server.log",
            )
        )
        base = f"http://127.0.0.1:{port}"
        wait_http(base + "/api/health")
        user = console_sign_in(base, "bench")
        path = f"/console/executions/{ex_id}"
        times, size = [], 0
        for _ in range(args.repeat + 1):
            t0 = time.perf_counter()
            resp = user.get(path)
            times.append((time.perf_counter() - t0) * 1000)
            assert resp.status_code == 200, resp.text[:500]
            size = len(resp.content)
        cold, warm = times[0], times[1:]
        result: dict[str, Any] = {
            "hosts": args.hosts,
            "execution": ex_id,
            "server_ms": {
                "first": round(cold, 1),
                "min": round(min(warm), 1),
                "median": round(statistics.median(warm), 1),
                "max": round(max(warm), 1),
            },
            "page_bytes": size,
            "loadavg": os.getloadavg(),
        }
        result.update(browser_load(base + path, user.cookie, args.screenshot))
        host = httpx.get(base + "/api/health").json()
        result["health"] = host
        print(json.dumps(result, indent=2))
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))
        return 0
    finally:
        stop(procs)
        alloc.close()  # the Redis databases are emptied by their next lease
        subprocess.run(
            [
                "psql",
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-XAtc",
                f"DROP DATABASE IF EXISTS {DB}",
            ],
            capture_output=True,
        )
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
