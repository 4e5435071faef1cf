"""app.artifacts without a server: packing a folder reproducibly, Local sources, how repository
fields map to URLs, the remote verify command and gzip. The HTTP (Artifactory-like fake) and S3
(moto) sources, checksums and the cache are in tests/cloud/test_artifacts.py.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from app import artifacts
from app.artifacts import (
    ArtifactAuthError,
    ArtifactError,
    ChecksumError,
    Credentials,
    artifact_url,
    fetch,
    httpfetch,
    pack_folder,
    resolve,
    verify_remote_command,
)
from app.artifacts.httpfetch import HttpAuth
from app.settings import get_settings


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Each test has its own VMFARM_HOME (so its own cache), no proxies and quick retries."""
    for key in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("VMFARM_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(httpfetch, "BACKOFF_BASE", 0.01)
    get_settings.cache_clear()
    yield tmp_path / "home"
    get_settings.cache_clear()


@pytest.fixture()
def app_dir(tmp_path: Path) -> Path:
    """A small application folder: nested files, an executable, an empty folder, a symlink."""
    root = tmp_path / "web-app"
    (root / "bin").mkdir(parents=True)
    (root / "conf").mkdir()
    (root / "empty").mkdir()
    (root / "bin" / "start.sh").write_text("#!/bin/sh\nexec python3 -m http.server\n")
    (root / "bin" / "start.sh").chmod(0o755)
    (root / "conf" / "app.ini").write_text("[app]\nport = 8080\n")
    (root / "README").write_text("web-app 1.4.2\n")
    (root / "current").symlink_to("bin")
    return root


def local(path: Path, tag: str = "1.4.2", **spec: Any) -> dict[str, Any]:
    return {
        "type": "Local",
        "spec": {"path": str(path), **spec},
        "tag": tag,
        "fileName": f"web_app-{tag}.tar.gz",
    }


# --- the reproducible pack ----------------------------------------------------------------------


def test_pack_gives_the_same_bytes_for_the_same_content(app_dir: Path, tmp_path: Path) -> None:
    first, second, third = tmp_path / "1.tar.gz", tmp_path / "2.tar.gz", tmp_path / "3.tar.gz"
    pack_folder(app_dir, first)
    pack_folder(app_dir, second)
    assert first.read_bytes() == second.read_bytes()

    # A copy made at another time, in another order, with other mtimes and a looser umask.
    other = tmp_path / "elsewhere" / "web-app"
    other.mkdir(parents=True)
    (other / "README").write_text("web-app 1.4.2\n")
    (other / "conf").mkdir()
    (other / "conf" / "app.ini").write_text("[app]\nport = 8080\n")
    (other / "conf" / "app.ini").chmod(0o664)
    (other / "current").symlink_to("bin")
    (other / "empty").mkdir()
    (other / "bin").mkdir()
    shutil.copy(app_dir / "bin" / "start.sh", other / "bin" / "start.sh")
    os.utime(other / "README", (1_000_000, 1_000_000))
    pack_folder(other, third)
    assert third.read_bytes() == first.read_bytes()

    raw = first.read_bytes()
    assert raw[4:8] == b"\0\0\0\0", "gzip header mtime must be 0"
    assert not raw[3] & 0x08, "the gzip header must not carry a file name"
    with tarfile.open(first) as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    assert names == sorted(names)
    assert names == ["README", "bin", "bin/start.sh", "conf", "conf/app.ini", "current", "empty"]
    assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 and m.uname == "" for m in members)
    modes = {m.name: m.mode for m in members}
    assert modes["bin/start.sh"] == 0o755 and modes["conf/app.ini"] == 0o644
    assert next(m for m in members if m.name == "current").linkname == "bin"

    (other / "README").write_text("web-app 1.4.3\n")
    pack_folder(other, third)
    assert third.read_bytes() != first.read_bytes()


