"""app.artifacts: HTTP (Artifactory-like fake) and S3 (moto) sources, checksums, the cache and
its once-per-execution fetch. Everything runs on 127.0.0.1; no sshd. The pure parts are in
tests/unit/test_artifacts.py.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import pickle
import subprocess
import sys
import tarfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from app import artifacts
from app.artifacts import (
    ArtifactAuthError,
    ArtifactError,
    ArtifactUnavailableError,
    ChecksumError,
    Credentials,
    Fetched,
    fetch,
    httpfetch,
)
from app.errors import HostError, TransferError
from app.settings import get_settings
from tests.alloc import Allocator
from tests.conftest import moto_server
from tests.fakes.artifact_server import ArtifactServer

REGION = "us-east-1"
SECRET = "pa55-w0rd-never-shown"
APP_PATH = "/libs/web-app/1.4.2/web-app-1.4.2.tar.gz"


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


@pytest.fixture(scope="module")
def moto_url(tmp_path_factory: pytest.TempPathFactory, alloc: Allocator) -> Iterator[str]:
    """moto in server mode on 127.0.0.1, boto3 pointed at it (tests/conftest.moto_server)."""
    with moto_server(tmp_path_factory, alloc, region=REGION) as url:
        yield url


@pytest.fixture()
def s3(moto_url: str) -> Any:
    return boto3.client("s3", region_name=REGION, endpoint_url=moto_url)


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


@pytest.fixture(scope="module")
def tls_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the fake repositories' self-signed certificate is made."""
    return tmp_path_factory.mktemp("tls")


@pytest.fixture()
def repo(tls_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ArtifactServer]:
    """A repository with basic auth over https; the worker trusts its certificate through
    VMFARM_ARTIFACT_CA_BUNDLE (credentials are never sent over plain http)."""
    with ArtifactServer(username="deploy", password=SECRET, tls_dir=tls_dir) as server:
        assert server.ca_file is not None
        monkeypatch.setenv("VMFARM_ARTIFACT_CA_BUNDLE", str(server.ca_file))
        yield server


def local(path: Path, tag: str = "1.4.2", **spec: Any) -> dict[str, Any]:
    return {
        "type": "Local",
        "spec": {"path": str(path), **spec},
        "tag": tag,
        "fileName": f"web_app-{tag}.tar.gz",
    }


def http(url: str, tag: str = "1.4.2", atype: str = "Artifactory", **spec: Any) -> dict[str, Any]:
    return {
        "type": atype,
        "spec": {"url": url, **spec},
        "tag": tag,
        "fileName": f"web_app-{tag}.tar.gz",
    }


def basic(server: ArtifactServer, path: str = APP_PATH, **spec: Any) -> dict[str, Any]:
    """An Artifactory artifact on ``server`` with a ``<tag>`` URL template and a username."""
    template = server.url + path.replace("1.4.2", "<tag>")
    return http(template, **{"username": "deploy", "passwordRef": "artifactory_password", **spec})


CREDS = Credentials(password=SECRET)


# --- the reproducible pack ----------------------------------------------------------------------


# --- one content, three sources -----------------------------------------------------------------


def test_local_http_and_s3_give_the_same_sha256(
    app_dir: Path, repo: ArtifactServer, s3: Any, tmp_path: Path
) -> None:
    from_local = fetch(local(app_dir), execution_id="ex-same")
    data = Path(from_local.path).read_bytes()

    repo.add(APP_PATH, data)
    # (no checksum known before the download: the bytes really come over the wire)
    from_http = fetch(basic(repo, allowUnverified=True), execution_id="ex-same", credentials=CREDS)

    s3.create_bucket(Bucket="releases")
    s3.put_object(
        Bucket="releases",
        Key="web-app/1.4.2/web-app.tar.gz",
        Body=data,
        Metadata={"sha256": from_local.sha256},
    )
    from_s3 = fetch(
        {
            "type": "AmazonS3",
            "tag": "1.4.2",
            "fileName": "x",
            "spec": {
                "bucket": "releases",
                "key": "web-app/<+artifact.tag>/web-app.tar.gz",
                "region": REGION,
            },
        },
        execution_id="ex-same",
    )

    assert from_local.sha256 == from_http.sha256 == from_s3.sha256
    assert from_local.path == from_http.path == from_s3.path  # one cached file per content
    assert from_http.source == f"Artifactory {repo.url}{APP_PATH}"
    assert from_s3.source == f"AmazonS3 s3://releases/web-app/1.4.2/web-app.tar.gz ({REGION})"
    assert ("GET", APP_PATH, "Basic") in repo.log
    assert SECRET not in repr(from_http) and "deploy" not in from_http.source

    # The pack unpacks to the folder.
    out = tmp_path / "unpacked"
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(out, filter="tar")
    assert (out / "bin" / "start.sh").read_text() == (app_dir / "bin" / "start.sh").read_text()


