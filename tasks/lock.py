"""Run lock: at most one process-images or rebuild-neighbours run per database at a time."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Connection, Engine, text
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError

from lookalike.tasks.database import (
    DatabaseError,
    create_db_engine,
    describe_db_error,
    parse_database_url,
)
from lookalike.tasks.settings import Settings, SettingsError

DEFAULT_LOCK_TIMEOUT: float = Settings.model_fields["lock_timeout"].default  # the settings' default
POLL_SECONDS = 0.25
MARIADB_LOCK_NAME_LIMIT = 64  # GET_LOCK names longer than this are an error

WaitNotice = Callable[[str], None]

log = logging.getLogger(__name__)


class RunLockError(DatabaseError):
    """Another run kept the database's run lock past the timeout; one line for the user."""


@contextlib.contextmanager
def hold_run_lock(
    database_url: str, timeout: float = DEFAULT_LOCK_TIMEOUT, on_wait: WaitNotice | None = None
) -> Iterator[float]:
    """Hold the database's run lock for the block; yields the seconds spent waiting for it.

    MariaDB: GET_LOCK on a connection of its own, held until the block ends. SQLite: an
    exclusive flock on a file beside the database. Both are released by the operating system
    or the server when the process dies, so a crashed run never leaves a stale lock.
    """
    if timeout < 0:
        raise SettingsError(f"the lock timeout must be 0 s or more, got {timeout:g}")
    parsed = parse_database_url(database_url)
    notice = on_wait or (lambda _message: None)
    if parsed.get_backend_name() != "sqlite":
        with _hold_mariadb_lock(database_url, parsed, timeout, notice) as waited:
            yield waited
        return
    path = sqlite_lock_path(parsed)
    if path is None:  # an in-memory database belongs to one process: nothing to share
        yield 0.0
        return
    with _hold_file_lock(path, timeout, notice, _describe(parsed)) as waited:
        yield waited


def is_run_lock_busy(database_url: str) -> bool:
    """True when another run holds the lock now (a hint for the CLI; the answer may go stale)."""
    try:
        with hold_run_lock(database_url, timeout=0):
            return False
    except RunLockError:
        return True


def sqlite_lock_path(parsed: URL) -> Path | None:
    """The lock file beside a SQLite database file; None for an in-memory database."""
    if not parsed.database or parsed.database == ":memory:":
        return None
    database = Path(parsed.database).resolve()
    return database.with_name(database.name + ".run-lock")


def mariadb_lock_name(parsed: URL) -> str:
    """The server-wide GET_LOCK name of this database (names are limited to 64 characters)."""
    name = f"lookalike-run:{parsed.database or ''}"
    if len(name) <= MARIADB_LOCK_NAME_LIMIT:
        return name
    return "lookalike-run:" + hashlib.blake2b(name.encode(), digest_size=16).hexdigest()


def _describe(parsed: URL) -> str:
    """The database as shown in messages, without its password."""
    return parsed.render_as_string(hide_password=True)


def _timeout_message(database: str, timeout: float, holder: str) -> str:
    return (
        f"another lookalike run holds the run lock of {database} ({holder}); "
        f"gave up after waiting {timeout:g} s: try again when it has finished"
    )


@contextlib.contextmanager
def _hold_file_lock(
    path: Path, timeout: float, notice: WaitNotice, database: str
) -> Iterator[float]:
    """An exclusive flock on path, polled until the timeout."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        started = time.monotonic()
        if not _try_flock(fd):
            notice(f"another run holds the run lock of {database}; waiting up to {timeout:g} s")
            while not _try_flock(fd):
                if time.monotonic() - started >= timeout:
                    holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
                    raise RunLockError(_timeout_message(database, timeout, f"process {holder}"))
                time.sleep(POLL_SECONDS)
        waited = time.monotonic() - started
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)  # who holds it, for the waiter's message
        yield waited
    finally:
        os.close(fd)  # closing the descriptor releases the flock


def _try_flock(fd: int) -> bool:
    """Take the exclusive lock if it is free; False when another open file holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


@dataclass
class _HeldLock:
    """A MariaDB run lock this process holds: its name and the connection holding it."""

    name: str
    engine: Engine
    conn: Connection


