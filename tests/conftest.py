"""Shared fixtures: a temporary Prefect home, and a fresh database per test (SQLite or MariaDB).

MariaDB tests run on a private server that this session starts on first use and removes at the
end (tests/mariadb_server.py), or on the server that LOOKALIKE_TEST_DATABASE_URL names: an
admin SQLAlchemy URL such as mysql+pymysql://root:PASSWORD@HOST:3306/test. Either way each test
gets a database of its own, created before it and dropped after it.

Under pytest-xdist (`make test` runs two workers, tests handed out by file) every worker is a
process of its own that runs the session fixtures itself: its own private MariaDB (own data
folder and port), its own Prefect test harness and its own PREFECT_HOME, named by worker and pid.
"""

from __future__ import annotations

import atexit
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.mariadb_server import MariaDBUnavailable, PrivateMariaDB

TEST_DATABASE_ENV = "LOOKALIKE_TEST_DATABASE_URL"
# Read before the LOOKALIKE_* variables are cleared below: no code under test may see it. An
# xdist worker starts after the controller cleared them: it gets the URL in its workerinput.
GIVEN_ADMIN_URL = os.environ.get(TEST_DATABASE_ENV, "")
_WORKERINPUT_KEY = "lookalike_test_database_url"

# Keep Prefect out of the user's home and off the network before it is imported anywhere; one
# home per process (an xdist worker's id in the name too), removed when the process's run ends.
_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "main")
_PREFECT_HOME = (
    Path(os.environ.get("TMPDIR", "/tmp")) / f"lookalike-test-prefect-{_WORKER}-{os.getpid()}"
)
os.environ["PREFECT_HOME"] = str(_PREFECT_HOME)
# Registered first, so run last: after the harness's own exit handlers, which may still write.
atexit.register(shutil.rmtree, _PREFECT_HOME, ignore_errors=True)
# Dask's scratch folder (test_dask's cluster, the flows' temporary one) likewise, not
# /tmp/dask-scratch-space left behind.
_DASK_SCRATCH = _PREFECT_HOME.with_name(f"lookalike-test-dask-{_WORKER}-{os.getpid()}")
os.environ["DASK_TEMPORARY_DIRECTORY"] = str(_DASK_SCRATCH)
atexit.register(shutil.rmtree, _DASK_SCRATCH, ignore_errors=True)
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
for _name in list(os.environ):
    if _name.startswith("LOOKALIKE_"):
        del os.environ[_name]


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """pytest-xdist, in the controller: hand each worker the admin URL read above."""
    node.workerinput[_WORKERINPUT_KEY] = GIVEN_ADMIN_URL  # an xdist WorkerController


def given_admin_url(config: pytest.Config) -> str:
    """LOOKALIKE_TEST_DATABASE_URL as the run was started with ("" when unset)."""
    workerinput = getattr(config, "workerinput", None)
    return str(workerinput[_WORKERINPUT_KEY]) if workerinput is not None else GIVEN_ADMIN_URL


def pytest_unconfigure(config: pytest.Config) -> None:
    """Remove this process's PREFECT_HOME (the harness keeps its database elsewhere) and Dask
    scratch folder; the exit handlers above remove whatever is written after this."""
    shutil.rmtree(_PREFECT_HOME, ignore_errors=True)
    shutil.rmtree(_DASK_SCRATCH, ignore_errors=True)


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
def mariadb_admin_url(pytestconfig: pytest.Config) -> Iterator[str]:
    """Admin URL of this session's MariaDB: LOOKALIKE_TEST_DATABASE_URL's, else a private one
    (one per xdist worker; on a given server the workers' database names differ anyway)."""
    given = given_admin_url(pytestconfig)
    if given:
        error = answers(given)
        if error:
            pytest.fail(f"{TEST_DATABASE_ENV} does not answer: {error}", pytrace=False)
        yield given
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
