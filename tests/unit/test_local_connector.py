"""LocalConnector on real processes: streaming, timeouts, exit codes, quoting, files, sandboxes."""

from __future__ import annotations

import os
import stat
import uuid
from pathlib import Path

import pytest

from app.connectors.base import HostTarget
from app.connectors.local import LocalConnector, private_namespace_supported
from app.errors import CommandTimeoutError, TransferError
from tests.waiting import process_gone, wait_for


@pytest.fixture
def local() -> LocalConnector:
    """The onDelegate case: commands run right here."""
    return LocalConnector(HostTarget(hostname="delegate"))


@pytest.fixture
def sandboxes(tmp_path: Path) -> tuple[LocalConnector, LocalConnector]:
    """Two sandbox hosts side by side, as `lab up --sandbox` describes them."""
    if not private_namespace_supported():
        message = "sandbox hosts need a private mount namespace (root, or user namespaces)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return (
        LocalConnector(HostTarget(hostname="127.0.1.1", sandbox_root=str(tmp_path / "h1"))),
        LocalConnector(HostTarget(hostname="127.0.1.2", sandbox_root=str(tmp_path / "h2"))),
    )


def test_output_streams_while_the_command_runs(local: LocalConnector, tmp_path: Path) -> None:
    # The script waits for a file that only the output callback creates: if output were handed
    # over at the end, the script would wait until its timeout.
    go = tmp_path / "go"
    seen: list[tuple[str, str]] = []

    def on_output(stream: str, text: str) -> None:
        seen.append((stream, text))
        if "first" in text:
            go.touch()

    result = local.run(
        f"echo first; while [ ! -e {go} ]; do sleep 0.01; done; echo second >&2; exit 3",
        timeout=30,
        on_output=on_output,
    )

    assert result.exit_code == 3
    assert result.stdout == "first\n"
    assert result.stderr == "second\n"
    assert seen == [("stdout", "first\n"), ("stderr", "second\n")]
    assert result.duration > 0


def test_large_output_on_both_streams_arrives_whole(local: LocalConnector) -> None:
    # 3 x 400 KB of two-byte characters on each stream: no deadlock, no split characters.
    result = local.run(
        "for i in 1 2 3; do printf 'é%.0s' $(seq 200000); printf 'ü%.0s' $(seq 200000) >&2; done"
    )

    assert result.exit_code == 0
    assert result.stdout == "é" * 600000
    assert result.stderr == "ü" * 600000


def test_timeout_kills_the_whole_process_group(local: LocalConnector, tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"

    with pytest.raises(CommandTimeoutError) as info:
        local.run(f"sleep 300 & echo $! > {pidfile}; wait", timeout=0.5)

    assert info.value.host == "delegate"
    assert "0.5 s" in str(info.value) and "host delegate" in str(info.value)
    assert info.value.error_class == "Timeout"
    # SIGKILL is delivered, and the orphan reaped, asynchronously: poll until it is gone.
    child = int(pidfile.read_text())
    wait_for(lambda: process_gone(child), 10, f"the background child {child} to die")


@pytest.mark.parametrize(
    ("script", "code"),
    [("true", 0), ("exit 7", 7), ("false", 1), ("kill -TERM $$", 143), ("no-such-cmd-xyz", 127)],
)
def test_exit_codes_are_data_not_errors(local: LocalConnector, script: str, code: int) -> None:
    assert local.run(script).exit_code == code


def test_env_values_are_passed_literally(local: LocalConnector, tmp_path: Path) -> None:
    value = f"""a 'single' "double" $(touch {tmp_path}/dollar) `touch {tmp_path}/tick` $HOME \\n;"""

    result = local.run('printf %s "$VALUE"', env={"VALUE": value, "OTHER": "x"})

    assert result.stdout == value
    assert not (tmp_path / "dollar").exists()
    assert not (tmp_path / "tick").exists()


def test_workdir(local: LocalConnector, tmp_path: Path) -> None:
    assert local.run("pwd", workdir=str(tmp_path)).stdout == f"{tmp_path}\n"
    missing = local.run("echo should-not-run", workdir=str(tmp_path / "missing"))
    assert missing.exit_code == 1 and missing.stdout == ""


def test_put_and_get_copy_files(local: LocalConnector, tmp_path: Path) -> None:
    src = tmp_path / "src.txt"
    src.write_text("payload\n")
    remote = tmp_path / "deep" / "er" / "conf.txt"

    local.put(str(src), str(remote), mode=0o640)
    local.get(str(remote), str(tmp_path / "back" / "copy.txt"))

    assert remote.read_text() == "payload\n"
    assert stat.S_IMODE(remote.stat().st_mode) == 0o640
    assert (tmp_path / "back" / "copy.txt").read_text() == "payload\n"
    with pytest.raises(TransferError, match="No such file"):
        local.get(str(tmp_path / "missing"), str(tmp_path / "x"))


def test_sandbox_hosts_have_their_own_opt_var_log_and_home(
    sandboxes: tuple[LocalConnector, LocalConnector], tmp_path: Path
) -> None:
    one, two = sandboxes
    name = f"vmfarm-sandbox-test-{uuid.uuid4().hex}"

    result = one.run(
        f'echo one > /opt/{name} && echo log > /var/log/{name} && echo "$HOME $HOSTADDR"'
    )

    assert result.exit_code == 0, result.stderr
    assert result.stdout == f"{tmp_path / 'h1' / 'home'} 127.0.1.1\n"
    assert (tmp_path / "h1" / "opt" / name).read_text() == "one\n"
    assert (tmp_path / "h1" / "var" / "log" / name).read_text() == "log\n"
    assert two.run(f"ls /opt/{name} /var/log/{name}").exit_code != 0
    assert not Path(f"/opt/{name}").exists()
    assert not Path(f"/var/log/{name}").exists()


def test_sandbox_put_and_get_see_what_commands_see(
    sandboxes: tuple[LocalConnector, LocalConnector], tmp_path: Path
) -> None:
    one, _ = sandboxes
    app = f"/opt/vmfarm-sandbox-test-{uuid.uuid4().hex}"
    # Given a release layout whose `current` symlink points at an absolute /opt path
    layout = one.run(f"mkdir -p {app}/releases/v2 && ln -sfn {app}/releases/v2 {app}/current")
    assert layout.exit_code == 0, layout.stderr
    src = tmp_path / "config.yml"
    src.write_text("port: 8080\n")

    # When a file is put through the symlink and read back
    one.put(str(src), f"{app}/current/config.yml", mode=0o600)
    one.get(f"{app}/current/config.yml", str(tmp_path / "fetched.yml"))

    # Then it landed in the sandbox's release directory, never on the real /opt
    landed = tmp_path / "h1" / app.lstrip("/") / "releases" / "v2" / "config.yml"
    assert landed.read_text() == "port: 8080\n"
    assert stat.S_IMODE(landed.stat().st_mode) == 0o600
    assert (tmp_path / "fetched.yml").read_text() == "port: 8080\n"
    assert not Path(app).exists()
    assert one.run(f"cat {app}/current/config.yml").stdout == "port: 8080\n"
