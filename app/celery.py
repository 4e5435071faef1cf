"""The one Celery configuration, imported by every process (CLI, control worker, region workers).

It must be identical everywhere: a chord body and every chain continuation are published by the
worker that finished the previous task, with *that* worker's routing (design note §5.1).
Each setting below says why it is set; see ../shared/research/celery-design-note.md §5 and §12.
"""

from __future__ import annotations

import functools
import logging
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from celery import Celery
from celery.schedules import crontab
from kombu import Exchange, Queue

from app.settings import get_settings
from app.signing import celery_settings, setup, signing_paths

log = logging.getLogger("vmfarm.publish")

CONTROL_QUEUE = "vmfarm.control"
EXCHANGE = Exchange("vmfarm", type="direct")
# Tasks that run on a region's workers (SSH work, discovery); everything else is control.
REGION_TASKS = frozenset(
    {"vmfarm.run_host", "vmfarm.run_step", "vmfarm.check_host", "vmfarm.discover"}
)
# Region tasks whose kwargs carry ``region`` (and ``tags``) themselves instead of a ``key``.
_KWARG_ROUTED = frozenset({"vmfarm.discover"})
_REGION_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
# Messages may sit reserved or queued this long before Redis redelivers them. With early ack it
# bounds nothing about how long a task may *run*; it must exceed the longest queue wait (6 h).
VISIBILITY_TIMEOUT = 6 * 3600


def region_queue(region: str) -> str:
    """``us-east-1`` -> ``vmfarm.us-east-1``; a region name that is not a safe name fails."""
    if not _REGION_RE.match(region or ""):
        raise ValueError(f"invalid region name {region!r}")
    return f"vmfarm.{region}"


def make_queue(name: str) -> Queue:
    return Queue(name, EXCHANGE, routing_key=name)


def ensure_queue(name: str) -> str:
    """Declare queue ``name`` in this process's queue table (if new) and return it.

    Only for names built by ``region_queue`` or ``app.delegates.queue_for``: every other queue
    name stays unknown and fails loudly (``task_create_missing_queues = False``).
    """
    queues = app.amqp.queues
    if name not in queues:
        queues.add(make_queue(name))
    return name


def ensure_region_queue(region: str) -> str:
    """Declare ``vmfarm.<region>`` in this process's queue table and return its name.

    Regions come from pipeline files, so their queues cannot all be listed up front; every other
    queue name stays unknown and fails loudly (``task_create_missing_queues = False``).
    """
    return ensure_queue(region_queue(region))


def route_task(
    name: str, args: Any, kwargs: Any, options: Any, task: Any = None, **_: Any
) -> dict[str, str]:
    """Region tasks go to their region's queue, or to the queue of the worker tags they need
    (``vmfarm.<region>[a,b]``, see app.delegates); the rest to control.

    Step tasks carry region and tags in their ``key`` kwarg, discovery as kwargs of its own.
    """
    if name in REGION_TASKS:
        from app.delegates import queue_for

        kw = kwargs or {}
        src = kw if name in _KWARG_ROUTED else (kw.get("key") or {})
        return {"queue": ensure_queue(queue_for(str(src.get("region", "")), src.get("tags") or ()))}
    return {"queue": CONTROL_QUEUE}