def test_local_folder_and_file(app_dir: Path, home: Path) -> None:
    got = fetch(local(app_dir))
    assert got.source == f"Local folder {app_dir}" and got.ext == "tar.gz"
    assert Path(got.path) == home / "cache" / "artifacts" / f"{got.sha256}.tar.gz"
    assert hashlib.sha256(Path(got.path).read_bytes()).hexdigest() == got.sha256
    assert got.size == Path(got.path).stat().st_size
    assert not got.verified and got.checksum_from is None and not got.from_cache
    again = fetch(local(app_dir))
    assert again.path == got.path and again.sha256 == got.sha256

    jar = app_dir.parent / "service.jar"
    jar.write_bytes(b"PK\x03\x04 not really a jar")
    one = fetch(local(jar, sha256=hashlib.sha256(jar.read_bytes()).hexdigest()))
    assert one.ext == "jar" and one.verified and one.checksum_from == "spec.sha256"
    assert Path(one.path).read_bytes() == jar.read_bytes()
    with pytest.raises(ChecksumError):
        fetch(local(jar, checksum="sha256:" + "0" * 64))
    with pytest.raises(ArtifactError, match="does not exist on this worker"):
        fetch(local(app_dir.parent / "missing"))


# --- one content, three sources -----------------------------------------------------------------


# --- checksums -----------------------------------------------------------------------------------


# --- once per execution --------------------------------------------------------------------------


# --- HTTP behaviour ------------------------------------------------------------------------------


def test_url_mapping_of_repository_fields() -> None:
    base = "https://acme.jfrog.io/artifactory"
    assert (
        artifact_url(
            "Artifactory",
            {"baseUrl": base, "repository": "libs-release", "artifactPath": "/apps/web-app/"},
            "web-app-1.2.tgz",
        )
        == f"{base}/libs-release/apps/web-app/web-app-1.2.tgz"
    )
    assert (
        artifact_url(
            "Artifactory",
            {
                "baseUrl": base + "/",
                "repository": "generic",
                "artifactDirectory": "apps/web",
                "artifactPath": "web-<+artifact.tag>.tar.gz",
            },
            "1.2",
        )
        == f"{base}/generic/apps/web/web-1.2.tar.gz"
    )
    assert (
        artifact_url(
            "Artifactory",
            {
                "baseUrl": base,
                "repository": "r",
                "artifactPath": "/apps/{tag}/",
                "fileName": "app-{tag}.zip",
            },
            "2.0 rc",
        )
        == f"{base}/r/apps/2.0%20rc/app-2.0%20rc.zip"
    )
    assert (
        artifact_url("Http", {"url": "https://repo/libs/app/<tag>/app-<tag>.tar.gz"}, "1.0")
        == "https://repo/libs/app/1.0/app-1.0.tar.gz"
    )
    nexus = "https://nexus.acme.io"
    assert (
        artifact_url(
            "Nexus3Registry",
            {
                "baseUrl": nexus,
                "repository": "raw-hosted",
                "repositoryFormat": "raw",
                "spec": {"group": "/web"},
            },
            "web-1.0.tar.gz",
        )
        == f"{nexus}/repository/raw-hosted/web/web-1.0.tar.gz"
    )
    assert artifact_url(
        "Nexus3Registry",
        {
            "baseUrl": nexus,
            "repository": "maven-releases",
            "repositoryFormat": "maven",
            "spec": {
                "groupId": "com.acme.web",
                "artifactId": "web-app",
                "extension": "war",
                "classifier": "prod",
            },
        },
        "3.1.0",
    ) == (f"{nexus}/repository/maven-releases/com/acme/web/web-app/3.1.0/web-app-3.1.0-prod.war")
    assert (
        artifact_url(
            "Jenkins",
            {
                "baseUrl": "http://ci:8080",
                "jobName": "team/web-app",
                "artifactPath": "dist/web-app.tar.gz",
            },
            "57",
        )
        == "http://ci:8080/job/team/job/web-app/57/artifact/dist/web-app.tar.gz"
    )
    assert artifacts.extension("web-app-1.2.3") == "bin"
    assert artifacts.extension("web-app-1.2.3.TAR.GZ") == "tar.gz"


# --- credentials by reference --------------------------------------------------------------------

PW, TOKEN = "pw-from-the-store", "tok-from-the-store"


def repo(url: str = "https://repo.example/libs/web-<tag>.tgz", **spec: Any) -> dict[str, Any]:
    return {
        "type": "Artifactory",
        "tag": "1.4.2",
        "fileName": "web-1.4.2.tgz",
        "spec": {"url": url, **spec},
    }