# --- checksums -----------------------------------------------------------------------------------


def test_corrupted_download_raises_checksum_error(repo: ArtifactServer, home: Path) -> None:
    data = b"release bytes " * 1000
    repo.add(APP_PATH, data)
    repo.checksum_header = True
    repo.corrupt = True
    with pytest.raises(ChecksumError) as info:
        fetch(basic(repo), execution_id="ex-corrupt", credentials=CREDS)
    err = info.value
    good = hashlib.sha256(data).hexdigest()
    bad = hashlib.sha256(bytes([data[0] ^ 0xFF]) + data[1:]).hexdigest()
    text = str(err)
    assert f"Artifactory {repo.url}{APP_PATH}" in text
    assert good in text and bad in text and "X-Checksum-Sha256" in text
    assert (err.expected, err.actual, err.artifact) == (
        good,
        bad,
        f"Artifactory {repo.url}{APP_PATH}",
    )
    assert isinstance(err, TransferError) and isinstance(err, HostError)
    assert err.error_class == "Unknown"
    assert SECRET not in text
    copy = pickle.loads(pickle.dumps(err))
    assert type(copy) is ChecksumError and str(copy) == text and copy.actual == bad
    # Nothing of the bad download stays in the cache, and the failure is not remembered.
    cache = home / "cache" / "artifacts"
    assert not [p for p in cache.iterdir() if p.is_file()]
    repo.corrupt = False
    got = fetch(basic(repo), execution_id="ex-corrupt", credentials=CREDS)
    assert got.sha256 == good and got.verified and got.checksum_from == "X-Checksum-Sha256"


def test_sibling_sha256_file_verifies(repo: ArtifactServer) -> None:
    data = b"nexus raw artifact\n" * 50
    repo.add(APP_PATH, data)
    repo.siblings = True
    got = fetch(basic(repo, atype="Nexus3Registry"), credentials=CREDS)
    assert got.verified and got.checksum_from == "<url>.sha256"
    assert got.sha256 == hashlib.sha256(data).hexdigest()
    repo.add("/libs/web-app/1.4.2/other.tar.gz", b"other bytes")
    repo.corrupt = True
    with pytest.raises(ChecksumError, match=r"expected [0-9a-f]{64} \(from <url>.sha256\)"):
        fetch(basic(repo, path="/libs/web-app/1.4.2/other.tar.gz"), credentials=CREDS)


def test_spec_checksum_wins_and_no_checksum_anywhere_is_refused_unless_allowed(
    repo: ArtifactServer, caplog: pytest.LogCaptureFixture, home: Path
) -> None:
    data = b"plain web server\n"
    repo.add(APP_PATH, data)
    digest = hashlib.sha256(data).hexdigest()
    # A remote artifact with no checksum from any source is refused, its bytes discarded
    with pytest.raises(ArtifactError) as info:
        fetch(basic(repo), credentials=CREDS)
    text = str(info.value)
    assert f"artifact Artifactory {repo.url}{APP_PATH}: refused: no checksum" in text
    assert "spec.sha256" in text and "spec.allowUnverified: true" in text
    assert not [p for p in (home / "cache" / "artifacts").iterdir() if p.is_file()]
    # ... unless the artifact says allowUnverified: true (then it is said, not verified)
    with caplog.at_level(logging.INFO, logger="vmfarm.artifacts"):
        got = fetch(basic(repo, allowUnverified=True), credentials=CREDS)
    assert got.sha256 == digest and not got.verified and got.checksum_from is None
    assert "neither the spec nor the repository gives a checksum" in caplog.text
    assert SECRET not in caplog.text

    checked = fetch(basic(repo, checksum=f"sha256:{digest.upper()}"), credentials=CREDS)
    assert checked.verified and checked.checksum_from == "spec.checksum"
    with pytest.raises(ChecksumError, match=r"spec\.sha256"):
        fetch(basic(repo, sha256="ab" * 32), credentials=CREDS)
    with pytest.raises(ArtifactError, match="must be a sha256"):
        fetch(basic(repo, checksum="md5:0123"), credentials=CREDS)


