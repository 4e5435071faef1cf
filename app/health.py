"""Liveness checks for container healthchecks: ``python -m app.health worker|control|autoscaler``.

``worker`` and ``control`` check every such worker registered from this host, or only the
worker names given after the role (``python -m app.health worker vmfarm-r1@host``).

Each checks the process of *this* machine (container), exits 0 when it is alive and 1 when it
is not, with one line on stderr saying why:

* ``worker``: a region worker registered from this host (``WorkerBeat.hostname``) has beaten
  within ``VMFARM_HEARTBEAT_TIMEOUT`` and answers a Celery ping (its consumer loop runs, not
  only its heartbeat thread);
* ``control``: the same for a worker consuming the control queue;
* ``autoscaler``: ``vmfarm autoscale`` has completed a round recently (the file it rewrites
  every round, ``$VMFARM_HOME/autoscale/alive.json``, is younger than three intervals).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

ROLES = ("worker", "control", "autoscaler")


def alive_file() -> Path:
    """Where ``vmfarm autoscale`` records its last round."""
    from app.settings import get_settings

    return get_settings().home_dir / "autoscale" / "alive.json"


def mark_alive(path: Path, *, interval: float) -> None:
    """Record a completed autoscale round (pid, time, interval) atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"pid": os.getpid(), "at": time.time(), "interval": interval}))
    os.replace(tmp, path)


def check_worker(
    role: str,
    *,
    hostname: str | None = None,
    names: list[str] | None = None,
    ping: bool = True,
    timeout: float = 5.0,
    workers: list[dict[str, Any]] | None = None,
) -> tuple[bool, str]:
    """Whether this host's ``role`` workers (``worker`` or ``control``; only ``names`` when
    given) are alive, and why."""
    from app.celery import CONTROL_QUEUE
    from app.settings import get_settings

    if get_settings().embedded:
        return False, "no broker (VMFARM_BROKER_URL): there are no workers to check"
    host = hostname or socket.gethostname()
    if workers is None:
        from app.delegates import all_workers

        workers = all_workers()
    mine = [
        w
        for w in workers
        if w.get("hostname") == host
        and (
            CONTROL_QUEUE in (w.get("queues") or [])
            if role == "control"
            else bool(w.get("regions"))
        )
        and (not names or w.get("name") in names)
    ]
    if not mine:
        what = "control worker" if role == "control" else "region worker"
        return False, (
            f"no {what} of {host} is registered"
            + (f" as {', '.join(names)}" if names else "")
            + " (still starting, or it cannot write the ledger)"
        )
    live = [w for w in mine if w.get("live")]
    if not live:
        limit = get_settings().heartbeat_timeout
        return False, ", ".join(
            f"{w['name']}: last heartbeat {w['age']:.0f}s ago" for w in mine
        ) + f" (timeout {limit:g}s)"
    names = [str(w["name"]) for w in live]
    if ping:
        from app.celery import app

        replies = app.control.ping(destination=names, timeout=timeout) or []
        answered = {name for reply in replies for name in reply}
        silent = [n for n in names if n not in answered]
        if silent:
            return False, (
                f"{', '.join(silent)}: beating but not answering a ping within "
                f"{timeout:g}s (its consumer is stuck, or the broker is unreachable)"
            )
    return True, f"{', '.join(names)}: live"


def check_autoscaler(path: Path | None = None, *, now: float | None = None) -> tuple[bool, str]:
    """Whether ``vmfarm autoscale`` completed a round within three of its intervals (at
    least 60 s)."""
    path = path or alive_file()
    try:
        data = json.loads(path.read_text())
        at, interval = float(data["at"]), float(data["interval"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return False, f"{path}: no autoscale round recorded ({exc})"
    age = (now if now is not None else time.time()) - at
    limit = max(60.0, 3 * interval)
    if age > limit:
        return False, f"the last autoscale round was {age:.0f}s ago (limit {limit:g}s)"
    return True, f"last autoscale round {age:.0f}s ago"


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] not in ROLES or (args[0] == "autoscaler" and len(args) > 1):
        print(
            "usage: python -m app.health {worker|control} [NAME...] | autoscaler", file=sys.stderr
        )
        return 2
    try:
        ok, why = (
            check_autoscaler()
            if args[0] == "autoscaler"
            else check_worker(args[0], names=args[1:] or None)
        )
    except Exception as exc:  # the ledger or the broker cannot be read: not healthy
        ok, why = False, f"cannot check: {type(exc).__name__}: {exc}"
    print(f"{args[0]}: {why}", file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
