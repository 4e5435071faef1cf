"""Step output and liveness: output buffered into a few LogChunk rows with secrets masked,
output variables picked out of stdout, and one heartbeat thread per worker process.
"""

from __future__ import annotations

import base64
import logging
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import update
from sqlmodel import col

from app.db import RECONNECT_SECONDS, is_disconnect, retrying, session_scope
from app.models import HostStepRun, LogChunk, utcnow
from app.settings import get_settings
from app.units.script import OUTPUT_MARK  # the Script unit's output trap prints it

log = logging.getLogger("vmfarm.tasks")


TAIL_CHARS = 4000


FLUSH_BYTES = 64 * 1024


FLUSH_SECONDS = 1.0


class _Heartbeats:
    """One thread per worker process renews the heartbeat of every running step in a single
    UPDATE, so a silent 20-minute script still looks alive and a dead worker's steps do not."""

    def __init__(self) -> None:
        self._ids: set[int] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def add(self, run_id: int) -> None:
        with self._lock:
            self._ids.add(run_id)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._loop, name="vmfarm-heartbeat", daemon=True
                )
                self._thread.start()

    def discard(self, run_id: int) -> None:
        with self._lock:
            self._ids.discard(run_id)

    def _loop(self) -> None:
        failing = False
        while True:
            time.sleep(get_settings().heartbeat_interval)
            with self._lock:
                ids = list(self._ids)
            if not ids:
                continue
            try:  # waits for a restarting database (session_scope), then renews at once
                with session_scope() as s:
                    s.execute(
                        update(HostStepRun)
                        .where(col(HostStepRun.id).in_(ids))
                        .values(heartbeat_at=utcnow())
                    )
            except Exception as exc:  # the database may be away: try again next beat
                if not failing:
                    log.warning(
                        "could not renew the heartbeats of %d running steps (trying "
                        "again every beat): %s",
                        len(ids),
                        exc,
                        exc_info=not is_disconnect(exc),
                    )
                failing = True
                continue
            if failing:
                log.warning("heartbeats of %d running steps renewed again", len(ids))
            failing = False


heartbeats = _Heartbeats()


