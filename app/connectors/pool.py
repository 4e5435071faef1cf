"""A process-wide pool of open connections, keyed by (user, host, port).

A fresh SSH connection costs ~30 ms of CPU and a handshake; a further command on an open one
~4 ms. So every step of a host that runs in the same worker process leases the connection the
previous step returned::

    with get_pool().lease(target) as conn:
        result = conn.run(script, timeout=600)

A lease is exclusive: two threads working on the same host at the same time get two
connections, never one shared channel sequence. Idle connections are reused newest first,
dropped when dead or idle longer than ``max_idle``, and a connection whose lease ended in a
``ConnectivityError`` is never handed out again. Safe to call from Celery's threads pool; after
a fork (prefork pool) the child starts with an empty pool instead of sharing the parent's sockets.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from app.connectors.base import Connector, HostTarget
from app.errors import ConfigError, ConnectivityError

log = logging.getLogger(__name__)

DEFAULT_MAX_IDLE = 300.0

ConnectorFactory = Callable[[HostTarget], Connector]
# HostTarget.pool_key (user, host, port) plus the connector kind, so a sandbox target and an SSH
# target that happen to share an address never get each other's connection.
PoolKey = tuple[str, str, int, str]


def is_local(target: HostTarget) -> bool:
    """True when the target's commands run on this machine (sandbox or connection: local)."""
    return bool(target.sandbox_root) or target.extra.get("connection") == "local"


# A worker-side switch for benchmarks and tests, never written in a pipeline file (the loader
# refuses ``connection: {type: Noop}``): VMFARM_TEST_CONNECTION=noop makes every host of this
# worker a NoopConnector (nothing runs anywhere, every command "succeeds"). The coordinator reads
# the same setting (app.settings.Settings.test_connection) and then records no deployment in the
# Instance ledger: set it on every process of such a run.
TEST_CONNECTION_VAR = "VMFARM_TEST_CONNECTION"
TEST_CONNECTIONS = ("noop",)
_warned = False


def forced_connection() -> str | None:
    """The test-only connection this worker uses for every host (VMFARM_TEST_CONNECTION), if
    any; ConfigError for a value that names none."""
    value = os.environ.get(TEST_CONNECTION_VAR, "").strip().lower()
    if value and value not in TEST_CONNECTIONS:
        raise ConfigError(
            f"{TEST_CONNECTION_VAR}={value!r} names no test connection (known: "
            f"{', '.join(TEST_CONNECTIONS)}); unset it for real deployments"
        )
    return value or None


def pool_key(target: HostTarget) -> PoolKey:
    """The pool's key for a target."""
    kind = forced_connection() or ("local" if is_local(target) else "ssh")
    return (*target.pool_key, kind)


def default_connector(target: HostTarget) -> Connector:
    """The connector for a target: local for sandbox/local hosts, SSH otherwise (every host a
    NoopConnector under VMFARM_TEST_CONNECTION=noop)."""
    if forced_connection() == "noop":
        from app.connectors.noop import NoopConnector

        global _warned
        if not _warned:
            _warned = True
            log.warning(
                "%s=noop: no command runs on any host of this worker; every step "
                "records success (benchmarks and tests only)",
                TEST_CONNECTION_VAR,
            )
        return NoopConnector(target)
    if is_local(target):
        # Imported here: the local connector is optional for SSH-only workers.
        from app.connectors.local import LocalConnector

        local: Connector = LocalConnector(target)
        return local
    from app.connectors.ssh import SSHConnector

    # SSH credentials kept as secrets: resolved here, on the worker, only when connecting.
    wanted = {
        k: target.extra[k]
        for k in ("password_secret", "passphrase_secret", "private_key_secret")
        if target.extra.get(k)
    }
    values: dict[str, str] = {}
    if wanted:
        from app.secrets import resolve

        got = resolve(list(wanted.values()))
        values = {k: got[v] for k, v in wanted.items()}
    return SSHConnector(
        target,
        password=values.get("password_secret"),
        key_passphrase=values.get("passphrase_secret"),
        private_key_text=values.get("private_key_secret"),
    )


@dataclass
class PoolStats:
    """How many connections the pool holds right now."""

    idle: int
    leased: int


