"""Secrets: references, the environment and encrypted-file backends (in a temporary
VMFARM_HOME), the store's order and cache, masking, ``vmfarm secrets``. The AWS Secrets Manager
and Vault backends run against moto and a fake Vault in tests/cloud/test_secrets.py.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import pickle
import stat
import threading
from collections import namedtuple
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

import click
import pytest
from click.testing import CliRunner, Result
from cryptography.fernet import Fernet
from hypothesis import given, settings
from hypothesis import strategies as st

from app import secrets
from app.errors import VmfarmError
from app.secrets import (
    Masker,
    MaskingFilter,
    SecretAccessError,
    SecretConfigError,
    SecretError,
    SecretNotFoundError,
    SecretStore,
    StreamMasker,
    find_refs,
    parse_id,
    substitute,
)
from app.secrets.backends import EnvBackend, FileBackend, SecretRef, env_var_name
from app.secrets.store import SecretsSettings
from cli.commands import secrets as secrets_cmd
from tests.fakes.vault import FakeVault

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


def test_find_refs_reads_both_quotes_blanks_and_scopes_in_first_seen_order() -> None:
    text = (
        'export A=<+secrets.getValue("db_password")>\n'
        "B=<+secrets.getValue('account.api_key')> C=<+ secrets.getValue( \"org.x\" ) >\n"
        'D=<+secrets.getValue("db_password")> E=<+secrets.getValue("vault:app/db#pw")>\n'
        'F=<+secrets.other("no")> G=<+env.variables.x> H=secrets.getValue("bare")'
    )
    assert find_refs(text) == ["db_password", "account.api_key", "org.x", "vault:app/db#pw"]
    assert find_refs("nothing here") == []
    assert secrets.has_refs(text) and not secrets.has_refs("<+pipeline.name>")
    assert secrets.find_refs_in(
        ["<+secrets.getValue('a')>", "<+secrets.getValue('b')> <+secrets.getValue('a')>"]
    ) == ["a", "b"]


@pytest.mark.parametrize(
    ("sid", "name", "backend", "key", "scope"),
    [
        ("db_password", "db_password", None, None, ""),
        ("account.db_password", "db_password", None, None, "account"),
        ("org.team.token", "team.token", None, None, "org"),
        ("project.x", "x", None, None, "project"),
        ("env:DB", "DB", "env", None, ""),
        ("aws:prod/api#key", "prod/api", "aws", "key", ""),
        ("vault:app/db#password", "app/db", "vault", "password", ""),
        ("account.file:db", "db", "file", None, "account"),
        (
            "arn:aws:secretsmanager:eu-west-1:123456789012:secret:api-AbCdEf",
            "arn:aws:secretsmanager:eu-west-1:123456789012:secret:api-AbCdEf",
            None,
            None,
            "",
        ),
        ("http:thing", "http:thing", None, None, ""),
        ("  spaced  ", "spaced", None, None, ""),
    ],
)
def test_parse_id(sid: str, name: str, backend: str | None, key: str | None, scope: str) -> None:
    ref = parse_id(sid)
    assert (ref.name, ref.backend, ref.key, ref.scope) == (name, backend, key, scope)
    assert ref.id == sid.strip()


@pytest.mark.parametrize("sid", ["", "  ", "account.", "vault:", "db#", "aws:#k"])
def test_parse_id_refuses_ids_naming_nothing(sid: str) -> None:
    with pytest.raises(SecretConfigError):
        parse_id(sid)


def test_substitute_replaces_once_and_returns_values() -> None:
    table = {"a": "va$(reboot)", "account.b": "<+secrets.getValue('a')>"}
    seen: list[list[str]] = []

    def resolver(ids: list[str]) -> dict[str, str]:
        seen.append(ids)
        return {i: table[i] for i in ids}

    text, values = substitute(
        "x=<+secrets.getValue('a')> y=<+secrets.getValue(\"account.b\")>"
        " z=<+secrets.getValue('a')>",
        resolver,
    )
    # The second value looks like a reference: it is inserted as it is, never expanded.
    assert text == "x=va$(reboot) y=<+secrets.getValue('a')> z=va$(reboot)"
    assert values == table
    assert seen == [["a", "account.b"]]
    assert substitute("no refs", resolver) == ("no refs", {})
    assert len(seen) == 1


def test_substitute_binds_values_for_shell_scripts() -> None:
    from app.definitions.expressions import Binder

    binder = Binder()
    text, values = substitute(
        "curl -u u:<+secrets.getValue('pw')> && echo \"<+secrets.getValue('pw')>\"",
        lambda ids: {"pw": "p'w\"$x"},
        bind=binder,
    )
    assert text == 'curl -u u:${VMFARM_VALUE_1} && echo "${VMFARM_VALUE_1}"'
    assert binder.env == {"VMFARM_VALUE_1": "p'w\"$x"} and values == {"pw": "p'w\"$x"}


def test_substitute_uses_resolve_by_default_and_registers_for_masking(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("VMFARM_SECRET_DEPLOY_TOKEN", "tok-9f8e7d6c")
    text, values = substitute("T=<+secrets.getValue('project.deploy-token')>")
    assert text == "T=tok-9f8e7d6c"
    assert values == {"project.deploy-token": "tok-9f8e7d6c"}
    assert secrets.mask("log: tok-9f8e7d6c") == "log: ***"


# --- env backend ----------------------------------------------------------------------------------


def test_env_backend_names_and_json_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    assert env_var_name("db-password") == "VMFARM_SECRET_DB_PASSWORD"
    assert env_var_name("team.api/key ä") == "VMFARM_SECRET_TEAM_API_KEY__"
    monkeypatch.setenv("VMFARM_SECRET_DB_PASSWORD", "env-pw-1")
    monkeypatch.setenv("VMFARM_SECRET_CFG", json.dumps({"user": "app", "port": 5432}))
    monkeypatch.setenv("VMFARM_SECRET_EMPTY", "")
    got = store().resolve(
        ["db_password", "account.db-password", "env:db.password", "env:cfg#user", "cfg#port"]
    )
    assert got == {
        "db_password": "env-pw-1",
        "account.db-password": "env-pw-1",
        "env:db.password": "env-pw-1",
        "env:cfg#user": "app",
        "cfg#port": "5432",
    }
    with pytest.raises(SecretNotFoundError) as exc:
        store().get("env:empty")
    assert "VMFARM_SECRET_EMPTY" in str(exc.value)
    with pytest.raises(SecretNotFoundError, match="no field 'password'") as exc:
        store().get("env:cfg#password")
    assert "5432" not in str(exc.value) and "app" not in str(exc.value).replace("'env:", "")


def test_env_field_of_a_non_json_value_is_an_error_without_the_value(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("VMFARM_SECRET_PLAIN", "plain-value-77")
    with pytest.raises(SecretError, match="not a JSON object") as exc:
        store().get("plain#k")
    assert "plain-value-77" not in str(exc.value)


# --- encrypted file -------------------------------------------------------------------------------


def test_file_backend_round_trip_with_a_fernet_key(_env: Path, key: str) -> None:
    fb = secrets.store.file_backend()
    assert fb.path == _env / "secrets.enc"
    assert fb.set("db_password", "f1le-s3cret") is True
    assert fb.set("db_password", "f1le-s3cret-2") is False
    fb.set("cfg", json.dumps({"user": "u1", "pass": "p-json-1"}))
    got = store(secrets="file").resolve(["db_password", "file:cfg#pass", "org.cfg"])
    assert got["db_password"] == "f1le-s3cret-2" and got["file:cfg#pass"] == "p-json-1"
    assert [e.name for e in fb.entries()] == ["cfg", "db_password"]
    raw = fb.path.read_bytes()
    assert b"f1le-s3cret" not in raw and b"db_password" not in raw and b"p-json-1" not in raw
    assert json.loads(raw)["kdf"] == {"name": "none"}
    assert stat.S_IMODE(fb.path.stat().st_mode) == 0o600
    assert sorted(p.name for p in fb.path.parent.iterdir()) == ["secrets.enc", "secrets.enc.lock"]
    assert fb.remove("cfg") is True and fb.remove("cfg") is False
    assert [e.name for e in fb.entries()] == ["db_password"]


def test_file_backend_with_a_passphrase_and_a_key_file(
    _env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    keyfile = tmp_path / "key"
    keyfile.write_text("correct horse battery staple\n")
    monkeypatch.setenv("VMFARM_SECRETS_KEY_FILE", str(keyfile))
    fb = secrets.store.file_backend()
    assert fb.key_source.startswith("VMFARM_SECRETS_KEY_FILE")
    fb.set("phrase_secret", "via-passphrase-1")
    envelope = json.loads(fb.path.read_text())
    assert envelope["kdf"]["name"] == "scrypt" and len(base64.b64decode(envelope["kdf"]["salt"]))
    assert store().get("phrase_secret") == "via-passphrase-1"
    # The same passphrase given directly works too; another one does not.
    monkeypatch.setenv("VMFARM_SECRETS_KEY", "correct horse battery staple")
    assert store().get("file:phrase_secret") == "via-passphrase-1"
    monkeypatch.setenv("VMFARM_SECRETS_KEY", "wrong horse battery staple")
    with pytest.raises(SecretAccessError, match="VMFARM_SECRETS_KEY is not the key") as exc:
        store().get("phrase_secret")
    assert "via-passphrase-1" not in str(exc.value)
    assert exc.value.secret_id == "phrase_secret" and exc.value.backend == "file"


def test_file_backend_wrong_missing_and_unusable_keys(
    _env: Path, key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    secrets.store.file_backend().set("k1", "value-for-k1")
    monkeypatch.setenv("VMFARM_SECRETS_KEY", Fernet.generate_key().decode())
    with pytest.raises(SecretAccessError) as denied:
        store().get("k1")
    assert "value-for-k1" not in str(denied.value) and "'k1'" in str(denied.value)
    assert str(_env / "secrets.enc") in str(denied.value)
    # A passphrase against a file written with a Fernet key.
    monkeypatch.setenv("VMFARM_SECRETS_KEY", "a long passphrase here")
    with pytest.raises(SecretAccessError, match="Fernet key"):
        store().get("k1")
    monkeypatch.delenv("VMFARM_SECRETS_KEY")
    with pytest.raises(SecretConfigError, match="VMFARM_SECRETS_KEY is not set") as missing:
        store().get("k1")
    assert missing.value.backend == "file"
    # No file and no key: simply not found (nothing to read), named as such.
    (_env / "secrets.enc").unlink()
    with pytest.raises(SecretNotFoundError, match="does not exist"):
        store().get("k1")
    # A new file needs a usable key.
    monkeypatch.setenv("VMFARM_SECRETS_KEY", "short")
    with pytest.raises(SecretConfigError, match="at least 8"):
        secrets.store.file_backend().set("k2", "value-2")


def test_file_backend_damaged_file(_env: Path, key: str) -> None:
    path = _env / "secrets.enc"
    path.parent.mkdir(parents=True)
    path.write_text("not json")
    with pytest.raises(SecretError, match="not a vmfarm secrets file"):
        store().get("x1")
    secrets.store.file_backend().path.unlink()
    fb = secrets.store.file_backend()
    fb.set("x1", "value-x1")
    doc = json.loads(path.read_text())
    doc["data"] = doc["data"][:-8] + "AAAAAAAA"
    path.write_text(json.dumps(doc))
    with pytest.raises(SecretAccessError, match="altered"):
        store().get("x1")


def test_file_backend_concurrent_writers_lose_nothing(_env: Path, key: str) -> None:
    path = _env / "secrets.enc"

    def writer(i: int) -> None:
        FileBackend(path, key).set(f"name{i}", f"value-{i}")

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(e.name for e in FileBackend(path, key).entries()) == sorted(
        f"name{i}" for i in range(12)
    )
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


def test_file_names_are_checked(key: str) -> None:
    fb = secrets.store.file_backend()
    for bad in ("", "a b", "-x", "x#y", "env:x", "account.db", "a" * 300):
        with pytest.raises(SecretConfigError):
            fb.set(bad, "value-1")
    with pytest.raises(SecretConfigError, match="empty"):
        fb.set("ok", "")


# --- store: order, prefixes, errors, cache --------------------------------------------------------


def test_lookup_order_and_explicit_prefixes(key: str, monkeypatch: pytest.MonkeyPatch) -> None:
    secrets.store.file_backend().set("shared", "from-file-1")
    monkeypatch.setenv("VMFARM_SECRET_SHARED", "from-env-1")
    assert store().get("shared") == "from-env-1"  # default order env,file
    assert store().get("file:shared") == "from-file-1"
    assert store(secrets="file,env").get("shared") == "from-file-1"
    with pytest.raises(SecretConfigError, match="not enabled") as exc:
        store(secrets="env").get("file:shared")
    assert exc.value.backend == "file" and "from-file-1" not in str(exc.value)
    with pytest.raises(SecretConfigError, match="unknown backend"):
        store(secrets="env,gcp")
    with pytest.raises(SecretConfigError, match="no secrets backend"):
        store(secrets="").get("shared")


def test_missing_secret_names_the_id_and_every_backend_asked(key: str) -> None:
    with pytest.raises(SecretNotFoundError) as exc:
        secrets.resolve(["account.nope"])
    msg = str(exc.value)
    assert "'account.nope'" in msg and "VMFARM_SECRET_NOPE" in msg and "secrets.enc" in msg
    assert exc.value.secret_id == "account.nope" and exc.value.backend == "env,file"
    assert isinstance(exc.value, VmfarmError)


def test_several_failures_are_reported_together(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMFARM_SECRET_OK", "okay-value")
    with pytest.raises(SecretError) as exc:
        store().resolve(["ok", "gone1", "vault:gone2"])
    assert len(exc.value.errors) == 2
    assert "gone1" in str(exc.value) and "vault:gone2" in str(exc.value)
    assert "okay-value" not in str(exc.value)


def test_errors_pickle_with_their_fields() -> None:
    err = SecretAccessError(
        "denied", secret_id="a", backend="vault", errors=[SecretNotFoundError("x", secret_id="b")]
    )
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is SecretAccessError and str(back) == str(err)
    assert (back.secret_id, back.backend, back.error_class) == ("a", "vault", "Authorization")
    assert back.errors[0].secret_id == "b"


class Counting:
    name = "env"

    def __init__(self) -> None:
        self.calls = 0
        self.value = "counted-1"

    def lookup(self, ref: SecretRef) -> str | None:
        self.calls += 1
        return self.value

    def where(self, ref: SecretRef) -> str:
        return "counting"


def test_values_are_cached_for_the_ttl_then_read_again() -> None:
    now = [100.0]
    backend = Counting()
    s = SecretStore([backend], ttl=60, clock=lambda: now[0], register=False)
    assert s.resolve(["a", "account.a", " a "]) == {"a": "counted-1", "account.a": "counted-1"}
    assert backend.calls == 1  # scopes are stripped: one secret
    backend.value = "counted-2"
    now[0] += 59
    assert s.get("a") == "counted-1" and backend.calls == 1
    now[0] += 2
    assert s.get("a") == "counted-2" and backend.calls == 2
    s.clear_cache()
    s.get("a")
    assert backend.calls == 3
    nocache = SecretStore([backend], ttl=0, register=False)
    nocache.get("a")
    nocache.get("a")
    assert backend.calls == 5


def test_settings_defaults(_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = SecretsSettings()
    assert s.order == ["env", "file"] and s.secrets_ttl == 60
    assert s.file_path == _env / "secrets.enc" and s.secrets_vault_mount == "secret"
    assert s.file_key() == (None, "VMFARM_SECRETS_KEY")
    monkeypatch.setenv("VMFARM_SECRETS_KEY", "a-passphrase-in-env")
    monkeypatch.setenv("VMFARM_SECRETS", " Vault , env,vault ")
    s = SecretsSettings()
    assert "a-passphrase-in-env" not in repr(s) and s.order == ["vault", "env"]
    assert s.file_key() == ("a-passphrase-in-env", "VMFARM_SECRETS_KEY")
    assert "a-passphrase-in-env" not in repr(secrets.store.file_backend(s))
    monkeypatch.setenv("VMFARM_SECRETS_TTL", "soon")
    with pytest.raises(SecretConfigError, match="VMFARM_SECRETS_TTL"):
        secrets.resolve(["x"])
    assert run("list").exit_code == 2


def test_resolve_registers_values_with_the_global_masker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMFARM_SECRET_GLOBAL_ONE", "gl0bal-value-x")
    assert secrets.get_secret("global_one") == "gl0bal-value-x"
    assert secrets.mask_obj({"log": "got gl0bal-value-x"}) == {"log": "got ***"}
    assert secrets.resolve_in({"a": "<+secrets.getValue('global_one')>", "b": "x"}) == {
        "global_one": "gl0bal-value-x"
    }


# --- AWS Secrets Manager (moto server) ------------------------------------------------------------


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


# --- masking --------------------------------------------------------------------------------------

SECRET = 'p@ss w0rd/+=&é"\\x'


@pytest.mark.parametrize(
    "form",
    [
        SECRET,
        base64.b64encode(SECRET.encode()).decode(),
        base64.b64encode(SECRET.encode()).decode().rstrip("="),
        base64.urlsafe_b64encode(SECRET.encode()).decode(),
        base64.urlsafe_b64encode(SECRET.encode()).decode().rstrip("="),
        quote(SECRET, safe=""),
        quote(SECRET),
        quote_plus(SECRET),
        quote(SECRET, safe="").lower(),
        json.dumps(SECRET)[1:-1],
        json.dumps(SECRET, ensure_ascii=False)[1:-1],
        json.dumps(json.dumps(SECRET)[1:-1])[1:-1],
    ],
    ids=[
        "raw",
        "b64",
        "b64-nopad",
        "urlsafe",
        "urlsafe-nopad",
        "quote",
        "quote-slash",
        "quote_plus",
        "quote-lowerhex",
        "json",
        "json-unicode",
        "json-twice",
    ],
)
def test_mask_covers_every_form(form: str) -> None:
    m = Masker([SECRET])
    masked = m.mask(f"before {form} after")
    assert masked == "before *** after"


def test_mask_inside_longer_base64_and_json_documents() -> None:
    m = Masker(["hunter2-secret"])
    basic = base64.b64encode(b"deploy:hunter2-secret").decode()
    piped = base64.b64encode(b"hunter2-secret\n").decode()  # echo $S | base64
    for text in (
        f"Authorization: Basic {basic}",
        piped,
        json.dumps({"env": {"PW": "hunter2-secret"}}),
        json.dumps({"body": json.dumps({"pw": "hunter2-secret"})}),
    ):
        masked = m.mask(text)
        assert "***" in masked
        for enc in (b"hunter2-secret", b"deploy:hunter2-secret", b"hunter2-secret\n"):
            assert base64.b64encode(enc).decode() not in masked
        assert "hunter2-secret" not in masked
    # What is left of "deploy:" around the masked part cannot decode to the value.
    assert not m.mask(basic).endswith(basic[-8:])


def test_mask_multi_line_values() -> None:
    key = (
        "-----BEGIN KEY-----\nMIIEvQIBADANBgkqhkiG9w0B\nAQEFAASCBKcwggSjAgEAAoIB\n"
        "-----END KEY-----\n"
    )
    m = Masker([key])
    assert m.mask(f"key: {key}done") == "key: ***done"
    assert m.mask("x " + key.replace("\n", "\r\n")) == "x ***"
    # Line by line, as a log sink storing one line per entry would see it.
    for line in key.splitlines():
        assert m.mask(f"> {line}") == "> ***"
    assert m.mask(json.dumps({"k": key})) == '{"k": "***"}'
    assert m.mask(base64.b64encode(key.encode()).decode()) == "***"


def test_short_values_are_not_masked_and_longest_value_wins() -> None:
    m = Masker(["abc", " x ", "", "abcd", "abcdefgh"])
    assert m.count == 2
    assert m.mask("abc abcd abcdefgh abcdefg") == "abc *** *** ***efg"
    assert Masker(["abc"], min_length=3).mask("xabcx") == "x***x"
    assert Masker(["s3cret"], placeholder="[MASKED]").mask("a s3cret b") == "a [MASKED] b"
    assert Masker([r"back\1slash"], placeholder=r"\1").mask(r"x back\1slash") == r"x \1"


def test_mask_obj_recurses_and_keeps_other_objects() -> None:
    m = Masker(["tok-123456"])
    Row = namedtuple("Row", "id line")
    obj = {
        "tok-123456": ["a tok-123456", ("tok-123456", 5, None)],
        "n": 1.5,
        "row": Row(1, "out tok-123456"),
        "s": {"tok-123456"},
        "b": b"tok-123456",
    }
    got = m.mask_obj(obj)
    assert got == {
        "***": ["a ***", ("***", 5, None)],
        "n": 1.5,
        "row": Row(1, "out ***"),
        "s": {"***"},
        "b": b"tok-123456",
    }
    assert obj["n"] == 1.5 and "tok-123456" in obj  # the original is untouched
    assert Masker().mask_obj(obj) is obj
    assert "tok-123456" not in repr(m)


def test_global_registry_register_and_mask() -> None:
    assert secrets.register("registered-single-value") == 1  # a string is one value
    assert secrets.register(["registered-single-value", "ab"]) == 0
    assert secrets.global_masker().mask("x registered-single-value") == "x ***"
    assert secrets.mask("registered-single-value") == "***"


def test_logging_filter_masks_message_args_and_traceback() -> None:
    m = Masker(["log-secret-42"])
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(self.format(record))

    handler = Keep()
    handler.addFilter(MaskingFilter(m))
    log = logging.getLogger("test_secrets.masking")
    log.addHandler(handler)
    log.propagate = False
    try:
        log.warning("token %s used", "log-secret-42")
        try:
            raise RuntimeError("failed with log-secret-42")
        except RuntimeError:
            log.exception("boom")
    finally:
        log.removeHandler(handler)
    assert records[0] == "token *** used"
    assert "RuntimeError: failed with ***" in records[1]
    assert not any("log-secret-42" in r for r in records)


def test_stream_masker_finds_values_split_across_chunks() -> None:
    m = Masker(["split-secret-99"])
    s = StreamMasker(m)
    out = s.feed("line one\nvalue: split-se") + s.feed("cret-99 and more") + s.feed("\nend")
    out += s.flush()
    assert out == "line one\nvalue: *** and more\nend"
    long = StreamMasker(m, pending_max=10)
    assert long.feed("x" * 20 + "split-secret-99") == "x" * 20 + "***"


def test_masker_is_thread_safe_while_values_are_added() -> None:
    m = Masker()
    values = [f"thread-value-{i:04d}" for i in range(200)]
    text = " ".join(values)
    errors: list[str] = []

    def add() -> None:
        for v in values:
            m.add(v)

    def use() -> None:
        for _ in range(200):
            out = m.mask(text)
            if len(out) > len(text):
                errors.append(out)

    threads = [threading.Thread(target=add)] + [threading.Thread(target=use) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert m.mask(text) == " ".join(["***"] * 200)


def test_mask_long_log_with_many_values() -> None:
    values = [f"val-{i:05d}-{'x' * (i % 7)}" for i in range(500)]
    m = Masker(values)
    lines = [f"{i} ok {values[i % 500] if i % 3 == 0 else 'plain'}" for i in range(20000)]
    masked = m.mask("\n".join(lines)).split("\n")
    assert len(masked) == 20000
    assert all(("***" in line) == (i % 3 == 0) for i, line in enumerate(masked))
    assert not any("val-" in line for line in masked)


@settings(max_examples=200, deadline=None)
@given(
    value=st.text(
        alphabet=st.characters(blacklist_characters="*", blacklist_categories=("Cs",)),
        min_size=4,
        max_size=40,
    ).filter(lambda v: len(v.strip()) >= 4),
    before=st.text(
        alphabet=st.characters(blacklist_characters="*", blacklist_categories=("Cs",)), max_size=30
    ),
    after=st.text(
        alphabet=st.characters(blacklist_characters="*", blacklist_categories=("Cs",)), max_size=30
    ),
)
def test_masked_text_never_contains_the_value(value: str, before: str, after: str) -> None:
    m = Masker([value])
    b64 = base64.b64encode(value.encode()).decode()
    for text in (
        before + value + after,
        before + b64 + after,
        before + quote(value) + after,
        json.dumps({"k": before + value + after}),
    ):
        masked = m.mask(text)
        assert value not in masked and value.strip() not in masked
        assert b64 not in masked


# --- CLI ------------------------------------------------------------------------------------------


def cli() -> click.Group:
    @click.group()
    def main() -> None:
        """test group"""

    secrets_cmd.register(main)
    return main


def run(*args: str, input: str | None = None) -> Result:
    return CliRunner().invoke(cli(), ["secrets", *args], input=input, catch_exceptions=False)


def all_output(r: Result) -> str:
    return r.output + r.stdout + r.stderr


def test_cli_set_list_rm_never_print_values(
    _env: Path, key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    r = run("set", "db_password", "--value-stdin", input="cli-v4lue-1\n")
    assert r.exit_code == 0, all_output(r)
    assert "db_password created" in r.stdout and "cli-v4lue-1" not in all_output(r)
    r = run("set", "api_key", input="prompted-v4lue\n")
    assert r.exit_code == 2 and "--value-stdin" in r.stderr  # no terminal: not asked
    monkeypatch.setattr(secrets_cmd, "_interactive", lambda: True)
    r = run("set", "api_key", input="prompted-v4lue\nprompted-v4lue\n")
    assert r.exit_code == 0, all_output(r)
    assert "prompted-v4lue" not in all_output(r)
    r = run("set", "multi", "--value-stdin", "-o", "json", input="l1-secret\nl2-secret\r\n")
    assert r.exit_code == 0 and json.loads(r.stdout)["created"] is True
    assert "secret" not in r.stdout.replace("secrets.enc", "")
    r = run("set", "db_password", "--value-stdin", input="cli-v4lue-2")
    assert "db_password updated" in r.stdout
    monkeypatch.setenv("VMFARM_SECRETS", "file")
    got = SecretStore.from_settings(register=False).resolve(["db_password", "api_key", "multi"])
    assert got == {
        "db_password": "cli-v4lue-2",
        "api_key": "prompted-v4lue",
        "multi": "l1-secret\nl2-secret",
    }

    r = run("list")
    assert r.exit_code == 0
    assert [ln.split()[0] for ln in r.stdout.strip().splitlines()[1:]] == [
        "api_key",
        "db_password",
        "multi",
    ]
    r = run("list", "-o", "json")
    doc = json.loads(r.stdout)
    assert [s["name"] for s in doc["secrets"]] == ["api_key", "db_password", "multi"]
    assert doc["file"] == str(_env / "secrets.enc")
    r = run("rm", "api_key")
    assert r.exit_code == 0 and "api_key removed" in r.stdout
    r = run("rm", "api_key")
    assert r.exit_code == 2 and "no secret 'api_key'" in r.stderr
    assert [s["name"] for s in json.loads(run("list", "-o", "json").stdout)["secrets"]] == [
        "db_password",
        "multi",
    ]
    for value in ("cli-v4lue-1", "cli-v4lue-2", "prompted-v4lue", "l1-secret", "l2-secret"):
        assert value not in (_env / "secrets.enc").read_text()


def test_cli_bad_input_exits_2_without_values(
    _env: Path, key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert run("set", "ok_name", "--value-stdin", input="kept-value-1").exit_code == 0
    r = run("set", "bad name", "--value-stdin", input="bad-name-value")
    assert r.exit_code == 2 and "not valid" in r.stderr and "bad-name-value" not in all_output(r)
    r = run("set", "account.x", "--value-stdin", input="scoped-value")
    assert r.exit_code == 2 and "'x'" in r.stderr
    r = run("set", "empty", "--value-stdin", input="\n")
    assert r.exit_code == 2 and "empty" in r.stderr
    monkeypatch.setenv("VMFARM_SECRETS_KEY", Fernet.generate_key().decode())
    for args in (("list",), ("rm", "ok_name"), ("set", "other", "--value-stdin")):
        r = run(*args, input="other-value-1")
        assert r.exit_code == 2, all_output(r)
        assert "VMFARM_SECRETS_KEY is not the key" in r.stderr
        assert "kept-value-1" not in all_output(r) and "other-value-1" not in all_output(r)
    monkeypatch.delenv("VMFARM_SECRETS_KEY")
    r = run("list")
    assert r.exit_code == 2 and "VMFARM_SECRETS_KEY is not set" in r.stderr


def test_cli_warns_when_pipelines_would_not_read_the_file(
    key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VMFARM_SECRET_SHADOWED", "from-env-x")
    r = run("set", "shadowed", "--value-stdin", input="from-file-x")
    assert r.exit_code == 0 and "VMFARM_SECRET_SHADOWED is set" in r.stderr
    assert "from-env-x" not in all_output(r) and "from-file-x" not in all_output(r)
    monkeypatch.setenv("VMFARM_SECRETS", "env,vault")
    r = run("set", "other", "--value-stdin", input="other-x-value")
    assert r.exit_code == 0 and "not enabled" in r.stderr


def test_cli_keygen_and_empty_list(_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    r = run("keygen")
    new_key = r.stdout.strip()
    assert r.exit_code == 0 and len(base64.urlsafe_b64decode(new_key)) == 32
    monkeypatch.setenv("VMFARM_SECRETS_KEY", new_key)
    r = run("list")
    assert r.exit_code == 0 and "no secrets in" in r.stderr
    assert json.loads(run("list", "-o", "json").stdout)["secrets"] == []


def test_env_backend_reads_a_given_mapping() -> None:
    backend = EnvBackend({"VMFARM_SECRET_X_Y": "mapped-1"})
    assert backend.lookup(parse_id("x.y")) == "mapped-1"
    assert backend.lookup(parse_id("z")) is None