@dataclass
class LogSink:
    """Buffers output and writes it as a few LogChunk rows (never one row per line)."""

    run_id: int
    unit: str = ""
    seq: int = 0
    buf: list[tuple[str, str, str]] = field(default_factory=list)
    size: int = 0
    last_flush: float = field(default_factory=time.monotonic)
    tails: dict[str, str] = field(default_factory=lambda: {"stdout": "", "stderr": ""})
    outputs: dict[str, str] = field(default_factory=dict)
    _partial: str = ""
    _failing: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)
    # Secret values this worker resolved never reach a row: each stream is masked as it
    # arrives, a value split across two chunks included.
    _maskers: dict[str, Any] = field(default_factory=dict)

    def write(self, stream: str, text: str) -> None:
        if stream == "stdout" and (OUTPUT_MARK in text or self._partial):
            text = self._strip_outputs(text)
            if not text:
                return
        text = self._masker(stream).feed(text)
        if not text:
            return
        with self.lock:
            self.buf.append((self.unit, stream, text))
            self.size += len(text)
            self.tails[stream] = (self.tails[stream] + text)[-TAIL_CHARS:]
            due = self.size >= FLUSH_BYTES or time.monotonic() - self.last_flush >= FLUSH_SECONDS
        if due:
            self.flush()

    def _strip_outputs(self, text: str) -> str:
        # Output-variable lines may arrive split across chunks: hold an incomplete last line.
        text = self._partial + text
        self._partial = ""
        kept: list[str] = []
        for line in text.splitlines(keepends=True):
            if OUTPUT_MARK in line:
                if not line.endswith("\n"):
                    self._partial = line
                    continue
                before, _, rest = line.partition(OUTPUT_MARK)
                m = re.match(r"(\w+)=([A-Za-z0-9+/=]*)", rest)
                if m:
                    self.outputs[m.group(1)] = base64.b64decode(m.group(2)).decode(
                        "utf-8", "replace"
                    )
                if before:  # the script's last line had no newline: keep it
                    kept.append(before + "\n")
                continue
            kept.append(line)
        return "".join(kept)

    def _masker(self, stream: str) -> Any:
        m = self._maskers.get(stream)
        if m is None:
            from app.secrets import StreamMasker

            m = self._maskers[stream] = StreamMasker()
        return m

    def close(self) -> None:
        """Write what the stream maskers still hold, then flush (waiting for a restarting
        ledger)."""
        for stream, m in list(self._maskers.items()):
            rest = m.flush()
            if rest:
                with self.lock:
                    self.buf.append((self.unit, stream, rest))
                    self.tails[stream] = (self.tails[stream] + rest)[-TAIL_CHARS:]
        if self.buf:
            self.flush(wait=RECONNECT_SECONDS)

    def flush(self, *, wait: float = 0.0) -> None:
        """Write the buffered output as LogChunk rows. While the ledger is unreachable the
        output stays buffered for the next flush (never an error in the unit: the command on
        the host goes on); with ``wait`` (the last flush) a lost connection is tried again
        for that many seconds."""
        with self.lock:
            items, self.buf, self.size = self.buf, [], 0
            self.last_flush = time.monotonic()
            start = self.seq
            self.seq += len(items)
        if not items and not wait:
            return
        tries = 0

        def write() -> None:
            nonlocal tries
            tries += 1
            self._write(start, items, wait, again=tries > 1)

        try:
            if wait:
                retrying(write, what=f"writing the logs of step run {self.run_id}", within=wait)
            else:
                write()
        except Exception as exc:
            if wait or not is_disconnect(exc):
                raise
            with self.lock:  # keep them, ahead of what came meanwhile
                self.buf[:0] = items
                self.size += sum(len(text) for _, _, text in items)
            if not self._failing:
                log.warning(
                    "step run %d: the ledger is unreachable (%s); its output stays "
                    "buffered until the next flush",
                    self.run_id,
                    exc,
                )
            self._failing = True
            return
        if self._failing:
            log.warning("step run %d: its buffered output is written again", self.run_id)
        self._failing = False

    def _write(
        self, start: int, items: list[tuple[str, str, str]], wait: float, *, again: bool
    ) -> None:
        """One transaction. On ``again`` (a retry: the server may have committed the first
        try before the connection was cut) the rows of these sequence numbers may exist, with
        the same text: they are kept (insert-only, so a worker's database role needs no
        DELETE on logs)."""
        rows = [
            {
                "host_step_run_id": self.run_id,
                "seq": start + n,
                "unit": unit,
                "stream": stream,
                "text": text,
                "created_at": utcnow(),
            }
            for n, (unit, stream, text) in enumerate(_merge(items))
        ]
        with session_scope(wait=wait) as s:
            if rows:
                if s.get_bind().dialect.name == "postgresql":
                    from sqlalchemy.dialects.postgresql import insert
                else:
                    from sqlalchemy.dialects.sqlite import insert  # type: ignore[assignment]
                stmt = insert(LogChunk).values(rows)
                if again:
                    stmt = stmt.on_conflict_do_nothing(index_elements=["host_step_run_id", "seq"])
                s.execute(stmt)
            s.execute(
                update(HostStepRun)
                .where(HostStepRun.id == self.run_id)  # type: ignore[arg-type]
                .values(heartbeat_at=utcnow())
            )


def _merge(items: list[tuple[str, str, str]]) -> Iterator[tuple[str, str, str]]:
    """Adjacent chunks of the same unit and stream become one row."""
    cur: tuple[str, str, list[str]] | None = None
    for unit, stream, text in items:
        if cur and cur[0] == unit and cur[1] == stream:
            cur[2].append(text)
        else:
            if cur:
                yield cur[0], cur[1], "".join(cur[2])
            cur = (unit, stream, [text])
    if cur:
        yield cur[0], cur[1], "".join(cur[2])
