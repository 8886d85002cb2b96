"""Database engines for SQLite and MariaDB, with errors turned into one readable line."""

from __future__ import annotations

import functools
import logging
import sqlite3
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import (
    ArgumentError,
    DBAPIError,
    DisconnectionError,
    NoSuchModuleError,
    OperationalError,
)

from lookalike.sql.migrations import migrate
from lookalike.sql.schema import metadata
from lookalike.tasks.errors import LookalikeError, first_line

log = logging.getLogger(__name__)

# Server gone, lost connection, can't connect, lock wait timeout, deadlock, server shutting down.
TRANSIENT_MARIADB_CODES = {2002, 2003, 2006, 2013, 1205, 1213, 1053}
# A pooled reader connection idle this long is pinged before reuse (the server may be gone).
READER_PING_AFTER_S = 5.0


class DatabaseError(LookalikeError, RuntimeError):
    """The database cannot be used; the message is one line meant for the user."""


def parse_database_url(url: str) -> URL:
    """Parse a SQLAlchemy URL, refusing malformed ones and unsupported back-ends."""
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError) as exc:
        raise DatabaseError(f"malformed database URL {url!r}: {exc}") from None
    if parsed.get_backend_name() not in ("sqlite", "mysql", "mariadb"):
        raise DatabaseError(
            f"unsupported database {parsed.get_backend_name()!r}: use sqlite:///FILE "
            "or mysql+pymysql://USER:PASSWORD@HOST:PORT/DB"
        )
    return parsed


def utcnow() -> datetime:
    """Timezone-naive UTC, as stored in DateTime columns."""
    return datetime.now(UTC).replace(tzinfo=None)


def is_mariadb(engine: Engine) -> bool:
    """True for MariaDB/MySQL engines."""
    return engine.dialect.name in ("mysql", "mariadb")


def create_db_engine(url: str, *, local_infile: bool = False) -> Engine:
    """An engine for the URL; LOCAL INFILE only when asked (the bulk loader's connection)."""
    parsed = parse_database_url(url)
    try:
        if parsed.get_backend_name() == "sqlite":
            return _sqlite_engine(parsed)
        return create_engine(
            parsed,
            pool_pre_ping=True,
            pool_recycle=3600,
            connect_args={"local_infile": local_infile, "charset": "utf8mb4"},
        )
    except NoSuchModuleError as exc:
        raise DatabaseError(f"unsupported database driver in {url!r}: {exc}") from None


def create_reader_engine(url: str, ping_after_s: float = READER_PING_AFTER_S) -> Engine:
    """An engine for short read-only requests (the API): one round trip per query on MariaDB.

    The writer's engine pings on every checkout and rolls back on every return: two extra
    round trips per request. Readers run in autocommit (each SELECT sees the latest committed
    data, and there is no transaction to roll back), and ping only connections that sat idle
    long enough for the server to have dropped or restarted.
    """
    parsed = parse_database_url(url)
    if parsed.get_backend_name() == "sqlite":
        return create_db_engine(url)
    engine = create_engine(
        parsed,
        isolation_level="AUTOCOMMIT",
        skip_autocommit_rollback=True,  # else each Connection.close() sends a ROLLBACK
        pool_reset_on_return=None,
        pool_recycle=3600,
        connect_args={"local_infile": False, "charset": "utf8mb4"},
    )
    _ping_idle_connections(engine, ping_after_s)
    return engine


def _ping_idle_connections(engine: Engine, ping_after_s: float) -> None:
    """Before reuse, ping a connection idle for ping_after_s or longer; replace it if dead."""

    @event.listens_for(engine, "checkin")
    def _on_checkin(_dbapi_connection, record):  # type: ignore[no-untyped-def]
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _on_checkout(dbapi_connection, record, _proxy):  # type: ignore[no-untyped-def]
        idle_since = record.info.get("idle_since")
        if idle_since is None or time.monotonic() - idle_since < ping_after_s:
            return
        try:
            dbapi_connection.ping(reconnect=False)
        except Exception as exc:  # any driver error means this connection is gone
            # The pool discards it and checks out (or opens) another one.
            raise DisconnectionError(f"idle connection lost: {exc}") from exc