# MariaDB run locks held by this process, by database URL (see confirm_run_lock).
_HELD: dict[str, _HeldLock] = {}


@contextlib.contextmanager
def _hold_mariadb_lock(
    database_url: str, parsed: URL, timeout: float, notice: WaitNotice
) -> Iterator[float]:
    """GET_LOCK on a dedicated autocommit connection, kept open while the block runs."""
    name = mariadb_lock_name(parsed)
    engine = create_db_engine(database_url)
    try:
        conn = _lock_connection(engine, parsed)
        waited = _acquire_mariadb_lock(conn, name, timeout, notice, _describe(parsed))
        held = _HELD[database_url] = _HeldLock(name, engine, conn)
        try:
            yield waited
        finally:
            _HELD.pop(database_url, None)
            _release_mariadb_lock(held.conn, name)
    finally:
        engine.dispose()


def confirm_run_lock(database_url: str) -> None:
    """Before writing: make sure this process still holds the run lock; RunLockError if not.

    A MariaDB lock belongs to its connection, so a server restart or a dropped connection
    releases it silently and another run could start. Here a lost lock is taken again when
    it is free (the run goes on) and refused when another run has it. SQLite's file lock
    cannot be lost this way.
    """
    held = _HELD.get(database_url)
    if held is None:
        return
    try:
        owner = held.conn.execute(
            text("SELECT IS_USED_LOCK(:n) = CONNECTION_ID()"), {"n": held.name}
        )
        if owner.scalar():
            return
    except DBAPIError as exc:
        log.warning("run lock connection lost (%s); taking the lock again", describe_db_error(exc))
    _retake_lock(held, parse_database_url(database_url))


def _retake_lock(held: _HeldLock, parsed: URL) -> None:
    """Take a lost lock again on a new connection, without waiting."""
    with contextlib.suppress(DBAPIError):
        held.conn.close()
    held.conn = _lock_connection(held.engine, parsed)
    database = _describe(parsed)
    if not _get_lock(held.conn, held.name, 0):
        raise RunLockError(
            f"this run lost the run lock of {database} (its connection dropped) and another "
            "run holds it now; stopped before writing: run again when that run has finished"
        )
    log.warning("run lock of %s taken again after its connection was lost", database)


def _lock_connection(engine: Engine, parsed: URL) -> Connection:
    """A connection of the lock's own, outside any transaction."""
    try:
        return engine.connect().execution_options(isolation_level="AUTOCOMMIT")
    except DBAPIError as exc:
        raise DatabaseError(
            f"cannot use database {_describe(parsed)}: {describe_db_error(exc)}"
        ) from None


def _acquire_mariadb_lock(
    conn: Connection, name: str, timeout: float, notice: WaitNotice, database: str
) -> float:
    """Take the named lock, waiting up to timeout; the seconds waited."""
    started = time.monotonic()
    try:
        if not _get_lock(conn, name, 0):
            notice(f"another run holds the run lock of {database}; waiting up to {timeout:g} s")
            if not _get_lock(conn, name, timeout):
                holder = conn.execute(text("SELECT IS_USED_LOCK(:n)"), {"n": name}).scalar()
                raise RunLockError(_timeout_message(database, timeout, f"connection {holder}"))
    except DBAPIError as exc:
        conn.close()
        raise DatabaseError(
            f"cannot take the run lock of {database}: {describe_db_error(exc)}"
        ) from None
    except RunLockError:
        conn.close()
        raise
    return time.monotonic() - started


def _release_mariadb_lock(conn: Connection, name: str) -> None:
    """Release the lock and close its connection; a lost connection has released it already."""
    try:
        conn.execute(text("SELECT RELEASE_LOCK(:n)"), {"n": name})
    except DBAPIError as exc:
        log.warning("run lock connection lost before release (%s)", describe_db_error(exc))
    finally:
        conn.close()


def _get_lock(conn: Connection, name: str, timeout: float) -> bool:
    """GET_LOCK: True when taken, False on timeout; NULL (an error on the server) raises."""
    got = conn.execute(text("SELECT GET_LOCK(:n, :t)"), {"n": name, "t": timeout}).scalar()
    if got is None:
        raise DatabaseError(f"GET_LOCK({name!r}) failed on the server")
    return bool(got)
