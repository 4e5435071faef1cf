"""Host keys: the known_hosts files vmfarm reads and writes (OpenSSH's format, hashed names
included), and which key types to ask a host for.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import paramiko
from paramiko.hostkeys import HostKeyEntry, HostKeys

log = logging.getLogger("app.connectors.ssh")


def known_hosts_name(hostname: str, port: int) -> str:
    """The name a host has in known_hosts: ``host`` on port 22, ``[host]:port`` elsewhere."""
    return hostname if port == 22 else f"[{hostname}]:{port}"


def default_known_hosts_file() -> str:
    """OpenSSH's per-user known_hosts, used when a target names none."""
    return os.path.expanduser("~/.ssh/known_hosts")


@dataclass(frozen=True)
class KnownHosts:
    """A parsed known_hosts file."""

    keys: HostKeys
    revoked: frozenset[str]  # "type base64" of every @revoked key

    def lookup(self, name: str) -> Mapping[str, paramiko.PKey] | None:
        """The keys on record for a known_hosts name, by key type (None if none)."""
        return self.keys.lookup(name)


# known_hosts parsing costs ~3 ms per 100 lines: cache the parsed file per process, keyed by
# (inode, size, mtime) so an edit (ours or anyone's) is picked up on the next connect.
_known_hosts_lock = threading.Lock()
_known_hosts_cache: dict[str, tuple[tuple[int, int, int], KnownHosts]] = {}


def load_known_hosts(path: str) -> KnownHosts | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    sig = (st.st_ino, st.st_size, st.st_mtime_ns)
    with _known_hosts_lock:
        cached = _known_hosts_cache.get(path)
    if cached is not None and cached[0] == sig:
        return cached[1]
    with open(path, encoding="utf-8", errors="replace") as fh:
        keys = parse_known_hosts(fh.read())
    with _known_hosts_lock:
        _known_hosts_cache[path] = (sig, keys)
    return keys


def parse_known_hosts(text: str) -> KnownHosts:
    # Not HostKeys.load(): it raises on lines it cannot decode (@cert-authority, @revoked, a
    # corrupt line), and one such line must not make every host unreachable. A skipped line can
    # only leave a host unknown, never make it trusted; @revoked keys are kept and refused.
    keys = HostKeys()
    revoked: set[str] = set()
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("@"):
            fields = line.split()
            if fields[0] == "@revoked" and len(fields) >= 4:
                revoked.add(f"{fields[2]} {fields[3]}")
            continue  # @cert-authority: host certificates are not supported
        try:
            entry = HostKeyEntry.from_line(line, lineno)
        except Exception:
            log.debug("known_hosts line %d skipped: cannot parse it", lineno)
            continue
        if entry is not None and entry.key is not None:
            for hostname in entry.hostnames:
                keys.add(hostname, entry.key.get_name(), entry.key)
    return KnownHosts(keys=keys, revoked=frozenset(revoked))


def preferred_key_types(known: Iterable[str], offered: Sequence[str]) -> list[str]:
    # Ask the server for a key type we already have on record, as OpenSSH does; otherwise a host
    # with several host keys would show us one we do not know and look "changed".
    wanted: list[str] = []
    for name in known:
        wanted += ["rsa-sha2-512", "rsa-sha2-256"] if name == "ssh-rsa" else [name]
    first = [t for t in wanted if t in offered]
    return first + [t for t in offered if t not in first]


def describe_key(key: paramiko.PKey) -> str:
    return f"{key.get_name()} {key.fingerprint}"
