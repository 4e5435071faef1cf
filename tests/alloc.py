"""One allocator for what tests share on this machine: lab addresses, TCP ports, Redis databases.

Several checkouts run their tests on one machine at the same time, so nothing a test binds or
flushes may be a number written in the test. Every lease is an exclusive ``fcntl.flock`` on a
file under ``/tmp/vmfarm-alloc/`` (``VMFARM_TEST_ALLOC_DIR``), held for as long as the lease
lives: the kernel drops the lock when the holder's process dies, so a killed test run leaks
nothing, and a lock file left on disk means nothing by itself.

- Addresses: a block of consecutive ``127.0.1.x`` (x in 2..254; 127.0.1.1 is the hostname's
  address on Debian), for ``lab_up(first=...)`` and for servers bound on their own address. An
  address is taken only when its lock is free *and* no TCP socket on this machine uses it
  (``/proc/net/tcp``), which also keeps clear of labs started without this allocator
  (``vmfarm lab up``, benchmarks). Every port on a leased address belongs to the lease.
- Ports: the kernel picks a free one (bind to port 0), then its number is locked, so two test
  runs never hand the same number to two servers.
- Redis databases: a database number of the test Redis (``VMFARM_TEST_REDIS``), 2..15 (0 and 1
  are the defaults a developer's own vmfarm uses), emptied when leased.

When nothing is free the allocator waits (other runs release their leases as their tests end)
and fails after ``wait`` seconds naming what it could not get.
"""

from __future__ import annotations

import fcntl
import os
import random
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

LOCK_DIR = Path(os.environ.get("VMFARM_TEST_ALLOC_DIR", "/tmp/vmfarm-alloc"))
SUBNET = "127.0.1."
FIRST_HOST, LAST_HOST = 2, 254
FIRST_REDIS_DB = 2


def _lock(name: str) -> int | None:
    """An exclusive lock on LOCK_DIR/name: its open descriptor, or None if another holds it."""
    LOCK_DIR.mkdir(parents=True, exist_ok=True)
    if LOCK_DIR.stat().st_uid == os.geteuid():
        os.chmod(LOCK_DIR, 0o1777)  # other users' test runs lock here too
    path = LOCK_DIR / name
    # Read-only is enough for flock, so another user's lock file (0644 under their umask) works.
    fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _addresses_in_use() -> set[str]:
    """Local IPv4 addresses of every TCP socket on this machine (any state but TIME_WAIT)."""
    used: set[str] = set()
    try:
        lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return used
    for line in lines:
        fields = line.split()
        local, state = fields[1], fields[3]
        if state == "06":  # TIME_WAIT: closed, nobody listens
            continue
        raw = bytes.fromhex(local.split(":")[0])
        used.add(socket.inet_ntoa(raw[::-1]))  # /proc/net/tcp is little-endian
    return used


@dataclass
class Lease:
    """Held numbers (addresses, a port or a database) and the locks that reserve them."""

    what: str
    fds: list[int] = field(default_factory=list, repr=False)

    def release(self) -> None:
        """Give the numbers back (closing the lock files drops the locks)."""
        while self.fds:
            os.close(self.fds.pop())

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@dataclass
class AddressLease(Lease):
    first: int = 0
    count: int = 0

    @property
    def addresses(self) -> list[str]:
        """The block's addresses, in order."""
        return [f"{SUBNET}{n}" for n in range(self.first, self.first + self.count)]


@dataclass
class PortLease(Lease):
    port: int = 0


@dataclass
class RedisLease(Lease):
    base: str = ""
    db: int = 0

    @property
    def url(self) -> str:
        return f"{self.base}/{self.db}"


