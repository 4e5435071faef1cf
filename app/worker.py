"""Start Celery workers: region and control workers (``vmfarm worker``), and the embedded one.

The embedded worker is a real Celery worker (threads pool) running inside the CLI process on
kombu's sqla+sqlite broker and the db+sqlite result backend: the same canvases and tasks as a
fleet of workers, with polling latency and no remote control (no Flower, no revoke).
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Iterable
from typing import Any

from app.celery import CONTROL_QUEUE, app, ensure_region_queue

log = logging.getLogger("vmfarm.worker")


def queues_for(regions: Iterable[str], *, control: bool) -> list[str]:
    names = [ensure_region_queue(r) for r in regions]
    if control:
        names.append(CONTROL_QUEUE)
    return sorted(set(names))


def run_worker(*, regions: list[str], control: bool, concurrency: int | None = None,
               loglevel: str = "INFO", name: str | None = None, beat: bool = False) -> None:
    """Run a worker in the foreground until it is stopped (SIGTERM: warm shutdown)."""
    queues = queues_for(regions, control=control)
    # Region work is I/O bound (SSH): threads. A control-only worker uses prefork, where
    # Celery's time limits work.
    pool = "threads" if regions else "prefork"
    conc = concurrency or (32 if regions else 2)
    label = "-".join(regions) if regions else "control"
    hostname = name or f"vmfarm-{label}@{socket.gethostname()}"
    argv = ["worker", "-Q", ",".join(queues), "-P", pool, "-c", str(conc), "-n", hostname,
            "-E", "-l", loglevel, "--without-mingle", "--without-gossip"]
    if beat:  # the periodic reconciler; run exactly one beat per deployment
        from app.settings import get_settings

        argv += ["-B", "-s", str(get_settings().home_dir / "celerybeat-schedule")]
    app.worker_main(argv)


class EmbeddedWorker:
    """A Celery worker in a thread of this process (embedded mode)."""

    def __init__(self, regions: Iterable[str], *, concurrency: int = 16) -> None:
        self.queues = queues_for(regions, control=True)
        self.concurrency = concurrency
        self.controller: Any = None
        self.thread: threading.Thread | None = None

    def __enter__(self) -> EmbeddedWorker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Start consuming the queues in a background thread."""
        # Pool threads resolve tasks through current_app: without this they would find Celery's
        # default app (which holds copies of shared tasks, with no result backend) and chords
        # would never complete. `celery worker` does the same at start.
        app.set_current()
        app.set_default()
        self.controller = app.WorkController(
            pool_cls="threads", concurrency=self.concurrency, queues=self.queues,
            hostname=f"vmfarm-embedded-{socket.gethostname()}", loglevel="WARNING",
            without_heartbeat=True, without_mingle=True, without_gossip=True,
            ready_callback=None, send_events=False,
        )
        self.thread = threading.Thread(target=self.controller.start, name="vmfarm-worker",
                                       daemon=True)
        self.thread.start()

    def stop(self) -> None:
        """Stop the worker and wait for its thread (in-flight tasks finish first)."""
        if self.controller is not None:
            try:
                self.controller.stop(in_sighandler=False, exitcode=0)
            except Exception:
                log.debug("embedded worker stop raised", exc_info=True)
        if self.thread is not None:
            self.thread.join(timeout=30)
