"""One error hierarchy for vmfarm: every error vmfarm raises on purpose is a ``VmfarmError``.

Third-party errors (paramiko, socket, SQL, cloud SDKs, HTTP) are turned into these at the
boundary, so that failure strategies, the CLI and the ledger speak one vocabulary. Classes live
here unless a package owns them (the module is named)::

    VmfarmError
    ├── SpecError                   a pipeline file is wrong (file:line:col, field); exit 2
    │   └── SpecErrors              several SpecError at once
    ├── ExpressionError             an expression cannot be resolved (app.definitions.expressions;
    │   │                           the loader turns it into a SpecError with its place)
    │   └── ConditionError          a ``when`` condition that does not parse or cannot be judged
    │                               (app.definitions.conditions)
    ├── ConfigError                 settings or environment are wrong (a missing tool, a bad URL)
    ├── PolicyViolation             a plan breaks a policy rule; nothing ran (app.policy); exit 2
    ├── FreezeActiveError           a run falls in an active freeze window; nothing ran
    │                               (app.definitions.freeze); exit 2
    ├── PermissionRefused           the caller lacks a permission (app.rbac); exit 3
    ├── ApprovalRefused             the caller may not vote on this approval; exit 3
    ├── LabError                    the local lab cannot start (not root, sshd missing, ...)
    ├── DiscoveryError              a cloud provider could not list an infrastructure's hosts
    ├── TrafficError                a blue-green traffic switch failed (the old set keeps traffic)
    ├── SecretError                 a secret could not be resolved; never holds the value
    │   │                           (app.secrets.errors)
    │   ├── SecretNotFoundError     no enabled backend holds it
    │   ├── SecretAccessError       the backend refused (Authorization)
    │   └── SecretConfigError       the secrets settings are wrong
    ├── RetryableFetchError         one failed attempt of an artifact download that is tried
    │                               again (app.artifacts.httpfetch; never leaves that module)
    └── HostError                   something went wrong on one host, in one step
        ├── ConnectivityError       TCP connect refused / reset, SSH protocol failure
        │   ├── UnreachableError    no route, DNS failure, connect timeout
        │   └── HostKeyError        the host key is unknown or changed
        ├── AuthenticationError     the host refused our credentials
        ├── CommandTimeoutError     a command ran past its timeout
        ├── TransferError           a Copy unit failed (SFTP)
        │   └── ArtifactError       an artifact could not be fetched (app.artifacts.errors)
        │       ├── ArtifactAuthError          the repository refused the credentials
        │       ├── ArtifactAccessError        the credentials may not read it
        │       ├── ArtifactUnavailableError   unreachable, or 5xx after the retries
        │       └── ChecksumError              the bytes do not have the expected sha256
        ├── WorkerLostError         the worker running the step vanished (DelegateRestart)
        └── VerificationError       a verification check could not judge (Verification)

Every error is picklable (it may cross the broker) and says what happened, where, and what to do.
A command that exits non-zero is not an error but an outcome (``app.units.base.Outcome``): it is
recorded and judged, never raised.
The ``error_class`` of a ``HostError`` (and of ``DiscoveryError`` and ``SecretError``) is the
name failure strategies match on: Harness's error types, ``ERROR_TYPES`` below.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# The error types of Harness's failure strategies (``onFailure.errors``) that vmfarm records.
ERROR_TYPES = (
    "Unknown",
    "Authentication",
    "Authorization",
    "Connectivity",
    "Timeout",
    "Verification",
    "DelegateRestart",
    "ApprovalRejection",
)


class VmfarmError(Exception):
    """Base of every error vmfarm raises on purpose."""


@dataclass(eq=False)
class SpecError(VmfarmError):
    """A pipeline file is invalid. Printed as ``file:line:col: message``."""

    message: str
    file: str = "<input>"
    line: int = 0
    col: int = 0
    field: str = ""

    def __post_init__(self) -> None:
        super().__init__(str(self))

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}:{self.col}" if self.line else self.file
        fld = f" [{self.field}]" if self.field and self.field not in self.message else ""
        return f"{where}: {self.message}{fld}"

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.message, self.file, self.line, self.col, self.field))


@dataclass(eq=False)
class SpecErrors(VmfarmError):
    """Several problems found in one load; each is reported."""

    errors: list[SpecError] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__init__(str(self))

    def __str__(self) -> str:
        return "\n".join(str(e) for e in self.errors)

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.errors,))


class ConfigError(VmfarmError):
    """Settings or the environment are wrong (a bad URL, a missing tool)."""


class ApprovalRefused(VmfarmError):
    """The caller may not approve or reject this execution (the message says why)."""


class LabError(VmfarmError):
    """The local lab cannot do what was asked (not root, sshd missing, ...)."""


class HostError(VmfarmError):
    """Something went wrong on one host. Carries the host and step it happened in."""

    error_class = "Unknown"

    def __init__(self, message: str, *, host: str = "", step: str = "", unit: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.host = host
        self.step = step
        self.unit = unit

    def __str__(self) -> str:
        where = ", ".join(
            p
            for p in (
                f"host {self.host}" if self.host else "",
                f"step {self.step}" if self.step else "",
                f"unit {self.unit}" if self.unit else "",
            )
            if p
        )
        return f"{self.message} ({where})" if where else self.message

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_host_error, (type(self), self.message, self.host, self.step, self.unit))


def _rebuild_host_error(
    cls: type[HostError], message: str, host: str, step: str, unit: str
) -> HostError:
    return cls(message, host=host, step=step, unit=unit)


class ConnectivityError(HostError):
    """The SSH connection failed or broke."""

    error_class = "Connectivity"


class UnreachableError(ConnectivityError):
    """The host could not be reached at all (no route, DNS, connect timeout)."""


class HostKeyError(ConnectivityError):
    """The host key is not in known_hosts, or it changed."""


class AuthenticationError(HostError):
    """The host refused the credentials."""

    error_class = "Authentication"


class CommandTimeoutError(HostError):
    """A command ran longer than its timeout and was stopped."""

    error_class = "Timeout"


class TransferError(HostError):
    """A Copy unit could not transfer its file."""

    error_class = "Unknown"


class WorkerLostError(HostError):
    """The worker that ran this step disappeared (Harness: DelegateRestart)."""

    error_class = "DelegateRestart"


class VerificationError(HostError):
    """A verification check could not give a number (Prometheus unreachable, ambiguous query)."""

    error_class = "Verification"


class TrafficError(VmfarmError):
    """A traffic switch failed: the load balancer refused or was unreachable, or green never
    passed its health checks. ``switch`` names the load balancer (HAProxy name, target group ARN).
    """

    def __init__(self, message: str, *, switch: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.switch = switch

    def __str__(self) -> str:
        if self.switch and self.switch not in self.message:
            return f"{self.message} (traffic switch {self.switch})"
        return self.message

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.message,), {"switch": self.switch})


class DiscoveryError(VmfarmError):
    """A cloud provider could not list an infrastructure's hosts.

    ``error_class`` is what failure strategies match on: ``Authentication`` (bad or expired
    credentials, no permission), ``Connectivity`` (endpoint unreachable, throttled past the
    retries) or ``Unknown``. The message names the infrastructure and what was wrong (an unknown
    region, resource group, project or zone is named as such).
    """

    def __init__(
        self, message: str, *, infrastructure: str = "", error_class: str = "Unknown"
    ) -> None:
        super().__init__(message)
        self.message = message
        self.infrastructure = infrastructure
        self.error_class = error_class

    def __str__(self) -> str:
        if self.infrastructure and self.infrastructure not in self.message:
            return f"infrastructure '{self.infrastructure}': {self.message}"
        return self.message

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_discovery_error, (self.message, self.infrastructure, self.error_class))


def _rebuild_discovery_error(message: str, infrastructure: str, error_class: str) -> DiscoveryError:
    return DiscoveryError(message, infrastructure=infrastructure, error_class=error_class)
