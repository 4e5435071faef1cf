"""HAProxySwitch on a real HAProxy: clients see no failed request across blue-green switches.

Four tiny HTTP servers answer their version (v1 on two addresses, v2 on two more, all five
addresses and the port leased from the allocator for the module, tests/alloc.py; the fifth has
nothing listening). Two client threads send sequential GETs through HAProxy while the test
switches v1 -> v2 -> v1 -> v2: one opens a connection per request, one keeps a single connection
alive (the case a reload gets wrong). Needs the haproxy package; scripts/test installs it.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from app.errors import TrafficError
from app.traffic import traffic_switch_from_spec
from app.traffic.haproxy import HAProxySwitch
from tests.alloc import Allocator
from tests.waiting import wait_for

# Set by the module's `backends` fixture from its leases: "address:port" of each server.
V1: list[str] = []
V2: list[str] = []
NOBODY = ""  # a leased address:port where nothing listens
CLIENT_MAX_REQUESTS = 20_000
CLIENT_MAX_SECONDS = 60.0


def require_haproxy() -> None:
    if shutil.which("haproxy") or os.access("/usr/sbin/haproxy", os.X_OK):
        return
    message = "HAProxy is not installed: apt-get install -y haproxy"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def alive(pid: int) -> bool:
    """Whether /proc still lists ``pid`` (a zombie counts: it must have been reaped)."""
    return Path(f"/proc/{pid}").exists()


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


class VersionHandler(BaseHTTPRequestHandler):
    """Answers every GET with its server's version; HTTP/1.1 so connections stay open."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        body = self.server.version.encode()  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def handle(self) -> None:
        # HAProxy's health checks close with a reset once they read the status line.
        with contextlib.suppress(ConnectionError):
            super().handle()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def backends(alloc: Allocator) -> Iterator[None]:
    """Lease five addresses and a port for the module's backends (V1, V2, NOBODY)."""
    global NOBODY
    with alloc.addresses(5) as block, alloc.port() as port:
        at = [f"{address}:{port.port}" for address in block.addresses]
        V1[:], V2[:], NOBODY = sorted(at[0:2]), sorted(at[2:4]), at[4]  # as sorted() compares
        yield


@pytest.fixture
def version_servers(backends: None) -> Iterator[dict[str, ThreadingHTTPServer]]:
    """v1 and v2 servers on the four backend addresses, by backend."""
    servers: dict[str, ThreadingHTTPServer] = {}
    for backends, version in ((V1, "v1"), (V2, "v2")):
        for backend in backends:
            host, port = backend.split(":")
            server = ThreadingHTTPServer((host, int(port)), VersionHandler)
            server.daemon_threads = True
            server.version = version  # type: ignore[attr-defined]
            threading.Thread(target=server.serve_forever, daemon=True).start()
            servers[backend] = server
    yield servers
    for server in servers.values():
        if server.socket.fileno() != -1:
            server.shutdown()
            server.server_close()


@pytest.fixture
def switch(
    tmp_path: Path,
    version_servers: dict[str, ThreadingHTTPServer],
    free_port: Callable[[], int],
) -> Iterator[HAProxySwitch]:
    """A switch on a free port; its HAProxy is stopped whatever the test did."""
    require_haproxy()
    sw = HAProxySwitch(
        name="web",
        listen=f"127.0.0.1:{free_port()}",
        state_dir=tmp_path / "haproxy",
        health_check_path="/",
    )
    yield sw
    pid = sw.pid
    sw.stop()
    assert pid is None or not alive(pid)


