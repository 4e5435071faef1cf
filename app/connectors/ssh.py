"""SSHConnector: run bash scripts and copy files on one host over SSH (paramiko).

One ``SSHConnector`` is one SSH connection. Every ``run`` opens one exec channel on it (about
3 ms on an open connection, against about 30 ms of CPU and 100 ms for a fresh handshake), so the
pool (``app.connectors.pool``) keeps connections open between the steps of a host.

How a script runs: the channel executes ``exec bash -s`` and the script arrives on stdin, wrapped
so that bash parses all of it before running any of it (a syntax error runs nothing, and a
command in the script that reads stdin cannot swallow the rest of the script: the script's stdin
is /dev/null). The channel's stdin then stays open as a lifeline: when we close the channel on a
timeout, or the connection dies, a small watcher on the host sees EOF and stops the script's
process group (TERM, then KILL after 2 s), so a timed-out deploy does not keep running behind our
back. Processes the script detached with ``setsid``/``nohup ... &`` survive a normal exit.

Paramiko and socket errors become ``app.errors`` errors here, with the host:port and the fix in
the message.
"""

from __future__ import annotations

import codecs
import contextlib
import errno
import fcntl
import logging
import os
import posixpath
import select
import shlex
import socket
import threading
import time
import uuid
from collections.abc import Mapping
from typing import Any

import paramiko

from app.connectors.base import CommandResult, Connector, HostTarget, OutputCallback, env_prelude
from app.connectors.hostkeys import (
    default_known_hosts_file,
    describe_key,
    known_hosts_name,
    load_known_hosts,
    parse_known_hosts,
    preferred_key_types,
)
from app.connectors.sockets import tune_socket
from app.errors import (
    AuthenticationError,
    CommandTimeoutError,
    ConfigError,
    ConnectivityError,
    HostError,
    HostKeyError,
    TransferError,
    UnreachableError,
)

log = logging.getLogger(__name__)


KEEPALIVE_SECONDS = 15


# Paramiko negotiates mlkem768x25519 / curve25519, ed25519 host keys and aes-ctr + hmac-sha2 with
# OpenSSH by default. Its list still carries CBC modes, 3DES and MD5/SHA1-96 MACs for old peers:
# switch those off so a downgrade can never pick them (OpenSSH >= 7.x never needs them).
DISABLED_ALGORITHMS: dict[str, list[str]] = {
    "ciphers": ["3des-cbc", "aes128-cbc", "aes192-cbc", "aes256-cbc"],
    "macs": ["hmac-md5", "hmac-md5-96", "hmac-sha1-96"],
}


HOST_KEY_POLICIES = ("strict", "accept-new")


_READ_SIZE = 65536


# Safety net for the wait loop: wake up at least this often even if no event arrives.
_MAX_WAIT = 1.0


# Lines 1 and the last two are the wrapper; {body} is env, cd and the script. bash reads a whole
# compound command before running it, so every byte of the script is consumed from stdin first.
_WRAPPER = (
    "{{ __vmfarm_pid=$$; ( trap '' TERM; read -r _; if kill -0 \"$__vmfarm_pid\" 2>/dev/null;"
    " then kill -TERM 0; sleep 2; kill -KILL 0; fi ) <&0 >/dev/null 2>&1 & {{\n"
    "{body}\n"
    "}} </dev/null\n"
    "exit\n"
    "}}\n"
)


_REMOTE_COMMAND = "exec bash -s"


# Serialises accept-new appends between threads; flock() does it between processes.
_known_hosts_append_lock = threading.Lock()


class _VerifyHostKey(paramiko.MissingHostKeyPolicy):
    """Hands every host key to the connector: the paramiko client itself knows no keys."""

    def __init__(self, connector: SSHConnector) -> None:
        self._connector = connector

    def missing_host_key(
        self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey
    ) -> None:
        """Accept the key or raise HostKeyError."""
        self._connector._verify_host_key(hostname, key)


