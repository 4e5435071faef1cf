"""The local lab: N real OpenSSH servers on 127.0.1.K (or N local sandbox hosts).

``lab_up`` starts one ``sshd -D`` per host, host K listening on 127.0.1.K:22, each inside its own
mount namespace (its ``hosts/hK/opt`` on /opt and ``hosts/hK/var/log`` on /var/log) and with a
clean HOME: root's ``~/.bashrc`` on these machines runs ``pyenv init`` (~80 ms of CPU per remote
shell, see research/performance-anchors.md), which a real target host would not do. Layout::

    <root>/id_ed25519, id_ed25519.pub   the client key (made once; lab_down keeps it)
    <root>/authorized_keys              the client key, for every host
    <root>/known_hosts                  every host key, as "127.0.1.K ssh-ed25519 AAAA..."
    <root>/state.json                   what lab_up started: pids, mount namespaces, regions
    <root>/infrastructure.yaml          a static Infrastructure file for these hosts
    <root>/hosts/hK/                    sshd_config, host key, sshd.log, home/, opt/, var/log/

Without root or without sshd the lab falls back to *sandbox* hosts: the same directories, no
processes, and an Infrastructure whose ``connection.type`` is ``Sandbox`` (``LocalConnector`` runs
the commands locally in a private mount namespace per command).

``lab_down`` stops exactly what ``lab_up`` started, plus what runs *inside* a lab host: a process
is stopped only if it is in that host's mount namespace (recorded at start) and carries that
host's environment (the sshd's marker variable, or the host's HOME). In sandbox mode there is no
namespace to check; there the host's HOME together with its HOSTADDR identify its processes.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from app.connectors.base import HostTarget
from app.errors import LabError

log = logging.getLogger(__name__)

SSHD = "/usr/sbin/sshd"
SSH_PORT = 22
SUBNET = "127.0.1."
# sshd refuses to start without its privilege separation directory; Debian's service unit
# creates it (RuntimeDirectory=sshd), so a machine whose system sshd never ran has none.
PRIVSEP_DIR = Path("/run/sshd")
READY_TIMEOUT = 15.0
STOP_TIMEOUT = 5.0
# Set in each lab sshd's environment; its per-connection children inherit it, and it tells
# lab_down that a process in that namespace belongs to this host (sessions get HOME instead).
MARKER_VAR = "VMFARM_LAB_HOST"
STATE_VERSION = 1

Mode = Literal["ssh", "sandbox", "none"]

# sshd processes started by this Python process, so lab_down can reap them (no zombies).
_children: dict[int, subprocess.Popen[bytes]] = {}

# Runs between unshare and sshd: the private mounts, then exec, so the recorded pid is sshd's.
_NAMESPACE_SCRIPT = (
    'mount --bind "$1" /opt && mount --bind "$2" /var/log && exec "$3" -D -e -f "$4"'
)


@dataclass
class LabHost:
    """One lab host: where it listens, its region, and whether it is up."""

    num: int
    address: str
    port: int
    region: str
    pid: int | None
    alive: bool
    sandbox_root: Path | None
    host_dir: Path


@dataclass
class LabState:
    """What a lab root holds: its mode, hosts and the files clients need."""

    root: Path
    mode: Mode
    reason: str
    hosts: list[LabHost]
    infrastructure_file: Path
    key_file: Path | None
    known_hosts_file: Path | None

    @property
    def running(self) -> bool:
        """True when the lab has hosts and every one of them is alive."""
        return bool(self.hosts) and all(h.alive for h in self.hosts)

    def targets(self) -> list[HostTarget]:
        """A HostTarget per host, ready for SSHConnector (ssh mode) or LocalConnector (sandbox)."""
        if self.mode == "sandbox":
            return [
                HostTarget(hostname=h.address, sandbox_root=str(h.sandbox_root)) for h in self.hosts
            ]
        return [
            HostTarget(
                hostname=h.address,
                port=h.port,
                user="root",
                private_key_file=str(self.key_file),
                known_hosts_file=str(self.known_hosts_file),
            )
            for h in self.hosts
        ]


# ---------------------------------------------------------------------------------- public API


def lab_up(
    hosts: int,
    *,
    root: Path,
    regions: list[str] | None = None,
    sandbox: bool | None = None,
    first: int = 1,
) -> LabState:
    """Start N lab hosts (host K on 127.0.1.(first+K-1):22) under ``root``; return their state."""
    regions = list(regions) if regions else ["local"]
    _check_request(hosts, first, regions)
    root = root.resolve()
    _check_root_path(root)
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    nums = list(range(first, first + hosts))
    with _locked(root):
        mode, reason = _choose_mode(sandbox)
        current = _read_state(root)
        if current is not None:
            status = _status_from(root, current)
            same = status.mode == mode and [h.num for h in status.hosts] == nums and status.running
            if same:
                # Already running: only the regions may change, and they live in files alone.
                current["regions"] = regions
                for h in current["hosts"]:
                    h["region"] = _region(regions, h["num"] - first + 1)
                _write_files(root, current)
                return _status_from(root, current)
            log.info("lab in %s: stopping its %d hosts first", root, len(current["hosts"]))
            _down_locked(root)
        if mode == "sandbox":
            data = _up_sandbox(root, nums, first, regions, reason)
        else:
            data = _up_ssh(root, nums, first, regions)
        _write_files(root, data)
        return _status_from(root, data)


def lab_status(*, root: Path) -> LabState:
    """Which hosts of the lab in ``root`` are alive (sshd still ours and accepting TCP)."""
    root = root.resolve()
    data = _read_state(root)
    if data is None:
        return LabState(
            root=root,
            mode="none",
            reason=f"no lab in {root} (start one with `vmfarm lab up`)",
            hosts=[],
            infrastructure_file=root / "infrastructure.yaml",
            key_file=None,
            known_hosts_file=None,
        )
    _reap()
    return _status_from(root, data)


def lab_down(*, root: Path) -> int:
    """Stop the lab in ``root``: exactly its processes; return how many were stopped."""
    root = root.resolve()
    if not root.is_dir():
        return 0
    with _locked(root):
        return _down_locked(root)


# ------------------------------------------------------------------------------ mode, checks


def _check_request(hosts: int, first: int, regions: list[str]) -> None:
    if hosts < 1:
        raise LabError(f"a lab needs at least one host (got {hosts})")
    if first < 1 or first + hosts - 1 > 254:
        raise LabError(
            f"hosts {first}..{first + hosts - 1} do not fit in {SUBNET}1..{SUBNET}254; "
            "use fewer hosts or a smaller first"
        )
    bad = [r for r in regions if not r or not re.fullmatch(r"[A-Za-z0-9_.-]+", r)]
    if bad:
        raise LabError(f"invalid region names {bad!r}: use letters, digits, '-', '_' and '.'")


def _check_root_path(root: Path) -> None:
    # sshd_config and the bind-mount script take these paths as words; refuse what they can't.
    if re.search(r"[\s\"'\\%$`]", str(root)):
        raise LabError(
            f"lab root {root} contains whitespace, quotes, '%', '$' or '`': choose a plain path"
        )
    for hidden in (Path("/opt"), Path("/var/log")):
        if root == hidden or hidden in root.parents:
            raise LabError(
                f"lab root {root} is under {hidden}, which every lab host replaces with its own; "
                "choose a root elsewhere (e.g. .vmfarm/lab in the project)"
            )


def _ssh_blockers() -> list[str]:
    """Why real sshd hosts are impossible here (each item says how to fix it)."""
    blockers = []
    if os.geteuid() != 0:
        blockers.append(
            f"not running as root (uid {os.geteuid()}): sshd must bind port 22 and log in as "
            "root; run as root (e.g. `sudo vmfarm lab up`)"
        )
    if not os.access(SSHD, os.X_OK):
        blockers.append(f"{SSHD} is missing: apt-get install -y openssh-server")
    return blockers


def _choose_mode(sandbox: bool | None) -> tuple[Literal["ssh", "sandbox"], str]:
    if sandbox:
        return "sandbox", "sandbox mode requested"
    blockers = _ssh_blockers()
    if blockers and sandbox is None:
        return "sandbox", "no real sshd hosts: " + "; ".join(blockers)
    if blockers:
        raise LabError("cannot start the sshd lab: " + "; ".join(blockers))
    tools = []
    for tool, package in (
        ("unshare", "util-linux"),
        ("mount", "mount"),
        ("ssh-keygen", "openssh-client"),
    ):
        if shutil.which(tool) is None:
            tools.append(f"`{tool}` is missing: apt-get install -y {package}")
    try:
        pwd.getpwnam("sshd")
    except KeyError:
        tools.append(
            "the sshd privilege separation user is missing: "
            "apt-get install --reinstall -y openssh-server"
        )
    for mount_point in ("/opt", "/var/log"):
        if not os.path.isdir(mount_point):
            tools.append(
                f"{mount_point} does not exist (each host mounts its own on it): "
                f"mkdir -p {mount_point}"
            )
    if tools:
        raise LabError("cannot start the sshd lab: " + "; ".join(tools))
    return "ssh", "running as root with " + SSHD


def _region(regions: list[str], k: int) -> str:
    """Host K (1-based within the lab) gets regions[(K-1) % len(regions)]."""
    return regions[(k - 1) % len(regions)]


# ------------------------------------------------------------------------------------- up


def _host_dir(root: Path, num: int) -> Path:
    return root / "hosts" / f"h{num}"


def _make_host_dirs(hd: Path) -> None:
    for sub in ("opt", "var/log", "home"):
        (hd / sub).mkdir(parents=True, exist_ok=True)
    # An empty .bashrc and .profile: nothing runs at shell start-up (see the module docstring).
    for rc in (".bashrc", ".profile"):
        (hd / "home" / rc).touch(exist_ok=True)


def _up_sandbox(
    root: Path, nums: list[int], first: int, regions: list[str], reason: str
) -> dict[str, Any]:
    hosts = []
    for num in nums:
        _make_host_dirs(_host_dir(root, num))
        hosts.append(
            {
                "num": num,
                "address": f"{SUBNET}{num}",
                "port": SSH_PORT,
                "region": _region(regions, num - first + 1),
                "pid": None,
            }
        )
    return {
        "version": STATE_VERSION,
        "mode": "sandbox",
        "reason": reason,
        "first": first,
        "regions": regions,
        "hosts": hosts,
    }


def _up_ssh(root: Path, nums: list[int], first: int, regions: list[str]) -> dict[str, Any]:
    addresses = [f"{SUBNET}{n}" for n in nums]
    # A listener stopped a moment ago (a restart) may still hold its port briefly: wait a
    # little before calling the address taken.
    deadline = time.monotonic() + 3.0
    busy = [a for a in addresses if _accepts(a, SSH_PORT, 0.2)]
    while busy and time.monotonic() < deadline:
        time.sleep(0.1)
        busy = [a for a in busy if _accepts(a, SSH_PORT, 0.2)]
    if busy:
        raise LabError(
            f"port 22 is already in use on {', '.join(busy)} (another lab, or another sshd); "
            "stop it (`vmfarm lab down --root ...`) or choose other host numbers"
        )
    PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)
    key = root / "id_ed25519"
    _ensure_key(key, comment="vmfarm-lab-client")
    os.chmod(key, 0o600)
    pub = (root / "id_ed25519.pub").read_text().split()
    _write_text(root / "authorized_keys", f"{pub[0]} {pub[1]} vmfarm-lab\n")
    extra = _version_specific_options()
    known = []
    for num in nums:
        hd = _host_dir(root, num)
        _make_host_dirs(hd)
        host_key = hd / "ssh_host_ed25519_key"
        _ensure_key(host_key, comment=f"vmfarm-lab-h{num}")
        kind, blob = (hd / "ssh_host_ed25519_key.pub").read_text().split()[:2]
        known.append(f"{SUBNET}{num} {kind} {blob}\n")
        _write_text(hd / "sshd_config", _sshd_config(root, num, extra))
    _write_text(root / "known_hosts", "".join(known))

    hosts: list[dict[str, Any]] = []
    try:
        for num in nums:
            hosts.append(_spawn(root, num, first, regions))
        _wait_ready(root, hosts)
    except BaseException:
        # Leave nothing half-started behind: stop exactly the sshd started above.
        _stop({h["pid"]: _starttime(h["pid"]) for h in hosts})
        raise
    own_ns = _mntns(os.getpid())
    for h in hosts:
        h["mntns"] = _mntns(h["pid"])
        if h["mntns"] is None or h["mntns"] == own_ns:
            _stop({x["pid"]: _starttime(x["pid"]) for x in hosts})
            raise LabError(f"host {h['address']}: sshd is not in a private mount namespace")
    return {
        "version": STATE_VERSION,
        "mode": "ssh",
        "reason": "running as root with " + SSHD,
        "first": first,
        "regions": regions,
        "hosts": hosts,
    }


def _ensure_key(path: Path, *, comment: str) -> None:
    """Generate an ed25519 key pair once; later ups keep it (known_hosts stays valid)."""
    if path.exists() and path.with_name(path.name + ".pub").exists():
        return
    path.unlink(missing_ok=True)
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        check=True,
        stdin=subprocess.DEVNULL,
        capture_output=True,
    )


def _version_specific_options() -> list[str]:
    # OpenSSH >= 9.8 penalises sources with many failed or aborted connections; every lab client
    # comes from loopback, so that would lock the tests and benchmarks out. 9.2 has no option.
    out = subprocess.run([SSHD, "-V"], capture_output=True, text=True, check=False)
    m = re.search(r"OpenSSH_(\d+)\.(\d+)", out.stdout + out.stderr)
    if m and (int(m.group(1)), int(m.group(2))) >= (9, 8):
        return ["PerSourcePenalties no"]
    return []


def _sshd_config(root: Path, num: int, extra: list[str]) -> str:
    hd = _host_dir(root, num)
    lines = [
        f"# vmfarm lab host {num}: written by lab_up, rewritten on every up.",
        f"ListenAddress {SUBNET}{num}:{SSH_PORT}",
        f"HostKey {hd / 'ssh_host_ed25519_key'}",
        f"PidFile {hd / 'sshd.pid'}",
        f"AuthorizedKeysFile {root / 'authorized_keys'}",
        "PermitRootLogin prohibit-password",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        # PAM session setup costs per login and is not what is being tested.
        "UsePAM no",
        # The lab files live wherever the project is (group-writable dirs are common there).
        "StrictModes no",
        # Hundreds of concurrent connections from one client must not be dropped.
        "MaxStartups 2000:100:4000",
        "MaxSessions 200",
        "Subsystem sftp internal-sftp",
        "UseDNS no",
        "PrintMotd no",
        "PrintLastLog no",
        # HOME overrides /root for the session: bash then reads this host's empty .bashrc.
        f"SetEnv HOME={hd / 'home'} HOSTADDR={SUBNET}{num} HOSTNUM={num}",
        *extra,
    ]
    return "\n".join(lines) + "\n"


def _sshd_argv(root: Path, num: int) -> list[str]:
    """The exact command line of host ``num``'s sshd: how lab_status and lab_down recognise it."""
    return [SSHD, "-D", "-e", "-f", str(_host_dir(root, num) / "sshd_config")]


