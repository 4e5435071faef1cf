"""What an archive would do to a host if unpacked: checked on the worker before anything is
pushed, so a hostile or broken tarball never reaches a release folder.

A member is refused when it would land outside the release folder (an absolute path, a ``..``
component), when it is a link whose target leaves the folder (an absolute target, or a relative
one that climbs out of it), when it carries a setuid or setgid bit, or when it is a device, a
FIFO or anything else that is not a file, a folder or a link. The message names the member.
"""

from __future__ import annotations

import posixpath
import stat
import tarfile
from pathlib import PurePosixPath

# Enough to tell a release from an archive made to exhaust the host (or the check).
MAX_MEMBERS = 200_000


def _escapes(name: str) -> bool:
    """Does a path relative to the release folder leave it?"""
    if name.startswith("/") or PurePosixPath(name).is_absolute():
        return True
    norm = posixpath.normpath(name)
    return norm == ".." or norm.startswith("../")


def unsafe_members(path: str) -> list[str]:
    """Why unpacking the gzipped tar at ``path`` into a release folder is refused, one line per
    member (empty: it may be unpacked). A file that is not a tar archive is one problem."""
    problems: list[str] = []
    try:
        with tarfile.open(path, "r:*") as tar:
            for n, member in enumerate(tar):
                if n >= MAX_MEMBERS:
                    problems.append(f"more than {MAX_MEMBERS} members")
                    break
                name = member.name
                if _escapes(name):
                    problems.append(f"member {name!r} would land outside the release folder")
                    continue
                if member.issym() or member.islnk():
                    target = member.linkname
                    # A symbolic link resolves from its own folder, a hard link from the top.
                    base = posixpath.dirname(name) if member.issym() else ""
                    if target.startswith("/") or _escapes(posixpath.join(base, target)):
                        kind = "symbolic" if member.issym() else "hard"
                        problems.append(
                            f"member {name!r} is a {kind} link to {target!r}, "
                            "outside the release folder"
                        )
                    continue
                if not (member.isfile() or member.isdir()):
                    problems.append(f"member {name!r} is a device, FIFO or other special file")
                    continue
                if member.mode & (stat.S_ISUID | stat.S_ISGID):
                    problems.append(f"member {name!r} is setuid or setgid (mode {member.mode:o})")
    except (tarfile.TarError, OSError, EOFError) as exc:
        problems.append(f"not a readable tar archive ({exc})")
    return problems
