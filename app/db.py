"""Engines, sessions and migrations for the ledger (SQLite by default, PostgreSQL by URL).

Every process calls ``get_engine()``; the first call in a process upgrades the schema with Alembic
(under a PostgreSQL advisory lock, or SQLite's write lock, so concurrent starts are safe).
SQLite runs in WAL mode with every transaction ``BEGIN IMMEDIATE``: its single writer then queues
(busy timeout) instead of failing when a read turns into a write.

A database server may restart (or fail over) under running workers. Without a ping per
transaction: a pooled connection whose server has closed it is noticed at checkout from its
socket alone (a server that shuts down says so and closes the connection) and replaced, all
pooled connections with it; ``session_scope`` waits up to ``RECONNECT_SECONDS`` for the
server before its body runs; a transaction cut off in the middle is the caller's to try again,
with ``retrying`` when it is safe to repeat.
"""

from __future__ import annotations

import logging
import select
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from sqlalchemy import event, exc, text
from sqlalchemy.engine import Engine, make_url
from sqlmodel import Session, create_engine

from app.settings import get_settings

log = logging.getLogger("vmfarm.db")
T = TypeVar("T")

_engines: dict[str, Engine] = {}
_lock = threading.Lock()
# How long a transaction waits for a database server that is unreachable (restarting, failing
# over) before the error reaches the caller; ``retrying`` tries a cut-off transaction again
# for as long.
RECONNECT_SECONDS = 30.0
# Seconds before a connection attempt gives up (libpq waits forever by default).
CONNECT_TIMEOUT = 10
# Pooled connections older than this are replaced (idle connections cut by firewalls, NAT).
POOL_RECYCLE = 1800
# SQLSTATEs of a server that ends or refuses connections: admin shutdown, crash shutdown,
# cannot connect now (starting up or shutting down); and class 08, connection exceptions.
_DISCONNECT_STATES = frozenset({"57P01", "57P02", "57P03"})


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
        return "postgresql+psycopg://" + url[len("postgresql://") :]
    if url.startswith("postgres://"):
        return "postgresql+psycopg://" + url[len("postgres://") :]
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
            # No pool_pre_ping (a round trip per transaction): _check_socket at checkout.
            connect_args = (
                {}
                if "connect_timeout" in make_url(url).query
                else {"connect_timeout": CONNECT_TIMEOUT}
            )
            eng = create_engine(
                url,
                pool_size=10,
                max_overflow=40,
                pool_recycle=POOL_RECYCLE,
                connect_args=connect_args,
            )
            event.listen(eng, "checkout", _check_socket)
        if migrate_schema:  # idempotent: waits out a server that is restarting
            retrying(lambda: migrate(eng), what="upgrading the ledger's schema")
        _engines[url] = eng
        return eng


def head_revision() -> str:
    """The newest migration's revision, from the file names (``NNNN_name.py`` with revision
    ``NNNN``; tests/test_migrations.py checks that this is Alembic's head)."""
    from pathlib import Path

    versions = Path(__file__).resolve().parent / "migrations" / "versions"
    return max(p.name[:4] for p in versions.glob("[0-9][0-9][0-9][0-9]_*.py"))


def at_head(engine: Engine) -> bool:
    """Is the schema at the newest revision? One query; importing Alembic and asking it
    costs every short CLI command ~0.2 s."""
    try:
        with engine.connect() as conn:
            found = conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
    except exc.DBAPIError as err:
        if err.connection_invalidated:
            raise  # the server went away: let the caller wait or fail
        return False  # no alembic_version table yet (or no server: the upgrade will say)
    return list(found) == [head_revision()]


def migrate(engine: Engine) -> None:
    """Upgrade the schema to the newest Alembic revision (safe to call from many processes)."""
    if at_head(engine):
        return
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", "app:migrations")
    try:
        with engine.begin() as conn:
            if engine.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(727274)"))
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
    except exc.ProgrammingError as err:
        if getattr(err.orig, "sqlstate", None) != "42501":  # insufficient_privilege
            raise
        from app.errors import ConfigError

        # A role of app.dbroles (a worker, the server) may not change the schema.
        raise ConfigError(
            f"the ledger's schema is older than this vmfarm (revision {head_revision()}) and "
            f"{engine.url.username or 'this database user'} may not upgrade it: run any "
            "vmfarm command once as the database's owner, then start this process again"
        ) from None


def reset_engines() -> None:
    """Forget cached engines (tests switch databases)."""
    with _lock:
        for eng in _engines.values():
            eng.dispose()
        _engines.clear()


def _check_socket(dbapi_conn: Any, _record: Any, _proxy: Any) -> None:
    """Pool checkout: is this idle connection still open? Asked of its socket, no round trip.

    An idle connection has nothing to read unless its server has sent something unasked: a
    server that shuts down (restart, failover, pg_terminate_backend) sends its FATAL message
    and closes the connection. Then this connection, and every other pooled one made before
    it, is discarded and a new one made (a rare notice costs a reconnect, nothing more). A
    connection cut without a word (a network partition) fails at its first statement instead:
    SQLAlchemy then invalidates the pool, and the caller may try again (``retrying``).
    """
    pgconn = getattr(dbapi_conn, "pgconn", None)
    if pgconn is None:  # not psycopg: nothing to look at
        return
    try:
        if dbapi_conn.closed or dbapi_conn.broken:
            raise exc.InvalidatePoolError("the connection is closed")
        poller = select.poll()
        poller.register(pgconn.socket, select.POLLIN | select.POLLERR | select.POLLHUP)
        ready = poller.poll(0)
    except exc.DisconnectionError:
        raise
    except Exception as err:  # psycopg cannot even give the socket: it is gone
        raise exc.InvalidatePoolError(f"the connection is unusable: {err}") from err
    if ready:
        raise exc.InvalidatePoolError("the server closed the connection (restarted?)")


