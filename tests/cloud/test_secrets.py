"""Secrets in cloud stores: AWS Secrets Manager on moto in server mode, and HashiCorp Vault as
``tests.fakes.vault`` (a KV v2 HTTP server). All traffic stays on 127.0.0.0/8. Nothing here
skips. References, the environment and file backends, masking and ``vmfarm secrets`` are in
tests/unit/test_secrets.py.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from cryptography.fernet import Fernet

from app import secrets
from app.secrets import (
    SecretAccessError,
    SecretConfigError,
    SecretError,
    SecretNotFoundError,
    SecretStore,
)
from app.secrets.backends import VaultBackend
from app.secrets.store import SecretsSettings
from tests.alloc import Allocator
from tests.conftest import moto_server
from tests.fakes.vault import FakeVault

EAST = "us-east-1"
TOKEN = "s.test-token-1"


@pytest.fixture(autouse=True)
def _env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh VMFARM_HOME, no secrets settings or Vault variables from outside, no proxies;
    the process's default store is rebuilt for each test."""
    for key in list(os.environ):
        if key.startswith(("VMFARM_SECRET", "VAULT_")) or key.lower() in (
            "http_proxy",
            "https_proxy",
            "all_proxy",
        ):
            monkeypatch.delenv(key)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    home = tmp_path / "home"
    monkeypatch.setenv("VMFARM_HOME", str(home))
    secrets.reset()
    yield home
    secrets.reset()


@pytest.fixture()
def key(monkeypatch: pytest.MonkeyPatch) -> str:
    k = Fernet.generate_key().decode()
    monkeypatch.setenv("VMFARM_SECRETS_KEY", k)
    return k


def store(**overrides: Any) -> SecretStore:
    """A store built from the environment (``overrides``: settings fields that replace it),
    registering nothing with the global masker."""
    return SecretStore.from_settings(SecretsSettings(**overrides), register=False)


# --- references -----------------------------------------------------------------------------------


# --- env backend ----------------------------------------------------------------------------------


# --- encrypted file -------------------------------------------------------------------------------


# --- store: order, prefixes, errors, cache --------------------------------------------------------


# --- AWS Secrets Manager (moto server) ------------------------------------------------------------


@pytest.fixture(scope="module")
def moto_url(tmp_path_factory: pytest.TempPathFactory, alloc: Allocator) -> Iterator[str]:
    """moto in server mode on 127.0.0.1, boto3 pointed at it (tests/conftest.moto_server)."""
    with moto_server(tmp_path_factory, alloc, region=EAST) as url:
        yield url


@pytest.fixture(scope="module")
def sm_secrets(moto_url: str) -> dict[str, str]:
    """Secrets created in moto; their ARNs by name."""
    client = boto3.client("secretsmanager", region_name=EAST, endpoint_url=moto_url)
    arns = {}
    for name, kw in {
        "vmfarm/api": {"SecretString": "aws-api-s3cret"},
        "vmfarm/db": {
            "SecretString": json.dumps({"user": "app", "password": "aws-db-pw!", "port": 5432})
        },
        "vmfarm/bin": {"SecretBinary": b"binary-but-utf8"},
        "db_password": {"SecretString": "aws-db-password-plain"},
    }.items():
        arns[name] = client.create_secret(Name=name, **kw)["ARN"]
    return arns


def test_aws_string_json_field_binary_and_arn(sm_secrets: dict[str, str]) -> None:
    s = store(secrets="aws")
    got = s.resolve(
        [
            "aws:vmfarm/api",
            "aws:vmfarm/db#password",
            "vmfarm/db#port",
            "aws:vmfarm/bin",
            sm_secrets["vmfarm/api"],
        ]
    )
    assert got == {
        "aws:vmfarm/api": "aws-api-s3cret",
        "aws:vmfarm/db#password": "aws-db-pw!",
        "vmfarm/db#port": "5432",
        "aws:vmfarm/bin": "binary-but-utf8",
        sm_secrets["vmfarm/api"]: "aws-api-s3cret",
    }


