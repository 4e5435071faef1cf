"""The Connector interface: how a step's command units reach one host.

Implementations: ``SSHConnector`` (paramiko, the default for hosts) and ``LocalConnector``
(``onDelegate: true`` steps, and the local sandbox hosts). Connectors raise only
``app.errors.HostError`` subclasses; a non-zero exit is *data* (``CommandResult.exit_code``),
not an exception.
"""

from __future__ import annotations

import re
import shlex
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

# on_output(stream, text): stream is "stdout" or "stderr"; text is a decoded chunk (any size).
OutputCallback = Callable[[str, str], None]


@dataclass(frozen=True)
class HostTarget:
    """Where and how to connect: everything a connector needs, no secrets by value."""

    hostname: str
    port: int = 22
    user: str = "root"
    private_key_file: str | None = None
    known_hosts_file: str | None = None
    # "strict": the key must be in known_hosts; "accept-new": trust on first use and record it.
    host_key_policy: str = "strict"
    connect_timeout: float = 10.0
    # The local sandbox: run commands locally with this directory as the host's private root.
    sandbox_root: str | None = None
    extra: Mapping[str, str] = field(default_factory=dict)

    @property
    def pool_key(self) -> tuple[str, str, int]:
        return (self.user, self.hostname, self.port)


@dataclass
class CommandResult:
    """What one command did on one host."""

    exit_code: int
    stdout: str = ""
    stderr: str = ""
    duration: float = 0.0


def env_prelude(env: Mapping[str, str] | None) -> str:
    """Shell lines that export ``env``; values are quoted so nothing in them is evaluated."""
    if not env:
        return ""
    for k in env:
        if not _ENV_NAME.fullmatch(k):
            raise ValueError(f"invalid environment variable name {k!r}")
    return "".join(f"export {k}={shlex.quote(str(v))}\n" for k, v in env.items())


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class Connector(ABC):
    """A connection to one host. Not thread-safe: one user at a time (the pool hands it out)."""

    target: HostTarget

    @abstractmethod
    def connect(self) -> None:
        """Open the connection (idempotent); raise ConnectivityError/AuthenticationError."""

    @abstractmethod
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

    @abstractmethod
    def put(self, local_path: str, remote_path: str, *, mode: int | None = None) -> None:
        """Copy a local file to the host (parent directories are created); TransferError."""

    @abstractmethod
    def get(self, remote_path: str, local_path: str) -> None:
        """Copy a file from the host to a local path; TransferError."""

    @abstractmethod
    def close(self) -> None:
        """Close the connection (idempotent)."""

    def is_alive(self) -> bool:
        """True when the connection can take another command without reconnecting."""
        return True
