"""What vmfarm keeps is nobody else's: VMFARM_HOME 0700, the ledger, broker and result files
(and SQLite's -wal, -shm and -journal files beside them) 0600, whatever the umask.

The embedded ledger and broker are opened here for real (SQLite through SQLAlchemy and kombu),
in this process; tests/lab/test_clean_delegates.py checks the same after a whole embedded run.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.settings import Settings


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(autouse=True)
def careless_umask() -> Iterator[None]:
    """A umask that would leave every new file world-readable and writable."""
    old = os.umask(0)
    yield
    os.umask(old)


def test_the_embedded_ledger_broker_and_results_are_private(tmp_path: Path) -> None:
    # Given a new VMFARM_HOME
    s = Settings(home=tmp_path / "home")

    # When the ledger, the broker and the result backend are opened and written
    from kombu import Connection
    from sqlalchemy import text

    from app.db import get_engine

    engine = get_engine(s.db_url)
    with engine.begin() as conn:
        conn.execute(text("SELECT count(*) FROM execution"))
    with Connection(s.celery_broker) as broker:
        queue = broker.SimpleQueue("vmfarm.test")
        queue.put({"hello": "world"})
        assert queue.get(timeout=5).payload == {"hello": "world"}
        queue.close()
    from celery.backends.database import DatabaseBackend

    from app.celery import app as celery_app

    backend = DatabaseBackend(url=s.celery_backend.removeprefix("db+"), app=celery_app)
    backend.store_result("t-1", {"ok": True}, "SUCCESS")

    # Then the folder is 0700 and every file in it 0600, SQLite's own files included
    home = tmp_path / "home"
    assert mode(home) == 0o700
    found = {p.name: mode(p) for p in home.iterdir()}
    assert {"vmfarm.db", "broker.sqlite", "results.sqlite"} <= set(found)
    assert "vmfarm.db-wal" in found  # the ledger runs in WAL mode
    assert found == dict.fromkeys(found, 0o600)
    engine.dispose()


def test_a_home_an_earlier_version_left_open_is_closed(tmp_path: Path) -> None:
    # Given a vmfarm home of an earlier version: 0755, its ledger 0644
    home = tmp_path / "old"
    home.mkdir(mode=0o755)
    (home / "vmfarm.db").write_bytes(b"")
    os.chmod(home / "vmfarm.db", 0o644)
    (home / "vmfarm.db-wal").write_bytes(b"")
    os.chmod(home / "vmfarm.db-wal", 0o644)

    Settings(home=home).db_url  # noqa: B018 (reading it makes the files private)

    assert mode(home) == 0o700
    assert mode(home / "vmfarm.db") == 0o600
    assert mode(home / "vmfarm.db-wal") == 0o600


def test_a_shared_folder_given_as_home_is_not_closed_but_the_files_are_private(
    tmp_path: Path,
) -> None:
    # Given VMFARM_HOME pointing at a shared folder (like /tmp: world-writable, sticky)
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)

    s = Settings(home=shared)
    s.db_url, s.celery_broker, s.celery_backend  # noqa: B018

    assert mode(shared) == 0o1777  # other users' files there stay reachable
    assert {p.name: mode(p) for p in shared.iterdir()} == {
        "vmfarm.db": 0o600,
        "broker.sqlite": 0o600,
        "results.sqlite": 0o600,
    }


def test_a_ledger_url_outside_home_is_private_too(tmp_path: Path) -> None:
    s = Settings(home=tmp_path / "home", database_url=f"sqlite:///{tmp_path}/ledgers/l.db")
    assert s.db_url.endswith("/ledgers/l.db")
    assert mode(tmp_path / "ledgers") == 0o700  # created by vmfarm
    assert mode(tmp_path / "ledgers" / "l.db") == 0o600