def test_aws_in_lookup_order_after_env(
    sm_secrets: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    s = store(secrets="env,aws")
    assert s.get("account.db_password") == "aws-db-password-plain"
    monkeypatch.setenv("VMFARM_SECRET_DB_PASSWORD", "env-wins-1")
    assert store().get("db_password") == "env-wins-1"


def test_aws_missing_secret_and_missing_field(sm_secrets: dict[str, str]) -> None:
    s = store(secrets="env,aws")
    with pytest.raises(SecretNotFoundError) as exc:
        s.get("aws:vmfarm/nope")
    assert "'aws:vmfarm/nope'" in str(exc.value) and exc.value.backend == "aws"
    with pytest.raises(SecretNotFoundError) as exc:
        s.get("vmfarm/nope2")
    assert "Secrets Manager 'vmfarm/nope2'" in str(
        exc.value
    ) and "VMFARM_SECRET_VMFARM_NOPE2" in str(exc.value)
    with pytest.raises(SecretNotFoundError, match="no field 'pass'") as exc:
        s.get("aws:vmfarm/db#pass")
    assert "aws-db-pw!" not in str(exc.value) and "password, port, user" in str(exc.value)


def test_aws_honours_aws_endpoint_url(
    sm_secrets: dict[str, str], monkeypatch: pytest.MonkeyPatch, free_port: Callable[[], int]
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(SecretError) as exc:
        store(secrets="aws").get("aws:vmfarm/api")
    assert exc.value.error_class == "Connectivity" and "127.0.0.1" in str(exc.value)
    assert exc.value.backend == "aws"


def test_aws_denied_is_an_access_error(
    sm_secrets: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.secrets.backends import AwsBackend

    class Denying:
        def get_secret_value(self, **kw: Any) -> Any:
            from botocore.exceptions import ClientError

            raise ClientError(
                {"Error": {"Code": "AccessDeniedException", "Message": "not allowed"}},
                "GetSecretValue",
            )

    backend = AwsBackend()
    monkeypatch.setattr(backend, "_client", lambda region: Denying())
    s = SecretStore([backend], register=False)
    with pytest.raises(SecretAccessError, match="AccessDeniedException") as exc:
        s.get("vmfarm/api")
    assert exc.value.error_class == "Authorization"


# --- Vault KV v2 (fake server) --------------------------------------------------------------------


@pytest.fixture()
def vault(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeVault]:
    fake = FakeVault(tokens={TOKEN: ["*"], "s.limited": ["secret/data/public/"]}).start()
    fake.put("secret", "app/db", {"password": "vault-db-pw", "user": "app"})
    fake.put("secret", "app/single", {"token": "vault-single-tok"})
    fake.put("secret", "app/valued", {"value": "vault-valued", "note": "n"})
    fake.put("secret", "public/x", {"value": "public-x"})
    monkeypatch.setenv("VAULT_ADDR", fake.url)
    monkeypatch.setenv("VAULT_TOKEN", TOKEN)
    monkeypatch.setenv("VMFARM_SECRETS", "env,vault")
    try:
        yield fake
    finally:
        fake.stop()


def test_vault_reads_kv_v2_fields(vault: FakeVault) -> None:
    got = store().resolve(
        ["vault:app/db#password", "app/db#user", "vault:app/single", "org.app/valued"]
    )
    assert got == {
        "vault:app/db#password": "vault-db-pw",
        "app/db#user": "app",
        "vault:app/single": "vault-single-tok",
        "org.app/valued": "vault-valued",
    }
    first = vault.requests[0]
    assert (first.method, first.path) == ("GET", "/v1/secret/data/app/db")
    assert first.headers["x-vault-token"] == TOKEN
    assert "x-vault-namespace" not in first.headers


def test_vault_field_errors_never_show_values(vault: FakeVault) -> None:
    with pytest.raises(SecretConfigError, match="several fields") as exc:
        store().get("vault:app/db")
    assert "password, user" in str(exc.value) and "vault-db-pw" not in str(exc.value)
    with pytest.raises(SecretNotFoundError, match="no field 'pw'") as nf:
        store().get("vault:app/db#pw")
    assert "vault-db-pw" not in str(nf.value) and nf.value.backend == "vault"


def test_vault_404_and_deleted_versions_are_not_found(vault: FakeVault) -> None:
    with pytest.raises(SecretNotFoundError) as exc:
        store().get("vault:app/missing#k")
    assert (
        "'vault:app/missing#k'" in str(exc.value)
        and "secret/data/app/missing" in str(exc.value)
        and exc.value.backend == "vault"
    )
    vault.delete("secret", "app/single")
    with pytest.raises(SecretNotFoundError):
        store().get("vault:app/single")
    # Without a prefix, env is asked first, then Vault: both are named.
    with pytest.raises(SecretNotFoundError, match=r"VMFARM_SECRET_APP_MISSING.*vault"):
        store().get("app/missing")


def test_vault_403_is_an_access_error(vault: FakeVault, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VAULT_TOKEN", "s.wrong")
    with pytest.raises(SecretAccessError, match="403") as exc:
        store().get("vault:app/db#password")
    assert exc.value.secret_id == "vault:app/db#password" and exc.value.backend == "vault"
    assert "s.wrong" not in str(exc.value)
    monkeypatch.setenv("VAULT_TOKEN", "s.limited")
    assert store().get("vault:public/x") == "public-x"
    with pytest.raises(SecretAccessError, match="permission denied"):
        store().get("vault:app/db#password")


def test_vault_mount_namespace_and_failures(
    vault: FakeVault, monkeypatch: pytest.MonkeyPatch
) -> None:
    vault.put("kv", "team/a b", {"value": "other-mount-v"})
    monkeypatch.setenv("VMFARM_SECRETS_VAULT_MOUNT", "kv")
    monkeypatch.setenv("VAULT_NAMESPACE", "team1")
    assert store().get("vault:team/a b") == "other-mount-v"
    last = vault.requests[-1]
    assert last.path == "/v1/kv/data/team/a%20b" and last.headers["x-vault-namespace"] == "team1"
    vault.fail(503, ["Vault is sealed"])
    with pytest.raises(SecretError, match=r"answered 503 .*: Vault is sealed") as exc:
        store().get("vault:team/a b")
    assert exc.value.error_class == "Connectivity"


def test_vault_settings_missing_or_unreachable(
    monkeypatch: pytest.MonkeyPatch, free_port: Callable[[], int]
) -> None:
    monkeypatch.setenv("VMFARM_SECRETS", "vault")
    with pytest.raises(SecretConfigError, match="VAULT_ADDR is not set"):
        store().get("vault:a#b")
    monkeypatch.setenv("VAULT_ADDR", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(SecretConfigError, match="VAULT_TOKEN is not set"):
        store().get("vault:a#b")
    monkeypatch.setenv("VAULT_TOKEN", TOKEN)
    with pytest.raises(SecretError, match="cannot reach Vault") as exc:
        store().get("vault:a#b")
    assert exc.value.error_class == "Connectivity"
    assert "127.0.0.1" in repr(VaultBackend.from_env())


# --- masking --------------------------------------------------------------------------------------


# --- CLI ------------------------------------------------------------------------------------------