def build_config() -> dict[str, Any]:
    """The settings dict (a function so tests can inspect it)."""
    s = get_settings()
    redis = s.celery_broker.startswith(("redis://", "rediss://"))
    transport: dict[str, Any] = {}
    if redis:
        transport = {
            "visibility_timeout": VISIBILITY_TIMEOUT,
            "socket_timeout": 30,
            "socket_connect_timeout": 5,
            "socket_keepalive": True,
            "health_check_interval": 25,
        }
    else:
        # Embedded (kombu's sqla transport) polls, 1 s by default: a second per chain link.
        # kombu forwards every transport option of this transport to create_engine(), which
        # rejects polling_interval, so the interval is set on the transport class instead.
        from kombu.transport import sqlalchemy as kombu_sqla

        kombu_sqla.Transport.polling_interval = 0.05
    conf: dict[str, Any] = {
        "broker_url": s.celery_broker,
        "result_backend": s.celery_backend,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": transport,
        "result_backend_transport_options": {"visibility_timeout": VISIBILITY_TIMEOUT}
        if redis
        else {},
        # JSON only: task arguments are ids and keys, never objects or secrets. With message
        # signing (app.signing) tasks and remote control are JSON signed by the sender's key,
        # and only signed messages are taken; results and events stay plain JSON.
        **celery_settings(signing_paths(s)),
        "result_serializer": "json",
        "result_accept_content": ["json"],
        "event_serializer": "json",
        # Counts and logs the messages a worker refuses (unsigned, forged) instead of only
        # kombu's traceback.
        "worker_consumer": "app.signing:Consumer",
        # Routing: one control queue declared; region queues declared on demand by the router.
        "task_default_queue": CONTROL_QUEUE,
        "task_default_exchange": EXCHANGE.name,
        "task_default_routing_key": CONTROL_QUEUE,
        "task_queues": [make_queue(CONTROL_QUEUE)],
        "task_create_missing_queues": False,
        "task_routes": (route_task,),
        # SSH steps run at most once per dispatch: early ack, no redelivery of started work,
        # nothing waiting in a worker's prefetch buffer (a buffered message past the visibility
        # timeout ran twice in the design note's experiment).
        "task_acks_late": False,
        "task_reject_on_worker_lost": False,
        "worker_prefetch_multiplier": 1,
        "worker_disable_prefetch": redis,
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        # Off: the ledger records when a host step starts (HostStepRun); a STARTED state in
        # the result backend would cost a Redis write per task for nobody (benchmarks/).
        "task_track_started": False,
        "task_publish_retry": True,
        # Chords: errbacks only nudge the coordinator, so calling them per failed header task is
        # harmless and reacts sooner. Set explicitly: the default is pending deprecation.
        "task_allow_error_cb_on_chord_header": True,
        "result_chord_join_timeout": 30.0,
        "result_chord_retry_interval": 1.0 if redis else 0.1,
        "result_expires": 7 * 24 * 3600,
        "result_extended": True,  # Flower shows args: they carry ids only, never secrets
        "result_backend_always_retry": True,
        "result_backend_max_retries": 10,
        # Monitoring (Flower): task events only when asked for (VMFARM_TASK_EVENTS); Flower
        # enables them in the running workers itself (its --enable_events, the default).
        "worker_send_task_events": s.task_events,
        "task_send_sent_event": s.task_events,
        "worker_max_tasks_per_child": 1000,
        "worker_hijack_root_logger": False,
        "worker_soft_shutdown_timeout": 30.0,
        # Exactly one beat (`vmfarm worker --control --beat`): the reconciler is idempotent,
        # but a second beat would only do the same work twice.
        "beat_schedule": {
            "vmfarm-reconcile": {"task": "vmfarm.reconcile", "schedule": s.reconcile_interval},
            # Cron triggers of pipelines (app/schedules.py): a tick each minute
            # submits the due slots, each claimed once; a late tick is dropped.
            "vmfarm-schedules": {
                "task": "vmfarm.schedules_tick",
                "schedule": crontab(),
                "options": {"expires": 55},
            },
        },
    }
    return conf


# Messages per Redis pipeline when a canvas is published in one batch (``batched``): a few
# hundred keeps a round trip's payload small (a signed run_host message is ~4 kB).
PUBLISH_BATCH = 250

_batch = threading.local()


class VmfarmCelery(Celery):  # type: ignore[misc]  # celery ships no types
    """Celery, able to publish a whole canvas (a phase of 10,000 hosts) in a few Redis round
    trips: inside ``batched()`` every message of this thread goes through one producer whose
    commands are sent in pipelines of PUBLISH_BATCH messages, and the publisher subscribes to
    no result channel (nobody here waits on a canvas's results: gates read the ledger)."""

    def producer_or_acquire(self, producer: Any = None) -> Any:
        if producer is None:
            producer = getattr(_batch, "producer", None)
        return super().producer_or_acquire(producer)

    def _get_backend(self) -> Any:
        backend = super()._get_backend()
        if not backend.supports_native_join:  # a polling backend subscribes to nothing
            return backend
        pending, on_call = backend.add_pending_result, backend.on_task_call

        def add_pending_result(result: Any, weak: bool = False, start_drainer: bool = True) -> Any:
            if getattr(_batch, "producer", None) is not None:
                return result  # a group's ready barrier, which nobody waits on here
            return pending(result, weak=weak, start_drainer=start_drainer)

        def on_task_call(producer: Any, task_id: str) -> None:
            if getattr(_batch, "producer", None) is None:
                on_call(producer, task_id)

        backend.add_pending_result = add_pending_result
        backend.on_task_call = on_task_call
        return backend


