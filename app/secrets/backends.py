"""Secret backends: environment, encrypted file, AWS Secrets Manager, HashiCorp Vault KV v2.

Every backend answers ``lookup(ref) -> str | None``: the value, ``None`` when it does not hold
that name (the store then asks the next enabled backend), or a ``SecretError`` for anything
else (denied, unreachable, undecryptable), which stops the lookup: falling through to another
backend after, say, a 403 could silently pick up a different secret. ``where(ref)`` says where
it looked, for not-found messages. No message ever contains a value.

``env``
    ``VMFARM_SECRET_<NAME>``: the name upper-cased, each character other than ``A-Z0-9``
    turned into ``_`` (``db-password`` and ``db.password`` -> ``VMFARM_SECRET_DB_PASSWORD``).
    An empty variable counts as unset.
``file``
    An encrypted file, ``VMFARM_SECRETS_FILE`` (default ``$VMFARM_HOME/secrets.enc``), written
    by ``vmfarm secrets set``. The whole store (names included) is one Fernet token
    (AES-128-CBC + HMAC-SHA256) inside a small JSON envelope. The key is
    ``VMFARM_SECRETS_KEY`` (or the contents of the file ``VMFARM_SECRETS_KEY_FILE``): either a
    Fernet key (``vmfarm secrets keygen``) or a passphrase, from which the key is derived with
    scrypt (n=2**17, r=8, p=1) and a random salt kept in the envelope. Which of the two a file
    uses is recorded in it when it is created. Writes go to a temporary file in the same
    directory (mode 0600), fsynced, then renamed over the old one, under an exclusive lock
    (``secrets.enc.lock``) so that two writers never lose each other's change.
``aws``
    AWS Secrets Manager ``GetSecretValue`` with boto3's usual credentials and endpoint
    (``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_SECRETS_MANAGER``). The region is
    ``VMFARM_SECRETS_AWS_REGION``, else boto3's (``AWS_REGION``/``AWS_DEFAULT_REGION``), or
    the region of an ARN id. The value is ``SecretString`` (``SecretBinary`` if it is UTF-8).
``vault``
    Vault KV version 2 over HTTP: ``GET $VAULT_ADDR/v1/<mount>/data/<name>`` with
    ``X-Vault-Token: $VAULT_TOKEN`` (and ``X-Vault-Namespace: $VAULT_NAMESPACE`` if set;
    ``VAULT_CACERT`` for a private CA). The mount is ``VMFARM_SECRETS_VAULT_MOUNT`` (default
    ``secret``). The value is the field ``#key`` of ``data.data``; without ``#key`` the only
    field, or the field ``value``. 404 (or a deleted latest version) is not found; 403 is
    ``SecretAccessError``.

``#key`` on ``env``/``file``/``aws`` reads the value as a JSON object and takes that field
(a non-string field is returned as JSON: ``5``, ``true``, ``{"a": 1}``).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import hashlib
import json
import os
import re
import ssl
import tempfile
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from app.secrets.errors import (
    SecretAccessError,
    SecretConfigError,
    SecretError,
    SecretNotFoundError,
)
from app.secrets.refs import SecretRef

ENV_PREFIX = "VMFARM_SECRET_"


class Backend(Protocol):
    """What the store asks of a backend."""

    name: str

    def lookup(self, ref: SecretRef) -> str | None:
        """The value, None when this backend does not hold ``ref.name``; SecretError else."""
        ...

    def where(self, ref: SecretRef) -> str:
        """Where ``ref`` was looked for (``VMFARM_SECRET_DB``, a file, a Vault URL path)."""
        ...


def field_of(raw: str, ref: SecretRef, backend: str) -> str:
    """``raw`` itself, or field ``ref.key`` of the JSON object ``raw``."""
    if ref.key is None:
        return raw
    try:
        doc = json.loads(raw)
    except ValueError:
        doc = None
    if not isinstance(doc, dict):
        raise SecretError(
            f"secret {ref.id!r}: the value of {ref.name!r} is not a JSON object, so it has no "
            f"field {ref.key!r}",
            secret_id=ref.id,
            backend=backend,
        )
    if ref.key not in doc:
        raise SecretNotFoundError(
            f"secret {ref.id!r}: {ref.name!r} has no field {ref.key!r} (fields: "
            f"{', '.join(sorted(map(str, doc))) or 'none'})",
            secret_id=ref.id,
            backend=backend,
        )
    return as_text(doc[ref.key])


def as_text(value: object) -> str:
    return value if isinstance(value, str) else json.dumps(value)


# --- env ------------------------------------------------------------------------------------------


def env_var_name(name: str) -> str:
    """``VMFARM_SECRET_<NAME>``: upper case, every character but A-Z0-9 as ``_``."""
    return ENV_PREFIX + re.sub(r"[^A-Z0-9]", "_", name.upper())


class EnvBackend:
    """Secrets from ``VMFARM_SECRET_<NAME>`` environment variables (read at each lookup)."""

    name = "env"

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self._environ = environ

    def lookup(self, ref: SecretRef) -> str | None:
        environ = os.environ if self._environ is None else self._environ
        raw = environ.get(env_var_name(ref.name))
        if not raw:
            return None
        return field_of(raw, ref, self.name)

    def where(self, ref: SecretRef) -> str:
        return f"env {env_var_name(ref.name)}"


# --- encrypted file -------------------------------------------------------------------------------

FILE_FORMAT = "vmfarm-secrets"
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**17, 8, 1
MIN_PASSPHRASE = 8
KEY_ENV = "VMFARM_SECRETS_KEY"
KEY_FILE_ENV = "VMFARM_SECRETS_KEY_FILE"
NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-/]{0,255}$")

_derived: dict[tuple[bytes, bytes, int, int, int], bytes] = {}
_derived_lock = threading.Lock()


def is_fernet_key(key: str) -> bool:
    """True when ``key`` is a Fernet key (url-safe base64 of 32 bytes)."""
    try:
        return len(base64.urlsafe_b64decode(key.encode("ascii"))) == 32 and len(key) == 44
    except (ValueError, binascii.Error, UnicodeEncodeError):
        return False


def check_name(name: str) -> str | None:
    """Why ``name`` cannot be stored in the file (None when it can)."""
    if not NAME_RE.match(name):
        return (
            f"secret name {name!r} is not valid: use letters, digits, '_', '.', '-', '/' "
            "(up to 256 characters, not starting with '.', '-' or '/')"
        )
    for sc in ("account", "org", "project"):
        if name.startswith(sc + "."):
            return (
                f"secret name {name!r} starts with the scope {sc!r}: vmfarm has one store "
                f"and strips scopes when looking up, so store it as {name[len(sc) + 1 :]!r} "
                f'(<+secrets.getValue("{name}")> finds it)'
            )
    return None


@dataclass(frozen=True)
class StoredSecret:
    name: str
    updated: str  # ISO 8601 UTC


class FileBackend:
    """The local encrypted secrets file. See the module docstring for the format."""

    name = "file"

    def __init__(self, path: Path, key: str | None, *, key_source: str = KEY_ENV) -> None:
        self.path = Path(path)
        self._key = key
        self.key_source = key_source

    def __repr__(self) -> str:
        return f"<FileBackend {self.path}>"

    # -- reading ----------------------------------------------------------------------------

    def lookup(self, ref: SecretRef) -> str | None:
        entries = self._read(ref.id)
        entry = entries.get(ref.name)
        if entry is None:
            return None
        return field_of(str(entry["value"]), ref, self.name)

    def where(self, ref: SecretRef) -> str:
        exists = "" if self.path.exists() else ", which does not exist"
        return f"file {self.path}{exists}"

    def entries(self) -> list[StoredSecret]:
        """Names and update times, sorted by name (never values)."""
        return [StoredSecret(n, str(e.get("updated", ""))) for n, e in sorted(self._read().items())]

    def _read(self, secret_id: str = "") -> dict[str, dict[str, Any]]:
        envelope = self._envelope(secret_id)
        if envelope is None:
            return {}
        fernet = self._fernet(envelope["kdf"], secret_id)
        from cryptography.fernet import InvalidToken

        try:
            plain = fernet.decrypt(envelope["data"].encode("ascii"))
        except (InvalidToken, UnicodeEncodeError):
            raise SecretAccessError(
                f"cannot decrypt {self.path}: {self.key_source} is not the key it was written "
                "with (or the file was altered)",
                secret_id=secret_id,
                backend=self.name,
            ) from None
        try:
            doc = json.loads(plain)
            entries = doc["secrets"]
            if not isinstance(entries, dict):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            raise SecretError(
                f"{self.path} decrypts to something that is not a secrets store",
                secret_id=secret_id,
                backend=self.name,
            ) from None
        return entries

    def _envelope(self, secret_id: str = "") -> dict[str, Any] | None:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise SecretError(
                f"cannot read {self.path}: {exc.strerror or exc}",
                secret_id=secret_id,
                backend=self.name,
            ) from None
        try:
            env = json.loads(text)
            ok = (
                isinstance(env, dict)
                and env.get("format") == FILE_FORMAT
                and isinstance(env.get("kdf"), dict)
                and isinstance(env.get("data"), str)
            )
        except ValueError:
            ok = False
        if not ok:
            raise SecretError(
                f"{self.path} is not a vmfarm secrets file (or it is damaged)",
                secret_id=secret_id,
                backend=self.name,
            )
        version = env.get("version")
        if version != 1:
            raise SecretError(
                f"{self.path} has format version {version!r}; this vmfarm reads version 1",
                secret_id=secret_id,
                backend=self.name,
            )
        return dict(env)

    # -- keys -------------------------------------------------------------------------------

    def _require_key(self, secret_id: str) -> str:
        if not self._key:
            raise SecretConfigError(
                f"{KEY_ENV} is not set (nor {KEY_FILE_ENV}): the secrets file {self.path} "
                "cannot be read or written without its key",
                secret_id=secret_id,
                backend=self.name,
            )
        return self._key

    def _fernet(self, kdf: dict[str, Any], secret_id: str = "") -> Any:
        from cryptography.fernet import Fernet

        key = self._require_key(secret_id)
        kind = kdf.get("name")
        if kind == "none":
            if not is_fernet_key(key):
                raise SecretAccessError(
                    f"{self.path} is encrypted with a Fernet key, but {self.key_source} is not "
                    "one (a passphrase?)",
                    secret_id=secret_id,
                    backend=self.name,
                )
            return Fernet(key.encode("ascii"))
        if kind == "scrypt":
            try:
                salt = base64.b64decode(kdf["salt"])
                n, r, p = int(kdf["n"]), int(kdf["r"]), int(kdf["p"])
            except (KeyError, ValueError, TypeError, binascii.Error):
                raise SecretError(
                    f"{self.path} has damaged key-derivation settings",
                    secret_id=secret_id,
                    backend=self.name,
                ) from None
            return Fernet(derive_key(key, salt, n=n, r=r, p=p))
        raise SecretError(
            f"{self.path} uses an unknown key derivation {kind!r}",
            secret_id=secret_id,
            backend=self.name,
        )

    def _new_kdf(self) -> dict[str, Any]:
        key = self._require_key("")
        if is_fernet_key(key):
            return {"name": "none"}
        if len(key) < MIN_PASSPHRASE:
            raise SecretConfigError(
                f"{self.key_source} is neither a Fernet key nor a passphrase of at least "
                f"{MIN_PASSPHRASE} characters (make a key with: vmfarm secrets keygen)",
                backend=self.name,
            )
        return {
            "name": "scrypt",
            "salt": base64.b64encode(os.urandom(16)).decode("ascii"),
            "n": SCRYPT_N,
            "r": SCRYPT_R,
            "p": SCRYPT_P,
        }

    # -- writing ----------------------------------------------------------------------------

    def set(self, name: str, value: str) -> bool:
        """Store ``value`` under ``name``; True when it was new, False when replaced."""
        problem = check_name(name)
        if problem:
            raise SecretConfigError(problem, secret_id=name, backend=self.name)
        if not isinstance(value, str) or value == "":
            raise SecretConfigError(
                f"secret {name!r}: the value is empty", secret_id=name, backend=self.name
            )
        with self._locked():
            kdf, entries = self._load_for_write()
            created = name not in entries
            entries[name] = {
                "value": value,
                "updated": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            }
            self._write(kdf, entries)
        return created

    def remove(self, name: str) -> bool:
        """Delete ``name``; False when it was not there (nothing is written then)."""
        with self._locked():
            if self._envelope(name) is None:
                return False
            kdf, entries = self._load_for_write()
            if entries.pop(name, None) is None:
                return False
            self._write(kdf, entries)
        return True

    def _load_for_write(self) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
        envelope = self._envelope()
        if envelope is None:
            return self._new_kdf(), {}
        return envelope["kdf"], self._read()

    def _write(self, kdf: dict[str, Any], entries: dict[str, dict[str, Any]]) -> None:
        fernet = self._fernet(kdf)
        token = fernet.encrypt(json.dumps({"secrets": entries}, sort_keys=True).encode("utf-8"))
        doc = {"format": FILE_FORMAT, "version": 1, "kdf": kdf, "data": token.decode("ascii")}
        atomic_write(self.path, (json.dumps(doc, indent=1) + "\n").encode("utf-8"))

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock = self.path.with_name(self.path.name + ".lock")
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock


def derive_key(
    passphrase: str, salt: bytes, *, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P
) -> bytes:
    """The Fernet key for ``passphrase`` and ``salt`` (scrypt; cached for this process)."""
    from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

    cache_key = (hashlib.sha256(passphrase.encode("utf-8")).digest(), salt, n, r, p)
    with _derived_lock:
        hit = _derived.get(cache_key)
    if hit is not None:
        return hit
    raw = Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(passphrase.encode("utf-8"))
    key = base64.urlsafe_b64encode(raw)
    with _derived_lock:
        _derived[cache_key] = key
    return key


def atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` so that readers see the old or the new file, whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


# --- AWS Secrets Manager --------------------------------------------------------------------------

AWS_NOT_FOUND = frozenset({"ResourceNotFoundException"})
AWS_DENIED = frozenset(
    {
        "AccessDeniedException",
        "AccessDenied",
        "UnrecognizedClientException",
        "InvalidClientTokenId",
        "SignatureDoesNotMatch",
        "ExpiredTokenException",
        "ExpiredToken",
        "DecryptionFailure",
        "MissingAuthenticationToken",
        "IncompleteSignature",
    }
)
AWS_ATTEMPTS = 3
ARN_RE = re.compile(r"^arn:aws[a-z-]*:secretsmanager:(?P<region>[a-z0-9-]+):")


class AwsBackend:
    """AWS Secrets Manager (boto3 imported at the first lookup)."""

    name = "aws"

    def __init__(self, region: str | None = None) -> None:
        self.region = region
        self._lock = threading.Lock()
        self._session: Any = None
        self._clients: dict[str | None, Any] = {}

    def where(self, ref: SecretRef) -> str:
        return f"aws Secrets Manager {ref.name!r}"

    def _client(self, region: str | None) -> Any:
        with self._lock:
            client = self._clients.get(region)
            if client is None:
                import boto3
                from botocore.config import Config

                if self._session is None:
                    self._session = boto3.session.Session()
                client = self._session.client(
                    "secretsmanager",
                    region_name=region,
                    config=Config(
                        retries={"mode": "standard", "total_max_attempts": AWS_ATTEMPTS},
                        connect_timeout=5,
                        read_timeout=15,
                    ),
                )
                self._clients[region] = client
            return client

    def lookup(self, ref: SecretRef) -> str | None:
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            EndpointConnectionError,
            NoCredentialsError,
            NoRegionError,
        )

        m = ARN_RE.match(ref.name)
        region = m.group("region") if m else self.region
        try:
            answer = self._client(region).get_secret_value(SecretId=ref.name)
        except ClientError as exc:
            err = exc.response.get("Error", {})
            code = str(err.get("Code", ""))
            if code in AWS_NOT_FOUND:
                return None
            msg = str(err.get("Message", "")) or code
            cls = SecretAccessError if code in AWS_DENIED else SecretError
            raise cls(
                f"secret {ref.id!r}: AWS Secrets Manager refused GetSecretValue for "
                f"{ref.name!r}: {code}: {msg}",
                secret_id=ref.id,
                backend=self.name,
            ) from None
        except NoRegionError:
            raise SecretConfigError(
                f"secret {ref.id!r}: no AWS region for Secrets Manager (set "
                "VMFARM_SECRETS_AWS_REGION or AWS_DEFAULT_REGION)",
                secret_id=ref.id,
                backend=self.name,
            ) from None
        except NoCredentialsError:
            raise SecretConfigError(
                f"secret {ref.id!r}: no AWS credentials found for Secrets Manager",
                secret_id=ref.id,
                backend=self.name,
            ) from None
        except EndpointConnectionError as exc:
            raise SecretError(
                f"secret {ref.id!r}: cannot reach AWS Secrets Manager at "
                f"{getattr(exc, 'kwargs', {}).get('endpoint_url', '?')}",
                secret_id=ref.id,
                backend=self.name,
                error_class="Connectivity",
            ) from None
        except BotoCoreError as exc:
            raise SecretError(
                f"secret {ref.id!r}: AWS Secrets Manager failed: {type(exc).__name__}",
                secret_id=ref.id,
                backend=self.name,
                error_class="Connectivity",
            ) from None
        if answer.get("SecretString") is not None:
            raw = str(answer["SecretString"])
        else:
            try:
                raw = bytes(answer.get("SecretBinary") or b"").decode("utf-8")
            except UnicodeDecodeError:
                raise SecretError(
                    f"secret {ref.id!r}: {ref.name!r} is binary, not text",
                    secret_id=ref.id,
                    backend=self.name,
                ) from None
        return field_of(raw, ref, self.name)


# --- Vault KV v2 ----------------------------------------------------------------------------------

VAULT_TIMEOUT = 10.0


class VaultBackend:
    """HashiCorp Vault, KV secrets engine version 2, over its HTTP API."""

    name = "vault"

    def __init__(
        self,
        addr: str | None,
        token: str | None,
        *,
        mount: str = "secret",
        namespace: str | None = None,
        cacert: str | None = None,
        timeout: float = VAULT_TIMEOUT,
    ) -> None:
        self.addr = (addr or "").rstrip("/")
        self._token = token
        self.mount = mount.strip("/") or "secret"
        self.namespace = namespace
        self.cacert = cacert
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"<VaultBackend {self.addr or '(no VAULT_ADDR)'} mount={self.mount}>"

    @classmethod
    def from_env(
        cls, mount: str = "secret", environ: Mapping[str, str] | None = None
    ) -> VaultBackend:
        env = os.environ if environ is None else environ
        return cls(
            env.get("VAULT_ADDR"),
            env.get("VAULT_TOKEN"),
            mount=mount,
            namespace=env.get("VAULT_NAMESPACE") or None,
            cacert=env.get("VAULT_CACERT") or None,
        )

    def url_for(self, name: str) -> str:
        path = urllib.parse.quote(name.strip("/"), safe="/")
        return f"{self.addr}/v1/{urllib.parse.quote(self.mount, safe='/')}/data/{path}"

    def where(self, ref: SecretRef) -> str:
        return f"vault {self.mount}/data/{ref.name.strip('/')}"

    def lookup(self, ref: SecretRef) -> str | None:
        if not self.addr:
            raise SecretConfigError(
                f"secret {ref.id!r}: VAULT_ADDR is not set", secret_id=ref.id, backend=self.name
            )
        if not self._token:
            raise SecretConfigError(
                f"secret {ref.id!r}: VAULT_TOKEN is not set", secret_id=ref.id, backend=self.name
            )
        headers = {"X-Vault-Token": self._token, "Accept": "application/json"}
        if self.namespace:
            headers["X-Vault-Namespace"] = self.namespace
        req = urllib.request.Request(self.url_for(ref.name), headers=headers, method="GET")
        ctx = ssl.create_default_context(cafile=self.cacert) if self.cacert else None
        where = f"{self.mount}/data/{ref.name.strip('/')}"
        try:
            with urllib.request.urlopen(req, timeout=self.timeout, context=ctx) as resp:
                body = resp.read()
        except urllib.error.HTTPError as exc:
            status = exc.code
            detail = _vault_errors(exc.read())
            exc.close()
            if status == 404:
                return None
            if status == 403:
                raise SecretAccessError(
                    f"secret {ref.id!r}: Vault at {self.addr} denied reading {where} "
                    f"(403{': ' + detail if detail else ''}); check VAULT_TOKEN and its policy",
                    secret_id=ref.id,
                    backend=self.name,
                ) from None
            raise SecretError(
                f"secret {ref.id!r}: Vault at {self.addr} answered {status} for {where}"
                f"{': ' + detail if detail else ''}",
                secret_id=ref.id,
                backend=self.name,
                error_class="Connectivity" if status >= 500 else "Unknown",
            ) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise SecretError(
                f"secret {ref.id!r}: cannot reach Vault at {self.addr}: {reason}",
                secret_id=ref.id,
                backend=self.name,
                error_class="Connectivity",
            ) from None
        try:
            doc = json.loads(body)
            data = doc["data"]["data"]
        except (ValueError, KeyError, TypeError):
            raise SecretError(
                f"secret {ref.id!r}: Vault's answer for {where} is not a KV "
                f"version 2 secret (is {self.mount!r} a KV v2 mount?)",
                secret_id=ref.id,
                backend=self.name,
            ) from None
        if data is None:  # the latest version is deleted
            return None
        if not isinstance(data, dict):
            raise SecretError(
                f"secret {ref.id!r}: Vault's data for {where} is not an object",
                secret_id=ref.id,
                backend=self.name,
            )
        return self._field(ref, data, where)

    def _field(self, ref: SecretRef, data: dict[str, Any], where: str) -> str:
        fields = ", ".join(sorted(map(str, data))) or "none"
        if ref.key is not None:
            if ref.key not in data:
                raise SecretNotFoundError(
                    f"secret {ref.id!r}: Vault {where} has no field {ref.key!r} (fields: {fields})",
                    secret_id=ref.id,
                    backend=self.name,
                )
            return as_text(data[ref.key])
        if len(data) == 1:
            return as_text(next(iter(data.values())))
        if "value" in data:
            return as_text(data["value"])
        raise SecretConfigError(
            f"secret {ref.id!r}: Vault {where} has several fields ({fields}): name one, "
            f"as in vault:{ref.name}#field",
            secret_id=ref.id,
            backend=self.name,
        )


def _vault_errors(body: bytes) -> str:
    """Vault's ``{"errors": [...]}`` as one short line (they never hold secret data)."""
    try:
        errors = json.loads(body).get("errors") or []
    except (ValueError, AttributeError):
        return ""
    return "; ".join(str(e) for e in errors)[:300]
