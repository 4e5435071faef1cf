"""A Release unpacks only archives whose members stay in the release folder, as files and
folders of the SSH user: checked on the worker before anything is pushed; and a failed unpack
leaves nothing behind on the host (run here by a real bash)."""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from app.artifacts.archive import unsafe_members
from app.units.release import VERSION_RE, RenderedRelease, install_script


def _tarball(path: Path, members: list[tarfile.TarInfo]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for m in members:
            data = b"x" if m.isfile() else None
            if data is not None:
                m.size = len(data)
            tar.addfile(m, io.BytesIO(data) if data is not None else None)
    return path


def _member(
    name: str, *, kind: bytes = tarfile.REGTYPE, mode: int = 0o644, link: str = ""
) -> tarfile.TarInfo:
    m = tarfile.TarInfo(name)
    m.type, m.mode, m.linkname = kind, mode, link
    return m


def test_a_hostile_archive_is_refused_naming_each_member(tmp_path: Path) -> None:
    bad = _tarball(
        tmp_path / "bad.tar.gz",
        [
            _member("app/ok.txt"),
            _member("../x"),
            _member("/etc/cron.d/evil"),
            _member("app/passwd", kind=tarfile.SYMTYPE, link="/etc/passwd"),
            _member("app/up", kind=tarfile.SYMTYPE, link="../../../etc"),
            _member("app/su", mode=0o4755),
            _member("app/dev", kind=tarfile.CHRTYPE),
        ],
    )
    problems = unsafe_members(str(bad))
    assert problems == [
        "member '../x' would land outside the release folder",
        "member '/etc/cron.d/evil' would land outside the release folder",
        "member 'app/passwd' is a symbolic link to '/etc/passwd', outside the release folder",
        "member 'app/up' is a symbolic link to '../../../etc', outside the release folder",
        "member 'app/su' is setuid or setgid (mode 4755)",
        "member 'app/dev' is a device, FIFO or other special file",
    ]


def test_an_ordinary_archive_passes(tmp_path: Path) -> None:
    good = _tarball(
        tmp_path / "good.tar.gz",
        [
            _member("app", kind=tarfile.DIRTYPE, mode=0o755),
            _member("app/run.sh", mode=0o755),
            _member("app/current", kind=tarfile.SYMTYPE, link="run.sh"),
            _member("app/lib/../run2.sh"),
        ],
    )
    assert unsafe_members(str(good)) == []
    assert unsafe_members(str(tmp_path / "missing.tar.gz"))[0].startswith(
        "not a readable tar archive"
    )


@pytest.mark.parametrize("version", ["..", "../../etc", "1.0/..", "-rf", ".hidden", ""])
def test_a_version_that_could_leave_the_releases_folder_is_refused(version: str) -> None:
    assert not VERSION_RE.fullmatch(version)


def _rendered(base: Path) -> RenderedRelease:
    return RenderedRelease(
        identifier="release",
        type="Release",
        source="test",
        deploymentPath=str(base),
        version="1.0",
        releasesDirectory=f"{base}/releases",
        keep=3,
        current=f"{base}/current",
        currentTarget="releases/1.0",
        fileName="app.tar.gz",
        artifact={},
    )


def _install(base: Path, archive: bytes) -> subprocess.CompletedProcess[str]:
    incoming = base / "incoming" / "app.tar.gz"
    incoming.parent.mkdir(parents=True, exist_ok=True)
    incoming.write_bytes(archive)
    return subprocess.run(
        ["bash", "-c", install_script(_rendered(base), str(incoming))],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_a_failed_unpack_leaves_nothing_behind(tmp_path: Path) -> None:
    base = tmp_path / "opt app"  # a space too: the script quotes every path
    res = _install(base, b"this is not a gzip stream")
    assert res.returncode != 0
    assert list((base / "releases").iterdir()) == []  # no releases/.1.0.XXXX left
    assert not (base / "incoming" / "app.tar.gz").exists()


def test_an_unpacked_release_belongs_to_the_ssh_user(tmp_path: Path) -> None:
    base = tmp_path / "opt"
    archive = tmp_path / "a.tar.gz"
    m = _member("run.sh", mode=0o6777)  # modes and owners of the archive are not kept
    m.uid = m.gid = 4242
    _tarball(archive, [m])
    res = _install(base, archive.read_bytes())
    assert res.returncode == 0, res.stderr
    unpacked = base / "releases" / "1.0" / "run.sh"
    st = unpacked.stat()
    assert (st.st_uid, st.st_mode & 0o6000) == (os.getuid(), 0)
    assert (base / "releases" / "1.0" / ".vmfarm-release").read_text() == "1.0\n"
    assert not (base / "incoming" / "app.tar.gz").exists()
