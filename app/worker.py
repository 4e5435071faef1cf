"""Start Celery workers: region and control workers (``vmfarm worker``), and the embedded one.

A ``vmfarm worker`` may carry tags (``--tags gpu,pci``): it then also consumes the tag queues of
its regions (see app.delegates). It registers in the ledger's worker registry (``WorkerBeat``)
once ready and renews its row every ``heartbeat_interval`` from a daemon thread; the row is
deleted on a clean shutdown, so a row that stops beating is a worker that died. A region worker
also warms itself once ready (app.warm): imports, the ledger's pool, and SSH connections to the
recent hosts of its regions.

The embedded worker is a real Celery worker (threads pool) running inside the CLI process on
kombu's sqla+sqlite broker and the db+sqlite result backend: the same canvases and tasks as a
fleet of workers, with polling latency and no remote control (no Flower, no revoke).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Iterable
from typing import Any

from app.celery import CONTROL_QUEUE, app, ensure_queue, ensure_region_queue

log = logging.getLogger("vmfarm.worker")


def queues_for(regions: Iterable[str], *, control: bool, tags: Iterable[str] = ()) -> list[str]:
    """The queues a worker consumes, each declared in this process: per region the plain
    queue and, with tags, one per non-empty subset of them; plus control if asked."""
    from app.delegates import worker_queues

    regions = list(regions)
    names = [ensure_region_queue(r) for r in regions]
    names += [ensure_queue(q) for q in worker_queues(regions, tags)]
    if control:
        names.append(CONTROL_QUEUE)
    return sorted(set(names))


def run_worker(
    *,
    regions: list[str],
    control: bool,
    concurrency: int | None = None,
    loglevel: str = "INFO",
    name: str | None = None,
    beat: bool = False,
    tags: Iterable[str] = (),
) -> None:
    """Run a worker in the foreground until it is stopped (SIGTERM: warm shutdown).

    ValueError for an invalid region or tag, more than MAX_TAGS tags, or tags without regions.
    """
    from app.delegates import normalise_tags

    tag_list = normalise_tags(tags)
    if tag_list and not regions:
        raise ValueError("worker tags select region work: give --region with --tags")
    queues = queues_for(regions, control=control, tags=tag_list)
    # Region work is I/O bound (SSH): threads. A control-only worker uses prefork, where
    # Celery's time limits work.
    pool = "threads" if regions else "prefork"
    conc = concurrency or (32 if regions else 2)
    label = "-".join(regions) if regions else "control"
    hostname = name or f"vmfarm-{label}@{socket.gethostname()}"
    # The queues are selected here rather than with -Q: Celery splits -Q at commas, and a tag
    # queue's name has commas in it (vmfarm.r1[a,b]). Without -Q the worker keeps this choice.
    app.amqp.queues.select(queues)
    argv = [
        "worker",
        "-P",
        pool,
        "-c",
        str(conc),
        "-n",
        hostname,
        "-l",
        loglevel,
        "--without-mingle",
        "--without-gossip",
    ]
    from app.settings import get_settings

    if get_settings().task_events:  # else Flower turns them on while it watches
        argv.append("-E")
    if beat:  # the periodic reconciler; run exactly one beat per deployment
        argv += ["-B", "-s", str(get_settings().home_dir / "celerybeat-schedule")]
    heartbeat = Heartbeat(
        regions=regions, tags=list(tag_list), queues=queues, concurrency=conc, pool=pool
    )
    heartbeat.connect(default_name=hostname)
    if regions:  # SSH work runs in this one process (threads pool): warm it when ready
        _warm_when_ready(regions, control=control)
    else:  # prefork: each pool process warms itself as it starts
        _warm_pool_processes()
    try:
        app.worker_main(argv)
    finally:
        heartbeat.stop()


def _warm_when_ready(regions: list[str], *, control: bool) -> None:
    """Once the worker is ready, warm it in a daemon thread (app.warm): tasks are taken
    meanwhile; a task for a host not warmed yet connects as it always did."""
    from celery.signals import worker_ready

    def warm() -> None:
        from app.warm import warm_control, warm_start

        if control:
            warm_control()
        warm_start(regions)

    def on_ready(**_: Any) -> None:
        threading.Thread(target=warm, name="vmfarm-warm", daemon=True).start()

    worker_ready.connect(on_ready, weak=False)


def _warm_pool_processes() -> None:
    """A control worker's pool processes import the coordinator and open their ledger pool in
    a daemon thread as they start (app.warm.warm_control), not on their first gate."""
    from celery.signals import worker_process_init

    def on_init(**_: Any) -> None:
        from app.warm import warm_control

        threading.Thread(target=warm_control, name="vmfarm-warm", daemon=True).start()

    worker_process_init.connect(on_init, weak=False)


class Heartbeat:
    """This worker's row in the registry (``WorkerBeat``): written when the worker is ready,
    renewed every ``heartbeat_interval`` from a daemon thread, deleted on a clean shutdown.

    It uses an engine of its own without a connection pool: a prefork worker forks new pool
    processes from the main process at any time, and they must not inherit open connections.
    A failing write is logged and retried at the next beat; it never stops the worker.
    """

    def __init__(
        self, *, regions: list[str], tags: list[str], queues: list[str], concurrency: int, pool: str
    ) -> None:
        from app.settings import get_settings

        self.values: dict[str, Any] = {
            "hostname": socket.gethostname(),
            "pid": os.getpid(),
            "regions": list(regions),
            "tags": list(tags),
            "queues": list(queues),
            "concurrency": concurrency,
            "pool": pool,
        }
        self.interval = max(0.05, float(get_settings().heartbeat_interval))
        self.name: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._engine: Any = None
        self._failing = False

    def connect(self, *, default_name: str) -> None:
        """Start beating when the worker is ready; stop (and deregister) at its shutdown."""
        from celery.signals import worker_ready, worker_shutdown

        def on_ready(sender: Any = None, **_: Any) -> None:
            self.start(str(getattr(sender, "hostname", None) or default_name))

        def on_shutdown(sender: Any = None, **_: Any) -> None:
            self.stop()

        worker_ready.connect(on_ready, weak=False)
        worker_shutdown.connect(on_shutdown, weak=False)

    def start(self, name: str) -> None:
        if self._thread is not None:
            return
        from app.models import utcnow

        self.name = name
        self.values["started_at"] = utcnow()
        self._thread = threading.Thread(target=self._run, name="vmfarm-heartbeat", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            self.beat()
            if self._stop.wait(self.interval):
                return

    def _get_engine(self) -> Any:
        if self._engine is None:
            from sqlalchemy import event
            from sqlalchemy.pool import NullPool
            from sqlmodel import create_engine

            from app.db import _sqlite_begin, _sqlite_pragmas, migrate, normalise_url
            from app.settings import get_settings

            url = normalise_url(get_settings().db_url)
            if url.startswith("sqlite"):  # as app.db sets SQLite up: WAL, BEGIN IMMEDIATE
                engine = create_engine(
                    url,
                    poolclass=NullPool,
                    connect_args={"check_same_thread": False, "timeout": 60},
                )
                event.listen(engine, "connect", _sqlite_pragmas)
                event.listen(engine, "begin", _sqlite_begin)
            else:
                engine = create_engine(url, poolclass=NullPool)
            migrate(engine)
            self._engine = engine
        return self._engine

    def beat(self) -> bool:
        """Write this worker's row now (in_flight: tasks running in it). False on failure."""
        from celery.worker import state

        from app.models import WorkerBeat, utcnow

        assert self.name is not None
        values = {
            **self.values,
            "name": self.name,
            "in_flight": len(state.active_requests),
            "beat_at": utcnow(),
        }
        try:
            from sqlalchemy.dialects.postgresql import insert as pg_insert
            from sqlalchemy.dialects.sqlite import insert as sqlite_insert

            engine = self._get_engine()
            insert: Any = pg_insert if engine.dialect.name == "postgresql" else sqlite_insert
            stmt = insert(WorkerBeat).values(**values)
            stmt = stmt.on_conflict_do_update(
                index_elements=["name"], set_={k: stmt.excluded[k] for k in values if k != "name"}
            )
            with engine.begin() as conn:
                conn.execute(stmt)
        except Exception as exc:
            if not self._failing:
                log.warning(
                    "worker %s: cannot write its heartbeat (retrying every %ss): %s",
                    self.name,
                    self.interval,
                    exc,
                )
            self._failing = True
            return False
        if self._failing:
            log.warning("worker %s: heartbeat written again", self.name)
        self._failing = False
        return True

    def stop(self) -> None:
        """Stop beating and delete this worker's row (idempotent)."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is None:
            return
        thread.join(timeout=self.interval + 30)
        try:
            from sqlalchemy import delete
            from sqlmodel import col

            from app.models import WorkerBeat

            with self._get_engine().begin() as conn:
                conn.execute(delete(WorkerBeat).where(col(WorkerBeat.name) == self.name))
        except Exception as exc:
            log.warning("worker %s: cannot remove it from the registry: %s", self.name, exc)
        finally:
            if self._engine is not None:
                self._engine.dispose()


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
            pool_cls="threads",
            concurrency=self.concurrency,
            queues=self.queues,
            hostname=f"vmfarm-embedded-{socket.gethostname()}",
            loglevel="WARNING",
            without_heartbeat=True,
            without_mingle=True,
            without_gossip=True,
            ready_callback=None,
            send_events=False,
        )
        self.thread = threading.Thread(
            target=self.controller.start, name="vmfarm-worker", daemon=True
        )
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
        # A worker marks its process as one whose tasks must not wait on results; once it has
        # stopped, this process (the CLI, a test) may wait on them again.
        from celery._state import _set_task_join_will_block

        _set_task_join_will_block(False)
