"""LookalikeError: one base for every user-facing error, and the one line users see of it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lookalike.flows.runners import TaskRunnerError, build_task_runner
from lookalike.tasks.catalog import CollectionMismatchError, NoImagesError
from lookalike.tasks.database import DatabaseError, describe_db_error, parse_database_url
from lookalike.tasks.discover import DiscoveryError, check_root
from lookalike.tasks.errors import LookalikeError, first_line
from lookalike.tasks.knn.space import NonFiniteFeaturesError
from lookalike.tasks.load import LoadError
from lookalike.tasks.lock import RunLockError
from lookalike.tasks.models import WeightsError
from lookalike.tasks.settings import SettingsError
from lookalike.tasks.stage import StagingError

USER_ERRORS = [
    CollectionMismatchError,
    DatabaseError,
    DiscoveryError,
    LoadError,
    NoImagesError,
    NonFiniteFeaturesError,
    RunLockError,
    SettingsError,
    StagingError,
    TaskRunnerError,
    WeightsError,
]


@pytest.mark.parametrize("error", USER_ERRORS, ids=lambda error: error.__name__)
def test_every_user_error_is_a_lookalike_error(error: type[Exception]) -> None:
    assert issubclass(error, LookalikeError)


def test_errors_raised_by_the_stages_are_lookalike_errors(tmp_path: Path) -> None:
    with pytest.raises(LookalikeError, match="folder not found"):
        check_root(tmp_path / "missing")
    with pytest.raises(LookalikeError, match="unsupported database 'postgresql'"):
        parse_database_url("postgresql://x@127.0.0.1/db")
    with pytest.raises(LookalikeError, match="task runner must be one of local, dask"):
        build_task_runner("ray")


@pytest.mark.parametrize(
    ("message", "line"),
    [
        ("one line", "one line"),
        ("first\nsecond\nthird", "first"),
        ("\n  \n  indented first\nsecond", "indented first"),
        ("", "LookalikeError"),
        ("\n\n", "LookalikeError"),
    ],
)
def test_first_line_of_an_error(message: str, line: str) -> None:
    assert first_line(LookalikeError(message)) == line


def test_a_driver_error_is_described_by_its_first_line() -> None:
    class DriverError(Exception):
        pass

    class Wrapped(Exception):
        orig = DriverError(1045, "Access denied for user 'x'\nmore detail")

    assert describe_db_error(Wrapped("ignored")) == "Access denied for user 'x'"
    assert describe_db_error(DriverError("no such table: runs\n[SQL: ...]")) == (
        "no such table: runs"
    )
    assert describe_db_error(DriverError()) == "DriverError"


def test_the_errors_module_imports_nothing_of_lookalike() -> None:
    script = (
        "import sys\n"
        "import lookalike.tasks.errors\n"
        "print(sorted(m for m in sys.modules if m.startswith('lookalike.')))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "['lookalike.tasks', 'lookalike.tasks.errors']"
