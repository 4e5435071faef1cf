"""Resolving secret ids: settings, backend lookup order, a short per-process cache.

Settings (environment, read when the store is built; ``reset()`` rebuilds it)::

    VMFARM_SECRETS             enabled backends, in lookup order (default "env,file");
                               any of env, file, aws, vault, comma-separated
    VMFARM_SECRETS_FILE        the encrypted file (default $VMFARM_HOME/secrets.enc)
    VMFARM_SECRETS_KEY         its key: a Fernet key or a passphrase
    VMFARM_SECRETS_KEY_FILE    ... or a file holding it (used when VMFARM_SECRETS_KEY is unset)
    VMFARM_SECRETS_TTL         seconds a resolved value is reused in this process (default 60;
                               0: never cached)
    VMFARM_SECRETS_VAULT_MOUNT the Vault KV v2 mount (default "secret")
    VMFARM_SECRETS_AWS_REGION  the Secrets Manager region (default: boto3's)
    VMFARM_SECRET_<NAME>       a secret for the env backend
    VAULT_ADDR, VAULT_TOKEN, VAULT_NAMESPACE, VAULT_CACERT   the vault backend
    AWS_* (credentials, AWS_ENDPOINT_URL, ...)               the aws backend, as boto3 reads them

An id with a backend prefix (``vault:app/db#password``) asks that backend only, and only if it
is enabled in ``VMFARM_SECRETS``: the settings decide which stores a pipeline may read, the
prefix only picks among them. An id without one asks each enabled backend in order; the first
that holds the name answers. A backend that fails otherwise (denied, unreachable, wrong key)
stops the lookup with its error.

Every value resolved is registered with the process-wide masker (``app.secrets.masking``), so
logs and reports printed by this process hide it. Values are cached per process for
``VMFARM_SECRETS_TTL`` seconds; failures are never cached.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

from pydantic import SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.secrets.backends import (
    KEY_ENV,
    KEY_FILE_ENV,
    AwsBackend,
    Backend,
    EnvBackend,
    FileBackend,
    VaultBackend,
)
from app.secrets.errors import SecretConfigError, SecretError, SecretNotFoundError
from app.secrets.masking import Masker, global_masker
from app.secrets.refs import BACKEND_NAMES, SecretRef, parse_id

DEFAULT_ORDER = "env,file"


class SecretsSettings(BaseSettings):
    """The ``VMFARM_SECRETS*`` settings (and ``VMFARM_HOME``, for the default file)."""

    model_config = SettingsConfigDict(env_prefix="VMFARM_", extra="ignore")

    home: Path = Path(".vmfarm")
    secrets: str = DEFAULT_ORDER
    secrets_file: Path | None = None
    secrets_key: SecretStr | None = None
    secrets_key_file: Path | None = None
    secrets_ttl: float = 60.0
    secrets_vault_mount: str = "secret"
    secrets_aws_region: str | None = None

    @property
    def order(self) -> list[str]:
        """The enabled backends, in lookup order; SecretConfigError on an unknown name."""
        names = [n.strip().lower() for n in self.secrets.split(",") if n.strip()]
        unknown = [n for n in names if n not in BACKEND_NAMES]
        if unknown:
            raise SecretConfigError(
                f"VMFARM_SECRETS names unknown backend(s) {', '.join(unknown)}; known: "
                f"{', '.join(BACKEND_NAMES)}"
            )
        return list(dict.fromkeys(names))

    @property
    def file_path(self) -> Path:
        return (self.secrets_file or self.home / "secrets.enc").expanduser()

    def file_key(self) -> tuple[str | None, str]:
        """The file key and where it came from (for messages; never the key itself)."""
        if self.secrets_key is not None and self.secrets_key.get_secret_value():
            return self.secrets_key.get_secret_value(), KEY_ENV
        if self.secrets_key_file is not None:
            path = self.secrets_key_file.expanduser()
            try:
                text = path.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise SecretConfigError(
                    f"{KEY_FILE_ENV}={path}: cannot read it ({exc.strerror or exc})", backend="file"
                ) from None
            return (text or None), f"{KEY_FILE_ENV} ({path})"
        return None, KEY_ENV


def load_settings() -> SecretsSettings:
    """The settings from the environment; SecretConfigError (naming the variables, not their
    values) when one is malformed."""
    try:
        return SecretsSettings()
    except ValidationError as exc:
        bad = ", ".join(
            f"VMFARM_{'_'.join(map(str, e['loc'])).upper()} ({e['msg']})" for e in exc.errors()
        )
        raise SecretConfigError(f"bad secrets settings: {bad}") from None


def file_backend(settings: SecretsSettings | None = None) -> FileBackend:
    """The encrypted-file backend as configured (what ``vmfarm secrets`` edits)."""
    s = settings or load_settings()
    key, source = s.file_key()
    return FileBackend(s.file_path, key, key_source=source)


def build_backends(settings: SecretsSettings | None = None) -> list[Backend]:
    """The enabled backends, in lookup order."""
    s = settings or load_settings()
    out: list[Backend] = []
    for name in s.order:
        if name == "env":
            out.append(EnvBackend())
        elif name == "file":
            out.append(file_backend(s))
        elif name == "aws":
            out.append(AwsBackend(region=s.secrets_aws_region))
        elif name == "vault":
            out.append(VaultBackend.from_env(mount=s.secrets_vault_mount))
    return out


class SecretStore:
    """Looks ids up in backends (explicit prefix, else in order), caching values for ``ttl``."""

    def __init__(
        self,
        backends: Sequence[Backend],
        *,
        ttl: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        masker: Masker | None = None,
        register: bool = True,
    ) -> None:
        self.backends: dict[str, Backend] = {b.name: b for b in backends}
        self.order = [b.name for b in backends]
        self.ttl = ttl
        self._clock = clock
        self._masker = masker
        self._register = register
        self._cache: dict[tuple[str | None, str, str | None], tuple[float, str]] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<SecretStore {','.join(self.order) or '(no backends)'} ttl={self.ttl:g}>"

    @classmethod
    def from_settings(
        cls,
        settings: SecretsSettings | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        masker: Masker | None = None,
        register: bool = True,
    ) -> SecretStore:
        s = settings or load_settings()
        return cls(
            build_backends(s), ttl=s.secrets_ttl, clock=clock, masker=masker, register=register
        )

    def clear_cache(self) -> None:
        with self._lock:
            self._cache.clear()

    def get(self, secret_id: str) -> str:
        """The value of one id."""
        return self.resolve([secret_id])[secret_id.strip()]

    def resolve(self, ids: Iterable[str]) -> dict[str, str]:
        """``{id: value}`` for every id (keys are the ids stripped of surrounding blanks).

        Raises the SecretError of the failing id; when several fail, one SecretError whose
        message lists them all and whose ``errors`` holds each.
        """
        values: dict[str, str] = {}
        errors: list[SecretError] = []
        for raw in dict.fromkeys(i.strip() for i in ids):
            try:
                values[raw] = self._one(parse_id(raw))
            except SecretError as exc:
                if not exc.secret_id:
                    exc.secret_id = raw
                errors.append(exc)
        if self._register and values:
            (self._masker or global_masker()).add(values.values())
        if len(errors) == 1:
            raise errors[0]
        if errors:
            raise SecretError(
                f"{len(errors)} secrets could not be resolved:\n"
                + "\n".join(f"  {e}" for e in errors),
                secret_id=", ".join(e.secret_id for e in errors),
                backend=", ".join(dict.fromkeys(e.backend for e in errors if e.backend)),
                error_class=errors[0].error_class,
                errors=errors,
            )
        return values

    def _one(self, ref: SecretRef) -> str:
        now = self._clock()
        if self.ttl > 0:
            with self._lock:
                hit = self._cache.get(ref.cache_key)
            if hit is not None and hit[0] > now:
                return hit[1]
        value = self._lookup(ref)
        if self.ttl > 0:
            with self._lock:
                self._cache[ref.cache_key] = (now + self.ttl, value)
        return value

    def _lookup(self, ref: SecretRef) -> str:
        if ref.backend is not None:
            backend = self.backends.get(ref.backend)
            if backend is None:
                raise SecretConfigError(
                    f"secret {ref.id!r} asks the {ref.backend} backend, which is not enabled "
                    f"(VMFARM_SECRETS={','.join(self.order) or '(none)'})",
                    secret_id=ref.id,
                    backend=ref.backend,
                )
            chain = [backend]
        else:
            chain = [self.backends[n] for n in self.order]
        if not chain:
            raise SecretConfigError(
                f"secret {ref.id!r}: no secrets backend is enabled (VMFARM_SECRETS is empty)",
                secret_id=ref.id,
            )
        for backend in chain:
            value = backend.lookup(ref)
            if value is not None:
                return value
        looked = "; ".join(b.where(ref) for b in chain)
        raise SecretNotFoundError(
            f"secret {ref.id!r} not found (looked in: {looked})",
            secret_id=ref.id,
            backend=",".join(b.name for b in chain),
        )


_default: SecretStore | None = None
_default_lock = threading.Lock()


def default_store() -> SecretStore:
    """The process's store, built from the environment at first use."""
    global _default
    with _default_lock:
        if _default is None:
            _default = SecretStore.from_settings()
        return _default


def reset() -> None:
    """Forget the process's store and its cache (the next use re-reads the settings)."""
    global _default
    with _default_lock:
        _default = None


def resolve(ids: Iterable[str]) -> dict[str, str]:
    """``{id: value}`` from the process's store; see ``SecretStore.resolve``."""
    return default_store().resolve(ids)


def get_secret(secret_id: str) -> str:
    """One value from the process's store."""
    return default_store().get(secret_id)


def resolve_in(texts: Mapping[str, str] | Iterable[str]) -> dict[str, str]:
    """Resolve every id referenced in ``texts`` (strings, or a mapping's values)."""
    from app.secrets.refs import find_refs_in

    items = texts.values() if isinstance(texts, Mapping) else texts
    ids = find_refs_in(items)
    return resolve(ids) if ids else {}