class ReplayingBatch:
    """The Redis commands of a batch of messages (kombu's publish-batch protocol of its Redis
    channel: ``publish``, ``flush``, ``discard``, ``close``), sent in one pipeline when
    ``max_size`` are buffered and when the batch ends.

    A pipeline the connection lost (Redis restarted under it) is sent again, whole, on a new
    connection, as ``task_publish_retry_policy`` allows, as kombu does for one message outside
    a batch: its messages are delivered at least once (a message the broker took before the cut
    arrives twice and runs once: same task id, idempotent claim); messages of earlier
    pipelines are not sent again."""

    def __init__(self, channel: Any, max_size: int) -> None:
        self.channel = channel
        self.max_size = max_size
        self.commands: list[tuple[str, tuple[Any, ...]]] = []
        self._collecting: list[tuple[str, tuple[Any, ...]]] | None = None

    def publish(self, message: Any, **kwargs: Any) -> Any:
        collected: list[tuple[str, tuple[Any, ...]]] = []
        self._collecting = collected
        try:
            result = self.channel.basic_publish(message, _publish_batch=self, **kwargs)
        finally:
            self._collecting = None
        if self.commands and len(self.commands) + len(collected) > self.max_size:
            self.flush()
        self.commands.extend(collected)
        if len(self.commands) >= self.max_size:
            self.flush()
        return result

    def add(self, name: str, *args: Any) -> None:
        """One Redis command of the message being published (called by the channel)."""
        if self._collecting is None:
            raise RuntimeError("a Redis publish command outside a publish")
        self._collecting.append((name, args))

    def flush(self) -> None:
        if not self.commands:
            return
        from redis.exceptions import ConnectionError as Lost
        from redis.exceptions import TimeoutError as Late

        policy = app.conf.task_publish_retry_policy or {}
        retries = int(policy.get("max_retries", 3))
        delay, step = (
            float(policy.get("interval_start", 0)),
            float(policy.get("interval_step", 0.2)),
        )
        most = float(policy.get("interval_max", 1))
        for attempt in range(retries + 1):
            try:
                with (
                    self.channel.conn_or_acquire() as client,
                    client.pipeline(transaction=False) as pipe,
                ):
                    for name, args in self.commands:
                        getattr(pipe, name)(*args)
                    pipe.execute()
                break
            except (Lost, Late, OSError) as exc:
                if attempt == retries:
                    from kombu.exceptions import BatchPublishError

                    raise BatchPublishError(
                        f"the broker lost {len(self.commands)} published messages' connection "
                        f"{retries + 1} times; delivery is uncertain"
                    ) from exc
                log.warning(
                    "publishing %d messages: the broker connection was lost (%s); sending "
                    "them again in %.1f s",
                    len(self.commands),
                    exc,
                    min(delay, most),
                )
                time.sleep(min(delay, most))
                delay += step
        self.commands = []

    def discard(self) -> None:
        self.commands = []

    def close(self) -> None:
        self.commands = []


@contextmanager
def batched(size: int | None = None) -> Iterator[None]:
    """Publish every message this thread sends inside the block through one producer, in
    Redis pipelines of ``size`` messages (PUBLISH_BATCH; sent when full and when the block
    ends; other transports send each at once), subscribing to no result. A message is
    signed, routed and given its options exactly as outside the block (``ReplayingBatch``
    says how a lost connection is handled). If the block raises, messages not yet sent are
    dropped."""
    if getattr(_batch, "producer", None) is not None:  # nested: the outer block sends
        yield
        return
    with app.producer_or_acquire() as producer:
        channel = producer.channel
        if hasattr(channel, "create_publish_batch"):  # kombu's Redis channel
            channel.create_publish_batch = functools.partial(ReplayingBatch, channel)
        _batch.producer = producer
        try:
            with producer.batch(max_size=size or PUBLISH_BATCH):
                yield
        finally:
            _batch.producer = None


app = VmfarmCelery(
    "vmfarm", include=["tasks.deploy", "tasks.control", "tasks.discovery", "app.schedules"]
)
app.conf.update(build_config())
setup(app, signing_paths(get_settings()))


def reconfigure() -> None:
    """Re-read settings (tests change the environment after import)."""
    get_settings.cache_clear()
    app.conf.update(build_config())
    setup(app, signing_paths(get_settings()))
    # A task bound to the app keeps the serializer of the configuration it was bound under
    # (Celery's Task.bind copies task_serializer once): give every task today's, so a process
    # that turns signing on or off here sends what the workers accept.
    # Each task also caches its send options (serializer among them) on first send, and the
    # app's message sender caches the default serializer when first built: drop both.
    if app.finalized:
        for task in app.tasks.values():
            type(task).serializer = app.conf.task_serializer
            task._exec_options = None
    app.amqp.__dict__.pop("send_task_message", None)
    # The broker connection and producer pools and the result backend are cached on first use:
    # drop them. kombu keeps its pools in global groups keyed by broker URL, so a closed pool
    # would come back for the same URL later: clear those groups too.
    from kombu import pools

    pools.reset()
    app._pool = None
    app.amqp._producer_pool = None
    app.__dict__.pop("backend", None)
    app._local.__dict__.pop("backend", None)
