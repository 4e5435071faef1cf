"""Waiting for a condition instead of sleeping and hoping.

A test that needs something to happen (a worker to answer, a process to be reaped, a status to
change) polls for it with :func:`wait_for`; the only fixed pause left is the poll interval, and
the test goes on as soon as the condition holds. A timeout is a failure that says what never
happened, with whatever the caller adds to explain it (worker logs, the last status).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def wait_for(
    check: Callable[[], T],
    timeout: float,
    what: str = "the condition",
    *,
    interval: float = 0.05,
    explain: Callable[[], str] | None = None,
) -> T:
    """Call ``check`` until it returns something truthy, and return that; fail after
    ``timeout`` seconds naming ``what`` (and ``explain()``, if given)."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() >= deadline:
            detail = f"\n{explain()}" if explain is not None else ""
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}{detail}")
        time.sleep(interval)  # the poll interval: the one pause this helper makes


def process_gone(pid: int) -> bool:
    """Whether ``pid`` has exited: no /proc entry, or a zombie waiting to be reaped."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return text[text.rindex(")") + 2] in "ZX"
