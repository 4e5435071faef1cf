"""Celery message signing: workers take work only from processes holding a key in the store.

Celery's own ``auth`` serializer signs every task message (and remote-control message) with the
sender's private key; a receiver accepts a message only when its signature verifies against a
certificate in its certificate store (``security_cert_store``: a directory or a glob). A message
published straight to Redis (no signature), or signed with a key whose certificate is not in the
store, is refused: the worker logs a WARNING naming the queue and the task, counts it
(``vmfarm_refused_messages_total``, app.metrics.refused) and runs nothing.

Who needs what. Every process that *publishes* signs, so it needs a key and certificate of its
own; every process that *consumes* needs the store. That is every process here: the server and
the CLI publish runs; the control worker publishes phases (gates, nudges); a region worker
publishes too, because Celery's canvases continue on the worker that finished the previous
task (the next link of a chain, the body of a chord once its last header task is done, an
error callback). So each kind of process gets its own key, and the store holds the
certificates of all of them: a region's key can be revoked by removing its certificate::

    vmfarm server keys /etc/vmfarm/keys --name server       # the server (and CLI in local use)
    vmfarm server keys /etc/vmfarm/keys --name control      # the control worker
    vmfarm server keys /etc/vmfarm/keys --name region-r1    # the workers of region r1
    # each process:  VMFARM_SECURITY_KEY=/etc/vmfarm/keys/<name>.key
    #                VMFARM_SECURITY_CERTIFICATE=/etc/vmfarm/keys/<name>.pem
    #                VMFARM_SECURITY_CERT_STORE=/etc/vmfarm/keys/certs
    # ship a region only its own .key and .pem, and the certs/ directory.

The same with openssl (Celery needs RSA keys; the signature is RSA-PSS over SHA-256)::

    openssl req -x509 -newkey rsa:3072 -nodes -days 825 -subj "/O=vmfarm/CN=vmfarm control" \\
        -keyout control.key -out control.pem && chmod 600 control.key && cp control.pem certs/

Results are not signed (they come back from workers into the result backend): decisions are
taken from the ledger, never from a result. Task events stay JSON: they inform Flower and run
nothing. Embedded mode (kombu's SQLite broker inside one process) never signs.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.errors import ConfigError

if TYPE_CHECKING:
    from app.settings import Settings

log = logging.getLogger("vmfarm.signing")

DIGEST = "sha256"
KEY_BITS = 3072
CERT_DAYS = 825


@dataclass(frozen=True)
class SigningPaths:
    key: Path
    certificate: Path
    cert_store: str


def signing_paths(settings: Settings) -> SigningPaths | None:
    """This process's key, certificate and store when it signs (service mode, configured);
    None when messages are plain JSON. ConfigError when only some paths are set, or a file is
    missing: half a configuration must not silently mean "unsigned"."""
    if not settings.signing:
        if settings.embedded and settings.security_cert_store:
            log.info(
                "embedded mode: task messages are not signed (one process, no broker to "
                "reach); the VMFARM_SECURITY_* settings apply to service mode"
            )
        return None
    named = {
        "VMFARM_SECURITY_KEY": settings.security_key,
        "VMFARM_SECURITY_CERTIFICATE": settings.security_certificate,
        "VMFARM_SECURITY_CERT_STORE": settings.security_cert_store,
    }
    missing = [k for k, v in named.items() if not v]
    if missing:
        raise ConfigError(
            f"message signing is half configured: {', '.join(missing)} not set "
            "(set all three VMFARM_SECURITY_* paths, or none for unsigned "
            "messages); see `vmfarm server keys --help`"
        )
    assert settings.security_key and settings.security_certificate and settings.security_cert_store
    for env, path in (
        ("VMFARM_SECURITY_KEY", settings.security_key),
        ("VMFARM_SECURITY_CERTIFICATE", settings.security_certificate),
    ):
        if not Path(path).is_file():
            raise ConfigError(f"{env}={path}: no such file")
    store = settings.security_cert_store
    import glob

    if not (os.path.isdir(store) and os.listdir(store)) and not glob.glob(store):
        raise ConfigError(
            f"VMFARM_SECURITY_CERT_STORE={store}: no certificate there (a "
            "directory of PEM certificates, or a glob)"
        )
    return SigningPaths(Path(settings.security_key), Path(settings.security_certificate), store)


def celery_settings(paths: SigningPaths | None) -> dict[str, Any]:
    """The Celery settings for signed (or plain JSON) task and control messages."""
    if paths is None:
        return {"task_serializer": "json", "accept_content": ["json"]}
    return {
        "security_key": str(paths.key),
        "security_certificate": str(paths.certificate),
        "security_cert_store": paths.cert_store,
        "security_digest": DIGEST,
        # Tasks and remote control (pidbox uses task_serializer and accept_content): signed.
        "task_serializer": "auth",
        "accept_content": ["auth"],
    }


def setup(app: Any, paths: SigningPaths | None) -> None:
    """Register the ``auth`` serializer with this process's key and store (Celery's
    ``setup_security``: every process, after the configuration, before it sends or receives),
    or go back to JSON. Keeps the remote-control mailbox in step with the configuration."""
    if paths is not None:
        # JSON stays enabled: results and events are JSON (their accept lists say so).
        app.setup_security(allowed_serializers=["json"])
    control = app.__dict__.get("control")  # created once, with the serializer of its day
    if control is not None:
        control.mailbox.serializer = app.conf.task_serializer
        control.mailbox.accept = app.conf.accept_content


# --- refused messages ---------------------------------------------------------------------------


def note_refusal(message: Any, exc: BaseException) -> None:
    """Count and log a task message this worker refused to decode (unsigned, forged, unknown
    signer): a WARNING naming the queue and the task, and ``vmfarm_refused_messages_total``."""
    from kombu.exceptions import ContentDisallowed

    from app.metrics.refused import count_refused_message

    info = getattr(message, "delivery_info", None) or {}
    queue = str(info.get("routing_key") or info.get("exchange") or "?")
    headers = getattr(message, "headers", None) or {}
    task = str(headers.get("task") or "?") if isinstance(headers, dict) else "?"
    if isinstance(exc, ContentDisallowed):
        reason = "unsigned"
        why = f"not signed (content type {getattr(message, 'content_type', '?')})"
    else:
        reason = "bad-signature"
        # Celery's own message here can be a TypeError of its error handling (celery #7645):
        # the refusal stands either way, so say what it means and keep Celery's words below.
        why = (
            "its signature does not verify (a key whose certificate is not in the store, "
            "or an altered message)"
        )
        log.debug("refusal detail: %s", exc)
    count_refused_message(reason)  # on the broker: every exporter sees it
    log.warning(
        "refused a message on queue %s for task %s (id %s): %s; nothing ran",
        queue,
        task,
        headers.get("id", "?") if isinstance(headers, dict) else "?",
        why,
    )


@lru_cache(maxsize=1)
def counting_consumer() -> type[Any]:
    """Celery's worker consumer, counting the messages it refuses (``worker_consumer``)."""
    from celery.worker.consumer import Consumer

    class RefusalCountingConsumer(Consumer):  # type: ignore[misc]
        def on_invalid_task(self, body: Any, message: Any, exc: BaseException) -> None:
            note_refusal(message, exc)
            super().on_invalid_task(body, message, exc)

        def on_decode_error(self, message: Any, exc: BaseException) -> None:
            note_refusal(message, exc)
            super().on_decode_error(message, exc)

    return RefusalCountingConsumer


