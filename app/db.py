"""Engines, sessions and migrations for the ledger (SQLite by default, PostgreSQL by URL).

Every process calls ``get_engine()``; the first call in a process upgrades the schema with Alembic
(under a PostgreSQL advisory lock, or SQLite's write lock, so concurrent starts are safe).
SQLite runs in WAL mode with every transaction ``BEGIN IMMEDIATE``: its single writer then queues
(busy timeout) instead of failing when a read turns into a write.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.engine import Engine
from sqlmodel import Session, create_engine

from app.settings import get_settings

_engines: dict[str, Engine] = {}
_lock = threading.Lock()


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    dbapi_conn.isolation_level = None  # let SQLAlchemy's "begin" event issue BEGIN IMMEDIATE
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=60000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def _sqlite_begin(conn: Any) -> None:
    conn.exec_driver_sql("BEGIN IMMEDIATE")


def normalise_url(url: str) -> str:
    """``postgresql://`` means psycopg 3 (the driver we install)."""
    if url.startswith("postgresql://"):
        return "postgresql+psycopg://" + url[len("postgresql://"):]
    if url.startswith("postgres://"):
        return "postgresql+psycopg://" + url[len("postgres://"):]
    return url


def get_engine(url: str | None = None, *, migrate_schema: bool = True) -> Engine:
    """The process-wide engine for ``url`` (default: settings), migrated on first use."""
    url = normalise_url(url or get_settings().db_url)
    with _lock:
        eng = _engines.get(url)
        if eng is not None:
            return eng
        if url.startswith("sqlite"):
            eng = create_engine(url, connect_args={"check_same_thread": False, "timeout": 60})
            event.listen(eng, "connect", _sqlite_pragmas)
            event.listen(eng, "begin", _sqlite_begin)
        else:
            eng = create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=40)
        if migrate_schema:
            migrate(eng)
        _engines[url] = eng
        return eng


def migrate(engine: Engine) -> None:
    """Upgrade the schema to the newest Alembic revision (safe to call from many processes)."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", "app:migrations")
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(727274)"))
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


def reset_engines() -> None:
    """Forget cached engines (tests switch databases)."""
    with _lock:
        for eng in _engines.values():
            eng.dispose()
        _engines.clear()


@contextmanager
def session_scope(url: str | None = None) -> Iterator[Session]:
    """A session in one transaction: committed on success, rolled back on error."""
    with Session(get_engine(url), expire_on_commit=False) as s, s.begin():
        yield s


def insert_once(model: type[Any], values: dict[str, Any]) -> tuple[int, Any | None]:
    """Insert a row keyed by its unique ``idem_key`` unless it exists.

    Returns (id, None) when this call inserted it (the caller owns the work), or (id, row) when
    it was already there (a duplicate delivery: the caller returns the recorded result).
    """
    from sqlalchemy.dialects.postgresql import insert as pg_insert
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert
    from sqlmodel import select

    ins = pg_insert if get_engine().dialect.name == "postgresql" else sqlite_insert
    stmt = ins(model).values(**values).on_conflict_do_nothing(
        index_elements=["idem_key"]).returning(model.id)
    with session_scope() as s:
        new_id = s.execute(stmt).scalar()
        if new_id is not None:
            return int(new_id), None
        row = s.exec(select(model).where(model.idem_key == values["idem_key"])).one()
        return int(row.id or 0), row
