"""A real Prometheus scraping lab hosts' apps, and users sending them requests: for tests of
canary analysis (tests/lab/test_canary_analysis_lab.py, tests/service/test_canary_analysis_run.py).

The Debian ``prometheus`` binary listens on a leased 127.0.0.1 port and scrapes
``<address>:8080/metrics`` of every host given, every 250 ms.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from app.errors import VerificationError
from app.verify import prometheus_query
from tests.alloc import Allocator
from tests.waiting import wait_for

HAVE_PROMETHEUS = shutil.which("prometheus") is not None


@contextmanager
def scraping(addresses: Sequence[str], alloc: Allocator, work: Path) -> Iterator[str]:
    """Prometheus scraping every address's app; yields its URL once it has scraped them all."""
    targets = ", ".join(f"'{a}:8080'" for a in addresses)
    (work / "prometheus.yml").write_text(
        "global: {scrape_interval: 250ms, scrape_timeout: 200ms}\n"
        f"scrape_configs:\n  - job_name: web\n    static_configs: [{{targets: [{targets}]}}]\n"
    )
    lease = alloc.port()
    log = (work / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={work / 'prometheus.yml'}",
            f"--storage.tsdb.path={work / 'data'}",
            f"--web.listen-address=127.0.0.1:{lease.port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{lease.port}"
    try:

        def ready() -> bool:
            assert proc.poll() is None, f"prometheus exited with {proc.returncode}"
            try:
                return prometheus_query(url, "count(up)", timeout=1) == len(addresses)
            except VerificationError:
                return False

        wait_for(
            ready,
            30,
            "prometheus to scrape the lab hosts",
            interval=0.2,
            explain=lambda: (work / "prometheus.log").read_text()[-2000:],
        )
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        lease.release()


class Users:
    """Requests to every host's app, round and round, until closed (answers counted per host;
    refused connections while a host restarts are part of a deployment)."""

    def __init__(self, addresses: Sequence[str]) -> None:
        self.answers: dict[str, int] = dict.fromkeys(addresses, 0)
        self.stop = threading.Event()
        self.threads = [
            threading.Thread(target=self._loop, args=(list(addresses[i::2]),), daemon=True)
            for i in range(2)
        ]
        for t in self.threads:
            t.start()

    def _loop(self, mine: list[str]) -> None:
        while not self.stop.is_set():
            for address in mine:
                try:
                    with urllib.request.urlopen(f"http://{address}:8080/", timeout=2):
                        pass
                except urllib.error.HTTPError:
                    pass  # an answer all the same (the bad build's 500s)
                except OSError:
                    self.stop.wait(0.05)  # not listening (yet): a deployment restarts it
                    continue
                self.answers[address] += 1

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(5)


def version_on(address: str) -> str:
    """The version the app on ``address`` says it runs."""
    import json

    with urllib.request.urlopen(f"http://{address}:8080/health", timeout=5) as resp:
        return str(json.loads(resp.read())["version"])
