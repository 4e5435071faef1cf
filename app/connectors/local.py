"""LocalConnector: run a step's commands on this machine, or inside a local sandbox host.

Two uses:

* ``onDelegate: true`` steps and ``connection: {type: Local}`` hosts (no ``sandbox_root``):
  ``bash`` on the worker itself, in the worker's working directory.
* the lab's sandbox hosts (``HostTarget.sandbox_root`` set): each command runs in a fresh private
  mount namespace where ``<sandbox_root>/opt`` is /opt and ``<sandbox_root>/var/log`` is /var/log,
  with ``HOME=<sandbox_root>/home`` and ``HOSTADDR=<hostname>``. ``put``/``get`` run inside that
  namespace too, so they see exactly the files the commands see (a ``/opt/app/current`` symlink
  to ``/opt/app/releases/v2`` resolves inside the sandbox, not on the real /opt).

A command never sees the worker's environment (its secrets key, cloud credentials, other
steps' secrets): it starts with PATH, HOME and LANG only (and HOSTADDR on a sandbox host), and
the step's own variables and the values and secrets it references are exported by the script's
first lines. The script, those lines included, goes to ``bash -s`` over stdin, as over SSH: no
value is ever in a process's argv (``ps`` shows ``bash -s``). It is wrapped so that bash reads all
of it before running any of it, and the script's own stdin is /dev/null.

As with ssh, ``run`` returns when the script has exited *and* its stdout and stderr are closed: a
background process that keeps them open (``sleep 60 &``) holds the command until its timeout.
Start daemons with their output redirected (``nohup app >app.log 2>&1 &``).
"""

from __future__ import annotations

import codecs
import contextlib
import functools
import logging
import os
import selectors
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO

from app.connectors.base import (
    CommandResult,
    Connector,
    HostTarget,
    OutputCallback,
    env_prelude,
)
from app.errors import CommandTimeoutError, ConnectivityError, TransferError

log = logging.getLogger(__name__)

# The sandbox's mount step fails with this exit code and this text, so that a broken sandbox
# (a connectivity problem) is told apart from a script that fails.
_MOUNT_FAILED_CODE = 125
_MOUNT_FAILED_TEXT = "vmfarm-sandbox: cannot mount the host's /opt and /var/log"
_READ_SIZE = 65536
# What a command inherits from the worker's environment: nothing else (see the module docstring).
INHERITED = ("PATH", "HOME", "LANG")
# bash reads a compound command whole before it runs it: a script with a syntax error runs
# nothing, and a command in it that reads stdin cannot swallow the rest of the script.
_WRAPPER = "{{\n{body}\n}} </dev/null\nexit\n"


