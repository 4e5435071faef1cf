"""The test allocator (tests/alloc.py): two test runs on one machine never hold the same lab
addresses, and a run that dies gives its leases back without anyone cleaning up."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests import alloc
from tests.conftest import REPO
from tests.waiting import process_gone, wait_for

# The tests use a pool of 20 addresses, 127.0.1.2-21, and ignore the sockets of this machine
# (labs of other test runs may come and go meanwhile); the locks are what they check.
POOL = (2, 21)

HOLDER = """
import sys, time
from tests import alloc
alloc.FIRST_HOST, alloc.LAST_HOST = 2, 21
alloc._addresses_in_use = set
lease = alloc.Allocator(wait=5).addresses(int(sys.argv[1]))
print(lease.first, lease.count, flush=True)
time.sleep(300)  # the behaviour under test: a run that holds its lease until it is killed
"""


@pytest.fixture
def lock_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private lock directory and pool, so the test never competes with real test runs."""
    monkeypatch.setattr(alloc, "LOCK_DIR", tmp_path / "locks")
    monkeypatch.setattr(alloc, "FIRST_HOST", POOL[0])
    monkeypatch.setattr(alloc, "LAST_HOST", POOL[1])
    monkeypatch.setattr(alloc, "_addresses_in_use", set)
    return tmp_path / "locks"


def _holder(lock_dir: Path, count: int) -> tuple[subprocess.Popen[str], range]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "VMFARM_TEST_ALLOC_DIR": str(lock_dir)}
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(count)],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    first, n = (int(x) for x in proc.stdout.readline().split())
    return proc, range(first, first + n)


def test_another_process_never_gets_addresses_a_live_process_holds(lock_dir: Path) -> None:
    proc, held = _holder(lock_dir, 12)  # 12 of the 20: a block of 8 at most is left
    try:
        mine = alloc.Allocator(wait=1).addresses(4)
        assert not set(range(mine.first, mine.first + mine.count)) & set(held)
        assert mine.addresses == [f"127.0.1.{n}" for n in range(mine.first, mine.first + 4)]
        with pytest.raises(RuntimeError, match="no block of 9 lab address"):
            alloc.Allocator(wait=0.5).addresses(9)
        mine.release()
    finally:
        proc.kill()
        proc.wait()


def test_a_killed_holder_gives_its_addresses_back(lock_dir: Path) -> None:
    proc, held = _holder(lock_dir, 20)  # every address of the pool
    with pytest.raises(RuntimeError, match="other test runs on this machine hold them"):
        alloc.Allocator(wait=0.5).addresses(1)
    # When the run that held them dies (no cleanup: SIGKILL)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    wait_for(lambda: process_gone(proc.pid), 10, "the holder to be gone")
    # Then its addresses can be leased at once
    lease = alloc.Allocator(wait=5).addresses(20)
    assert lease.first == held.start
    lease.release()


def test_a_released_lease_is_free_again_in_the_same_process(lock_dir: Path) -> None:
    allocator = alloc.Allocator(wait=0.5)
    whole = allocator.addresses(20)
    with pytest.raises(RuntimeError):
        allocator.addresses(1)
    whole.release()
    assert allocator.addresses(1).count == 1
    allocator.close()