# --- once per execution --------------------------------------------------------------------------


def test_twenty_concurrent_fetches_hit_the_server_once(repo: ArtifactServer) -> None:
    data = os.urandom(256 * 1024)
    repo.add(APP_PATH, data)
    repo.checksum_header = True
    repo.delay = 0.2  # the first download is still running when the others ask
    start = threading.Barrier(20)
    results: list[Fetched] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def host() -> None:
        try:
            start.wait()
            got = fetch(basic(repo), execution_id="ex-20", credentials=CREDS)
            with lock:
                results.append(got)
        except BaseException as exc:
            with lock:
                errors.append(exc)

    threads = [threading.Thread(target=host) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(results) == 20
    assert repo.count("GET", APP_PATH) == 1
    assert repo.count("HEAD", APP_PATH) == 1
    assert len({(r.path, r.sha256) for r in results}) == 1
    assert sum(not r.from_cache for r in results) == 1
    assert results[0].sha256 == hashlib.sha256(data).hexdigest()


def test_worker_processes_on_one_machine_share_the_fetch(repo: ArtifactServer, home: Path) -> None:
    repo.add(APP_PATH, b"shared by processes" * 1000)
    repo.checksum_header = True
    repo.delay = 0.2
    code = (
        "import sys\n"
        "from app.artifacts import Credentials, fetch\n"
        "got = fetch({'type': 'Artifactory', 'tag': '1.4.2', 'spec': {'url': sys.argv[1], "
        "'username': 'deploy'}}, execution_id='ex-procs', "
        "credentials=Credentials(password=sys.argv[2]))\n"
        "print(got.sha256)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, repo.url + APP_PATH, SECRET],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert len({out.strip() for out, _ in outs}) == 1
    assert repo.count("GET", APP_PATH) == 1


def test_later_executions_reuse_the_cache_only_with_a_known_checksum(
    repo: ArtifactServer, home: Path
) -> None:
    data = b"v1.4.2" * 1000
    repo.add(APP_PATH, data)
    repo.checksum_header = True
    first = fetch(basic(repo), execution_id="ex-1", credentials=CREDS)
    second = fetch(basic(repo), execution_id="ex-2", credentials=CREDS)
    assert not first.from_cache and second.from_cache and second.verified
    assert repo.count("GET", APP_PATH) == 1 and repo.count("HEAD", APP_PATH) == 2

    # A cached file that no longer matches its name is not used.
    Path(first.path).write_bytes(b"tampered")
    third = fetch(basic(repo), execution_id="ex-3", credentials=CREDS)
    assert not third.from_cache and repo.count("GET", APP_PATH) == 2
    assert Path(third.path).read_bytes() == data

    # Without any checksum, each execution downloads again; within one it does not.
    repo.checksum_header = False
    repo.reset_counts()
    unverified = basic(repo, allowUnverified=True)
    fetch(unverified, execution_id="ex-4", credentials=CREDS)
    fetch(unverified, execution_id="ex-4", credentials=CREDS)
    fetch(unverified, execution_id="ex-5", credentials=CREDS)
    assert repo.count("GET", APP_PATH) == 2

    artifacts.forget_execution("ex-4")
    assert not (home / "cache" / "artifacts" / "index" / "ex-4").exists()


# --- HTTP behaviour ------------------------------------------------------------------------------


def test_503_then_200_is_retried(repo: ArtifactServer, caplog: pytest.LogCaptureFixture) -> None:
    data = b"flaky repository\n" * 100
    repo.add(APP_PATH, data)
    repo.checksum_header = True
    repo.fail_next(APP_PATH, status=503)
    with caplog.at_level(logging.WARNING, logger="vmfarm.artifacts"):
        got = fetch(basic(repo), credentials=CREDS)
    assert got.sha256 == hashlib.sha256(data).hexdigest() and got.verified
    assert repo.count("GET", APP_PATH) == 2
    assert "HTTP 503; retrying" in caplog.text

    repo.fail_next(APP_PATH, status=502, times=10, method="HEAD")
    with pytest.raises(
        ArtifactUnavailableError, match=r"HTTP 502 \(gave up after 5 attempts"
    ) as info:
        fetch(basic(repo), credentials=CREDS)
    assert info.value.error_class == "Connectivity"


def test_unreachable_repository(
    monkeypatch: pytest.MonkeyPatch, free_port: Callable[[], int]
) -> None:
    monkeypatch.setattr(httpfetch, "ATTEMPTS", 2)
    with pytest.raises(ArtifactUnavailableError, match="cannot connect") as info:
        fetch(http(f"http://127.0.0.1:{free_port()}/libs/app-<tag>.tar.gz"))
    assert "gave up after 2 attempts" in str(info.value)


def test_wrong_password_is_a_clear_error_without_the_password(
    repo: ArtifactServer, caplog: pytest.LogCaptureFixture, home: Path
) -> None:
    repo.add(APP_PATH, b"secret build")
    wrong = "Wr0ng-" + SECRET
    with caplog.at_level(logging.DEBUG), pytest.raises(ArtifactAuthError) as info:
        fetch(basic(repo), execution_id="ex-auth", credentials=Credentials(password=wrong))
    err = info.value
    text = str(err)
    assert "refused the credentials of user 'deploy' (HTTP 401)" in text
    assert f"{repo.url}{APP_PATH}" in text
    assert err.error_class == "Authentication"
    for secret in (wrong, SECRET):
        assert secret not in text and secret not in repr(err)
        assert secret not in caplog.text
        assert secret not in repr(Credentials(password=secret))
    assert wrong not in str(pickle.loads(pickle.dumps(err)).__dict__)
    assert repo.count("GET", APP_PATH) == 0  # the HEAD was refused: no download attempted

    with pytest.raises(ArtifactAuthError, match="needs credentials"):
        fetch(http(repo.url + APP_PATH))
    with pytest.raises(ArtifactAuthError, match="passwordRef 'artifactory_password'"):
        fetch(basic(repo))
    assert artifacts.check(basic(repo)) == []  # at plan time the secret may come later


def test_credentials_in_the_url_and_bearer_tokens(
    repo: ArtifactServer, tls_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo.add(APP_PATH, b"payload")
    repo.checksum_header = True
    url = repo.url.replace("https://", f"https://deploy:{SECRET}@") + APP_PATH
    got = fetch(http(url + "?download=1"))
    assert got.source == f"Artifactory {repo.url}{APP_PATH}?…"
    assert SECRET not in repr(got)

    with ArtifactServer(
        token="tok-123-secret", checksum_header=True, tls_dir=tls_dir / "bearer"
    ) as bearer:
        assert bearer.ca_file is not None
        monkeypatch.setenv("VMFARM_ARTIFACT_CA_BUNDLE", str(bearer.ca_file))
        bearer.add("/a/app.zip", b"zip bytes")
        got = fetch(
            http(bearer.url + "/a/app.zip", atype="Http"), credentials={"token": "tok-123-secret"}
        )
        assert got.ext == "zip" and ("GET", "/a/app.zip", "Bearer") in bearer.log
        with pytest.raises(ArtifactAuthError, match="the bearer token") as info:
            fetch(http(bearer.url + "/a/app.zip"), credentials=Credentials(token="nope-x"))
        assert "nope-x" not in str(info.value)


def test_a_password_ref_is_resolved_from_the_workers_secrets_when_fetching(
    repo: ArtifactServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from app import secrets

    # Given the password only in the worker's secrets (env backend), named by passwordRef
    monkeypatch.setenv("VMFARM_SECRETS", "env")
    monkeypatch.setenv("VMFARM_SECRET_ARTIFACTORY_PASSWORD", SECRET)
    secrets.reset()
    repo.add(APP_PATH, b"by reference")
    repo.checksum_header = True
    try:
        # When it is fetched without any credentials passed in
        with caplog.at_level(logging.DEBUG):
            got = fetch(basic(repo), execution_id="ex-ref")
        # Then the repository received them, and they show nowhere
        assert Path(got.path).read_bytes() == b"by reference" and got.verified
        assert ("GET", APP_PATH, "Basic") in repo.log
        assert SECRET not in caplog.text and SECRET not in repr(got)
        # And a secret the worker does not hold fails the fetch naming it, before any request
        repo.reset_counts()
        with pytest.raises(ArtifactAuthError) as info:
            fetch(basic(repo, passwordRef="account.nexus_password"))
        assert "spec.passwordRef 'account.nexus_password'" in str(info.value)
        assert "VMFARM_SECRET_NEXUS_PASSWORD" in str(info.value)  # where it was looked for
        assert repo.log == []
    finally:
        secrets.reset()


def test_credentials_over_plain_http_never_leave_the_worker() -> None:
    # Given a plain-http repository that would accept them
    with ArtifactServer(username="deploy", password=SECRET) as plain:
        plain.add(APP_PATH, b"bytes")
        for art, creds in [
            (basic(plain), CREDS),
            (
                http(plain.url + APP_PATH, username="deploy", passwordRef="artifactory_password"),
                None,
            ),
            (http(plain.url + APP_PATH, atype="Http"), Credentials(token="tok-never-sent")),
        ]:
            # When it is fetched, it is refused before any request
            with pytest.raises(ArtifactError, match="credentials are sent over https only"):
                fetch(art, credentials=creds)
        assert plain.log == []


def test_redirects_keep_credentials_on_the_same_origin_only(repo: ArtifactServer) -> None:
    with ArtifactServer() as storage:
        storage.add("/blob/abc", b"redirected bytes")
        repo.redirects[APP_PATH] = storage.url + "/blob/abc"
        got = fetch(
            basic(repo, sha256=hashlib.sha256(b"redirected bytes").hexdigest()), credentials=CREDS
        )
    assert Path(got.path).read_bytes() == b"redirected bytes"
    assert ("GET", "/blob/abc", "") in storage.log  # no Authorization sent to the other host


def test_not_found_and_bad_specs(repo: ArtifactServer) -> None:
    with pytest.raises(ArtifactError, match=r"not found \(HTTP 404\)") as info:
        fetch(basic(repo, path="/libs/none-1.4.2.tar.gz"), credentials=CREDS)
    assert info.value.error_class == "Unknown"
    with pytest.raises(ArtifactError, match="connectorRef 'artifactory_connector' is not"):
        fetch(
            {
                "type": "Artifactory",
                "tag": "1",
                "spec": {"connectorRef": "artifactory_connector", "artifactPath": "/apps/"},
            }
        )
    with pytest.raises(ArtifactError, match="needs the artifact's tag"):
        fetch(http(repo.url + "/libs/app-<tag>.tar.gz", tag=""))
    with pytest.raises(ArtifactError, match="unresolved expression"):
        fetch(http(repo.url + "/libs/<+input>.tar.gz"))
    with pytest.raises(ArtifactError, match="not supported"):
        fetch({"type": "CustomArtifact", "tag": "1", "spec": {}})
    assert artifacts.check({"type": "Http", "tag": "1", "spec": {}}) == [
        "Http artifact: set spec.url, or spec.baseUrl with the repository fields"
    ]


# --- S3 ------------------------------------------------------------------------------------------


def test_s3_checksums_and_errors(s3: Any) -> None:
    s3.create_bucket(Bucket="builds")
    data = b"s3 artifact\n" * 500
    digest = hashlib.sha256(data).hexdigest()
    s3.put_object(Bucket="builds", Key="web/2.0/web.tar.gz", Body=data, Metadata={"sha256": digest})
    spec = {"bucketName": "builds", "filePath": "web/<tag>/web.tar.gz", "region": REGION}
    art = {"type": "AmazonS3", "tag": "2.0", "fileName": "x", "spec": spec}
    got = fetch(art, execution_id="ex-s3")
    assert got.verified and got.checksum_from == "S3 metadata sha256" and got.sha256 == digest
    again = fetch(art, execution_id="ex-s3-later")
    assert again.from_cache and again.path == got.path

    s3.put_object(Bucket="builds", Key="web/2.1/web.tar.gz", Body=b"damaged bytes")
    meant = hashlib.sha256(b"built bytes").hexdigest()
    s3.put_object(
        Bucket="builds", Key="web/2.1/web.tar.gz.sha256", Body=f"{meant}  web.tar.gz\n".encode()
    )
    with pytest.raises(ChecksumError, match=r"AmazonS3 s3://builds/web/2.1/web.tar.gz") as info:
        fetch({**art, "tag": "2.1"})
    assert info.value.checksum_from == "<key>.sha256" and info.value.expected == meant

    s3.put_object(Bucket="builds", Key="web/2.2/web.tar.gz", Body=data)
    with pytest.raises(ChecksumError, match=r"spec\.sha256"):
        fetch({**art, "tag": "2.2", "spec": {**spec, "sha256": "0" * 64}})
    with pytest.raises(ArtifactError, match=r"refused: no checksum .*ChecksumSHA256") as refused:
        fetch({**art, "tag": "2.2"})
    assert "s3://builds/web/2.2/web.tar.gz" in str(refused.value)
    plain = fetch({**art, "tag": "2.2", "spec": {**spec, "allowUnverified": True}})
    assert not plain.verified and plain.sha256 == digest

    s3.put_object(Bucket="builds", Key="web/3.0/web.tgz", Body=b"tgz", ChecksumAlgorithm="SHA256")
    tgz = fetch({**art, "tag": "3.0", "spec": {**spec, "filePath": "web/<tag>/web.tgz"}})
    assert tgz.verified and tgz.checksum_from == "S3 ChecksumSHA256" and tgz.ext == "tgz"

    with pytest.raises(ArtifactError, match="does not exist") as missing:
        fetch({**art, "tag": "9.9"})
    assert missing.value.error_class == "Unknown"
    with pytest.raises(ArtifactError, match="does not exist"):
        fetch({**art, "spec": {**spec, "bucketName": "no-such-bucket"}})


# --- on the host ---------------------------------------------------------------------------------


# --- connectors ----------------------------------------------------------------------------------


def test_an_artifactory_connector_gives_the_server_and_the_password_by_reference(
    repo: ArtifactServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The reference's service form (connectorRef + artifactPath + tag) with a connector in
    Harness's shape: the plan names the server and the password's secret id, the worker that
    fetches resolves the secret and the repository receives it; it shows nowhere."""
    import json
    import shutil

    from app import secrets
    from app.definitions.loader import choose_pipeline, load
    from app.definitions.resolve import resolve

    # Given the good pipeline files with an Artifactory service that names only a connector,
    # and the connector's password only in the worker's secrets
    files = tmp_path / "files"
    shutil.copytree(Path(__file__).resolve().parents[1] / "data" / "good", files)
    (files / "service.yaml").write_text(
        "apiVersion: v1\nkind: Service\nmetadata: {name: hello-app, identifier: hello_app}\n"
        "spec:\n  serviceDefinition:\n    type: SSH\n    spec:\n      artifacts:\n"
        "        primary:\n          type: Artifactory\n          spec:\n"
        "            connectorRef: account.libs\n            artifactPath: /libs/web-app/\n"
        "            fileName: web-app-<+artifact.tag>.tar.gz\n            tag: <+input>\n"
        "      variables:\n        - {name: app_port, type: String, value: '8080'}\n"
        "        - {name: greeting, type: String, value: hi}\n"
    )
    (files / "connectors.yaml").write_text(
        "connector:\n  name: libs\n  identifier: libs\n  orgIdentifier: default\n"
        "  type: Artifactory\n  spec:\n"
        f"    artifactoryServerUrl: {repo.url}\n"
        "    auth:\n      type: UsernamePassword\n      spec:\n        username: deploy\n"
        "        passwordRef: account.artifactory_password\n"
    )
    repo.add("/libs/web-app/web-app-2.0.1.tar.gz", b"from the connector's server")
    repo.checksum_header = True
    monkeypatch.setenv("VMFARM_SECRETS", "env")
    monkeypatch.setenv("VMFARM_SECRET_ARTIFACTORY_PASSWORD", SECRET)
    secrets.reset()
    try:
        # When the pipeline is planned and the worker fetches the plan's artifact
        bundle = load([files], inputs={"tag": "2.0.1"}, require_inputs=True)
        plan = resolve(bundle, choose_pipeline(bundle, None), execution_id="ex-conn").to_json()
        artifact = plan["stages"][0]["artifact"]
        with caplog.at_level(logging.DEBUG):
            got = fetch(artifact, execution_id="ex-conn")
        # Then the bytes came from the connector's server, with its credentials
        assert Path(got.path).read_bytes() == b"from the connector's server" and got.verified
        assert ("GET", "/libs/web-app/web-app-2.0.1.tar.gz", "Basic") in repo.log
        # And the plan holds the secret's id, never its value; no log shows it
        assert "account.artifactory_password" in json.dumps(plan)
        assert SECRET not in json.dumps(plan) and SECRET not in caplog.text
        # And a connector naming a secret the worker does not hold fails the fetch, naming it
        (files / "connectors.yaml").write_text(
            (files / "connectors.yaml")
            .read_text()
            .replace("account.artifactory_password", "account.no_such_password")
        )
        bundle = load([files], inputs={"tag": "2.0.1"}, require_inputs=True)
        plan = resolve(bundle, choose_pipeline(bundle, None), execution_id="ex-c2").to_json()
        repo.reset_counts()
        with pytest.raises(ArtifactAuthError, match=r"'account\.no_such_password'"):
            fetch(plan["stages"][0]["artifact"], execution_id="ex-c2")
        assert repo.log == []
    finally:
        secrets.reset()


def test_an_s3_artifact_fetches_with_its_aws_connectors_keys(
    s3: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An AmazonS3 artifact naming an Aws connector (ManualConfig): the plan holds the access
    key and the secret key's id; the worker, which has no AWS credentials of its own, fetches
    with the connector's keys."""
    from app import secrets
    from app.definitions.loader import choose_pipeline, load
    from app.definitions.resolve import resolve

    s3.create_bucket(Bucket="connector-builds")
    s3.put_object(
        Bucket="connector-builds",
        Key="web/3.1/web.tar.gz",
        Body=b"by the connector",
        ChecksumAlgorithm="SHA256",
    )
    files = tmp_path / "files"
    import shutil

    shutil.copytree(Path(__file__).resolve().parents[1] / "data" / "good", files)
    (files / "service.yaml").write_text(
        "apiVersion: v1\nkind: Service\nmetadata: {name: hello-app, identifier: hello_app}\n"
        "spec:\n  serviceDefinition:\n    type: SSH\n    spec:\n      artifacts:\n"
        "        primary:\n          type: AmazonS3\n          spec:\n"
        "            connectorRef: aws_builds\n            bucketName: connector-builds\n"
        f"            filePath: web/<+artifact.tag>/web.tar.gz\n            region: {REGION}\n"
        "            tag: <+input>\n"
        "      variables:\n        - {name: app_port, type: String, value: '8080'}\n"
        "        - {name: greeting, type: String, value: hi}\n"
    )
    (files / "connectors.yaml").write_text(
        "connector:\n  name: aws_builds\n  identifier: aws_builds\n  type: Aws\n  spec:\n"
        "    credential:\n      type: ManualConfig\n      spec:\n"
        "        accessKey: AKIABUILDS0000000001\n        secretKeyRef: builds_secret_key\n"
    )
    bundle = load([files], inputs={"tag": "3.1"}, require_inputs=True)
    artifact = resolve(bundle, choose_pipeline(bundle, None), execution_id="ex-s3c").to_json()[
        "stages"
    ][0]["artifact"]
    assert (artifact["spec"]["accessKey"], artifact["spec"]["secretKeyRef"]) == (
        "AKIABUILDS0000000001",
        "builds_secret_key",
    )
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("VMFARM_SECRETS", "env")
    secrets.reset()
    try:
        # Without the secret on the worker, the fetch fails naming it
        with pytest.raises(ArtifactAuthError, match=r"'builds_secret_key'"):
            fetch(artifact, execution_id="ex-s3c")
        monkeypatch.setenv("VMFARM_SECRET_BUILDS_SECRET_KEY", "builds-secret-never-shown")
        secrets.reset()
        got = fetch(artifact, execution_id="ex-s3c")
        assert Path(got.path).read_bytes() == b"by the connector" and got.verified
    finally:
        secrets.reset()
