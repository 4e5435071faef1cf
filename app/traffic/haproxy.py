"""HAProxySwitch: blue-green traffic through a real HAProxy on the control machine.

For the lab and on-prem hosts (spec ``type: Local``). Needs HAProxy 2.5 or newer (Debian 12
ships 2.6): ``apt-get install -y haproxy``. The switch never installs anything; a missing or
too old binary raises ``ConfigError`` with that command.

Files, all under ``state_dir``::

    haproxy.cfg   frontend on ``listen``, backend ``be_<name>`` whose servers are the live set
    state.json    the frontend settings and the live set (what ``start()`` restores)
    haproxy.pid   the master's pid (``-p``); ``stop()`` signals exactly that process
    admin.sock    the runtime API (stats socket, level admin)
    master.sock   the master CLI (``-S``): ``show proc``, and ``reload`` for an operator
                  (both sockets go to /tmp/vmfarm-haproxy-<hash of state_dir>/ instead when
                  state_dir is too long for a UNIX socket path)
    haproxy.log   HAProxy's own stderr: startup errors, servers going UP/DOWN
    lock          serialises switches from several worker processes

How a switch moves traffic: through the runtime API, with no reload.

1. Each green backend is added as a new server (``add server ... check``), its health check
   enabled, and put in ``drain`` state: HAProxy checks it but sends it no traffic. A leftover
   server of that backend is never reused: leaving maintenance keeps its last check result.
2. The switch waits for a *completed, passing* check of every green server. This matters:
   a server leaving maintenance is reported UP (check status INI) before it was ever checked,
   so without this wait traffic could reach a green host HAProxy never saw answer. If one goes
   DOWN (``fall`` failed checks in a row) or has not passed within ``check_timeout``, green is
   put back to maintenance and deleted, blue keeps all traffic, and ``TrafficError`` names the
   server and the check's reason.
3. The new config file is written and validated (``haproxy -c``) so a restart keeps the set.
4. Green is set ``ready``, then (a separate command, only if that succeeded) blue ``maint``.
   At every instant at least one complete set is enabled, and only old or new servers are;
   requests already running on blue finish there.
5. The switch returns once no request runs on blue any more (``drain_timeout`` at most), so
   blue can be torn down. Blue's servers are then deleted; one that HAProxy still holds idle
   connections to stays in maintenance (no traffic) until the next switch deletes it.

Why not a seamless reload (``expose-fd listeners`` / ``-x`` / master CLI ``reload``)? The
listening socket does survive a reload, but measured on HAProxy 2.6 with a keep-alive client:
after ``reload`` returned, the old worker answered one more request from the *old* backend,
then closed the connection under the next one (``RemoteDisconnected``): a failed request. A
reload also starts the new worker's servers as UP before any check, and forks a process per
switch. Runtime state changes apply between two requests, even on a kept-alive client
connection (HTTP mode picks a server per request): tests/test_traffic_haproxy.py sends about
10,000 requests over fresh and kept-alive connections across three switches, with no failure.
The config file is still kept current, so a restart (or an operator's ``reload``) comes back
with the live set.

HAProxy runs in master-worker mode (``-W``) as a child of the process that started it, in its
own session so that stopping a Celery worker does not stop traffic. It is not daemonised
(``-D``): on machines whose PID 1 does not reap orphans a daemon's master stays a zombie after
it exits; a child we started is reaped by ``stop()``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.errors import ConfigError, TrafficError
from app.traffic.base import (
    SwitchResult,
    TrafficSwitch,
    canonical_ip_backend,
    format_backend,
    split_backend,
    unique,
)

log = logging.getLogger(__name__)

INSTALL_HINT = "install it with `apt-get install -y haproxy` (Debian 12 ships 2.6)"
MIN_VERSION = (2, 5)  # dynamic servers with health checks (add server ... check)
CLI_TIMEOUT = 5.0
START_TIMEOUT = 15.0
LOCK_TIMEOUT = 120.0
POLL = 0.1
# AF_UNIX paths hold 107 bytes on Linux, and HAProxy binds through "<path>.<pid>.tmp" (up to
# 12 more bytes) before renaming: longer socket paths fail with "name too long".
MAX_SOCKET_PATH = 95

# `show servers state`: srv_op_state 0 and 2 are SRV_ST_STOPPED and SRV_ST_RUNNING;
# srv_check_result 3 and 4 are CHK_RES_PASSED and CHK_RES_CONDPASS; srv_admin_state 0 means no
# maintenance or drain flag, 0x08 is SRV_ADMF_FDRAIN (drain set through the runtime API).
OP_STOPPED, OP_RUNNING = 0, 2
CHECK_PASSED = (3, 4)
ADMIN_FORCED_DRAIN = 0x08

# HAProxy masters started by this Python process, so stop() can reap them (no zombies).
_children: dict[int, subprocess.Popen[bytes]] = {}


def find_haproxy() -> str:
    """The haproxy binary, or ConfigError saying how to install it."""
    found = shutil.which("haproxy")
    for candidate in (found, "/usr/sbin/haproxy", "/usr/local/sbin/haproxy"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise ConfigError(
        f"HAProxy is not installed; the Local traffic switch needs it: {INSTALL_HINT}"
    )


def haproxy_version(binary: str) -> tuple[int, int]:
    """(major, minor) of ``binary``, from ``haproxy -v``."""
    try:
        out = subprocess.run(
            [binary, "-v"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise ConfigError(f"cannot run {binary} -v: {exc}; {INSTALL_HINT}") from None
    match = re.search(r"version (\d+)\.(\d+)", out)
    if not match:
        raise ConfigError(f"{binary} -v did not print a version ({out[:80]!r}); {INSTALL_HINT}")
    return int(match[1]), int(match[2])


@dataclass(frozen=True)
class _Server:
    """One server of the backend, from ``show servers state``."""

    name: str
    backend: str  # "address:port"
    op_state: int
    admin: int
    check_result: int

    @property
    def enabled(self) -> bool:
        return self.admin == 0


class HAProxySwitch(TrafficSwitch):
    """A local HAProxy whose single backend is the live set."""

    def __init__(
        self,
        *,
        name: str,
        listen: str,
        state_dir: Path,
        mode: str = "http",
        health_check_path: str | None = None,
        check_interval: float = 1.0,
        check_timeout: float = 30.0,
        drain_timeout: float = 30.0,
        haproxy_bin: str | None = None,
    ) -> None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
            raise ConfigError(f"HAProxy switch name {name!r}: use letters, digits, '_', '.', '-'")
        self.name = name
        self.label = f"haproxy {name}"
        host, port = split_backend(listen, label=self.label)
        if port is None:
            raise ConfigError(f"traffic listen {listen!r} needs a port, e.g. 127.0.0.1:18080")
        self.listen = format_backend(host, port)
        if mode not in ("http", "tcp"):
            raise ConfigError(f"HAProxy mode {mode!r} must be http or tcp")
        self.mode = mode
        self.health_check_path = health_check_path
        self.check_interval = check_interval
        self.check_timeout = check_timeout
        self.drain_timeout = drain_timeout
        self.state_dir = Path(state_dir).absolute()
        self.config_file = self.state_dir / "haproxy.cfg"
        self.state_file = self.state_dir / "state.json"
        self.pid_file = self.state_dir / "haproxy.pid"
        socket_dir = _socket_dir(self.state_dir)
        self.admin_socket = socket_dir / "admin.sock"
        self.master_socket = socket_dir / "master.sock"
        self.log_file = self.state_dir / "haproxy.log"
        self.backend_name = f"be_{name}"
        self.haproxy_bin = haproxy_bin or find_haproxy()
        version = haproxy_version(self.haproxy_bin)
        if version < MIN_VERSION:
            raise ConfigError(
                f"{self.haproxy_bin} is HAProxy {version[0]}.{version[1]}; the Local traffic "
                f"switch needs {MIN_VERSION[0]}.{MIN_VERSION[1]} or newer (dynamic servers "
                f"with health checks): {INSTALL_HINT}"
            )

    # -- the interface ------------------------------------------------------------------------

    def live(self) -> list[str]:
        """Enabled servers that HAProxy considers up; [] when HAProxy is not running."""
        if self.pid is None:
            return []
        return [
            s.backend for s in self._servers().values() if s.enabled and s.op_state == OP_RUNNING
        ]

    def switch(self, backends: list[str]) -> SwitchResult:
        """Make exactly ``backends`` live: check green, enable it, then retire blue."""
        started = time.monotonic()
        target = unique([canonical_ip_backend(b, label=self.label) for b in backends])
        if not target:
            raise TrafficError(
                "refusing to switch to an empty set: every request would fail; "
                "stop the switch instead to take the service down",
                switch=self.label,
            )
        with self._locked():
            if self.pid is None:
                self._write_config(target)
                self._start()
                self._wait_checked([_server_name(b) for b in target], initial=True)
                return self._result(target, [], [], started)
            self._check_frontend()
            self._sweep(self._servers())
            servers = self._servers()
            previous = [s.backend for s in servers.values() if s.enabled]
            added = [b for b in target if b not in previous]
            removed = [b for b in previous if b not in target]
            if not added and not removed:
                self._write_config(target)
                return self._result([], [], previous, started)
            enabled = {s.backend: s for s in servers.values() if s.enabled}
            staged = self._stage(added, servers)
            try:
                self._wait_checked(staged)
                self._write_config(target)
                try:
                    self._cli_each([f"set server {self._srv(n)} state ready" for n in staged])
                except TrafficError:
                    self._write_config(previous)
                    raise
            except TrafficError:
                self._unstage(staged)
                raise
            retiring = [enabled[b].name for b in removed]
            self._cli_each([f"set server {self._srv(n)} state maint" for n in retiring])
            self._retire(retiring)
            return self._result(added, removed, previous, started)

    def close(self) -> None:
        """Nothing to release: every runtime command uses its own short connection."""

    # -- process control ----------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """The master's pid if the HAProxy of this state_dir is running, else None."""
        try:
            pid = int(self.pid_file.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if _is_our_haproxy(pid, self.config_file) else None

    def start(self) -> None:
        """Start HAProxy with the live set recorded in state_dir, if it is not running."""
        with self._locked():
            if self.pid is not None:
                self._check_frontend()
                return
            backends = self._recorded().get("backends") or []
            if not backends:
                raise TrafficError(
                    f"nothing recorded in {self.state_file} to serve; call switch(backends)",
                    switch=self.label,
                )
            self._write_config(list(backends))
            self._start()

    def stop(self, timeout: float = 10.0) -> bool:
        """Stop the HAProxy this state_dir started (by its pid); False if none was running."""
        with self._locked():
            pid = self.pid
            if pid is None:
                self._remove_runtime_files()
                return False
            workers = _children_of(pid)
            # SIGUSR1 is HAProxy's soft stop: stop listening, finish running requests, exit.
            for sig, wait in (
                (signal.SIGUSR1, timeout),
                (signal.SIGTERM, 3.0),
                (signal.SIGKILL, 3.0),
            ):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
                if _wait_gone([pid, *workers], wait):
                    break
            else:
                raise TrafficError(f"HAProxy pid {pid} did not stop", switch=self.label)
            self._remove_runtime_files()
            log.info("stopped HAProxy %s (pid %d)", self.name, pid)
            return True

    def _start(self) -> None:
        self._remove_runtime_files()
        _make_private_dir(self.admin_socket.parent)
        cmd = [
            self.haproxy_bin,
            "-W",
            "-f",
            str(self.config_file),
            "-p",
            str(self.pid_file),
            "-S",
            f"{self.master_socket},mode,600",
        ]
        with open(self.log_file, "ab") as log_out:
            try:
                proc = subprocess.Popen(
                    cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=log_out,
                    stderr=log_out,
                    start_new_session=True,
                    cwd=self.state_dir,
                )
            except OSError as exc:
                raise ConfigError(f"cannot run {self.haproxy_bin}: {exc}; {INSTALL_HINT}") from None
        _children[proc.pid] = proc
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                _children.pop(proc.pid, None)
                raise TrafficError(
                    f"HAProxy exited at start (code {proc.returncode}): {self._log_tail()}",
                    switch=self.label,
                )
            if self.pid == proc.pid and self.admin_socket.exists():
                with contextlib.suppress(TrafficError):
                    self._cli("show info")
                    log.info("started HAProxy %s (pid %d) on %s", self.name, proc.pid, self.listen)
                    return
            time.sleep(POLL)
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        _children.pop(proc.pid, None)
        raise TrafficError(
            f"HAProxy did not answer on {self.admin_socket} within {START_TIMEOUT:.0f} s: "
            f"{self._log_tail()}",
            switch=self.label,
        )

    # -- switch steps -------------------------------------------------------------------------

    def _stage(self, added: list[str], servers: dict[str, _Server]) -> list[str]:
        """Add a new server per green backend, in drain state with checks on; their names."""
        staged: list[str] = []
        try:
            for backend in added:
                # Never reuse a leftover server of this backend: leaving maintenance keeps its
                # last check result (measured: PASSED for a backend that had since died), so
                # only a new server proves green answers now.
                taken = set(servers)
                for old in [s for s in servers.values() if s.backend == backend]:
                    if self._delete(old):
                        taken.discard(old.name)
                name = _server_name(backend)
                suffix = 1
                while name in taken:
                    suffix += 1
                    name = f"{_server_name(backend)}-{suffix}"
                out = self._cli(
                    f"add server {self._srv(name)} {_address(backend)} {self._server_options()}"
                )
                if "New server registered" not in out:
                    raise TrafficError(
                        f"HAProxy refused to add {backend}: {out.strip()}", switch=self.label
                    )
                staged.append(name)
                self._cli_each(
                    [
                        f"enable health {self._srv(name)}",
                        f"set server {self._srv(name)} state drain",
                    ]
                )
        except TrafficError:
            self._unstage(staged)
            raise
        return staged

    def _wait_checked(self, names: list[str], *, initial: bool = False) -> None:
        """Wait for a completed, passing health check of every server in ``names``."""
        deadline = time.monotonic() + self.check_timeout
        while True:
            servers = {s.name: s for s in self._servers().values()}
            pending = [
                n
                for n in names
                if n not in servers
                or servers[n].op_state != OP_RUNNING
                or servers[n].check_result not in CHECK_PASSED
            ]
            if not pending:
                return
            # DOWN means `fall` checks in a row failed since staging: green was verified before
            # the switch, so waiting out check_timeout would only delay the same answer.
            down = [n for n in pending if n in servers and servers[n].op_state == OP_STOPPED]
            if down or time.monotonic() >= deadline:
                failed = down or pending
                stats = self._stats()
                reasons = "; ".join(
                    f"{servers[n].backend if n in servers else n}: {_check_reason(stats.get(n))}"
                    for n in failed
                )
                what = (
                    "HAProxy started, but these servers fail its health checks"
                    if initial
                    else "green failed HAProxy's health checks, blue keeps the traffic"
                )
                waited = f"{self.check_timeout:.0f} s" if not down else "until DOWN"
                raise TrafficError(f"{what} (waited {waited}): {reasons}", switch=self.label)
            time.sleep(POLL)

    def _unstage(self, names: list[str]) -> None:
        """Take staged green servers out again (best effort): maintenance, then delete."""
        for name in names:
            with contextlib.suppress(TrafficError):
                self._cli(f"set server {self._srv(name)} state maint")
                self._cli(f"del server {self._srv(name)}")

    def _retire(self, names: list[str]) -> None:
        """Wait for the requests still running on blue, then delete blue's servers."""
        # When switch() returns no request runs on blue any more, so blue can be torn down.
        deadline = time.monotonic() + self.drain_timeout
        while True:
            stats = self._stats()
            busy = [n for n in names if int(stats.get(n, {}).get("scur") or 0) > 0]
            if not busy:
                break
            if time.monotonic() >= deadline:
                log.warning(
                    "HAProxy %s: %s still serving requests after %.0f s",
                    self.name,
                    ", ".join(busy),
                    self.drain_timeout,
                )
                break
            time.sleep(POLL)
        for name in names:
            out = self._cli(f"del server {self._srv(name)}")
            # Idle server-side connections kept for reuse refuse the delete for a few seconds
            # (measured: up to 18 s). They carry no request, so the switch does not wait for
            # them: the server stays in maintenance, gets no traffic, and the next switch's
            # sweep deletes it.
            if "Server deleted" not in out and "No such server" not in out:
                log.debug("HAProxy %s: %s kept in maintenance: %s", self.name, name, out.strip())

    def _sweep(self, servers: dict[str, _Server]) -> None:
        """Delete leftovers of earlier switches: every disabled server (they get no traffic)."""
        for server in servers.values():
            if not server.enabled:
                self._delete(server)

    def _delete(self, server: _Server) -> bool:
        """Delete one disabled server; False while HAProxy still holds connections to it."""
        try:
            if server.admin & ADMIN_FORCED_DRAIN:
                self._cli(f"set server {self._srv(server.name)} state maint")
            out = self._cli(f"del server {self._srv(server.name)}")
        except TrafficError:
            return False
        return "Server deleted" in out or "No such server" in out

    def _result(
        self, added: list[str], removed: list[str], previous: list[str], started: float
    ) -> SwitchResult:
        return SwitchResult.finish(
            label=f"HAProxy {self.name}",
            added=added,
            removed=removed,
            previous=previous,
            live=self.live(),
            started=started,
        )

    # -- the runtime API ----------------------------------------------------------------------

    def _cli(self, command: str, *, master: bool = False) -> str:
        """One runtime API command on its own connection; the whole answer as text."""
        path = self.master_socket if master else self.admin_socket
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(CLI_TIMEOUT)
                sock.connect(str(path))
                sock.sendall(command.encode() + b"\n")
                # Without the half-close the master CLI waits for more commands.
                sock.shutdown(socket.SHUT_WR)
                chunks = []
                while chunk := sock.recv(65536):
                    chunks.append(chunk)
        except OSError as exc:
            raise TrafficError(
                f"HAProxy runtime socket {path} did not answer '{' '.join(command.split()[:2])}': "
                f"{exc}",
                switch=self.label,
            ) from None
        return b"".join(chunks).decode(errors="replace")

    def _cli_each(self, commands: list[str]) -> None:
        """Commands that answer nothing on success, sent on one line (they run back to back)."""
        if not commands:
            return
        out = self._cli("; ".join(commands))
        if out.strip():
            raise TrafficError(
                f"HAProxy refused '{'; '.join(commands)}': {out.strip()}", switch=self.label
            )

    def _servers(self) -> dict[str, _Server]:
        """The backend's servers by name, from ``show servers state``."""
        text = self._cli(f"show servers state {self.backend_name}")
        lines = text.splitlines()
        if not lines or lines[0].strip() != "1":
            raise TrafficError(
                f"HAProxy has no backend {self.backend_name}: {text.strip()[:200]}",
                switch=self.label,
            )
        header: list[str] = []
        servers: dict[str, _Server] = {}
        for line in lines[1:]:
            if line.startswith("#"):
                header = line.lstrip("# ").split()
                continue
            if not line.strip():
                continue
            row = dict(zip(header, line.split(), strict=False))
            server = _Server(
                name=row["srv_name"],
                backend=format_backend(row["srv_addr"], int(row["srv_port"])),
                op_state=int(row["srv_op_state"]),
                admin=int(row["srv_admin_state"]),
                check_result=int(row["srv_check_result"]),
            )
            servers[server.name] = server
        return servers

    def _stats(self) -> dict[str, dict[str, str]]:
        """``show stat`` rows of the backend's servers, by server name (scur, check_desc...)."""
        text = self._cli(f"show stat {self.backend_name} 4 -1")
        lines = [line for line in text.splitlines() if line.strip()]
        if not lines or not lines[0].startswith("# "):
            return {}
        header = lines[0][2:].split(",")
        rows = (dict(zip(header, line.split(","), strict=False)) for line in lines[1:])
        return {row["svname"]: row for row in rows if "svname" in row}

    def _srv(self, name: str) -> str:
        return f"{self.backend_name}/{name}"

    # -- files --------------------------------------------------------------------------------

    def _server_options(self) -> str:
        # rise/fall govern later UP<->DOWN changes; the first check is awaited explicitly.
        return f"check inter {max(100, int(self.check_interval * 1000))} rise 2 fall 2"

    def _config_text(self, backends: list[str]) -> str:
        check = (
            f"    option httpchk GET {self.health_check_path}\n" if self.health_check_path else ""
        )
        servers = "".join(
            f"    server {_server_name(b)} {_address(b)} {self._server_options()}\n"
            for b in backends
        )
        return (
            f"# Written by vmfarm (app/traffic/haproxy.py) for traffic switch {self.name}.\n"
            "# Switches are applied through the runtime API without a reload; this file is\n"
            "# rewritten on each one so that a restart starts with the live set.\n"
            "global\n"
            f"    stats socket {self.admin_socket} mode 600 level admin expose-fd listeners\n"
            "    stats timeout 30s\n"
            # Bounds a soft stop whose clients keep connections open.
            "    hard-stop-after 30s\n"
            "defaults\n"
            f"    mode {self.mode}\n"
            "    timeout connect 3s\n"
            "    timeout client 60s\n"
            "    timeout server 60s\n"
            "    timeout queue 10s\n"
            # A connect that fails (a host that just went down) is retried on another server.
            "    retries 3\n"
            "    option redispatch 1\n"
            f"frontend fe_{self.name}\n"
            f"    bind {_address(self.listen)}\n"
            f"    default_backend {self.backend_name}\n"
            f"backend {self.backend_name}\n"
            "    balance roundrobin\n"
            f"{check}{servers}"
        )

    def _write_config(self, backends: list[str]) -> None:
        """Write haproxy.cfg and state.json atomically, after ``haproxy -c`` accepted it."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        text = self._config_text(backends)
        if self.config_file.exists() and self.config_file.read_text() == text:
            return
        tmp = self.config_file.with_name("haproxy.cfg.new")
        tmp.write_text(text)
        check = subprocess.run(
            [self.haproxy_bin, "-c", "-q", "-f", str(tmp)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if check.returncode != 0:
            raise TrafficError(
                f"HAProxy rejected the generated config {tmp}: "
                f"{(check.stderr or check.stdout).strip()[-500:]}",
                switch=self.label,
            )
        os.replace(tmp, self.config_file)
        state = {
            "name": self.name,
            "listen": self.listen,
            "mode": self.mode,
            "health_check_path": self.health_check_path,
            "backends": backends,
        }
        tmp_state = self.state_file.with_name("state.json.new")
        tmp_state.write_text(json.dumps(state, indent=2) + "\n")
        os.replace(tmp_state, self.state_file)

    def _recorded(self) -> dict[str, Any]:
        try:
            data = json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _check_frontend(self) -> None:
        # Runtime commands cannot move a listener: a changed frontend needs a restart.
        recorded = self._recorded()
        wanted = {
            "listen": self.listen,
            "mode": self.mode,
            "health_check_path": self.health_check_path,
        }
        differs = {k: recorded[k] for k in wanted if k in recorded and recorded[k] != wanted[k]}
        if differs:
            raise TrafficError(
                f"the running HAProxy {self.name} (pid {self.pid}, {self.state_dir}) has "
                f"{differs}, not {wanted}; stop it (HAProxySwitch.stop) to change the frontend",
                switch=self.label,
            )

    def _remove_runtime_files(self) -> None:
        for path in (self.pid_file, self.admin_socket, self.master_socket):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        if self.admin_socket.parent != self.state_dir:
            with contextlib.suppress(OSError):
                self.admin_socket.parent.rmdir()

    def _log_tail(self) -> str:
        try:
            lines = self.log_file.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        # The log is appended to across starts; the last alerts say why this one failed.
        alerts = [line for line in lines[-20:] if "[ALERT]" in line]
        return " | ".join(alerts[-3:] or lines[-5:]) or "(empty log)"

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialise switches on this state_dir across threads and worker processes."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self.state_dir / "lock", "a+") as handle:
            deadline = time.monotonic() + LOCK_TIMEOUT
            while True:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise TrafficError(
                            f"another switch of {self.name} held {self.state_dir}/lock for "
                            f"{LOCK_TIMEOUT:.0f} s",
                            switch=self.label,
                        ) from None
                    time.sleep(POLL)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


def _socket_dir(state_dir: Path) -> Path:
    """Where the sockets go: state_dir, or a short private directory named after it."""
    if len(str(state_dir / "master.sock")) <= MAX_SOCKET_PATH:
        return state_dir
    # Derived from state_dir alone, so every worker process finds the same sockets.
    digest = hashlib.sha256(str(state_dir).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"vmfarm-haproxy-{digest}"


def _make_private_dir(path: Path) -> None:
    """Create ``path`` (0700) or accept it only if it is our own directory, not a symlink."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
        raise TrafficError(f"{path} is not a directory owned by this user; remove it")
    if stat.S_IMODE(info.st_mode) & 0o077:
        path.chmod(0o700)


def _check_reason(row: dict[str, str] | None) -> str:
    """A health check's outcome in words: ``Layer4 connection problem (Connection refused)``."""
    if not row or not row.get("check_desc"):
        return "no check result yet"
    detail = row.get("last_chk", "")
    return f"{row['check_desc']} ({detail})" if detail else row["check_desc"]


def _server_name(backend: str) -> str:
    """A stable HAProxy server name for a backend: ``srv-127.0.1.3-8080``."""
    host, port = split_backend(backend)
    return f"srv-{host}-{port}"


def _address(backend: str) -> str:
    """HAProxy's address syntax: ``ipv6@`` makes an IPv6 address unambiguous."""
    host, port = split_backend(backend)
    return f"ipv6@{host}:{port}" if ":" in host else f"{host}:{port}"


def _is_our_haproxy(pid: int, config_file: Path) -> bool:
    """Whether ``pid`` is a live (not zombie) haproxy started with ``config_file``."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        proc_stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    if proc_stat.rsplit(")", 1)[-1].split()[0] == "Z":
        _reap(pid)
        return False
    return (
        bool(cmdline) and cmdline[0].endswith(b"haproxy") and str(config_file).encode() in cmdline
    )


def _children_of(pid: int) -> list[int]:
    """Pids whose parent is ``pid`` (the master's workers)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            proc_stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(proc_stat.rsplit(")", 1)[-1].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    _reap(pid)
    try:
        proc_stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # A zombie has exited; only its parent can remove it (we do, for masters we started).
    return proc_stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _reap(pid: int) -> None:
    proc = _children.get(pid)
    if proc is not None and proc.poll() is not None:
        _children.pop(pid, None)


def _wait_gone(pids: list[int], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while any(_alive(p) for p in pids):
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL)
    return True
