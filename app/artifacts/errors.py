"""Errors of artifact fetching. All are ``TransferError`` (a ``HostError``): a Copy unit that
cannot get its artifact fails on its host like a failed SFTP transfer, and failure strategies
match on ``error_class``::

    TransferError
    └── ArtifactError               cannot fetch (bad spec, unsupported type, HTTP 404, ...)
        ├── ArtifactAuthError       the repository refused the credentials (Authentication)
        ├── ArtifactAccessError     the credentials may not read it (Authorization)
        ├── ArtifactUnavailableError repository unreachable or 5xx after the retries
        │                           (Connectivity)
        └── ChecksumError           the bytes are not the ones the checksum names (Unknown)

Every message names the artifact by its description (``Fetched.source``), which never holds a
credential. The errors pickle with their attributes (they may cross the broker).
"""

from __future__ import annotations

from typing import Any

from app.errors import TransferError


class ArtifactError(TransferError):
    """An artifact could not be fetched. ``artifact`` is its description (no credentials)."""

    error_class = "Unknown"

    def __init__(
        self, message: str, *, artifact: str = "", host: str = "", step: str = "", unit: str = ""
    ) -> None:
        super().__init__(message, host=host, step=step, unit=unit)
        self.artifact = artifact

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.message,), self.__dict__.copy())


class ArtifactAuthError(ArtifactError):
    """The repository refused the credentials (HTTP 401, S3 InvalidAccessKeyId, ...)."""

    error_class = "Authentication"


class ArtifactAccessError(ArtifactError):
    """The credentials were accepted but may not read the artifact (HTTP 403, AccessDenied)."""

    error_class = "Authorization"


class ArtifactUnavailableError(ArtifactError):
    """The repository could not be reached, or kept failing (5xx), after the retries."""

    error_class = "Connectivity"


class ChecksumError(ArtifactError):
    """The fetched bytes do not have the sha256 the spec or the repository gave.

    ``expected`` and ``actual`` are the two hex digests; ``checksum_from`` says where the
    expected one came from (``spec.sha256``, ``X-Checksum-Sha256``, ``<url>.sha256``, ...).
    """

    error_class = "Unknown"

    def __init__(
        self,
        message: str,
        *,
        artifact: str = "",
        expected: str = "",
        actual: str = "",
        checksum_from: str = "",
        host: str = "",
        step: str = "",
        unit: str = "",
    ) -> None:
        super().__init__(message, artifact=artifact, host=host, step=step, unit=unit)
        self.expected = expected
        self.actual = actual
        self.checksum_from = checksum_from
