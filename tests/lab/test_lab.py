"""The local lab, as a user sees it: real sshd hosts one can log in to, and a clean `down`.

Every test uses its own lab root (tmp_path) and its own block of addresses leased from the
allocator (``first=block.first``), so they can run next to other labs on 127.0.1.x; each fixture
stops its lab even when the test fails.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from app.connectors.local import LocalConnector, private_namespace_supported
from app.errors import LabError
from app.lab import SSHD, LabHost, LabState, lab_down, lab_status, lab_up
from tests.alloc import AddressLease
from tests.waiting import process_gone, wait_for

Lease = Callable[[int], AddressLease]

REPO = Path(__file__).resolve().parents[2]


def require_ssh_lab() -> None:
    """Skip on a developer machine without root/sshd; in CI (CI=true) that is a failure."""
    missing = []
    if os.geteuid() != 0:
        missing.append("root")
    if not os.access(SSHD, os.X_OK):
        missing.append(f"{SSHD} (apt-get install -y openssh-server)")
    if shutil.which("ssh") is None:
        missing.append("the ssh client (apt-get install -y openssh-client)")
    if missing:
        message = "the sshd lab needs " + ", ".join(missing)
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture
def lab_root(tmp_path: Path) -> Iterator[Path]:
    """A lab root for one test; whatever lab the test starts there is stopped afterwards."""
    root = tmp_path / "lab"
    yield root
    lab_down(root=root)


@pytest.fixture
def ssh_lab_root(lab_root: Path) -> Path:
    require_ssh_lab()
    return lab_root


def running(pid: int) -> bool:
    """True while ``pid`` is a live process (a zombie waiting to be reaped counts as stopped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


def ssh(state: LabState, host: LabHost, command: str) -> subprocess.CompletedProcess[str]:
    """Log in with the system ssh client: the lab key, the lab known_hosts, strict checking."""
    return subprocess.run(
        [
            "ssh",
            "-F",
            "/dev/null",
            "-i",
            str(state.key_file),
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            f"UserKnownHostsFile={state.known_hosts_file}",
            "-o",
            "GlobalKnownHostsFile=/dev/null",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "ConnectTimeout=10",
            f"root@{host.address}",
            command,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def test_up_starts_real_sshd_hosts_that_accept_the_lab_key(
    ssh_lab_root: Path, lease_addresses: Lease
) -> None:
    # Given a lab of three hosts in two regions
    block = lease_addresses(3)
    state = lab_up(3, root=ssh_lab_root, regions=["r1", "r2"], first=block.first)

    # Then three sshd processes run, one per address, each listening on port 22
    assert state.mode == "ssh"
    assert [h.address for h in state.hosts] == block.addresses
    assert [h.region for h in state.hosts] == ["r1", "r2", "r1"]
    for h in state.hosts:
        assert h.pid is not None and running(h.pid) and h.alive
        assert "sshd" in Path(f"/proc/{h.pid}/cmdline").read_text()
    assert len({h.pid for h in state.hosts}) == 3

    # And the client key is private, known_hosts names every host key
    assert state.key_file is not None and state.known_hosts_file is not None
    assert state.key_file.stat().st_mode & 0o777 == 0o600
    known = state.known_hosts_file.read_text().splitlines()
    assert [line.split()[:2] for line in known] == [[h.address, "ssh-ed25519"] for h in state.hosts]

    # When we log in to each host with strict host-key checking
    for h in state.hosts:
        (h.host_dir / "opt" / "marker").write_text(f"I am {h.address}\n")
        out = ssh(state, h, "echo $HOME; echo $HOSTADDR $HOSTNUM; cat /opt/marker")
        # Then it works, in that host's own HOME and /opt
        assert out.returncode == 0, out.stderr
        assert out.stdout.splitlines() == [
            str(h.host_dir / "home"),
            f"{h.address} {h.num}",
            f"I am {h.address}",
        ]

    # And the state is what lab_status reports
    assert [(h.pid, h.alive) for h in lab_status(root=ssh_lab_root).hosts] == [
        (h.pid, True) for h in state.hosts
    ]


def test_infrastructure_file_describes_the_lab(ssh_lab_root: Path, lease_addresses: Lease) -> None:
    block = lease_addresses(2)
    state = lab_up(2, root=ssh_lab_root, regions=["eu", "us"], first=block.first)

    doc = yaml.safe_load(state.infrastructure_file.read_text())

    assert doc == {
        "apiVersion": "v1",
        "kind": "Infrastructure",
        "metadata": {"name": "lab", "identifier": "lab"},
        "spec": {
            "environmentRef": "lab",
            "deploymentType": "Ssh",
            "type": "Pdc",
            "spec": {
                "region": "eu",
                "connection": {
                    "type": "SSH",
                    "user": "root",
                    "port": 22,
                    "privateKeyFile": str(ssh_lab_root.resolve() / "id_ed25519"),
                    "knownHostsFile": str(ssh_lab_root.resolve() / "known_hosts"),
                },
                "hosts": [
                    {"hostname": block.addresses[0], "region": "eu"},
                    {"hostname": block.addresses[1], "region": "us"},
                ],
            },
        },
    }
    state_json = json.loads((ssh_lab_root / "state.json").read_text())
    assert [h["pid"] for h in state_json["hosts"]] == [h.pid for h in state.hosts]


def test_each_host_has_a_private_opt_and_var_log(
    ssh_lab_root: Path, lease_addresses: Lease
) -> None:
    state = lab_up(2, root=ssh_lab_root, first=lease_addresses(2).first)
    one, two = state.hosts
    name = f"vmfarm-lab-test-{uuid.uuid4().hex}"

    # When host one writes to /opt and /var/log
    out = ssh(state, one, f"echo one > /opt/{name} && echo log > /var/log/{name}")
    assert out.returncode == 0, out.stderr

    # Then the files are in host one's directory, not on host two, not on the real machine
    assert (one.host_dir / "opt" / name).read_text() == "one\n"
    assert (one.host_dir / "var" / "log" / name).read_text() == "log\n"
    check = ssh(state, two, f"ls /opt/{name} /var/log/{name}")
    assert check.returncode != 0
    assert not (two.host_dir / "opt" / name).exists()
    assert not Path(f"/opt/{name}").exists()
    assert not Path(f"/var/log/{name}").exists()


def test_shells_on_the_hosts_use_the_clean_home_not_roots_bashrc(
    ssh_lab_root: Path, lease_addresses: Lease
) -> None:
    state = lab_up(1, root=ssh_lab_root, first=lease_addresses(1).first)
    (host,) = state.hosts
    home = host.host_dir / "home"
    # The lab's HOME starts with an empty .bashrc: nothing (like `pyenv init`) runs per shell.
    assert (home / ".bashrc").read_text() == ""

    # Given a marker in the host's .bashrc (Debian's bash reads ~/.bashrc for ssh commands)
    (home / ".bashrc").write_text("export LAB_BASHRC=host-home\n")

    out = ssh(state, host, 'echo "$HOME|${LAB_BASHRC-none}|${PYENV_SHELL-none}"')

    # Then the shell read the host's .bashrc and nothing from root's (pyenv init sets PYENV_SHELL)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"{home}|host-home|none"


def test_up_again_is_a_no_op_and_a_new_size_restarts(
    ssh_lab_root: Path, lease_addresses: Lease
) -> None:
    first = lease_addresses(3).first
    first_state = lab_up(2, root=ssh_lab_root, first=first)
    pids = [h.pid for h in first_state.hosts]

    # Same size: the same processes, only the regions are rewritten
    again = lab_up(2, root=ssh_lab_root, first=first, regions=["a", "b"])
    assert [h.pid for h in again.hosts] == pids
    assert [h.region for h in again.hosts] == ["a", "b"]
    assert "region: b" in again.infrastructure_file.read_text()

    # Another size: the old servers stop, new ones start
    bigger = lab_up(3, root=ssh_lab_root, first=first)
    assert len(bigger.hosts) == 3 and bigger.running
    assert not any(running(p) for p in pids if p is not None)


def test_down_stops_exactly_the_lab_processes(ssh_lab_root: Path, lease_addresses: Lease) -> None:
    state = lab_up(2, root=ssh_lab_root, first=lease_addresses(2).first)
    sshd_pids = [h.pid for h in state.hosts]
    # Given an app started on a lab host over ssh
    out = ssh(state, state.hosts[0], "nohup sleep 300 >/dev/null 2>&1 & echo $!")
    assert out.returncode == 0, out.stderr
    app_pid = int(out.stdout)
    # and, outside the lab, a decoy with the very same HOME (only the namespace differs)
    decoy = subprocess.Popen(
        ["sleep", "300"], env={**os.environ, "HOME": str(state.hosts[0].host_dir / "home")}
    )
    try:
        # When the lab goes down
        stopped = lab_down(root=ssh_lab_root)

        # Then both sshd and the app are gone, the decoy still runs
        assert stopped >= 3
        assert not any(running(p) for p in sshd_pids if p is not None)
        assert not running(app_pid)
        assert decoy.poll() is None
        # and the state is gone but the keys stay (known_hosts remains valid for the next up)
        assert not (ssh_lab_root / "state.json").exists()
        assert (ssh_lab_root / "id_ed25519").exists()
        assert lab_status(root=ssh_lab_root).mode == "none"
        assert lab_down(root=ssh_lab_root) == 0
    finally:
        decoy.send_signal(signal.SIGTERM)
        decoy.wait()


def test_status_shows_a_host_that_died(ssh_lab_root: Path, lease_addresses: Lease) -> None:
    first = lease_addresses(2).first
    state = lab_up(2, root=ssh_lab_root, first=first)
    dead = state.hosts[1]
    assert dead.pid is not None
    os.kill(dead.pid, signal.SIGKILL)
    # The signal is delivered asynchronously: wait until the process is really gone.
    wait_for(lambda: process_gone(dead.pid), 10, f"sshd {dead.pid} to die", interval=0.01)

    status = lab_status(root=ssh_lab_root)

    assert [h.alive for h in status.hosts] == [True, False]
    assert not status.running
    # `up` again notices and brings the whole lab back
    assert lab_up(2, root=ssh_lab_root, first=first).running


def test_up_refuses_an_address_already_in_use(ssh_lab_root: Path, lease_addresses: Lease) -> None:
    # Given something else listening on port 22 of the (leased) address
    block = lease_addresses(1)
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind((block.addresses[0], 22))
        squatter.listen()

        with pytest.raises(LabError, match=re.escape(block.addresses[0])):
            lab_up(1, root=ssh_lab_root, first=block.first)

    assert lab_status(root=ssh_lab_root).mode == "none"


def test_sandbox_mode_needs_no_sshd(lab_root: Path, lease_addresses: Lease) -> None:
    if not private_namespace_supported():
        message = "sandbox hosts need a private mount namespace (root, or user namespaces)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    # Given a sandbox lab (what a machine without root or sshd gets)
    state = lab_up(
        2, root=lab_root, sandbox=True, regions=["r1", "r2"], first=lease_addresses(2).first
    )

    assert state.mode == "sandbox" and "requested" in state.reason
    assert all(h.pid is None and h.alive for h in state.hosts)
    assert state.key_file is None
    spec = yaml.safe_load(state.infrastructure_file.read_text())["spec"]["spec"]
    assert spec["connection"] == {"type": "Sandbox"}
    assert spec["hosts"] == [
        {"hostname": h.address, "region": r, "sandboxRoot": str(h.sandbox_root)}
        for h, r in zip(state.hosts, ["r1", "r2"], strict=True)
    ]

    # When a command runs on sandbox host one
    name = f"vmfarm-lab-test-{uuid.uuid4().hex}"
    one, two = (LocalConnector(t) for t in state.targets())
    result = one.run(f'echo one > /opt/{name}; echo "$HOME $HOSTADDR"')

    # Then it ran "on" that host: its HOME, its address, its own /opt
    assert result.exit_code == 0, result.stderr
    assert result.stdout == f"{state.hosts[0].host_dir / 'home'} {state.hosts[0].address}\n"
    assert (state.hosts[0].host_dir / "opt" / name).read_text() == "one\n"
    assert two.run(f"test -e /opt/{name}").exit_code == 1
    assert not Path(f"/opt/{name}").exists()

    # And an app started there is stopped by lab_down
    app_pid = int(one.run("nohup sleep 300 >/dev/null 2>&1 & echo $!").stdout)
    assert lab_down(root=lab_root) == 1
    assert not running(app_pid)


def _python_for(uid: int) -> str | None:
    """An interpreter that user ``uid`` can run (a venv may link into root's home)."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for candidate in (os.path.realpath(sys.executable), f"/usr/bin/{version}"):
        probe = subprocess.run(
            ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", candidate, "-c", ""],
            capture_output=True,
            check=False,
        )
        if probe.returncode == 0:
            return candidate
    return None


def _skip_or_fail(message: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(message)  # CI must run it: a skip would hide a broken fallback
    pytest.skip(message)


def test_without_root_the_lab_falls_back_to_sandbox_hosts(lease_addresses: Lease) -> None:
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        _skip_or_fail("needs root (to become another user) and setpriv")
    nobody = 65534
    python = _python_for(nobody)
    if python is None:
        _skip_or_fail("no Python interpreter that an unprivileged user may run")
        return
    code = """
import json, sys
from pathlib import Path
from app.errors import LabError
from app.lab import lab_down, lab_up
root = Path(sys.argv[1])
try:
    lab_up(1, root=root, sandbox=False)
    refused = ""
except LabError as e:
    refused = str(e)
state = lab_up(1, root=root, first=int(sys.argv[2]))
lab_down(root=root)
print(json.dumps({"refused": refused, "mode": state.mode, "reason": state.reason}))
"""
    site = [p for p in sys.path if p.endswith("site-packages")]
    # pytest's tmp_path lives in a root-only directory; /tmp is open to every user.
    with tempfile.TemporaryDirectory(prefix="vmfarm-lab-test-") as tmp:
        os.chmod(tmp, 0o777)
        out = subprocess.run(
            [
                "setpriv",
                f"--reuid={nobody}",
                f"--regid={nobody}",
                "--clear-groups",
                python,
                "-c",
                code,
                f"{tmp}/lab",
                str(lease_addresses(1).first),
            ],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
            cwd=tmp,
            env={
                "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                "HOME": tmp,
                "PYTHONPATH": os.pathsep.join([str(REPO), *site]),
            },
        )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    # sandbox=False: a clear error that says what to do
    assert "not running as root" in result["refused"] and "run as root" in result["refused"]
    # sandbox=None: sandbox hosts, and why
    assert result["mode"] == "sandbox"
    assert "not running as root" in result["reason"]
