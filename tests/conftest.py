"""Shared fixtures: a temporary Prefect home, and a fresh database per test (SQLite or MariaDB)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

MARIADB_ADMIN_URL = os.environ.get(
    "LOOKALIKE_TEST_MARIADB", "mysql+pymysql://root:@127.0.0.1:3306/test"
)

# Keep Prefect out of the user's home and off the network before it is imported anywhere.
_PREFECT_HOME = Path(os.environ.get("TMPDIR", "/tmp")) / f"lookalike-test-prefect-{os.getpid()}"
os.environ["PREFECT_HOME"] = str(_PREFECT_HOME)
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
for _name in list(os.environ):
    if _name.startswith("LOOKALIKE_") and _name != "LOOKALIKE_TEST_MARIADB":
        del os.environ[_name]


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """One ephemeral Prefect API for the whole session, with a temporary PREFECT_HOME."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def mariadb_available() -> bool:
    """True when the MariaDB server of the test setup answers."""
    import sqlalchemy

    try:
        engine = sqlalchemy.create_engine(MARIADB_ADMIN_URL)
        with engine.connect():
            pass
        engine.dispose()
        return True
    except Exception:
        return False


@pytest.fixture
def mariadb_url() -> Iterator[str]:
    """A MariaDB database made for this test and dropped after it."""
    import sqlalchemy

    if not mariadb_available():
        pytest.fail(f"MariaDB is not reachable at {MARIADB_ADMIN_URL}; start it (see .ci/run)")
    name = f"lookalike_test_{uuid.uuid4().hex[:12]}"
    admin = sqlalchemy.create_engine(MARIADB_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(
            f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_nopad_bin"
        )
    url = sqlalchemy.engine.make_url(MARIADB_ADMIN_URL).set(database=name)
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS `{name}`")
        admin.dispose()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A SQLite database file in this test's temporary folder."""
    return f"sqlite:///{tmp_path / 'lookalike.sqlite'}"


@pytest.fixture(params=["sqlite", pytest.param("mariadb", marks=pytest.mark.mariadb)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each test that takes this runs once on SQLite and once on MariaDB."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'lookalike.sqlite'}"
    return str(request.getfixturevalue("mariadb_url"))
