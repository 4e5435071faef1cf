"""Reproducible .tar.gz of a local folder: the same content gives the same bytes.

Entries are sorted by path; owners are uid/gid 0 with no names; every mtime is 0; modes are
normalised like git does (directories and executable files 0755, other files 0644; symlinks
kept as links); hard links are stored as separate files; sockets and fifos are left out. The
gzip header has mtime 0 and no file name. Bytes are the same on every machine with the same
zlib (compression level 9).
"""

from __future__ import annotations

import gzip
import os
import stat
import tarfile
from pathlib import Path


def pack_folder(src: Path, out: Path) -> None:
    """Write the folder ``src`` as a reproducible .tar.gz to ``out``."""
    entries = sorted(src.rglob("*"), key=lambda p: p.relative_to(src).as_posix())
    with (
        out.open("wb") as fh,
        gzip.GzipFile(filename="", fileobj=fh, mode="wb", mtime=0, compresslevel=9) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        for p in entries:
            st = os.lstat(p)
            info = tarfile.TarInfo(p.relative_to(src).as_posix())
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mtime = 0
            if stat.S_ISDIR(st.st_mode):
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            elif stat.S_ISREG(st.st_mode):  # a hard link is stored as a file of its own
                info.type, info.size = tarfile.REGTYPE, st.st_size
                info.mode = 0o755 if st.st_mode & 0o111 else 0o644
                with p.open("rb") as data:
                    tar.addfile(info, data)
            elif stat.S_ISLNK(st.st_mode):
                info.type, info.mode = tarfile.SYMTYPE, 0o777
                info.linkname = os.readlink(p)
                tar.addfile(info)
            # sockets, fifos and devices have no place in an artifact