@pytest.fixture()
def store(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The worker's secrets: the env backend only, with a password and a token."""
    from app import secrets

    monkeypatch.setenv("VMFARM_SECRETS", "env")
    monkeypatch.setenv("VMFARM_SECRET_ARTIFACTORY_PW", PW)
    monkeypatch.setenv("VMFARM_SECRET_CI_TOKEN", TOKEN)
    secrets.reset()
    yield
    secrets.reset()


@pytest.mark.parametrize(
    ("spec", "auth"),
    [
        ({"username": "deployer", "passwordRef": "account.artifactory_pw"}, ("deployer", PW, None)),
        (
            {"username": "deployer", "password": '<+secrets.getValue("artifactory_pw")>'},
            ("deployer", PW, None),
        ),
        ({"tokenRef": "env:ci_token"}, (None, None, TOKEN)),
        ({"token": "<+secrets.getValue('ci_token')>"}, (None, None, TOKEN)),
    ],
)
def test_the_secrets_a_spec_names_are_resolved_on_the_worker_that_fetches(
    store: None, spec: dict[str, str], auth: tuple[str | None, ...]
) -> None:
    # When the worker resolves the artifact, the secrets come from its store
    got = resolve(repo(**spec))
    assert (got.auth.username, got.auth.password, got.auth.token) == auth
    assert PW not in repr(got) and TOKEN not in repr(got)
    # And at plan time none is resolved
    assert resolve(repo(**spec), require_secrets=False).auth == HttpAuth()
    # And the values are masked in whatever this process prints
    from app.secrets import mask

    value = str(got.auth.password or got.auth.token)
    assert mask(f"sent {value}") == "sent ***"


def test_a_secret_the_worker_cannot_resolve_fails_the_fetch_naming_it(store: None) -> None:
    with pytest.raises(ArtifactAuthError) as info:
        fetch(repo(username="deployer", passwordRef="no_such_secret"))
    text = str(info.value)
    assert "spec.passwordRef 'no_such_secret': the secret cannot be resolved" in text
    assert info.value.error_class == "Authentication"
    with pytest.raises(ArtifactAuthError, match=r"spec\.token: .*'missing_token'"):
        fetch(repo(token='<+secrets.getValue("missing_token")>'))
    assert artifacts.check(repo(username="d", passwordRef="no_such_secret")) == []  # plan time


@pytest.mark.parametrize(
    "spec",
    [
        {"username": "deployer", "passwordRef": "artifactory_pw"},
        {"tokenRef": "ci_token"},
        {"username": "deployer"},
        {"url": "http://deployer:secret@127.0.0.1:9/libs/web-<tag>.tgz"},
    ],
)
def test_credentials_over_plain_http_are_refused_before_anything_is_fetched(
    store: None, spec: dict[str, str]
) -> None:
    art = repo(**{"url": "http://127.0.0.1:9/libs/web-<tag>.tgz", **spec})
    with pytest.raises(ArtifactError, match="credentials are sent over https only") as info:
        fetch(art)  # (port 9 would refuse the connection: the refusal comes first)
    assert ":secret@" not in str(info.value) and PW not in str(info.value)
    assert [p for p in artifacts.check(art) if "https only" in p]
    with pytest.raises(ArtifactError, match="https only"):
        fetch(repo("http://127.0.0.1:9/x.tgz"), credentials=Credentials(password="x"))
    assert artifacts.check(repo("http://127.0.0.1:9/x.tgz")) == []  # no credentials: fine


# --- S3 ------------------------------------------------------------------------------------------


# --- on the host ---------------------------------------------------------------------------------


def test_verify_remote_command(tmp_path: Path) -> None:
    target = tmp_path / "dir with 'quotes' $x" / "web app.tar.gz"
    target.parent.mkdir()
    target.write_bytes(b"deployed bytes")
    digest = hashlib.sha256(b"deployed bytes").hexdigest()

    def run(cmd: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["sh", "-c", cmd], capture_output=True, text=True, timeout=30)

    assert run(verify_remote_command(str(target), digest)).returncode == 0
    target.write_bytes(b"deployed bytez")
    bad = run(verify_remote_command(str(target), digest))
    assert bad.returncode == 1
    assert f"does not have sha256 {digest}" in bad.stderr
    missing = run(verify_remote_command(str(tmp_path / "gone.tar.gz"), digest))
    assert missing.returncode == 1
    with pytest.raises(ValueError):
        verify_remote_command("/opt/app\n; rm -rf /", digest)
    with pytest.raises(ValueError):
        verify_remote_command("/opt/app.tar.gz", "not-a-digest")


def test_gzip_of_a_fetch_is_readable(app_dir: Path) -> None:
    got = fetch(local(app_dir))
    with gzip.open(got.path) as gz:
        assert gz.read(512)
