"""The run lock: a MariaDB lock lost with its connection is taken again or refused clearly."""

from __future__ import annotations

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url

from lookalike.tasks.database import create_db_engine
from lookalike.tasks.lock import RunLockError, confirm_run_lock, hold_run_lock, mariadb_lock_name


def lock_holder(url: str) -> int | None:
    """The connection id holding the database's run lock, None when free."""
    engine = create_db_engine(url)
    name = mariadb_lock_name(make_url(url))
    with engine.connect() as conn:
        holder = conn.execute(text("SELECT IS_USED_LOCK(:n)"), {"n": name}).scalar()
    engine.dispose()
    return None if holder is None else int(holder)


def kill_connection(url: str, connection_id: int) -> None:
    """Drop a server connection, as a restart or a network cut would."""
    engine = create_db_engine(url)
    with engine.connect() as conn:
        conn.execute(text(f"KILL {int(connection_id)}"))
    engine.dispose()


@pytest.mark.mariadb
def test_a_held_lock_is_confirmed_without_change(mariadb_url: str) -> None:
    with hold_run_lock(mariadb_url, timeout=5):
        holder = lock_holder(mariadb_url)
        confirm_run_lock(mariadb_url)
        assert lock_holder(mariadb_url) == holder is not None
    assert lock_holder(mariadb_url) is None


@pytest.mark.mariadb
def test_a_lock_lost_with_its_connection_is_taken_again_when_free(mariadb_url: str) -> None:
    with hold_run_lock(mariadb_url, timeout=5):
        first = lock_holder(mariadb_url)
        assert first is not None
        kill_connection(mariadb_url, first)
        assert lock_holder(mariadb_url) is None  # the server released it with the connection
        confirm_run_lock(mariadb_url)
        second = lock_holder(mariadb_url)
        assert second is not None and second != first
        with pytest.raises(RunLockError), hold_run_lock(mariadb_url, timeout=0):
            pass  # another run is kept out again
    assert lock_holder(mariadb_url) is None


@pytest.mark.mariadb
def test_a_lock_another_run_took_meanwhile_stops_this_run(mariadb_url: str) -> None:
    other = create_db_engine(mariadb_url)
    name = mariadb_lock_name(make_url(mariadb_url))
    with hold_run_lock(mariadb_url, timeout=5):
        kill_connection(mariadb_url, lock_holder(mariadb_url) or 0)
        with other.connect() as conn:
            assert conn.execute(text("SELECT GET_LOCK(:n, 0)"), {"n": name}).scalar() == 1
            with pytest.raises(RunLockError, match="lost the run lock .* another run holds it"):
                confirm_run_lock(mariadb_url)
    other.dispose()


def test_sqlite_locks_need_no_confirmation(sqlite_url: str) -> None:
    with hold_run_lock(sqlite_url, timeout=5):
        confirm_run_lock(sqlite_url)  # a file lock cannot be lost with a connection
