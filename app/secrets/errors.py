"""Errors of the secrets package (all ``VmfarmError``; none ever carries a secret value).

::

    VmfarmError
    └── SecretError               a secret could not be resolved (backend unreachable, bad answer)
        ├── SecretNotFoundError   no enabled backend has it (or the named JSON/KV field is absent)
        ├── SecretAccessError     the backend refused (HTTP 403, AccessDenied, wrong file key)
        └── SecretConfigError     settings are wrong (key or VAULT_ADDR missing, bad id)

Each names the secret id (as written in the pipeline) and the backend(s) involved. ``errors``
holds the individual errors when one ``resolve`` call failed for several ids.
``error_class`` is the Harness failure type a failure strategy would match on.
"""

from __future__ import annotations

from app.errors import VmfarmError


class SecretError(VmfarmError):
    """A secret could not be resolved. Never holds the value."""

    default_error_class = "Unknown"

    def __init__(
        self,
        message: str,
        *,
        secret_id: str = "",
        backend: str = "",
        error_class: str = "",
        errors: list[SecretError] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.secret_id = secret_id
        self.backend = backend
        self.error_class = error_class or self.default_error_class
        self.errors: list[SecretError] = list(errors or [])

    def __str__(self) -> str:
        extra = []
        if self.secret_id and repr(self.secret_id) not in self.message:
            extra.append(f"secret {self.secret_id!r}")
        if self.backend and self.backend not in self.message:
            extra.append(f"backend {self.backend}")
        return f"{self.message} ({', '.join(extra)})" if extra else self.message

    def __reduce__(self) -> tuple[object, ...]:
        return (
            _rebuild,
            (type(self), self.message, self.secret_id, self.backend, self.error_class, self.errors),
        )


def _rebuild(
    cls: type[SecretError],
    message: str,
    secret_id: str,
    backend: str,
    error_class: str,
    errors: list[SecretError],
) -> SecretError:
    return cls(
        message, secret_id=secret_id, backend=backend, error_class=error_class, errors=errors
    )


class SecretNotFoundError(SecretError):
    """No enabled backend holds the secret (or the named field of it)."""


class SecretAccessError(SecretError):
    """The backend refused to give the secret: permission denied, or the file key is wrong."""

    default_error_class = "Authorization"


class SecretConfigError(SecretError):
    """The secrets settings are wrong or incomplete (a missing key, a bad id, no VAULT_ADDR)."""
