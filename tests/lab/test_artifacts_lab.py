"""Artifacts on 8 lab hosts: one pipeline (a Release unit, then a start script) deploys from a
local folder, from an HTTPS repository with basic auth (a local server; the password is a
secret of the worker, named by passwordRef) and from S3 (moto); the artifact is fetched once
per execution; a corrupted download fails with a checksum error; a rollback to the release the
hosts still hold fetches nothing. A remote artifact without any checksum is refused unless it
says allowUnverified; credentials over plain http are refused before anything runs; hosts that
download the artifact themselves never show its URL or password to ``ps``."""

from __future__ import annotations

import hashlib
import json
import shutil
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.alloc import Allocator
from tests.conftest import base_env, run_vmfarm
from tests.fakes.artifact_server import ArtifactServer

PASSWORD = "s3cr3t-pw-only-in-the-worker"

PIPELINE = textwrap.dedent("""\
    apiVersion: v1
    kind: Environment
    metadata: {name: lab}
    spec: {type: PreProduction}
    ---
    apiVersion: v1
    kind: Pipeline
    metadata: {name: releases}
    spec:
      stages:
        - stage:
            name: Deploy
            identifier: deploy
            type: Deployment
            spec:
              service: {serviceRef: app}
              environment:
                environmentRef: lab
                infrastructureDefinitions: [{identifier: lab}]
              strategy: {type: Rolling, phases: [4]}
              execution:
                steps:
                  - step:
                      type: Command
                      name: Install
                      identifier: install
                      spec:
                        commandUnits:
                          - identifier: paths
                            type: Setup
                            spec: {paths: [/opt/rel, /opt/rel/logs], mode: "0750"}
                          - identifier: release
                            type: Release
                            spec: {deploymentPath: /opt/rel, keep: 3}
                          - identifier: start
                            type: Script
                            spec:
                              source:
                                type: Inline
                                spec:
                                  script: |
                                    cat /opt/rel/current/content.txt > /opt/rel/running
                                    echo "<+artifact.checksum> <+artifact.path>" > /opt/rel/info
    """)


