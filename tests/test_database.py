"""Database engines: URL checks, readable errors, and schema creation racing other runs."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import inspect, text

from lookalike.sql.schema import metadata
from lookalike.tasks.catalog import start_run
from lookalike.tasks.database import (
    DatabaseError,
    connect_checked,
    create_db_engine,
    create_reader_engine,
    create_schema,
    parse_database_url,
)

RACERS = 6


def test_unsupported_backends_and_malformed_urls_are_refused_in_one_line() -> None:
    with pytest.raises(DatabaseError, match="unsupported database 'postgresql'"):
        parse_database_url("postgresql://localhost/x")
    with pytest.raises(DatabaseError, match="malformed database URL"):
        parse_database_url("not a url")


def test_unreachable_mariadb_is_one_line_without_the_password() -> None:
    with pytest.raises(DatabaseError) as caught:
        connect_checked("mysql+pymysql://root:secret@127.0.0.1:1/nowhere")
    message = str(caught.value)
    assert "secret" not in message and "***" in message
    assert "\n" not in message


def test_runs_starting_together_all_create_the_schema(database_url: str) -> None:
    """Several processes' first runs create the tables at once; none of them fails."""
    barrier = threading.Barrier(RACERS)
    errors: list[BaseException] = []
    engines = [create_db_engine(database_url) for _ in range(RACERS)]

    def race(index: int) -> None:
        barrier.wait()
        try:
            create_schema(engines[index])
        except BaseException as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=race, args=(i,)) for i in range(RACERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert errors == []
    assert set(inspect(engines[0]).get_table_names()) == set(metadata.tables)
    for engine in engines:
        engine.dispose()


def test_the_reader_engine_sees_each_new_commit(mariadb_url: str) -> None:
    """Autocommit readers hold no snapshot between requests: a later write is visible."""
    writer, reader = connect_checked(mariadb_url), create_reader_engine(mariadb_url)
    query = text("SELECT COUNT(*) FROM runs")
    with reader.connect() as conn:
        before = conn.execute(query).scalar_one()
    start_run(writer, "x")  # a write committed by another connection
    with reader.connect() as conn:
        assert conn.execute(query).scalar_one() == before + 1
    writer.dispose()
    reader.dispose()


def test_the_reader_engine_replaces_a_connection_the_server_dropped(mariadb_url: str) -> None:
    reader = create_reader_engine(mariadb_url, ping_after_s=0.0)
    with reader.connect() as conn:
        first_id = conn.execute(text("SELECT CONNECTION_ID()")).scalar_one()
    admin = create_db_engine(mariadb_url)
    with admin.connect() as conn:
        conn.execute(text(f"KILL {int(first_id)}"))
    admin.dispose()
    with reader.connect() as conn:  # the ping finds the pooled connection dead: a new one
        second_id = conn.execute(text("SELECT CONNECTION_ID()")).scalar_one()
    assert second_id != first_id
    assert reader.pool.checkedout() == 0
    reader.dispose()
