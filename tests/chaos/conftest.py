"""Fixtures of the chaos suite: its own lab and the table of faults and outcomes.

The host faults' lab is three real sshd hosts on 127.0.1.90-92; the service faults
(test_service_faults.py: Redis and PostgreSQL restarted, on private servers) have their own four
on 127.0.1.93-96, and the worker faults (test_worker_faults.py: a region worker killed with
SIGKILL mid-phase, on private servers too) three on 127.0.1.97-99 (other suites use 101-148 and
150-252 at the same time). Each test adds a row
(fault, outcome, time from the fault to the terminal state); the table is printed at the end of
the session and written to ``tests/chaos/last-run.md``.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

CHAOS_FIRST = 90  # hosts 127.0.1.90 .. 127.0.1.(90 + CHAOS_HOSTS - 1)
CHAOS_HOSTS = 3
LAST_RUN = Path(__file__).resolve().parent / "last-run.md"


@dataclass
class ChaosRow:
    fault: str
    outcome: str
    seconds: float | None  # from the fault to the execution's terminal state


@dataclass
class ChaosTable:
    rows: list[ChaosRow] = field(default_factory=list)

    def add(self, fault: str, outcome: str, seconds: float | None) -> None:
        self.rows.append(ChaosRow(fault, outcome, seconds))

    def markdown(self) -> str:
        lines = ["| fault | outcome | time to terminal state |", "|---|---|---|"]
        for r in self.rows:
            secs = "n/a" if r.seconds is None else f"{r.seconds:.1f} s"
            lines.append(f"| {r.fault} | {r.outcome.replace('|', '/')} | {secs} |")
        return "\n".join(lines) + "\n"


TABLE = ChaosTable()


@pytest.fixture(scope="session")
def chaos_table() -> Iterator[ChaosTable]:
    yield TABLE
    if TABLE.rows:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        LAST_RUN.write_text(
            f"# Chaos run, {stamp} on {platform.node()}\n\n"
            "Written by tests/chaos (see tests/chaos/test_host_faults.py, "
            "tests/chaos/test_service_faults.py and tests/chaos/test_worker_faults.py); time "
            "is measured from the fault to the execution's terminal state.\n\n"
            + TABLE.markdown())


@pytest.fixture(scope="session")
def chaos_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Three real sshd hosts, 127.0.1.90-92, one region (embedded mode runs them all)."""
    from app.lab import lab_down, lab_up

    root = tmp_path_factory.mktemp("chaoslab")
    # sandbox=False: without root or sshd this raises LabError saying why (never a skip).
    state = lab_up(CHAOS_HOSTS, root=root, regions=["r1"], sandbox=False, first=CHAOS_FIRST)
    assert state.mode == "ssh" and state.running, f"chaos lab did not start: {state.reason}"
    yield state
    lab_down(root=root)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if TABLE.rows:
        terminalreporter.section("chaos: faults and outcomes")
        terminalreporter.write(TABLE.markdown())
        terminalreporter.write_line(f"(also written to {LAST_RUN})")
