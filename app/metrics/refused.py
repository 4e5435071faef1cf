"""Messages a worker refused (unsigned, or signed by no one it trusts), counted where every
exporter can read them.

A worker that refuses a message calls ``count_refused_message(reason)``. The count lives in a
Redis hash on the broker (``HINCRBY vmfarm:metrics:refused-messages <reason> 1``): workers are
separate processes on separate machines, and the exporter that Prometheus scrapes is another
one, so an in-process counter would be seen by nobody. Without a Redis broker (embedded mode:
one process) the count is kept in this process.

The exporter reads it as ``vmfarm_refused_messages_total{reason}``.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter

log = logging.getLogger("vmfarm.metrics")

KEY = "vmfarm:metrics:refused-messages"
# Always exposed (as 0 until one is refused): an alert on increase() needs a series.
REASONS = ("unsigned", "bad-signature")
_local: Counter[str] = Counter()
_lock = threading.Lock()


def _redis_url() -> str | None:
    from app.settings import get_settings

    url = get_settings().celery_broker
    return url if url.startswith(("redis://", "rediss://")) else None


def _client(url: str) -> object:
    import redis

    return redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)


def count_refused_message(reason: str = "unsigned") -> None:
    """Count one refused message (``reason``: a short word, e.g. ``unsigned``,
    ``bad-signature``, ``untrusted-signer``). Never raises: a refusal must not fail because
    the count cannot be written (it is logged)."""
    reason = (reason or "unknown").strip()[:64] or "unknown"
    url = _redis_url()
    if url is None:
        with _lock:
            _local[reason] += 1
        return
    try:
        _client(url).hincrby(KEY, reason, 1)  # type: ignore[attr-defined]
    except Exception as exc:
        log.warning("cannot count a refused message (%s) on the broker: %s", reason, exc)
        with _lock:
            _local[reason] += 1


def refused_counts() -> dict[str, int]:
    """Refused messages by reason: the broker's count plus this process's."""
    counts: Counter[str] = Counter(dict.fromkeys(REASONS, 0))
    url = _redis_url()
    if url is not None:
        raw = _client(url).hgetall(KEY)  # type: ignore[attr-defined]
        for k, v in dict(raw).items():
            name = k.decode() if isinstance(k, bytes) else str(k)
            counts[name] += int(v)
    with _lock:
        counts.update(_local)
    return dict(counts)
