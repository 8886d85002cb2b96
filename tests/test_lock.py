"""The run lock: one holder at a time; a MariaDB lock lost with its connection is taken again."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

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


# --- SQLite: an exclusive flock on DATABASE.run-lock -------------------------------------------

TRY_LOCK = """
import sys
from lookalike.tasks.lock import RunLockError, hold_run_lock
try:
    with hold_run_lock(sys.argv[1], timeout=float(sys.argv[2])):
        print("took")
except RunLockError as exc:
    print("refused:", exc)
"""


def try_lock_in_another_process(url: str, timeout: float = 0) -> str:
    """What a second process trying the run lock reports: "took" or "refused: ..."."""
    done = subprocess.run(
        [sys.executable, "-c", TRY_LOCK, url, str(timeout)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout.strip()


def test_a_held_sqlite_lock_keeps_another_process_out_and_is_confirmed(sqlite_url: str) -> None:
    assert try_lock_in_another_process(sqlite_url) == "took"
    with hold_run_lock(sqlite_url, timeout=5) as waited:
        assert waited < 1
        refused = try_lock_in_another_process(sqlite_url)
        assert refused.startswith("refused: another lookalike run holds the run lock")
        assert f"(process {os.getpid()})" in refused  # the holder is named
        confirm_run_lock(sqlite_url)  # nothing to retake: the flock is still this process's
        assert try_lock_in_another_process(sqlite_url).startswith("refused:")
    assert try_lock_in_another_process(sqlite_url) == "took"  # released with the block


def test_a_second_holder_waits_until_the_first_releases(sqlite_url: str) -> None:
    notices: list[str] = []
    waited: list[float] = []
    second_started = threading.Event()

    def second_run() -> None:
        second_started.set()
        with hold_run_lock(sqlite_url, timeout=30, on_wait=notices.append) as seconds:
            waited.append(seconds)

    with hold_run_lock(sqlite_url, timeout=5):
        thread = threading.Thread(target=second_run)
        thread.start()
        second_started.wait(5)
        time.sleep(1.0)
        assert thread.is_alive() and waited == []  # still waiting while the first holds it
    thread.join(30)
    assert not thread.is_alive()
    assert len(waited) == 1 and 1.0 <= waited[0] < 30
    assert len(notices) == 1 and "waiting up to 30 s" in notices[0]


def test_a_held_sqlite_lock_refuses_a_second_holder_after_its_timeout(sqlite_url: str) -> None:
    with hold_run_lock(sqlite_url, timeout=5):
        started = time.monotonic()
        with (
            pytest.raises(RunLockError, match="gave up after waiting 0.5 s"),
            hold_run_lock(sqlite_url, timeout=0.5),
        ):
            pass
        assert time.monotonic() - started >= 0.5
    with hold_run_lock(sqlite_url, timeout=0) as waited:  # free again
        assert waited < 1