@dataclass
class Client:
    """Sequential GETs through the frontend, bounded in count and time, until stopped."""

    port: int
    keep_alive: bool
    records: list[tuple[float, float, str]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        deadline = time.monotonic() + CLIENT_MAX_SECONDS
        conn: http.client.HTTPConnection | None = None
        while (
            not self.stop.is_set()
            and time.monotonic() < deadline
            and len(self.records) + len(self.errors) < CLIENT_MAX_REQUESTS
        ):
            start = time.monotonic()
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                headers = {} if self.keep_alive else {"Connection": "close"}
                conn.request("GET", "/", headers=headers)
                response = conn.getresponse()
                body = response.read().decode()
                if response.status != 200:
                    raise RuntimeError(f"HTTP {response.status}: {body[:80]}")
                self.records.append((start, time.monotonic(), body))
            except Exception as exc:
                self.errors.append(f"{time.monotonic() - start:.3f}s {exc!r}")
                conn = None
                continue
            if not self.keep_alive:
                conn.close()
                conn = None
        if conn is not None:
            conn.close()


def test_switches_back_and_forth_without_a_failed_request(switch: HAProxySwitch) -> None:
    # Given HAProxy started by the first switch, serving v1
    first = switch.switch(V1)
    assert sorted(first.added) == V1 and first.previous == []
    assert sorted(switch.live()) == V1
    port = int(switch.listen.rsplit(":", 1)[1])
    clients = [Client(port, keep_alive=False), Client(port, keep_alive=True)]
    threads = [threading.Thread(target=c.run, daemon=True) for c in clients]
    for t in threads:
        t.start()
    answered(clients)

    # When traffic goes v1 -> v2 -> v1 -> v2 while the clients run
    windows: list[tuple[float, float, str]] = []
    durations = []
    for target, version, old in ((V2, "v2", V1), (V1, "v1", V2), (V2, "v2", V1)):
        began = time.monotonic()
        result = switch.switch(target)
        windows.append((began, time.monotonic(), version))
        durations.append(result.duration_s)
        assert sorted(result.added) == target and sorted(result.removed) == old
        assert sorted(result.previous) == old
        assert sorted(result.live) == target
        assert sorted(switch.live()) == target
        answered(clients)  # by the set just switched to
    for c in clients:
        c.stop.set()
    for t in threads:
        t.join(timeout=15)

    # Then no request failed, and each answer came from the set live at that moment
    for c in clients:
        assert c.errors == [], f"keep_alive={c.keep_alive}: {c.errors[:5]}"
        assert len(c.records) >= 50, f"keep_alive={c.keep_alive}: too few requests"
        counts = {version: 0 for _, _, version in windows}
        for start, end, body in c.records:
            expected = expected_version(start, end, windows)
            if expected is None:  # in flight during a switch call: either set
                assert body in ("v1", "v2")
            else:
                assert body == expected, (start, end, body, windows)
                counts[expected] += 1
        assert all(n > 0 for n in counts.values()), counts
    # A repeated switch is a no-op that still reports the live set
    again = switch.switch(list(reversed(V2)))
    assert not again.changed and sorted(again.previous) == V2
    print(  # numbers for the report: pytest -s
        f"\nrequests: {[len(c.records) for c in clients]} (new conn, keep-alive); failures: "
        f"{[len(c.errors) for c in clients]}; switch durations: {durations} s"
    )

    # Finally, stopping stops exactly this HAProxy: the master and its workers are gone
    pid = switch.pid
    assert pid is not None
    workers = children(pid)
    assert workers
    assert switch.stop() is True
    assert not alive(pid) and not any(alive(w) for w in workers)
    assert switch.pid is None and switch.live() == []
    assert not switch.admin_socket.exists()


def answered(clients: list[Client], count: int = 20) -> None:
    """Wait until every client has had ``count`` more answers than it has now."""
    marks = [len(c.records) for c in clients]
    wait_for(
        lambda: all(len(c.records) >= m + count for c, m in zip(clients, marks, strict=True)),
        30,
        f"{count} more answers per client",
        explain=lambda: "; ".join(f"keep_alive={c.keep_alive}: {c.errors[:3]}" for c in clients),
    )


def expected_version(
    start: float, end: float, windows: list[tuple[float, float, str]]
) -> str | None:
    """The version a request must see, or None when it overlapped a switch call."""
    for began, ended, _ in windows:
        if start < ended and end > began:
            return None
    settled = [version for _, ended, version in windows if ended <= start]
    return settled[-1] if settled else "v1"


def test_green_failing_its_checks_leaves_blue_live(switch: HAProxySwitch) -> None:
    # Given v1 live
    switch.switch(V1)
    # When green has nothing listening
    with pytest.raises(TrafficError) as caught:
        switch.switch([NOBODY])
    # Then the switch fails fast (once HAProxy calls green DOWN, not after check_timeout), says
    # which server and why, and blue keeps the traffic
    assert "(waited until DOWN)" in str(caught.value)
    assert NOBODY in str(caught.value)
    assert "blue keeps the traffic" in str(caught.value)
    assert sorted(switch.live()) == V1
    port = int(switch.listen.rsplit(":", 1)[1])
    for _ in range(4):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", "/")
        assert conn.getresponse().read() == b"v1"
        conn.close()
    assert NOBODY.split(":")[0] not in switch.config_file.read_text()


def test_a_backend_that_died_in_maintenance_is_checked_again(
    switch: HAProxySwitch, version_servers: dict[str, ThreadingHTTPServer]
) -> None:
    # Given every server live and checked, then one put in maintenance by hand (an operator,
    # or a blue server HAProxy could not delete yet) whose last check had passed
    switch.switch(V1 + V2)
    srv = "srv-" + V1[0].replace(":", "-")
    answer = runtime(switch.admin_socket, f"set server be_web/{srv} state maint")
    assert answer.strip() == ""
    # When that backend dies and a switch asks for it again
    dead = version_servers[V1[0]]
    dead.shutdown()
    dead.server_close()
    # Then its old passing check does not count: the switch fails and the live set stays
    with pytest.raises(TrafficError, match=re.escape(V1[0])):
        switch.switch([V1[0], *V2])
    assert sorted(switch.live()) == sorted([V1[1], *V2])


def runtime(path: Path, command: str) -> str:
    """One HAProxy runtime API command, as an operator would send it with socat."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5)
        sock.connect(str(path))
        sock.sendall(command.encode() + b"\n")
        sock.shutdown(socket.SHUT_WR)
        return b"".join(iter(lambda: sock.recv(65536), b"")).decode()


def test_restart_restores_the_recorded_live_set(switch: HAProxySwitch) -> None:
    # Given v2 live, then HAProxy stopped
    switch.switch(V2)
    assert switch.stop() is True
    assert switch.stop() is False
    # When it is started again from its state directory
    switch.start()
    # Then it serves the same set
    wait_for(
        lambda: sorted(switch.live()) == V2,
        10,
        f"HAProxy to serve {V2} again",
        explain=lambda: f"live: {switch.live()}",
    )


def test_a_long_state_dir_still_works(
    tmp_path: Path,
    version_servers: dict[str, ThreadingHTTPServer],
    free_port: Callable[[], int],
) -> None:
    # Given a state directory too long for a UNIX socket path (HAProxy's limit is about 95)
    require_haproxy()
    state_dir = tmp_path / ("d" * 60) / "traffic" / "haproxy-vmfarm"
    sw = HAProxySwitch(name="vmfarm", listen=f"127.0.0.1:{free_port()}", state_dir=state_dir)
    try:
        # When it switches, the sockets live in a short private directory instead
        assert sorted(sw.switch(V1).live) == V1
        assert sw.admin_socket.exists() and sw.admin_socket.parent != state_dir
        assert (sw.admin_socket.parent.stat().st_mode & 0o777) == 0o700
        # And a second switch object for the same state_dir (another worker) finds them
        other = HAProxySwitch(name="vmfarm", listen=sw.listen, state_dir=state_dir)
        assert sorted(other.live()) == V1
    finally:
        sw.stop()
    assert not sw.admin_socket.parent.exists()


def test_empty_set_and_bad_backends_are_refused(switch: HAProxySwitch) -> None:
    with pytest.raises(TrafficError, match="empty set"):
        switch.switch([])
    with pytest.raises(TrafficError, match="not an IP address"):
        switch.switch(["web1.internal:8080"])
    with pytest.raises(TrafficError, match="needs a port"):
        switch.switch([V1[0].split(":")[0]])
    assert switch.pid is None


def test_local_spec_builds_a_haproxy_switch(tmp_path: Path, free_port: Callable[[], int]) -> None:
    require_haproxy()
    listen = f"127.0.0.1:{free_port()}"
    sw = traffic_switch_from_spec(
        {"type": "Local", "listen": listen, "name": "web"}, state_dir=tmp_path
    )
    assert isinstance(sw, HAProxySwitch)
    assert sw.listen == listen and sw.state_dir == tmp_path / "haproxy-web"
    assert sw.live() == []