@functools.cache
def _namespace_argv() -> tuple[tuple[str, ...] | None, str]:
    """The unshare prefix for a private mount namespace here, or None and the reason why not."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return None, "`unshare` is missing (apt-get install -y util-linux)"
    argv = [unshare, "--mount", "--propagation", "private"]
    if os.geteuid() != 0:
        # Without root, a user namespace makes us root inside it, enough for bind mounts.
        argv.append("--map-root-user")
    # Probe with a real bind mount: some containers allow unshare but not mount.
    probe = subprocess.run(
        [*argv, "--", "mount", "--bind", "/var/log", "/var/log"],
        capture_output=True,
        text=True,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    if probe.returncode != 0:
        return None, f"{' '.join(argv)} failed: {probe.stderr.strip() or probe.returncode}"
    return tuple(argv), ""


def private_namespace_supported() -> bool:
    """True when sandbox hosts get a private /opt and /var/log on this machine."""
    return _namespace_argv()[0] is not None


class LocalConnector(Connector):
    """Runs commands with local ``bash``; with ``target.sandbox_root``, inside that sandbox host."""

    def __init__(self, target: HostTarget) -> None:
        self.target = target
        self._sandbox = Path(target.sandbox_root).resolve() if target.sandbox_root else None
        self._namespace: tuple[str, ...] | None = None
        self._connected = False

    # ------------------------------------------------------------------------ Connector API

    def connect(self) -> None:
        """Prepare the sandbox directories and namespace support (idempotent)."""
        if self._connected:
            return
        if self._sandbox is not None:
            for hidden in (Path("/opt"), Path("/var/log")):
                if self._sandbox == hidden or hidden in self._sandbox.parents:
                    raise ConnectivityError(
                        f"sandbox root {self._sandbox} is under {hidden}, which the sandbox "
                        "replaces; move it elsewhere",
                        host=self.target.hostname,
                    )
            try:
                for sub in ("opt", "var/log", "home"):
                    (self._sandbox / sub).mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise ConnectivityError(
                    f"cannot prepare sandbox root {self._sandbox}: {e.strerror}",
                    host=self.target.hostname,
                ) from e
            self._namespace, why = _namespace_argv()
            if self._namespace is None:
                log.warning(
                    "sandbox host %s: no private mount namespace (%s); its commands see the "
                    "real /opt and /var/log",
                    self.target.hostname,
                    why,
                )
        self._connected = True

    def run(
        self,
        script: str,
        *,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
        on_output: OutputCallback | None = None,
        workdir: str | None = None,
    ) -> CommandResult:
        """Run a bash script; stream output to on_output; never raise on non-zero."""
        self.connect()
        body = env_prelude(env)
        if workdir:
            body += f"cd {shlex.quote(workdir)} || exit 1\n"
        elif self.target.sandbox_root:
            body += 'cd -- "$HOME" 2>/dev/null || true\n'  # the sandbox host's own home
        body += script
        return self._execute(
            self._stdin_argv(),
            stdin=_WRAPPER.format(body=body).encode(),
            timeout=timeout,
            on_output=on_output,
        )

    def put(self, local_path: str, remote_path: str, *, mode: int | None = None) -> None:
        """Copy a local file to the host (parent directories are created); TransferError."""
        self.connect()
        what = f"cannot copy {local_path} to {remote_path}"
        if not self._in_namespace:
            try:
                dest = self._host_path(remote_path)
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(local_path, dest)
                if mode is not None:
                    os.chmod(dest, mode)
            except OSError as e:
                raise TransferError(f"{what}: {e.strerror or e}", host=self.target.hostname) from e
            return
        # Inside the namespace: the same path resolution as the commands get.
        chmod = f' && chmod {mode:o} -- "$1"' if mode is not None else ""
        script = f'mkdir -p -- "$(dirname -- "$1")" && cat > "$1"{chmod}'
        try:
            with open(local_path, "rb") as src:
                proc = subprocess.run(
                    self._argv(script, remote_path),
                    stdin=src,
                    capture_output=True,
                    env=self._env(),
                    cwd=self._cwd(),
                    check=False,
                )
        except OSError as e:
            raise TransferError(f"{what}: {e.strerror or e}", host=self.target.hostname) from e
        self._check_transfer(proc, what)

    def get(self, remote_path: str, local_path: str) -> None:
        """Copy a file from the host to a local path; TransferError."""
        self.connect()
        what = f"cannot copy {remote_path} to {local_path}"
        dest = Path(local_path)
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            if not self._in_namespace:
                shutil.copyfile(self._host_path(remote_path), tmp)
            else:
                with open(tmp, "wb") as out:
                    proc = subprocess.run(
                        self._argv('cat -- "$1"', remote_path),
                        stdout=out,
                        stderr=subprocess.PIPE,
                        env=self._env(),
                        cwd=self._cwd(),
                        check=False,
                    )
                self._check_transfer(proc, what)
            os.replace(tmp, dest)
        except OSError as e:
            raise TransferError(f"{what}: {e.strerror or e}", host=self.target.hostname) from e
        finally:
            tmp.unlink(missing_ok=True)

    def close(self) -> None:
        """Nothing to close: every command is its own process."""

    # --------------------------------------------------------------------------- internals

    @property
    def _in_namespace(self) -> bool:
        return self._sandbox is not None and self._namespace is not None

    def _argv(self, body: str, *args: str) -> list[str]:
        """The command line that runs ``body`` (with ``args`` as $1...) on this host; only for
        vmfarm's own fixed scripts (put, get) whose arguments are paths, never values."""
        if self._sandbox is None or self._namespace is None:
            return ["bash", "-c", body, "vmfarm", *args]
        return [*self._namespace, "--", "bash", "-c", self._mounts() + body, "vmfarm", *args]

    def _stdin_argv(self) -> list[str]:
        """The command line of ``run``: bash reads the script from stdin."""
        if self._sandbox is None or self._namespace is None:
            return ["bash", "-s"]
        # The mounts first; then this bash reads the script from the same stdin.
        return [*self._namespace, "--", "bash", "-c", self._mounts() + "exec bash -s"]

    def _mounts(self) -> str:
        assert self._sandbox is not None
        opt = shlex.quote(str(self._sandbox / "opt"))
        var_log = shlex.quote(str(self._sandbox / "var/log"))
        return (
            f"mount --bind {opt} /opt && mount --bind {var_log} /var/log || "
            f"{{ echo {shlex.quote(_MOUNT_FAILED_TEXT)} >&2; exit {_MOUNT_FAILED_CODE}; }}\n"
        )

    def _env(self) -> dict[str, str]:
        """A clean environment: the worker's PATH, HOME and LANG; a sandbox host's own HOME and
        HOSTADDR. (No BASH_ENV or ENV: nothing runs before the script.)"""
        env = {k: os.environ[k] for k in INHERITED if k in os.environ}
        env.setdefault("PATH", os.defpath)
        if self._sandbox is not None:
            env["HOME"] = str(self._sandbox / "home")
            env["HOSTADDR"] = self.target.hostname
        return env

    def _cwd(self) -> str | None:
        # A sandbox host's commands start in its HOME, as an ssh login does.
        return str(self._sandbox / "home") if self._sandbox is not None else None

    def _host_path(self, path: str) -> Path:
        """Where ``path`` is for this host's commands when they run without a namespace."""
        p = Path(path)
        if p.is_absolute():
            return p
        return Path(self._cwd() or os.getcwd()) / p

    def _check_transfer(self, proc: subprocess.CompletedProcess[bytes], what: str) -> None:
        if proc.returncode == 0:
            return
        err = (proc.stderr or b"").decode(errors="replace").strip()
        self._check_sandbox(proc.returncode, err)
        raise TransferError(
            f"{what}: {err or f'exit code {proc.returncode}'}", host=self.target.hostname
        )

    def _check_sandbox(self, code: int, stderr: str) -> None:
        if code == _MOUNT_FAILED_CODE and _MOUNT_FAILED_TEXT in stderr:
            raise ConnectivityError(
                f"sandbox host unusable: {stderr.strip()}", host=self.target.hostname
            )

    def _execute(
        self,
        argv: list[str],
        *,
        stdin: bytes,
        timeout: float | None,
        on_output: OutputCallback | None,
    ) -> CommandResult:
        started = time.monotonic()
        deadline = started + timeout if timeout is not None else None
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=self._env(),
                cwd=self._cwd(),
                # Its own process group: a timeout kills the script and everything it started.
                start_new_session=True,
            )
        except OSError as e:
            raise ConnectivityError(
                f"cannot start bash: {e.strerror or e}", host=self.target.hostname
            ) from e
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        chunks: dict[str, list[str]] = {"stdout": [], "stderr": []}
        try:
            # One selector loop instead of reader threads: the script is written, on_output is
            # always called on the caller's thread, one chunk at a time, and the timeout is
            # checked in the same loop.
            if not self._pump(
                proc.stdin, stdin, proc.stdout, proc.stderr, chunks, deadline, on_output
            ):
                raise self._timeout(timeout)
            try:
                code = proc.wait(
                    timeout=None if deadline is None else max(0.0, deadline - time.monotonic())
                )
            except subprocess.TimeoutExpired:
                raise self._timeout(timeout) from None
        finally:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            with contextlib.suppress(OSError):
                proc.stdin.close()
            proc.stdout.close()
            proc.stderr.close()
        if code < 0:
            code = 128 - code  # killed by a signal: report it the way a shell does
        stderr = "".join(chunks["stderr"])
        self._check_sandbox(code, stderr)
        return CommandResult(
            exit_code=code,
            stdout="".join(chunks["stdout"]),
            stderr=stderr,
            duration=time.monotonic() - started,
        )

    def _pump(
        self,
        stdin: IO[bytes],
        payload: bytes,
        stdout: IO[bytes],
        stderr: IO[bytes],
        chunks: dict[str, list[str]],
        deadline: float | None,
        on_output: OutputCallback | None,
    ) -> bool:
        """Write ``payload`` to stdin, then close it; pass each decoded chunk of output on as it
        arrives; True at EOF on both, False at the deadline."""
        # Incremental decoders: a UTF-8 character split across two reads stays whole.
        decoders = {
            name: codecs.getincrementaldecoder("utf-8")(errors="replace") for name in chunks
        }
        todo = memoryview(payload)
        os.set_blocking(stdin.fileno(), False)
        with selectors.DefaultSelector() as sel:
            sel.register(stdin, selectors.EVENT_WRITE, "stdin")
            sel.register(stdout, selectors.EVENT_READ, "stdout")
            sel.register(stderr, selectors.EVENT_READ, "stderr")
            while sel.get_map():
                wait = None if deadline is None else deadline - time.monotonic()
                if wait is not None and wait <= 0:
                    return False
                for key, _ in sel.select(wait):
                    name: str = key.data
                    if name == "stdin":
                        try:
                            todo = todo[os.write(key.fd, todo[:_READ_SIZE]) :]
                        except BrokenPipeError:  # bash is gone (it will say why)
                            todo = todo[:0]
                        if not todo:
                            sel.unregister(stdin)
                            stdin.close()
                        continue
                    data = os.read(key.fd, _READ_SIZE)
                    if not data:
                        sel.unregister(key.fileobj)
                    text = decoders[name].decode(data, final=not data)
                    if text:
                        chunks[name].append(text)
                        if on_output is not None:
                            on_output(name, text)
        return True

    def _timeout(self, timeout: float | None) -> CommandTimeoutError:
        return CommandTimeoutError(
            f"command did not finish within {timeout:g} s; its process group was killed",
            host=self.target.hostname,
        )
