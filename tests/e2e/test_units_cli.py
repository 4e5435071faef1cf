"""`vmfarm plan` in a subprocess on units that cannot run as written: the real source of a
repository artifact, a unit that cannot run, a download without a checksum. They live in the e2e
lane (the vmfarm command in a subprocess) so that tests/unit stays under a minute; the files
they plan are tests/unit/test_units.py's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import base_env, run_vmfarm
from tests.unit.test_units import (
    INPUTS,
    SERVICE,
    SHA,
    SIGNATURE,
    _plan,
    _write,
)


@pytest.mark.parametrize(
    ("artifact", "source"),
    [
        (
            f"""type: Artifactory
          spec:
            baseUrl: https://127.0.1.10:8081/artifactory
            username: deployer
            passwordRef: repo_password
            repository: libs-release
            artifactDirectory: web
            artifactPath: app-<+artifact.tag>.tar.gz
            sha256: "{SHA}"
            tag: <+input>
""",
            "Artifactory https://127.0.1.10:8081/artifactory/libs-release/web/app-2.0.1.tar.gz",
        ),
        (
            f"""type: Nexus3Registry
          spec:
            nexusServerUrl: https://127.0.1.10:8443/?token={SIGNATURE}
            repository: maven-releases
            groupId: com.example
            artifactId: app
            extension: tar.gz
            sha256: "{SHA}"
            tag: <+input>
""",
            "Nexus3Registry https://127.0.1.10:8443/repository/maven-releases/com/example/app/2.0.1/"
            "app-2.0.1.tar.gz?…",
        ),  # the base URL's query stays a query (shown as ?…), after the path
    ],
    ids=["Artifactory", "Nexus3Registry"],
)
def test_plan_names_the_real_source_of_a_repository_artifact(
    tmp_path: Path, artifact: str, source: str
) -> None:
    """Regression (issue 17): ``copy None -> ...`` for Http/Artifactory artifacts."""
    service = SERVICE.replace(SERVICE[SERVICE.index("type: Http") : SERVICE.index("---")], artifact)
    files = _write(tmp_path, service)
    text = _plan(files, tmp_path / "home")
    assert f"[copy] copy {source} -> /opt/app/pushed/app-2.0.1.tar.gz" in text, text
    assert "None" not in text
    for leaked in (SIGNATURE, "token"):
        assert leaked not in text
    (stage,) = json.loads(_plan(files, tmp_path / "home", "-o", "json"))["stages"]
    assert {
        u["source"]
        for step in stage["steps"]
        for u in step["units"]
        if u["type"] in ("Copy", "DownloadArtifact", "Release")
    } == {source}


def test_a_unit_that_cannot_run_shows_why_instead_of_a_traceback(tmp_path: Path) -> None:
    # Given a DownloadArtifact unit, and an artifact only the worker can read (a local folder)
    (tmp_path / "app").mkdir()
    service = SERVICE.replace(
        SERVICE[SERVICE.index("          type: Http") : SERVICE.index("---")],
        f"          type: Local\n          spec:\n            path: {tmp_path / 'app'}\n"
        "            tag: <+input>\n",
    )
    files = _write(tmp_path, service)
    # When it is planned
    out = _plan(files, tmp_path / "home", "-o", "json")
    (stage,) = json.loads(out)["stages"]
    fetch = stage["steps"][0]["units"][1]
    # Then the plan says why the unit would fail, and shows every other unit
    assert fetch["problem"] == (
        "DownloadArtifact cannot fetch a Local artifact on the host; "
        "use Copy or Release (the worker fetches it)"
    )
    assert stage["steps"][0]["units"][2]["source"] == f"Local folder {tmp_path / 'app'}"
    text = _plan(files, tmp_path / "home")
    assert "[fetch] downloadartifact: cannot run: DownloadArtifact cannot fetch" in text


def test_a_download_without_a_checksum_is_refused_at_load(tmp_path: Path) -> None:
    # Given the DownloadArtifact unit and an artifact whose spec gives no checksum
    service = SERVICE.replace(f'            sha256: "{SHA}"\n', "")
    assert SHA not in service
    files = _write(tmp_path, service)
    sets = [a for k, v in INPUTS.items() for a in ("--set", f"{k}={v}")]
    # When it is planned, it is refused: the host could verify nothing
    res = run_vmfarm("plan", *files, *sets, env=base_env(VMFARM_HOME=str(tmp_path / "home")))
    assert res.returncode == 2
    assert "a DownloadArtifact unit fetches this artifact on the host" in res.stderr
    assert "spec.allowUnverified: true" in res.stderr and "service.yaml:" in res.stderr
    # And with allowUnverified: true it is planned, unverified
    files = _write(
        tmp_path,
        service.replace("tag: <+input>", "tag: <+input>\n            allowUnverified: true"),
    )
    res = run_vmfarm("plan", *files, *sets, env=base_env(VMFARM_HOME=str(tmp_path / "home")))
    assert res.returncode == 0, res.stderr
    assert "no checksum from the source: not verified" in res.stdout