class Allocator:
    """Hands out leases; every lease still held is released by :meth:`close`."""

    def __init__(self, *, wait: float = 300.0) -> None:
        self.wait = wait
        self.leases: list[Lease] = []

    def close(self) -> None:
        """Release every lease this allocator handed out."""
        for lease in self.leases:
            lease.release()
        self.leases.clear()

    def _keep(self, lease: Lease) -> None:
        self.leases.append(lease)

    def _until_free(self, what: str, attempt: Callable[[], Lease | None]) -> Lease:
        deadline = time.monotonic() + self.wait
        while True:
            lease = attempt()
            if lease is not None:
                self._keep(lease)
                return lease
            if time.monotonic() >= deadline:
                raise RuntimeError(
                    f"no {what} free after {self.wait:g} s: other test runs on this machine "
                    f"hold them (locks in {LOCK_DIR})"
                )
            time.sleep(0.5)  # waiting for another run to release: nothing to poll but the locks

    # --- addresses ----------------------------------------------------------------------------

    def addresses(self, count: int) -> AddressLease:
        """A block of ``count`` consecutive 127.0.1.x addresses, unused by any socket."""
        if not 1 <= count <= LAST_HOST - FIRST_HOST + 1:
            raise ValueError(f"cannot lease {count} addresses")
        lease = self._until_free(
            f"block of {count} lab address(es)", lambda: self._try_addresses(count)
        )
        assert isinstance(lease, AddressLease)
        return lease

    def _try_addresses(self, count: int) -> AddressLease | None:
        starts = list(range(FIRST_HOST, LAST_HOST - count + 2))
        # Start the search at a random block: runs starting together rarely race for one.
        pivot = random.randrange(len(starts))
        used = _addresses_in_use()
        for first in starts[pivot:] + starts[:pivot]:
            nums = range(first, first + count)
            if any(f"{SUBNET}{n}" in used for n in nums):
                continue
            fds: list[int] = []
            for n in nums:
                fd = _lock(f"addr-{SUBNET}{n}.lock")
                if fd is None:
                    break
                fds.append(fd)
            else:
                # Locked: look again, a lab started without the allocator may have come up.
                if not any(f"{SUBNET}{n}" in _addresses_in_use() for n in nums):
                    return AddressLease(
                        what=f"{SUBNET}{first}+{count}", fds=fds, first=first, count=count
                    )
            for fd in fds:
                os.close(fd)
        return None

    # --- ports --------------------------------------------------------------------------------

    def port(self) -> PortLease:
        """A TCP port number free on 127.0.0.1 (and so on every loopback address)."""
        lease = self._until_free("TCP port", self._try_port)
        assert isinstance(lease, PortLease)
        return lease

    def _try_port(self) -> PortLease | None:
        for _ in range(50):
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port: int = sock.getsockname()[1]
                fd = _lock(f"port-{port}.lock")
            if fd is not None:
                return PortLease(what=f"port {port}", fds=[fd], port=port)
        return None

    # --- Redis databases ----------------------------------------------------------------------

    def redis_db(self, base: str) -> RedisLease:
        """A database of the Redis at ``base`` (``redis://host:port``), emptied for the lease."""
        import redis

        client = redis.Redis.from_url(f"{base}/0")
        try:
            configured = client.config_get("databases").get("databases")
            databases = int(configured) if configured else 16
        except redis.ResponseError:  # CONFIG disabled: Redis's default
            databases = 16
        finally:
            client.close()
        tag = base.split("://", 1)[-1].replace("/", "_").replace(":", "_")

        def attempt() -> RedisLease | None:
            for db in range(FIRST_REDIS_DB, databases):
                fd = _lock(f"redis-{tag}-{db}.lock")
                if fd is not None:
                    return RedisLease(what=f"{base}/{db}", fds=[fd], base=base, db=db)
            return None

        lease = self._until_free(f"Redis database at {base}", attempt)
        assert isinstance(lease, RedisLease)
        conn = redis.Redis.from_url(lease.url)
        try:
            conn.flushdb()
        finally:
            conn.close()
        return lease

    @contextmanager
    def scoped(self) -> Iterator[Allocator]:
        """A child allocator whose leases end with the block (module/function scope)."""
        child = Allocator(wait=self.wait)
        try:
            yield child
        finally:
            child.close()
