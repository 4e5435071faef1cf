"""The artifact cache of one worker machine: files named by their content.

Layout under ``VMFARM_HOME/cache/artifacts/``::

    <sha256>.<ext>                       a fetched or packed artifact (its bytes hash to the name)
    .<random>.<ext>.part                 a download in progress (renamed when verified)
    locks/<key>.lock                     one flock per (source, tag): processes take turns
    index/<execution>/<key>.json         what (source, tag) gave in that execution

``<key>`` is the sha256 of the source's identity (URL, ``s3://bucket/key``, local path; never a
credential) and the tag. Within one execution the index answers every later request for the same
(source, tag), from any thread or worker process on this machine, without asking the repository
again: all hosts get the same bytes. A later execution does not trust the index: it may reuse a
cached file only when it knows the checksum before downloading (the spec, or the repository's
``X-Checksum-Sha256`` / ``.sha256`` / S3 checksum) and the cached file still hashes to it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

CHUNK = 1 << 20

_guard = threading.Lock()
_thread_locks: dict[tuple[str, str], threading.Lock] = {}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def copy_hashing(src: BinaryIO, dst: BinaryIO) -> tuple[str, int]:
    """Copy ``src`` to ``dst``; (sha256 hex, bytes copied)."""
    h = hashlib.sha256()
    n = 0
    while chunk := src.read(CHUNK):
        dst.write(chunk)
        h.update(chunk)
        n += len(chunk)
    return h.hexdigest(), n


def cache_key(identity: str, tag: str | None) -> str:
    return hashlib.sha256(json.dumps([identity, tag or ""]).encode()).hexdigest()[:32]


def _safe_name(text: str) -> str:
    if re.fullmatch(r"[A-Za-z0-9_.-]{1,100}", text) and text not in (".", ".."):
        return text
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class ArtifactCache:
    """One cache directory (see the module docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path_for(self, sha256: str, ext: str) -> Path:
        return self.root / f"{sha256}.{ext}"

    def lookup(self, sha256: str, ext: str) -> Path | None:
        """The cached file with this content, if it is there and still hashes to its name."""
        path = self.path_for(sha256, ext)
        if path.is_file() and sha256_file(path) == sha256:
            return path
        return None

    def tmp_path(self, ext: str) -> Path:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        return self.root / f".{uuid.uuid4().hex}.{ext}.part"

    def commit(self, tmp: Path, sha256: str, ext: str) -> Path:
        """Move a verified download into place under its content name."""
        out = self.path_for(sha256, ext)
        if out.is_file() and out.stat().st_size == tmp.stat().st_size:
            tmp.unlink()  # the same content is already there (another source, execution)
        else:
            os.chmod(tmp, 0o600)  # the worker's cache is nobody else's
            tmp.replace(out)
        return out

    # --- the per-execution index -------------------------------------------------------------

    def _index_file(self, execution_id: str, key: str) -> Path:
        return self.root / "index" / _safe_name(execution_id) / f"{key}.json"

    def index_get(self, execution_id: str, key: str) -> dict[str, Any] | None:
        """The recorded result, if its file is still there with its size."""
        try:
            entry: dict[str, Any] = json.loads(self._index_file(execution_id, key).read_text())
            path = Path(entry["path"])
            if path.is_file() and path.stat().st_size == int(entry["size"]):
                return entry
        except (OSError, ValueError, KeyError, TypeError):
            pass
        return None

    def index_put(self, execution_id: str, key: str, entry: dict[str, Any]) -> None:
        path = self._index_file(execution_id, key)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = path.with_name(f".{uuid.uuid4().hex}.tmp")
        tmp.write_text(json.dumps(entry, sort_keys=True))
        os.chmod(tmp, 0o600)
        tmp.replace(path)

    def forget(self, execution_id: str) -> None:
        """Drop an execution's index (its cached files stay for later executions)."""
        folder = self.root / "index" / _safe_name(execution_id)
        for f in folder.glob("*"):
            with contextlib.suppress(OSError):
                f.unlink()
        with contextlib.suppress(OSError):
            folder.rmdir()

    # --- one fetch at a time per (source, tag) -----------------------------------------------

    @contextlib.contextmanager
    def locked(self, key: str) -> Iterator[None]:
        """Exclusive use of ``key``: among this process's threads (a lock) and among the
        processes sharing this cache directory (an flock)."""
        with _guard:
            lock = _thread_locks.setdefault((str(self.root), key), threading.Lock())
        with lock:
            folder = self.root / "locks"
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(folder / f"{key}.lock", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)  # releases the flock