# Celery imports the consumer class by name (``worker_consumer = "app.signing:Consumer"``).
def __getattr__(name: str) -> Any:
    if name == "Consumer":
        return counting_consumer()
    raise AttributeError(name)


# --- keys ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyFiles:
    key: Path
    certificate: Path
    store: Path


def init_keys(
    directory: Path, name: str, *, days: int = CERT_DAYS, now: datetime | None = None
) -> KeyFiles:
    """Create ``DIR/NAME.key`` (RSA, mode 0600), its self-signed certificate ``DIR/NAME.pem``,
    and a copy of the certificate in the store ``DIR/certs/``. Refuses to overwrite a key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    if not name or not all(c.isalnum() or c in "-_." for c in name) or name.startswith("."):
        raise ConfigError(f"'{name}' is not a key name (letters, digits, - _ .)")
    directory = Path(directory)
    key_path, cert_path = directory / f"{name}.key", directory / f"{name}.pem"
    store = directory / "certs"
    for p in (key_path, cert_path, store / f"{name}.pem"):
        if p.exists():
            raise ConfigError(
                f"{p} exists: a key is never overwritten (remove it, and its "
                "certificate from every store, to replace it)"
            )
    store.mkdir(parents=True, exist_ok=True)
    key = rsa.generate_private_key(public_exponent=65537, key_size=KEY_BITS)
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "vmfarm"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"vmfarm {name}"),
        ]
    )
    start = (now or datetime.now(UTC)) - timedelta(minutes=5)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    pem_key = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem_key)
    pem_cert = cert.public_bytes(serialization.Encoding.PEM)
    cert_path.write_bytes(pem_cert)
    (store / f"{name}.pem").write_bytes(pem_cert)
    return KeyFiles(key_path, cert_path, store)


__all__ = [
    "CERT_DAYS",
    "KeyFiles",
    "SigningPaths",
    "celery_settings",
    "counting_consumer",
    "init_keys",
    "note_refusal",
    "setup",
    "signing_paths",
]