def is_disconnect(err: BaseException) -> bool:
    """Is ``err`` a lost or refused database connection (a server restarting or failing
    over), after which the whole transaction may be tried again on a new connection?"""
    if isinstance(err, exc.DisconnectionError):
        return True
    if isinstance(err, exc.DBAPIError):
        if err.connection_invalidated:
            return True
        err = err.orig if err.orig is not None else err
    try:
        import psycopg
    except ImportError:  # pragma: no cover - psycopg is a dependency
        return False
    if not isinstance(err, psycopg.OperationalError):
        return False
    state = getattr(err, "sqlstate", None)
    # No SQLSTATE: libpq's own failure (refused, closed, reset, timed out connecting).
    return state is None or state.startswith("08") or state in _DISCONNECT_STATES


def _brief(err: BaseException) -> str:
    text_ = str(getattr(err, "orig", None) or err).strip().splitlines()
    return text_[0] if text_ else type(err).__name__


def _wait_for_server(s: Session, deadline: float) -> None:
    """Check out the session's connection now, waiting for an unreachable server until
    ``deadline`` (monotonic): nothing of the caller's transaction has run yet."""
    delay = 0.1
    while True:
        try:
            s.connection()
            return
        except exc.DBAPIError as err:
            if not is_disconnect(err) or time.monotonic() + delay > deadline:
                raise
            log.warning(
                "the database is unreachable (%s); trying again in %.1f s", _brief(err), delay
            )
        time.sleep(delay)
        delay = min(delay * 2, 2.0)


@contextmanager
def session_scope(url: str | None = None, *, wait: float = RECONNECT_SECONDS) -> Iterator[Session]:
    """A session in one transaction: committed on success, rolled back on error.

    On a database server the connection is taken before the body runs, waiting up to
    ``wait`` seconds for a server that is restarting (0: fail at once).
    """
    engine = get_engine(url)
    with Session(engine, expire_on_commit=False) as s, s.begin():
        if engine.dialect.name != "sqlite":
            _wait_for_server(s, time.monotonic() + wait)
        yield s


def retrying(fn: Callable[[], T], *, what: str, within: float = RECONNECT_SECONDS) -> T:
    """``fn()``, called again while it fails with a lost database connection, for up to
    ``within`` seconds. ``fn`` must run whole transactions (``session_scope``) that are safe to
    repeat: the server may have committed the one whose connection was cut."""
    deadline = time.monotonic() + within
    delay = 0.1
    while True:
        try:
            return fn()
        except Exception as err:
            if not is_disconnect(err) or time.monotonic() + delay > deadline:
                raise
            log.warning(
                "%s: the database connection was lost (%s); trying again in %.1f s",
                what,
                _brief(err),
                delay,
            )
        time.sleep(delay)
        delay = min(delay * 2, 2.0)


def insert_stmt(model: type[Any]) -> Any:
    """An INSERT of ``model`` in the ledger's dialect (for ``on_conflict_do_nothing``)."""
    from sqlalchemy.dialects.postgresql import insert as pg_insert
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    return (pg_insert if get_engine().dialect.name == "postgresql" else sqlite_insert)(model)


def insert_once(model: type[Any], values: dict[str, Any]) -> tuple[int, Any | None]:
    """Insert a row keyed by its unique ``idem_key`` unless it exists.

    Returns (id, None) when this call inserted it (the caller owns the work), or (id, row) when
    it was already there (a duplicate delivery: the caller returns the recorded result).
    """
    from sqlmodel import select

    stmt = (
        insert_stmt(model)
        .values(**values)
        .on_conflict_do_nothing(index_elements=["idem_key"])
        .returning(model.id)
    )
    with session_scope() as s:
        new_id = s.execute(stmt).scalar()
        if new_id is not None:
            return int(new_id), None
        row = s.exec(select(model).where(model.idem_key == values["idem_key"])).one()
        return int(row.id or 0), row


def claim_once(
    model: type[Any],
    values: dict[str, Any],
    *,
    what: str,
    owner: tuple[str, ...] = ("status", "worker", "started_at"),
) -> tuple[int, Any | None]:
    """``insert_once`` tried again on a lost connection. When the server committed the insert
    but the answer was lost, the row found is this call's own (the same ``owner`` values: the
    same worker and start time to the microsecond), and this call owns it."""

    def insert() -> tuple[int, Any | None]:
        run_id, row = insert_once(model, values)
        if row is not None and all(getattr(row, k) == values[k] for k in owner):
            return run_id, None
        return run_id, row

    return retrying(insert, what=what)
