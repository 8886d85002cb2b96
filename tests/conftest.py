"""Shared fixtures: a temporary Prefect home, and a fresh database per test (SQLite or MariaDB).

MariaDB tests run on a private server that this session starts on first use and removes at the
end (tests/mariadb_server.py), or on the server that LOOKALIKE_TEST_DATABASE_URL names: an
admin SQLAlchemy URL such as mysql+pymysql://root:PASSWORD@HOST:3306/test. Either way each test
gets a database of its own, created before it and dropped after it.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.mariadb_server import MariaDBUnavailable, PrivateMariaDB

TEST_DATABASE_ENV = "LOOKALIKE_TEST_DATABASE_URL"
# Read before the LOOKALIKE_* variables are cleared below: no code under test may see it.
GIVEN_ADMIN_URL = os.environ.get(TEST_DATABASE_ENV, "")

# Keep Prefect out of the user's home and off the network before it is imported anywhere.
_PREFECT_HOME = Path(os.environ.get("TMPDIR", "/tmp")) / f"lookalike-test-prefect-{os.getpid()}"
os.environ["PREFECT_HOME"] = str(_PREFECT_HOME)
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
for _name in list(os.environ):
    if _name.startswith("LOOKALIKE_"):
        del os.environ[_name]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test that takes a MariaDB database is marked mariadb, so -m can select it."""
    for item in items:
        if "mariadb_url" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.mariadb)


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """One ephemeral Prefect API for the whole session, with a temporary PREFECT_HOME."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def prefect_api_env(prefect_harness: None) -> dict[str, str]:
    """PREFECT_API_URL of the session's harness, for a `lookalike` subprocess: without it each
    run starts a temporary Prefect server of its own (about 13 s here). tests/test_up_to_date.py
    still runs the command in that ephemeral mode."""
    from prefect.settings import get_current_settings

    return {"PREFECT_API_URL": str(get_current_settings().api.url)}


def answers(admin_url: str) -> str | None:
    """None when the server behind this URL accepts the login, else the error, on one line."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(admin_url)
    try:
        with engine.connect():
            return None
    except Exception as exc:
        return " ".join(str(exc).split())[:300]
    finally:
        engine.dispose()


@pytest.fixture(scope="session")
def mariadb_admin_url() -> Iterator[str]:
    """Admin URL of this session's MariaDB: LOOKALIKE_TEST_DATABASE_URL's, else a private one."""
    if GIVEN_ADMIN_URL:
        error = answers(GIVEN_ADMIN_URL)
        if error:
            pytest.fail(f"{TEST_DATABASE_ENV} does not answer: {error}", pytrace=False)
        yield GIVEN_ADMIN_URL
        return
    try:
        server = PrivateMariaDB.launch()
    except MariaDBUnavailable as exc:
        pytest.fail(
            f"{exc}; run `sudo make services` to install them, or set {TEST_DATABASE_ENV}",
            pytrace=False,
        )
    try:
        yield server.url("mysql")
    finally:
        server.remove()


@pytest.fixture
def mariadb_url(mariadb_admin_url: str) -> Iterator[str]:
    """A MariaDB database made for this test and dropped after it."""
    import sqlalchemy

    name = f"lookalike_test_{uuid.uuid4().hex[:12]}"
    admin = sqlalchemy.create_engine(mariadb_admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(
            f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_nopad_bin"
        )
    url = sqlalchemy.engine.make_url(mariadb_admin_url).set(database=name)
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