class ConnectorPool:
    """Thread-safe pool of connected connectors; see the module docstring."""

    def __init__(
        self,
        *,
        max_idle: float = DEFAULT_MAX_IDLE,
        factory: ConnectorFactory = default_connector,
    ) -> None:
        """Create an empty pool; idle connections older than max_idle seconds are closed."""
        self.max_idle = max_idle
        self._factory = factory
        self._lock = threading.Lock()
        # Per key, a stack of (returned_at, connector): the newest is reused first, so surplus
        # connections age out instead of all staying warm.
        self._idle: dict[PoolKey, list[tuple[float, Connector]]] = {}
        # Leased connector -> the pool generation it was leased in (close_all bumps it).
        self._leased: dict[Connector, int] = {}
        self._generation = 0
        self._next_sweep = 0.0

    @contextmanager
    def lease(self, target: HostTarget) -> Iterator[Connector]:
        """Lend a connected connector for target; it returns to the pool when the block ends."""
        conn, generation = self._acquire(target)
        # Other failures (a timeout, a script error, a callback that raised) leave the connection
        # usable; is_alive() in _release has the last word.
        reusable = True
        try:
            yield conn
        except ConnectivityError:
            reusable = False  # the connection is suspect: never hand it out again
            raise
        finally:
            self._release(pool_key(target), conn, generation, reusable=reusable)

    def close_all(self) -> None:
        """Close every idle connection; leased ones are closed when their lease ends."""
        with self._lock:
            idle = [conn for stack in self._idle.values() for _, conn in stack]
            self._idle.clear()
            self._generation += 1
        for conn in idle:
            _close_quietly(conn)

    def stats(self) -> PoolStats:
        """Counts of idle and leased connections."""
        with self._lock:
            idle = sum(len(stack) for stack in self._idle.values())
            return PoolStats(idle=idle, leased=len(self._leased))

    def _acquire(self, target: HostTarget) -> tuple[Connector, int]:
        key = pool_key(target)
        now = time.monotonic()
        with self._lock:
            # A sweep visits every idle connection: at most one a second, not one per lease (a
            # worker that served 5,000 hosts holds 5,000 idle connections).
            expired = self._expire_locked(now) if now >= self._next_sweep else []
        for conn in expired:
            _close_quietly(conn)
        while True:
            with self._lock:
                stack = self._idle.get(key)
                returned, candidate = stack.pop() if stack else (now, None)
                if stack is not None and not stack:
                    del self._idle[key]
                generation = self._generation
                if candidate is not None:
                    self._leased[candidate] = generation
            if candidate is None:
                break
            if now - returned <= self.max_idle and candidate.is_alive():
                return candidate, generation
            log.debug("dropping dead pooled connection to %s@%s:%s (%s)", *key)
            self._forget(candidate)
            _close_quietly(candidate)
        # Connect outside the lock: a slow host must not hold up leases for other hosts.
        conn = self._factory(target)
        try:
            conn.connect()
        except BaseException:
            _close_quietly(conn)
            raise
        with self._lock:
            self._leased[conn] = self._generation
            return conn, self._generation

    def _release(self, key: PoolKey, conn: Connector, generation: int, *, reusable: bool) -> None:
        with self._lock:
            self._leased.pop(conn, None)
            keep = reusable and generation == self._generation
        if keep and conn.is_alive():
            with self._lock:
                if generation == self._generation:
                    self._idle.setdefault(key, []).append((time.monotonic(), conn))
                    return
        _close_quietly(conn)

    def _expire_locked(self, now: float) -> list[Connector]:
        self._next_sweep = now + min(1.0, self.max_idle / 10)
        expired: list[Connector] = []
        for key in list(self._idle):
            stack = self._idle[key]
            fresh = [(t, c) for t, c in stack if now - t <= self.max_idle]
            expired += [c for t, c in stack if now - t > self.max_idle]
            if fresh:
                self._idle[key] = fresh
            else:
                del self._idle[key]
        return expired

    def _forget(self, conn: Connector) -> None:
        with self._lock:
            self._leased.pop(conn, None)


def _close_quietly(conn: Connector) -> None:
    try:
        conn.close()
    except Exception:  # closing must never mask the error being handled
        log.debug("error closing %r", conn, exc_info=True)


_pool: ConnectorPool | None = None
_pool_lock = threading.Lock()


def get_pool() -> ConnectorPool:
    """The process-wide pool (created on first use)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ConnectorPool()
        return _pool


def _forget_pool_after_fork() -> None:
    # The child must not talk over the parent's sockets (their paramiko threads do not exist in
    # the child), nor wait on a lock another parent thread held at fork time.
    global _pool, _pool_lock
    _pool = None
    _pool_lock = threading.Lock()


def _close_pool_at_exit() -> None:
    if _pool is not None:
        _pool.close_all()


os.register_at_fork(after_in_child=_forget_pool_after_fork)
# paramiko warns that unclosed transports can hang interpreter exit.
atexit.register(_close_pool_at_exit)