def _service(kind: str, spec: str) -> str:
    return textwrap.dedent(f"""\
        apiVersion: v1
        kind: Service
        metadata: {{name: app}}
        spec:
          serviceDefinition:
            type: Ssh
            spec:
              artifacts:
                primary:
                  type: {kind}
                  spec:
        """) + textwrap.indent(textwrap.dedent(spec), " " * 12)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, alloc: Allocator) -> Iterator[dict[str, Any]]:
    """Two versions of an app as folders, as .tar.gz on an HTTP server with basic auth, and
    in a moto S3 bucket."""
    import boto3
    from moto.server import ThreadedMotoServer

    from app.artifacts.pack import pack_folder

    root = tmp_path_factory.mktemp("artifacts")
    packed: dict[str, bytes] = {}
    for version in ("1.0", "2.0"):
        folder = root / f"app-{version}"
        folder.mkdir()
        (folder / "content.txt").write_text(f"app version {version}\n")
        pack_folder(folder, root / f"app-{version}.tar.gz")
        packed[version] = (root / f"app-{version}.tar.gz").read_bytes()
    # The repository publishes <file>.sha256 beside each file (as Artifactory and Nexus can).
    server = ArtifactServer(
        username="deployer", password=PASSWORD, siblings=True, tls_dir=root / "tls"
    ).start()
    assert server.ca_file is not None
    for version, data in packed.items():
        server.add(f"/repo/app/{version}/app-{version}.tar.gz", data)
    lease = alloc.port()
    port = lease.port
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    moto.start()
    aws = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    s3 = boto3.client(
        "s3",
        region_name="us-east-1",
        endpoint_url=aws["AWS_ENDPOINT_URL"],
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    s3.create_bucket(Bucket="builds")
    for version, data in packed.items():
        s3.put_object(
            Bucket="builds",
            Key=f"app/app-{version}.tar.gz",
            Body=data,
            Metadata={"sha256": hashlib.sha256(data).hexdigest()},
        )
    # The worker trusts the repository's certificate and holds its password as a secret.
    worker = {
        **aws,
        "VMFARM_ARTIFACT_CA_BUNDLE": str(server.ca_file),
        "VMFARM_SECRETS": "env",
        "VMFARM_SECRET_REPO_PASSWORD": PASSWORD,
    }
    try:
        yield {"root": root, "server": server, "aws": aws, "packed": packed, "worker": worker}
    finally:
        server.stop()
        moto.stop()
        lease.release()


def _files(
    tmp_path: Path, world: dict[str, Any], source: str, *, checksum: bool = True
) -> list[str]:
    specs = {
        "local": ("Local", f"path: {world['root']}/app-1.0\ntag: <+input>\n"),
        "http": (
            "Http",
            f"url: {world['server'].url}/repo/app/<+artifact.tag>/"
            "app-<+artifact.tag>.tar.gz\nusername: deployer\n"
            "passwordRef: repo_password\ntag: <+input>\n",
        ),
        "s3": (
            "AmazonS3",
            "bucket: builds\nkey: app/app-<+artifact.tag>.tar.gz\n"
            "region: us-east-1\ntag: <+input>\n",
        ),
    }
    kind, spec = specs[source]
    (tmp_path / "service.yaml").write_text(_service(kind, spec))
    # <+artifact.checksum> asks the repository (or this run's fetch) for the checksum.
    (tmp_path / "pipeline.yaml").write_text(
        PIPELINE if checksum else PIPELINE.replace("<+artifact.checksum> ", "")
    )
    return [str(tmp_path / "service.yaml"), str(tmp_path / "pipeline.yaml")]


def _on_hosts(lab8: Any, name: str) -> list[str]:
    out = []
    for h in lab8.hosts:
        p = Path(h.host_dir) / "opt" / "rel" / name
        out.append(p.read_text() if p.exists() else "")
    return out


def _current(lab8: Any) -> list[str]:
    return [
        str((Path(h.host_dir) / "opt" / "rel" / "current").readlink())
        if (Path(h.host_dir) / "opt" / "rel" / "current").is_symlink()
        else ""
        for h in lab8.hosts
    ]


def _run(env: dict[str, str], files: list[str], lab8: Any, tag: str) -> tuple[int, Any]:
    res = run_vmfarm(
        "run",
        *files,
        str(lab8.infrastructure_file),
        "--set",
        f"tag={tag}",
        "-o",
        "json",
        env=env,
        timeout=300,
    )
    assert res.stdout.strip(), res.stderr
    return res.returncode, json.loads(res.stdout)


def _clean(lab8: Any) -> None:
    import shutil

    for h in lab8.hosts:
        shutil.rmtree(Path(h.host_dir) / "opt" / "rel", ignore_errors=True)


@pytest.mark.parametrize("source", ["local", "http", "s3"])
def test_one_pipeline_deploys_the_same_files_from_each_source(
    source: str, world: dict[str, Any], lab8: Any, tmp_path: Path
) -> None:
    _clean(lab8)
    env = base_env(VMFARM_HOME=str(tmp_path / "home"), **world["worker"])
    world["server"].reset_counts()
    code, report = _run(env, _files(tmp_path, world, source), lab8, "1.0")
    assert code == 0, report.get("error")
    # identical files on every host, from whichever source
    assert _on_hosts(lab8, "running") == ["app version 1.0\n"] * 8
    assert _current(lab8) == ["releases/1.0"] * 8
    logs = run_vmfarm("logs", report["id"], "-o", "json", env=env).stdout
    digest = hashlib.sha256(world["packed"]["1.0"]).hexdigest()
    assert logs.count(f"sha256 {digest}") == 8  # the same verified bytes reached every host
    info = _on_hosts(lab8, "info")[0].split()
    assert info[0] == digest and info[1].endswith(
        {"local": "app-1.0", "http": "app-1.0.tar.gz", "s3": "app-1.0.tar.gz"}[source]
    )
    logs_dir = Path(lab8.hosts[0].host_dir) / "opt" / "rel" / "logs"
    assert logs_dir.is_dir() and oct(logs_dir.stat().st_mode)[-3:] == "750"
    if source == "http":
        # fetched once for the execution, not once per host; the password never shows
        assert world["server"].count("GET", "/repo/app/1.0/app-1.0.tar.gz") == 1
        assert PASSWORD not in logs + json.dumps(report)


def test_a_corrupted_download_fails_with_a_checksum_error(
    world: dict[str, Any], lab8: Any, tmp_path: Path
) -> None:
    _clean(lab8)
    env = base_env(VMFARM_HOME=str(tmp_path / "home"), **world["worker"])
    world["server"].corrupt = True
    try:
        code, report = _run(env, _files(tmp_path, world, "http"), lab8, "2.0")
    finally:
        world["server"].corrupt = False
    assert code == 1
    host = report["stages"][0]["hosts"][0]
    error = host["steps"][0]["error"]
    assert "sha256 mismatch" in error and "app-2.0.tar.gz" in error
    assert host["host"] in error
    assert _on_hosts(lab8, "running")[0] == ""


def test_rollback_to_a_release_the_hosts_hold_fetches_nothing(
    world: dict[str, Any], lab8: Any, tmp_path: Path
) -> None:
    _clean(lab8)
    env = base_env(VMFARM_HOME=str(tmp_path / "home"), **world["worker"])
    files = _files(tmp_path, world, "http", checksum=False)
    assert _run(env, files, lab8, "1.0")[0] == 0
    code, second = _run(env, files, lab8, "2.0")
    assert code == 0 and _current(lab8) == ["releases/2.0"] * 8
    held = json.loads(run_vmfarm("artifacts", "app", "-o", "json", env=env).stdout)
    assert {tuple(i["releases"]) for i in held["instances"]} == {("2.0", "1.0")}
    world["server"].reset_counts()
    res = run_vmfarm("rollback", second["id"], "-o", "json", env=env, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr
    assert world["server"].log == []  # no request reached the repository
    assert _current(lab8) == ["releases/1.0"] * 8
    assert _on_hosts(lab8, "running") == ["app version 1.0\n"] * 8
    held = json.loads(run_vmfarm("artifacts", "app", "-o", "json", env=env).stdout)
    assert {i["version"] for i in held["instances"]} == {"1.0"}


def test_a_hostile_archive_is_refused_before_anything_reaches_the_hosts(
    world: dict[str, Any], lab8: Any, tmp_path: Path
) -> None:
    import io
    import tarfile

    # Given a release whose archive climbs out of its folder, links to /etc and is setuid
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, kind, mode, link in [
            ("../escaped", tarfile.REGTYPE, 0o644, ""),
            ("passwd", tarfile.SYMTYPE, 0o777, "/etc/passwd"),
            ("su", tarfile.REGTYPE, 0o4755, ""),
        ]:
            m = tarfile.TarInfo(name)
            m.type, m.mode, m.linkname = kind, mode, link
            data = b"x" if kind == tarfile.REGTYPE else b""
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    world["server"].add("/repo/app/6.6/app-6.6.tar.gz", buf.getvalue())
    _clean(lab8)
    env = base_env(VMFARM_HOME=str(tmp_path / "home"), **world["worker"])
    # When it is deployed
    code, report = _run(env, _files(tmp_path, world, "http", checksum=False), lab8, "6.6")
    # Then every host fails in the Release unit, the message names the members, and nothing
    # was pushed or unpacked anywhere
    assert code == 1
    errors = {
        s["error"]
        for h in report["stages"][0]["hosts"]
        for s in h["steps"]
        if s["status"] == "FAILED"
    }
    assert len(errors) == 1
    (error,) = errors
    assert "app-6.6.tar.gz is refused before anything is unpacked" in error
    assert "'../escaped' would land outside" in error and "'/etc/passwd'" in error
    for h in lab8.hosts:
        rel = Path(h.host_dir) / "opt" / "rel"
        assert not (rel / "releases" / "6.6").exists()
        assert not (rel / "incoming" / "app-6.6.tar.gz").exists()
        assert not (rel / "escaped").exists()


# --- credentials by reference, checksums, plain http ----------------------------------------


def _kept_bytes(home: Path) -> bytes:
    """Everything the run kept under VMFARM_HOME but the artifact cache: the ledger (plan,
    step and log rows), the broker's messages (task arguments) and the results."""
    return b"".join(
        p.read_bytes()
        for p in home.rglob("*")
        if p.is_file() and "cache" not in p.relative_to(home).parts
    )


def test_a_password_named_by_reference_reaches_the_repository_and_is_kept_nowhere(
    world: dict[str, Any], lab8: Any, tmp_path: Path
) -> None:
    # Given an https repository whose password only the worker's secrets hold (passwordRef)
    _clean(lab8)
    home = tmp_path / "home"
    env = base_env(VMFARM_HOME=str(home), **world["worker"])
    files = _files(tmp_path, world, "http")
    world["server"].reset_counts()
    # When the pipeline runs
    res = run_vmfarm(
        "run",
        *files,
        str(lab8.infrastructure_file),
        "--set",
        "tag=2.0",
        "-o",
        "json",
        env=env,
        timeout=300,
    )
    report = json.loads(res.stdout)
    # Then the repository got the password, every host runs the release
    assert res.returncode == 0, report.get("error")
    assert ("GET", "/repo/app/2.0/app-2.0.tar.gz", "Basic") in world["server"].log
    assert _on_hosts(lab8, "running") == ["app version 2.0\n"] * 8
    # And the password is in no CLI output, no log, no SQL row and no task message
    logs = run_vmfarm("logs", report["id"], "-o", "json", env=env)
    shown = run_vmfarm("status", report["id"], "-o", "json", env=env)
    assert shown.returncode == 0, shown.stderr
    for text in (res.stdout, res.stderr, logs.stdout, logs.stderr, shown.stdout):
        assert PASSWORD not in text
    kept = _kept_bytes(home)
    assert b"passwordRef" in kept or b"repo_password" in kept  # (the plan row is there)
    assert PASSWORD.encode() not in kept


def test_a_remote_artifact_without_any_checksum_is_refused_unless_it_allows_it(
    world: dict[str, Any], lab8: Any, tmp_path: Path
) -> None:
    # Given a repository that publishes no checksum, and a spec that gives none
    _clean(lab8)
    env = base_env(VMFARM_HOME=str(tmp_path / "home"), **world["worker"])
    files = _files(tmp_path, world, "http", checksum=False)
    world["server"].siblings = False
    try:
        # When it is deployed, every host fails naming the artifact and the fix
        code, report = _run(env, files, lab8, "1.0")
        assert code == 1
        errors = {
            s["error"]
            for h in report["stages"][0]["hosts"]
            for s in h["steps"]
            if s["status"] == "FAILED"
        }
        assert errors and all("app-1.0.tar.gz: refused: no checksum" in e for e in errors)
        assert all("spec.allowUnverified: true" in e for e in errors)
        assert _on_hosts(lab8, "running") == [""] * 8
        # And when the artifact says allowUnverified: true, it deploys
        service = Path(files[0])
        text = service.read_text()
        line = next(li for li in text.splitlines() if li.strip() == "tag: <+input>")
        service.write_text(
            text.replace(line, f"{line}\n{line[: line.index('tag')]}allowUnverified: true")
        )
        code, report = _run(env, files, lab8, "1.0")
        assert code == 0, report.get("error")
        assert _on_hosts(lab8, "running") == ["app version 1.0\n"] * 8
    finally:
        world["server"].siblings = True


def test_credentials_over_plain_http_are_refused_before_anything_runs(
    world: dict[str, Any], lab8: Any, tmp_path: Path
) -> None:
    _clean(lab8)
    env = base_env(VMFARM_HOME=str(tmp_path / "home"), **world["worker"])
    files = _files(tmp_path, world, "http")
    service = Path(files[0])
    service.write_text(service.read_text().replace("https://", "http://"))
    world["server"].reset_counts()
    res = run_vmfarm(
        "run", *files, str(lab8.infrastructure_file), "--set", "tag=1.0", env=env, timeout=120
    )
    assert res.returncode == 2, res.stdout + res.stderr
    assert "service.yaml:" in res.stderr and "credentials are sent over https only" in res.stderr
    assert world["server"].log == []
    assert _on_hosts(lab8, "running") == [""] * 8


DOWNLOAD = textwrap.dedent("""\
    apiVersion: v1
    kind: Environment
    metadata: {name: lab}
    spec: {type: PreProduction}
    ---
    apiVersion: v1
    kind: Pipeline
    metadata: {name: download}
    spec:
      stages:
        - stage:
            name: Deploy
            identifier: deploy
            type: Deployment
            spec:
              service: {serviceRef: app}
              environment:
                environmentRef: lab
                infrastructureDefinitions: [{identifier: lab}]
              execution:
                steps:
                  - step:
                      type: Command
                      name: Download
                      identifier: download
                      spec:
                        environmentVariables:
                          - {name: CURL_CA_BUNDLE, value: %(ca)s}
                        commandUnits:
                          - identifier: fetch
                            type: DownloadArtifact
                            spec: {destinationPath: /opt/dl}
    """)


@pytest.mark.timeout(300)
def test_a_host_that_downloads_the_artifact_shows_ps_no_url_and_no_password(
    world: dict[str, Any], lab8: Any, tmp_path: Path
) -> None:
    import subprocess
    import sys

    import yaml

    from tests.conftest import REPO

    # Given one lab host that downloads the artifact itself (DownloadArtifact), the password
    # named by passwordRef, and a repository slow enough for ps to see curl at work
    server = world["server"]
    digest = hashlib.sha256(world["packed"]["1.0"]).hexdigest()
    (tmp_path / "service.yaml").write_text(
        _service(
            "Artifactory",
            (
                f"url: {server.url}/repo/app/<+artifact.tag>/app-<+artifact.tag>.tar.gz\n"
                f"username: deployer\npasswordRef: repo_password\nsha256: {digest}\ntag: <+input>\n"
            ),
        )
    )
    (tmp_path / "pipeline.yaml").write_text(DOWNLOAD % {"ca": server.ca_file})
    infra = yaml.safe_load(Path(lab8.infrastructure_file).read_text())
    infra["spec"]["spec"]["hosts"] = infra["spec"]["spec"]["hosts"][:1]
    (tmp_path / "infra.yaml").write_text(yaml.safe_dump(infra))
    host_dir = Path(lab8.hosts[0].host_dir)
    shutil.rmtree(host_dir / "opt" / "dl", ignore_errors=True)
    env = base_env(VMFARM_HOME=str(tmp_path / "home"), **world["worker"])
    server.reset_counts()
    server.delay = 2.0
    listings: list[str] = []
    try:
        # When it runs, ps is sampled (as any local user could) until the run ends
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cli.main",
                "run",
                str(tmp_path / "service.yaml"),
                str(tmp_path / "pipeline.yaml"),
                str(tmp_path / "infra.yaml"),
                "--set",
                "tag=1.0",
                "-o",
                "json",
            ],
            env=env,
            cwd=REPO,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        while proc.poll() is None:
            listings.append(
                subprocess.run(
                    ["ps", "-eo", "args"], capture_output=True, text=True, check=True
                ).stdout
            )
        stdout, stderr = proc.communicate()
    finally:
        server.delay = 0.0
    # Then the host downloaded it (basic auth, verified) ...
    assert proc.returncode == 0, stdout[-2000:] + stderr[-3000:]
    assert ("GET", "/repo/app/1.0/app-1.0.tar.gz", "Basic") in server.log
    assert (host_dir / "opt" / "dl" / "app-1.0.tar.gz").read_bytes() == world["packed"]["1.0"]
    # ... and while curl ran, no process showed the password or the URL
    curls = [
        line
        for text in listings
        for line in text.splitlines()
        if line.startswith("curl ") and "-K -" in line
    ]
    assert curls, "ps never saw curl run"
    everything = "".join(listings)
    assert PASSWORD not in everything
    assert "/repo/app/1.0/app-1.0.tar.gz" not in everything
    # ... nor did the output, the ledger or a task message
    assert PASSWORD not in stdout + stderr
    assert PASSWORD.encode() not in _kept_bytes(tmp_path / "home")
