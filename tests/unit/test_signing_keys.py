"""Message-signing keys and settings: a key is private, never overwritten, and half a
configuration is an error rather than unsigned messages."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from app.errors import ConfigError
from app.settings import Settings
from app.signing import celery_settings, init_keys, signing_paths


def test_keys_are_private_and_their_certificate_is_in_the_store(tmp_path: Path) -> None:
    made = init_keys(tmp_path, "control")
    assert stat.S_IMODE(made.key.stat().st_mode) == 0o600
    assert (made.store / "control.pem").read_bytes() == made.certificate.read_bytes()
    # Celery's own classes read them: what the key signs, the store's certificate verifies
    from celery.security.certificate import FSCertStore
    from celery.security.key import PrivateKey
    from cryptography.hazmat.primitives.hashes import SHA256

    signature = PrivateKey(made.key.read_text()).sign(b"body", SHA256())
    [cert] = list(FSCertStore(str(made.store)).itercerts())
    cert.verify(b"body", signature, SHA256())


def test_an_existing_key_is_never_overwritten(tmp_path: Path) -> None:
    made = init_keys(tmp_path, "server")
    before = made.key.read_bytes()
    with pytest.raises(ConfigError, match="never overwritten"):
        init_keys(tmp_path, "server")
    assert made.key.read_bytes() == before


def test_half_a_signing_configuration_is_an_error(tmp_path: Path) -> None:
    made = init_keys(tmp_path, "server")
    s = Settings(broker_url="redis://127.0.0.1:6379/0", security_key=made.key)
    with pytest.raises(
        ConfigError, match="VMFARM_SECURITY_CERTIFICATE, VMFARM_SECURITY_CERT_STORE not set"
    ):
        signing_paths(s)


def test_service_mode_with_keys_signs_and_accepts_only_signed(tmp_path: Path) -> None:
    made = init_keys(tmp_path, "server")
    s = Settings(
        broker_url="redis://127.0.0.1:6379/0",
        security_key=made.key,
        security_certificate=made.certificate,
        security_cert_store=str(made.store),
    )
    conf = celery_settings(signing_paths(s))
    assert conf["task_serializer"] == "auth" and conf["accept_content"] == ["auth"]


def test_embedded_mode_does_not_sign(tmp_path: Path) -> None:
    made = init_keys(tmp_path, "server")
    s = Settings(
        home=tmp_path,
        security_key=made.key,
        security_certificate=made.certificate,
        security_cert_store=str(made.store),
    )
    assert signing_paths(s) is None
    assert celery_settings(None)["accept_content"] == ["json"]


def test_a_process_that_turns_signing_on_after_its_tasks_are_bound_sends_signed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Celery copies task_serializer into each task class once, when the app binds its tasks: a
    # process configured again (tests; app.celery.reconfigure) must not keep sending JSON to
    # workers that accept only signed messages.
    import tasks.deploy  # noqa: F401  (registers vmfarm.run_step)
    from app.celery import app, reconfigure

    made = init_keys(tmp_path, "server")
    run_step = app.tasks["vmfarm.run_step"]  # the app is finalized: its tasks are bound
    assert run_step.serializer == "json"
    monkeypatch.setenv("VMFARM_BROKER_URL", "redis://127.0.0.1:6379/15")
    monkeypatch.setenv("VMFARM_SECURITY_KEY", str(made.key))
    monkeypatch.setenv("VMFARM_SECURITY_CERTIFICATE", str(made.certificate))
    monkeypatch.setenv("VMFARM_SECURITY_CERT_STORE", str(made.store))
    try:
        reconfigure()
        assert run_step.serializer == "auth"
        monkeypatch.undo()
        reconfigure()
        assert run_step.serializer == "json"
    finally:
        monkeypatch.undo()
        reconfigure()


def test_a_process_configured_again_sends_real_messages_with_the_new_serializer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What matters is the message on the wire, not the attribute: a task already sent once
    # caches its send options (serializer among them), and Celery's sender caches the default.
    # Sent over kombu's in-memory transport (no broker needed); the content type is read from
    # what the producer hands the transport.
    from kombu.messaging import Producer

    import tasks.deploy  # noqa: F401  (registers vmfarm.run_step)
    from app.celery import app, reconfigure

    sent: list[str] = []
    real_publish = Producer._publish

    def spy(
        self: Producer, body: object, priority: object, content_type: str, *a: object, **kw: object
    ) -> object:
        sent.append(content_type)
        return real_publish(self, body, priority, content_type, *a, **kw)

    monkeypatch.setattr(Producer, "_publish", spy)
    made = init_keys(tmp_path, "server")
    run_step = app.tasks["vmfarm.run_step"]
    with monkeypatch.context() as env:
        env.setenv("VMFARM_BROKER_URL", "memory://")
        try:
            reconfigure()
            run_step.apply_async(kwargs={"key": {"region": "r1"}})  # caches its options
            env.setenv("VMFARM_SECURITY_KEY", str(made.key))
            env.setenv("VMFARM_SECURITY_CERTIFICATE", str(made.certificate))
            env.setenv("VMFARM_SECURITY_CERT_STORE", str(made.store))
            reconfigure()
            run_step.apply_async(kwargs={"key": {"region": "r1"}})
            app.send_task("vmfarm.run_step", kwargs={"key": {"region": "r1"}})
        finally:
            env.undo()
            reconfigure()
    assert sent == ["application/json", "application/data", "application/data"]