def _key_from_text(text: str, passphrase: Any) -> paramiko.PKey:
    """A private key given as text (a secret): through a 0600 file that lives only while
    paramiko reads it (PKey.from_path knows every key type and format)."""
    import tempfile

    fd, name = tempfile.mkstemp(prefix="vmfarm-key-")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text if text.endswith("\n") else text + "\n")
        return paramiko.PKey.from_path(name, password=passphrase)
    finally:
        os.unlink(name)


class SSHConnector(Connector):
    """One SSH connection to one host; not thread-safe (the pool gives it to one user at a time)."""

    def __init__(
        self,
        target: HostTarget,
        *,
        password: str | None = None,
        key_passphrase: str | None = None,
        private_key_text: str | None = None,
    ) -> None:
        """Prepare a connection; nothing is opened until connect() or the first command."""
        if target.host_key_policy not in HOST_KEY_POLICIES:
            # A settings mistake, not a host failure: nothing to retry, so not a HostError.
            raise ConfigError(
                f"unknown host_key_policy {target.host_key_policy!r} for "
                f"{target.hostname}:{target.port}; use one of {', '.join(HOST_KEY_POLICIES)}"
            )
        self.target = target
        # Secrets (from the secrets store, resolved on the worker): kept out of repr and logs.
        self._password = password
        self._key_passphrase = key_passphrase
        self._key_text = private_key_text
        self._client: paramiko.SSHClient | None = None
        self._sftp: paramiko.SFTPClient | None = None
        self._pkey: paramiko.PKey | None = None
        host = f"[{target.hostname}]" if ":" in target.hostname else target.hostname
        self._where = f"{host}:{target.port}"
        self._known_hosts = target.known_hosts_file or default_known_hosts_file()

    def __repr__(self) -> str:
        state = "connected" if self.is_alive() else "closed"
        return f"<SSHConnector {self.target.user}@{self._where} {state}>"

    # -- connection -------------------------------------------------------------------------

    def connect(self) -> None:
        """Open and authenticate the connection (idempotent); reopen it if it died."""
        if self.is_alive():
            return
        self.close()
        t = self.target
        pkey = self._load_private_key() if t.private_key_file or self._key_text else None
        known = load_known_hosts(self._known_hosts)
        on_record = known.lookup(known_hosts_name(t.hostname, t.port)) if known else None
        known_types = list(on_record.keys()) if on_record else []

        def transport_factory(sock: Any, /, **kwargs: Any) -> paramiko.Transport:
            if isinstance(sock, socket.socket):
                sock = tune_socket(sock)
            transport = paramiko.Transport(
                sock, disabled_algorithms=kwargs.get("disabled_algorithms")
            )
            if known_types:
                opts = transport.get_security_options()
                opts.key_types = preferred_key_types(known_types, opts.key_types)
            return transport

        client = paramiko.SSHClient()
        client.set_missing_host_key_policy(_VerifyHostKey(self))
        try:
            client.connect(
                t.hostname,
                port=t.port,
                username=t.user,
                pkey=pkey,
                password=self._password,
                timeout=t.connect_timeout,
                banner_timeout=t.connect_timeout,
                auth_timeout=t.connect_timeout,
                channel_timeout=t.connect_timeout,
                # A configured key is the only identity offered: an agent or ~/.ssh keys could
                # log in as someone else, and each refused key costs a round trip.
                allow_agent=pkey is None,
                look_for_keys=pkey is None,
                disabled_algorithms=DISABLED_ALGORITHMS,
                transport_factory=transport_factory,
            )
        except HostError:  # from our host key check
            client.close()
            raise
        except Exception as exc:
            client.close()
            raise self._connect_error(exc) from exc
        except BaseException:
            client.close()
            raise
        transport = client.get_transport()
        if transport is None:  # pragma: no cover - connect() returned without a transport
            client.close()
            raise ConnectivityError(
                f"SSH to {self._where}: no transport after connect", host=t.hostname
            )
        transport.set_keepalive(KEEPALIVE_SECONDS)
        self._client = client

    def is_alive(self) -> bool:
        """True when the connection can take another command without reconnecting."""
        transport = self._client.get_transport() if self._client else None
        return bool(transport and transport.is_active() and transport.is_authenticated())

    def close(self) -> None:
        """Close the connection (idempotent)."""
        sftp, client = self._sftp, self._client
        self._sftp = self._client = None
        for closable in (sftp, client):
            if closable is not None:
                try:
                    closable.close()
                except Exception:  # closing a dead connection may fail; it is gone either way
                    log.debug("error closing %s", self._where, exc_info=True)

    def _load_private_key(self) -> paramiko.PKey:
        if self._pkey is not None:
            return self._pkey
        path = os.path.expanduser(self.target.private_key_file or "")
        # paramiko 5.1 hands the passphrase to cryptography unchanged, and cryptography wants
        # bytes: a str fails with "password must be bytes" even when it is right.
        passphrase: Any = None if self._key_passphrase is None else self._key_passphrase.encode()
        try:
            if self._key_text is not None:
                path = "(the private key secret)"
                self._pkey = _key_from_text(self._key_text, passphrase)
                return self._pkey
            self._pkey = paramiko.PKey.from_path(path, password=passphrase)
        except (paramiko.PasswordRequiredException, TypeError) as exc:
            if passphrase is None and "password" in str(exc).lower():
                raise self._auth_error(
                    f"private key {path} is encrypted; give its passphrase "
                    "(key_passphrase, from a secret)"
                ) from exc
            raise self._auth_error(f"cannot load private key {path}: {exc}") from exc
        except OSError as exc:
            raise self._auth_error(
                f"cannot read private key {path}: {exc.strerror or exc}; "
                "check private_key_file and its permissions"
            ) from exc
        except Exception as exc:  # cryptography raises ValueError/TypeError/UnsupportedAlgorithm
            raise self._auth_error(
                f"cannot load private key {path} ({type(exc).__name__}: {exc}); it must be an "
                "ed25519, ecdsa or rsa key in OpenSSH or PEM format (wrong passphrase?)"
            ) from exc
        return self._pkey

    def _auth_error(self, message: str) -> AuthenticationError:
        return AuthenticationError(f"SSH to {self._where}: {message}", host=self.target.hostname)

    # -- host keys ---------------------------------------------------------------------------

    def _verify_host_key(self, name: str, key: paramiko.PKey) -> None:
        known = load_known_hosts(self._known_hosts)
        if known is not None and f"{key.get_name()} {key.get_base64()}" in known.revoked:
            raise HostKeyError(
                f"host key of {self._where} ({describe_key(key)}) is marked @revoked in "
                f"{self._known_hosts}; nothing was run. The host must get a new host key",
                host=self.target.hostname,
            )
        on_record = known.lookup(name) if known else None
        if on_record:
            if on_record.get(key.get_name()) == key:
                return
            raise self._changed_key_error(name, key, on_record)
        if self.target.host_key_policy == "accept-new":
            self._record_host_key(name, key)
            return
        port = f"-p {self.target.port} " if self.target.port != 22 else ""
        missing = "" if known is not None else " (the file does not exist)"
        raise HostKeyError(
            f"host key of {self._where} ({describe_key(key)}) is not in {self._known_hosts}"
            f"{missing}; nothing was run. Check the fingerprint out of band, then add it: "
            f"`ssh-keyscan {port}-H {self.target.hostname} >> {self._known_hosts}` "
            "(or set host_key_policy: accept-new to trust it on first use)",
            host=self.target.hostname,
        )

    def _changed_key_error(
        self, name: str, key: paramiko.PKey, on_record: Mapping[str, paramiko.PKey]
    ) -> HostKeyError:
        recorded = ", ".join(describe_key(k) for k in on_record.values())
        return HostKeyError(
            f"host key of {self._where} CHANGED: the server offers {describe_key(key)}, "
            f"{self._known_hosts} has {recorded}; nothing was run. This is either a reinstalled "
            "host or someone in the middle. If the change is expected, remove the old entry with "
            f"`ssh-keygen -R '{name}' -f {self._known_hosts}` and connect again",
            host=self.target.hostname,
        )

    def _record_host_key(self, name: str, key: paramiko.PKey) -> None:
        path = self._known_hosts
        with _known_hosts_append_lock:
            os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
            with os.fdopen(fd, "r+", encoding="utf-8") as fh:
                fcntl.flock(fh, fcntl.LOCK_EX)
                # Another thread or worker may have recorded this host since we looked: re-read
                # under the lock so two first connections do not write two different keys.
                text = fh.read()
                fresh = parse_known_hosts(text)
                on_record = fresh.lookup(name)
                if on_record:
                    if on_record.get(key.get_name()) == key:
                        return
                    raise self._changed_key_error(name, key, on_record)
                prefix = "\n" if text and not text.endswith("\n") else ""
                fh.write(f"{prefix}{name} {key.get_name()} {key.get_base64()}\n")
                fh.flush()
        log.warning(
            "accept-new: permanently added the host key of %s (%s) to %s",
            self._where,
            describe_key(key),
            path,
        )

    # -- errors -----------------------------------------------------------------------------

    def _connect_error(self, exc: Exception) -> HostError:
        """Turn what paramiko or the socket raised while connecting into our error."""
        host, where, secs = self.target.hostname, self._where, self.target.connect_timeout
        if isinstance(exc, paramiko.BadHostKeyException):
            return HostKeyError(
                f"host key of {where} changed; remove the old entry with "
                f"`ssh-keygen -R {host} -f {self._known_hosts}`",
                host=host,
            )
        if isinstance(exc, paramiko.AuthenticationException):
            how = (
                f"key {self.target.private_key_file}"
                if self.target.private_key_file
                else "agent/default keys" + (" and password" if self._password else "")
            )
            return AuthenticationError(
                f"{where} refused {self.target.user!r} with {how} ({exc}); check that the public "
                f"key is in {self.target.user}'s authorized_keys on the host and that the user "
                "may log in",
                host=host,
            )
        if isinstance(exc, socket.gaierror):
            return UnreachableError(
                f"cannot resolve {host!r} ({exc.strerror}); check the host name and DNS", host=host
            )
        if isinstance(exc, paramiko.ssh_exception.NoValidConnectionsError):
            errnos = {getattr(e, "errno", None) for e in exc.errors.values()}
            if errnos == {errno.ECONNREFUSED}:
                return ConnectivityError(
                    f"connection refused by {where}; is sshd running and listening on that port?",
                    host=host,
                )
            return UnreachableError(
                f"cannot reach {where} ({exc}); check the address, routing and firewalls", host=host
            )
        if isinstance(exc, ConnectionRefusedError):
            return ConnectivityError(
                f"connection refused by {where}; is sshd running and listening on that port?",
                host=host,
            )
        if isinstance(exc, (socket.timeout, TimeoutError)):
            return UnreachableError(
                f"connecting to {where} timed out after {secs:g}s; is the "
                "host up and the port open (firewall, security group)?",
                host=host,
            )
        if isinstance(exc, OSError) and exc.errno in (
            errno.EHOSTUNREACH,
            errno.ENETUNREACH,
            errno.EADDRNOTAVAIL,
        ):
            return UnreachableError(
                f"cannot reach {where} ({exc.strerror}); check the address and routing", host=host
            )
        if isinstance(exc, paramiko.SSHException) and "banner" in str(exc):
            return ConnectivityError(
                f"{where} accepted TCP but sent no SSH banner within {secs:g}s ({exc}); is it an "
                "SSH port, and is sshd overloaded (MaxStartups)?",
                host=host,
            )
        return ConnectivityError(
            f"SSH to {where} failed: {type(exc).__name__}: {exc}; retry, "
            "and check the host's sshd log if it persists",
            host=host,
        )

    def _dropped_meanwhile(self, exc: BaseException) -> bool:
        """Did the connection drop under this error? An SFTP status with an errno (no such
        file, permission denied) is the host's answer. Otherwise the transport thread may not
        have seen the end of the connection yet: give it a moment before calling it alive."""
        if isinstance(exc, (EOFError, ConnectionError)):
            return True
        if getattr(exc, "errno", None) is not None:
            return not self.is_alive()
        deadline = time.monotonic() + 0.3
        while True:
            if not self.is_alive():
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.03)

    def _dropped(self, doing: str, exc: BaseException | None = None) -> ConnectivityError:
        why = f" ({type(exc).__name__}: {exc})" if exc is not None else ""
        return ConnectivityError(
            f"connection to {self._where} dropped while {doing}{why}; the host may have rebooted "
            "or the network failed; whether the command finished is unknown",
            host=self.target.hostname,
        )

    # -- commands ---------------------------------------------------------------------------

    def run(
        self,
        script: str,
        *,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
        on_output: OutputCallback | None = None,
        workdir: str | None = None,
    ) -> CommandResult:
        """Run a bash script on the host; stream output to on_output; never raise on non-zero."""
        started = time.monotonic()
        deadline = started + timeout if timeout is not None else None
        body = env_prelude(env)
        if workdir:
            body += f"cd -- {shlex.quote(workdir)} || exit 1\n"
        else:
            # sshd starts in the passwd home; $HOME is what the host says (the lab sets a
            # private one per host). On an ordinary host both are the same directory.
            body += 'cd -- "$HOME" 2>/dev/null || true\n'
        payload = _WRAPPER.format(body=body + script).encode("utf-8")

        chan = self._open_channel()
        try:
            try:
                chan.exec_command(_REMOTE_COMMAND)
                # Bounded by the command timeout; the wrapper makes bash read all of stdin
                # before it runs anything, so the script's output cannot block this send.
                chan.settimeout(
                    None if deadline is None else max(0.001, deadline - time.monotonic())
                )
                chan.sendall(payload)
            except TimeoutError:
                raise self._timeout_error(timeout) from None
            except (paramiko.SSHException, OSError, EOFError) as exc:
                raise self._dropped("starting the command", exc) from exc
            out, err = self._collect(chan, deadline, timeout, on_output)
            return CommandResult(
                exit_code=chan.exit_status,
                stdout=out,
                stderr=err,
                duration=time.monotonic() - started,
            )
        finally:
            # On timeout or error this EOFs the script's stdin: the watcher then stops it.
            try:
                chan.close()
            except Exception:
                log.debug("error closing channel to %s", self._where, exc_info=True)

    def _open_channel(self) -> paramiko.Channel:
        self.connect()
        for attempt in (1, 2):
            transport = self._client.get_transport() if self._client else None
            try:
                if transport is None:
                    raise paramiko.SSHException("not connected")
                chan = transport.open_session(timeout=self.target.connect_timeout)
                # A stale error left from authentication would later read as a dropped link.
                transport.get_exception()
                return chan
            except (paramiko.SSHException, OSError, EOFError) as exc:
                # Nothing has run yet, so one reconnect is safe when the connection died idle.
                if attempt == 1 and not self.is_alive():
                    self.connect()
                    continue
                raise ConnectivityError(
                    f"cannot open a session on {self._where} ({type(exc).__name__}: {exc}); "
                    "if it says 'administratively prohibited', sshd's MaxSessions is too low",
                    host=self.target.hostname,
                ) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def _collect(
        self,
        chan: paramiko.Channel,
        deadline: float | None,
        timeout: float | None,
        on_output: OutputCallback | None,
    ) -> tuple[str, str]:
        utf8 = codecs.getincrementaldecoder("utf-8")
        streams = {
            "stdout": (chan.recv_ready, chan.recv, utf8("replace")),
            "stderr": (chan.recv_stderr_ready, chan.recv_stderr, utf8("replace")),
        }
        parts: dict[str, list[str]] = {"stdout": [], "stderr": []}

        def emit(stream: str, text: str) -> None:
            if text:
                parts[stream].append(text)
                if on_output is not None:
                    on_output(stream, text)

        # poll(), not select(): a busy worker can hold more than 1024 descriptors.
        poller = select.poll()
        poller.register(chan.fileno(), select.POLLIN)
        while True:
            # Read the end flags before draining: everything sent before the EOF is then already
            # in the buffers, and this drain gets all of it.
            ended = chan.eof_received or chan.closed
            got = False
            for stream, (ready, recv, decoder) in streams.items():
                while ready():
                    data = recv(_READ_SIZE)
                    if not data:
                        break
                    got = True
                    # The incremental decoder keeps a multibyte character split across two
                    # chunks until its last byte arrives.
                    emit(stream, decoder.decode(data))
            if ended:
                break
            if got:
                continue
            if deadline is not None and time.monotonic() >= deadline:
                raise self._timeout_error(
                    timeout, exit_code=chan.exit_status if chan.exit_status_ready() else None
                )
            poller.poll(int(_wait_slice(deadline) * 1000) + 1)
        for stream, (_, _, decoder) in streams.items():
            emit(stream, decoder.decode(b"", final=True))

        # Output can end (EOF) before the process does, e.g. after `exec >&- 2>&-`.
        while not chan.status_event.wait(_wait_slice(deadline)):
            if deadline is not None and time.monotonic() >= deadline:
                raise self._timeout_error(timeout)
        transport = chan.get_transport()
        if chan.exit_status == -1 and (
            not transport.is_active() or transport.get_exception() is not None
        ):
            # The channel ended without an exit status because the connection went away (the
            # other no-status case, a process killed by a signal, keeps the transport up).
            raise self._dropped("running a command")
        return "".join(parts["stdout"]), "".join(parts["stderr"])

    def _timeout_error(
        self, timeout: float | None, *, exit_code: int | None = None
    ) -> CommandTimeoutError:
        if exit_code is not None:
            # Like ssh, we wait for the end of the output, not just the exit of the script.
            return CommandTimeoutError(
                f"command on {self._where} exited with {exit_code}, but its output was still "
                f"open after {timeout:g}s: a background process it started holds stdout/stderr "
                "(it was left running). Start daemons with `nohup cmd >/dev/null 2>&1 &` or "
                "`setsid`",
                host=self.target.hostname,
            )
        return CommandTimeoutError(
            f"command on {self._where} did not finish within {timeout:g}s and was stopped "
            "(channel closed; its process group gets TERM, then KILL); raise the timeout or "
            "find out why it hangs",
            host=self.target.hostname,
        )

    # -- files ------------------------------------------------------------------------------

    def _sftp_client(self) -> paramiko.SFTPClient:
        if self._sftp is not None and self.is_alive():
            return self._sftp
        self._sftp = None
        channel_error: Exception | None = None
        for attempt in (1, 2):
            self.connect()
            assert self._client is not None
            try:
                self._sftp = self._client.open_sftp()
                return self._sftp
            except (paramiko.SSHException, OSError, EOFError) as exc:
                channel_error = exc
                if attempt == 1 and not self.is_alive():
                    continue  # died while idle: nothing happened yet, reconnect once
                break
        raise ConnectivityError(
            f"cannot start SFTP on {self._where} ({channel_error}); is `Subsystem sftp` set in "
            "the host's sshd_config?",
            host=self.target.hostname,
        )

    def _transfer_error(self, doing: str, exc: BaseException) -> HostError:
        # An SFTP session in an unknown state is not reused.
        if self._sftp is not None:
            try:
                self._sftp.close()
            except Exception:
                log.debug("error closing SFTP to %s", self._where, exc_info=True)
            self._sftp = None
        if self._dropped_meanwhile(exc):
            return self._dropped(doing, exc)
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        return TransferError(
            f"{doing} failed on {self._where}: {reason}", host=self.target.hostname
        )

    def put(self, local_path: str, remote_path: str, *, mode: int | None = None) -> None:
        """Copy a local file to the host atomically (temp name, then rename); TransferError."""
        if not os.path.isfile(local_path):
            raise TransferError(
                f"cannot copy {local_path} to {self._where}:{remote_path}: the "
                "local file does not exist",
                host=self.target.hostname,
            )
        sftp = self._sftp_client()
        doing = f"copying {local_path} to {remote_path}"
        parent, name = posixpath.split(remote_path)
        tmp = posixpath.join(parent, f".{name}.vmfarm-{uuid.uuid4().hex[:12]}.tmp")
        try:
            try:
                existing = sftp.stat(remote_path).st_mode
            except FileNotFoundError:
                existing = None
                if parent:
                    _sftp_makedirs(sftp, parent)
            try:
                sftp.put(local_path, tmp, confirm=True)
            except BaseException:  # a partial temp file must not stay (a full disk stays full)
                _sftp_remove_quietly(sftp, tmp)
                raise
            try:
                # Keep the mode of the file we replace unless a mode is given.
                final_mode = mode if mode is not None else existing
                if final_mode is not None:
                    sftp.chmod(tmp, final_mode & 0o7777)
                _sftp_replace(sftp, tmp, remote_path)
            except BaseException:
                _sftp_remove_quietly(sftp, tmp)
                raise
        except (OSError, paramiko.SSHException, EOFError) as exc:
            raise self._transfer_error(doing, exc) from exc

    def get(self, remote_path: str, local_path: str) -> None:
        """Copy a file from the host to a local path (atomic, parents created); TransferError."""
        sftp = self._sftp_client()
        local_dir = os.path.dirname(os.path.abspath(local_path))
        tmp = os.path.join(
            local_dir, f".{os.path.basename(local_path)}.vmfarm-{uuid.uuid4().hex[:12]}.tmp"
        )
        try:
            os.makedirs(local_dir, exist_ok=True)
            sftp.get(remote_path, tmp)
            os.replace(tmp, local_path)
        except (OSError, paramiko.SSHException, EOFError) as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise self._transfer_error(f"copying {remote_path} to {local_path}", exc) from exc