def _spawn(root: Path, num: int, first: int, regions: list[str]) -> dict[str, Any]:
    hd = _host_dir(root, num)
    argv = _sshd_argv(root, num)
    with open(hd / "sshd.log", "ab") as logf:
        proc = subprocess.Popen(
            [
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "--",
                "/bin/sh",
                "-c",
                _NAMESPACE_SCRIPT,
                "vmfarm-lab",
                str(hd / "opt"),
                str(hd / "var/log"),
                argv[0],
                argv[-1],
            ],
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=subprocess.STDOUT,
            # Its own session: Ctrl-C in the terminal that ran `lab up` must not stop the lab.
            start_new_session=True,
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", MARKER_VAR: str(hd)},
        )
    _children[proc.pid] = proc
    return {
        "num": num,
        "address": f"{SUBNET}{num}",
        "port": SSH_PORT,
        "region": _region(regions, num - first + 1),
        "pid": proc.pid,
    }


def _wait_ready(root: Path, hosts: list[dict[str, Any]]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT + 0.05 * len(hosts)
    pending = list(hosts)
    while pending:
        for h in list(pending):
            proc = _children.get(h["pid"])
            if proc is not None and proc.poll() is not None:
                raise LabError(
                    f"sshd for {h['address']} exited with code {proc.returncode} while starting; "
                    f"its log ({_host_dir(root, h['num']) / 'sshd.log'}) ends with:\n"
                    + _tail(_host_dir(root, h["num"]) / "sshd.log")
                )
            if _accepts(h["address"], h["port"], 0.5) and _owns(h["pid"], root, h["num"]):
                pending.remove(h)
        if pending and time.monotonic() > deadline:
            names = ", ".join(h["address"] for h in pending)
            raise LabError(
                f"lab hosts {names} did not accept TCP on port 22 within "
                f"{READY_TIMEOUT:.0f} s; see their sshd.log under {root / 'hosts'}"
            )
        if pending:
            time.sleep(0.05)


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# -------------------------------------------------------------------------------- files


def _write_text(path: Path, text: str, mode: int = 0o600) -> None:
    """Write atomically (a reader never sees half a known_hosts or state.json); private: the
    lab's state, keys and sshd configs are nobody else's."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as fh:
        os.fchmod(fd, mode)
        fh.write(text)
    os.replace(tmp, path)


def _read_state(root: Path) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads((root / "state.json").read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise LabError(
            f"{root / 'state.json'} is unreadable ({e}); remove it and stop any "
            "leftover lab sshd by hand (`pgrep -af 'sshd -D -e -f'`)"
        ) from e
    if data.get("version") != STATE_VERSION:
        raise LabError(f"{root / 'state.json'} has an unknown version {data.get('version')!r}")
    return data


class _IndentDumper(yaml.SafeDumper):
    """Indents list items under their key, as the Infrastructure examples are written."""

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        super().increase_indent(flow, False)


def _infrastructure(root: Path, data: dict[str, Any]) -> dict[str, Any]:
    if data["mode"] == "sandbox":
        connection: dict[str, Any] = {"type": "Sandbox"}
        hosts = [
            {
                "hostname": h["address"],
                "region": h["region"],
                "sandboxRoot": str(_host_dir(root, h["num"])),
            }
            for h in data["hosts"]
        ]
    else:
        connection = {
            "type": "SSH",
            "user": "root",
            "port": SSH_PORT,
            "privateKeyFile": str(root / "id_ed25519"),
            "knownHostsFile": str(root / "known_hosts"),
        }
        hosts = [{"hostname": h["address"], "region": h["region"]} for h in data["hosts"]]
    return {
        "apiVersion": "v1",
        "kind": "Infrastructure",
        "metadata": {"name": "lab", "identifier": "lab"},
        "spec": {
            "environmentRef": "lab",
            "deploymentType": "Ssh",
            "type": "Pdc",
            # The infrastructure's own region (where discovery runs) is the first lab region.
            "spec": {"region": data["regions"][0], "connection": connection, "hosts": hosts},
        },
    }


def _write_files(root: Path, data: dict[str, Any]) -> None:
    doc = yaml.dump(
        _infrastructure(root, data), Dumper=_IndentDumper, sort_keys=False, default_flow_style=False
    )
    _write_text(root / "infrastructure.yaml", doc)
    _write_text(root / "state.json", json.dumps(data, indent=2) + "\n")


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    """One up/down at a time per lab root (two terminals, or parallel test workers)."""
    with open(root / ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ------------------------------------------------------------------------------ status


def _status_from(root: Path, data: dict[str, Any]) -> LabState:
    mode: Mode = "sandbox" if data["mode"] == "sandbox" else "ssh"
    hosts = []
    for h in data["hosts"]:
        hd = _host_dir(root, h["num"])
        if mode == "sandbox":
            alive = all((hd / sub).is_dir() for sub in ("opt", "var/log", "home"))
        else:
            alive = _owns(h["pid"], root, h["num"]) and _accepts(h["address"], h["port"], 1.0)
        hosts.append(
            LabHost(
                num=h["num"],
                address=h["address"],
                port=h["port"],
                region=h["region"],
                pid=h["pid"],
                alive=alive,
                sandbox_root=hd if mode == "sandbox" else None,
                host_dir=hd,
            )
        )
    return LabState(
        root=root,
        mode=mode,
        reason=data.get("reason", ""),
        hosts=hosts,
        infrastructure_file=root / "infrastructure.yaml",
        key_file=root / "id_ed25519" if mode == "ssh" else None,
        known_hosts_file=root / "known_hosts" if mode == "ssh" else None,
    )


def _accepts(address: str, port: int, timeout: float) -> bool:
    try:
        with socket.create_connection((address, port), timeout=timeout):
            return True
    except OSError:
        return False


# ------------------------------------------------------------------------------- /proc


def _cmdline(pid: int) -> str | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return raw.decode(errors="replace").replace("\0", " ").strip()


def _owns(pid: int | None, root: Path, num: int) -> bool:
    """True when ``pid`` is still host ``num``'s sshd listener (not a recycled pid)."""
    if pid is None or not _running(pid):
        return False
    cmdline = _cmdline(pid)
    argv = " ".join(_sshd_argv(root, num))
    # sshd retitles its listener as "sshd: <argv> [listener] 0 of 100-4000 startups"; the config
    # path in argv is unique to this lab root and host.
    return cmdline == argv or (cmdline or "").startswith(f"sshd: {argv} [listener]")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses; fields follow its last ')'.
    return raw[raw.rindex(")") + 2 :].split()


def _running(pid: int) -> bool:
    fields = _stat_fields(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def _starttime(pid: int) -> int | None:
    """Start time in clock ticks since boot: with the pid it names one process, never a reuse."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields is not None else None


def _mntns(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/mnt").st_ino
    except OSError:
        return None


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    env = {}
    for item in raw.decode(errors="replace").split("\0"):
        key, sep, value = item.partition("=")
        if sep:
            env[key] = value
    return env


def _all_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


# -------------------------------------------------------------------------------- down


def _reap() -> None:
    """Collect the exit status of our sshd children that died on their own (no zombies)."""
    for pid, child in list(_children.items()):
        if child.poll() is not None:
            del _children[pid]


def _down_locked(root: Path) -> int:
    _reap()
    data = _read_state(root)
    if data is None:
        return 0
    victims: dict[int, int | None] = {}
    if data["mode"] == "ssh":
        # The listeners first, so that no new session starts while the rest is collected.
        listeners = {
            h["pid"]: _starttime(h["pid"]) for h in data["hosts"] if _owns(h["pid"], root, h["num"])
        }
        _signal(listeners, signal.SIGTERM)
        victims.update(listeners)
        by_ns = {h["mntns"]: _host_dir(root, h["num"]) for h in data["hosts"] if h.get("mntns")}
        for pid in _all_pids():
            hd = by_ns.get(_mntns(pid)) if pid not in victims else None
            if hd is None:
                continue
            env = _environ(pid)
            if env.get(MARKER_VAR) == str(hd) or env.get("HOME") == str(hd / "home"):
                victims[pid] = _starttime(pid)
    else:
        homes = {str(_host_dir(root, h["num"]) / "home"): h["address"] for h in data["hosts"]}
        for pid in _all_pids():
            env = _environ(pid)
            if env.get("HOME") in homes and env.get("HOSTADDR") == homes[env["HOME"]]:
                victims[pid] = _starttime(pid)
    victims.pop(os.getpid(), None)
    stopped = _stop(victims)
    (root / "state.json").unlink(missing_ok=True)
    return stopped


def _signal(procs: dict[int, int | None], sig: signal.Signals) -> None:
    for pid, start in procs.items():
        if start is not None and _starttime(pid) == start:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)


def _gone(pid: int, start: int | None) -> bool:
    child = _children.get(pid)
    if child is not None and child.poll() is not None:
        del _children[pid]
        return True
    return start is None or _starttime(pid) != start or not _running(pid)


def _stop(procs: dict[int, int | None]) -> int:
    """SIGTERM, then SIGKILL what is still the same process after STOP_TIMEOUT; count them."""
    _signal(procs, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT
    while time.monotonic() < deadline and not all(_gone(p, s) for p, s in procs.items()):
        time.sleep(0.02)
    left = {p: s for p, s in procs.items() if not _gone(p, s)}
    if left:
        _signal(left, signal.SIGKILL)
        deadline = time.monotonic() + STOP_TIMEOUT
        while time.monotonic() < deadline and not all(_gone(p, s) for p, s in left.items()):
            time.sleep(0.02)
    survivors = sorted(p for p, s in procs.items() if not _gone(p, s))
    if survivors:
        raise LabError(f"lab processes {survivors} did not stop after SIGKILL")
    return sum(1 for s in procs.values() if s is not None)
