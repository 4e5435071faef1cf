"""Task events for Flower: on while a ``vmfarm flower`` watches, off when the last one exits.

Flower (``--enable_events``, its default) turns Celery task events on in every worker and
keeps them on (it repeats the command every few seconds). Events cost three to four Redis
messages per task, so vmfarm leaves them off (``VMFARM_TASK_EVENTS``) unless someone watches.
``FlowerWatch`` wraps a Flower process: it registers it as a watcher on the broker and, when
Flower exits, turns task events off in the workers, unless another watcher is still
registered or ``VMFARM_TASK_EVENTS`` asks for them always.

Watchers are members of the Redis sorted set ``vmfarm:flower:watchers`` (score: when the
registration expires), renewed by a daemon thread, so a Flower that was killed (no clean exit)
stops counting after ``ttl`` seconds. A Flower started by other means (``celery flower``) is not
seen; it turns events on again by itself within seconds.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from types import TracebackType
from typing import Any

log = logging.getLogger("vmfarm.flower")

KEY = "vmfarm:flower:watchers"


class FlowerWatch:
    """``with FlowerWatch(app): run Flower`` (see the module docstring). ``disabled`` tells,
    after the block, whether this exit turned the events off (the workers' replies)."""

    def __init__(
        self, app: Any, *, url: str | None = None, ttl: float = 60.0, client: Any = None
    ) -> None:
        from app.settings import get_settings

        self.app = app
        self.ttl = float(ttl)
        self.url = url or get_settings().celery_broker
        self.client = client
        self.ident = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.disabled: list[dict[str, Any]] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _redis(self) -> Any:
        if self.client is None:
            import redis

            self.client = redis.Redis.from_url(
                self.url, socket_timeout=10, socket_connect_timeout=5
            )
        return self.client

    def _renew(self) -> None:
        r = self._redis()
        now = time.time()
        r.zadd(KEY, {self.ident: now + self.ttl})
        r.zremrangebyscore(KEY, "-inf", now)  # registrations that expired (killed Flowers)
        r.expire(KEY, int(self.ttl * 10))

    def _run(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                self._renew()
            except Exception as exc:  # the broker is down: Flower itself will say so
                log.warning("cannot renew this Flower's registration: %s", exc)

    def others(self) -> int:
        """Other Flowers registered and not expired."""
        r = self._redis()
        return int(r.zcount(KEY, f"({time.time()}", "+inf"))

    def __enter__(self) -> FlowerWatch:
        self._renew()
        self._thread = threading.Thread(target=self._run, name="vmfarm-flower-watch", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def stop(self) -> list[dict[str, Any]] | None:
        """Deregister; turn task events off in the workers unless someone else needs them.
        Returns the workers' replies when they were turned off, else None. Never raises."""
        from app.settings import get_settings

        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        try:
            self._redis().zrem(KEY, self.ident)
            if get_settings().task_events:
                log.info("task events stay on (VMFARM_TASK_EVENTS)")
                return None
            others = self.others()
            if others:
                log.info("task events stay on: %d other Flower(s) watching", others)
                return None
            replies = self.app.control.broadcast("disable_events", reply=True, timeout=2.0)
            self.disabled = list(replies or [])
            log.info("task events turned off in %d worker(s)", len(self.disabled))
            return self.disabled
        except Exception as exc:
            log.warning("could not turn task events off after Flower: %s", exc)
            return None