def _sftp_makedirs(sftp: paramiko.SFTPClient, path: str) -> None:
    """mkdir -p over SFTP."""
    try:
        sftp.stat(path)
        return
    except FileNotFoundError:
        pass
    parent = posixpath.dirname(path.rstrip("/"))
    if parent and parent != path:
        _sftp_makedirs(sftp, parent)
    try:
        sftp.mkdir(path)
    except OSError:
        sftp.stat(path)  # created meanwhile by someone else: fine; otherwise raise the real error


def _sftp_replace(sftp: paramiko.SFTPClient, src: str, dst: str) -> None:
    try:
        # posix-rename@openssh.com replaces dst atomically; plain SFTP rename refuses to.
        sftp.posix_rename(src, dst)
    except OSError as exc:
        if "unsupported" not in str(exc).lower():
            raise
        _sftp_remove_quietly(sftp, dst)
        sftp.rename(src, dst)


def _sftp_remove_quietly(sftp: paramiko.SFTPClient, path: str) -> None:
    with contextlib.suppress(OSError, paramiko.SSHException, EOFError):
        sftp.remove(path)


def _wait_slice(deadline: float | None) -> float:
    """How long to block for the next event: until the deadline, but at most _MAX_WAIT."""
    if deadline is None:
        return _MAX_WAIT
    return max(0.0, min(_MAX_WAIT, deadline - time.monotonic()))