def _sqlite_engine(parsed: URL) -> Engine:
    """SQLite with WAL (readers never block the writer) and enforced foreign keys."""
    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(parsed, connect_args={"timeout": 60})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record):  # type: ignore[no-untyped-def]
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA foreign_keys=ON")
        _switch_to_wal(cursor)
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    return engine


def _switch_to_wal(cursor: Any, attempts: int = 200) -> None:
    """Put the file in WAL mode (it stays so), waiting out other connections doing the same.

    Changing the journal mode needs the file to itself, and SQLite answers 'database is
    locked' at once instead of calling the busy handler: several runs opening a new
    database together would fail without these retries.
    """
    for attempt in range(1, attempts + 1):
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or attempt == attempts:
                raise
            time.sleep(min(0.01 * attempt, 0.25))


def describe_db_error(exc: BaseException) -> str:
    """A one-line reason for a driver error (e.g. 'Access denied for user ...')."""
    orig = getattr(exc, "orig", None) or exc
    args: tuple[Any, ...] = tuple(getattr(orig, "args", ()))
    if len(args) >= 2 and isinstance(args[1], str):
        return args[1].splitlines()[0]
    return first_line(orig)


def create_schema(engine: Engine) -> None:
    """Create missing tables; a concurrent run creating them at the same moment is fine."""
    # create_all checks, then creates table by table: a run starting at the same moment can
    # create a table between the two. Each such clash means one more table exists, so
    # checking again makes progress; len(tables) + 1 rounds always suffice.
    migrate(engine)  # a database of one folder gains its sources first
    rounds = len(metadata.tables) + 1
    for round_number in range(1, rounds + 1):
        try:
            metadata.create_all(engine)
            return
        except DBAPIError as exc:
            if "already exists" not in str(exc) or round_number == rounds:
                raise
            log.debug("another run created a table first; checking the schema again")
            time.sleep(0.05 * round_number)


def connect_checked(url: str) -> Engine:
    """An engine that is known to answer, with the schema created; else DatabaseError."""
    engine = create_db_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(text("SELECT 1"))
        create_schema(engine)
    except DBAPIError as exc:
        engine.dispose()
        safe = parse_database_url(url).render_as_string(hide_password=True)
        log.debug("database connection failed", exc_info=True)
        raise DatabaseError(f"cannot use database {safe}: {describe_db_error(exc)}") from None
    return engine


@functools.lru_cache(maxsize=8)
def engine_for(url: str) -> Engine:
    """One engine per URL per process, shared by the tasks that run there."""
    return create_db_engine(url)


def is_transient(exc: BaseException) -> bool:
    """True for errors worth a retry: lost or refused connections, lock waits, deadlocks."""
    if isinstance(exc, OperationalError):
        code = getattr(getattr(exc, "orig", None), "args", [None])[0]
        return code in TRANSIENT_MARIADB_CODES or "database is locked" in str(exc)
    return isinstance(exc, DBAPIError) and exc.connection_invalidated


def retry_if_transient(_task: Any, _task_run: Any, state: Any) -> bool:
    """Prefect retry condition: retry database tasks only after transient errors."""
    try:
        state.result()
    except Exception as exc:  # the task's own exception, re-raised by result()
        return is_transient(exc)
    return False


# The retry policy of every task that talks to the database, in one place: three retries
# after 2, 10 and 30 s, only for errors that a retry can cure (see is_transient).
DATABASE_RETRIES: dict[str, Any] = {
    "retries": 3,
    "retry_delay_seconds": [2, 10, 30],
    "retry_condition_fn": retry_if_transient,
}
