"""The settings object: environment values, typed and validated, with overrides on top."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from lookalike.tasks.settings import Settings, SettingsError

SetEnv = Callable[[dict[str, str]], None]


@pytest.fixture
def set_env(monkeypatch: pytest.MonkeyPatch) -> SetEnv:
    """Replace every LOOKALIKE_* variable of this process by the given ones (undone after)."""
    for name in [name for name in os.environ if name.startswith("LOOKALIKE_")]:
        monkeypatch.delenv(name)

    def apply(env: dict[str, str]) -> None:
        for name, value in env.items():
            monkeypatch.setenv(name, value)

    apply({})
    return apply


def test_runner_and_lock_settings_come_from_the_environment(set_env: SetEnv) -> None:
    defaults = Settings.from_env()
    assert (defaults.task_runner, defaults.dask_address, defaults.lock_timeout) == (
        "local",
        "",
        3600.0,
    )
    set_env(
        {
            "LOOKALIKE_TASK_RUNNER": "dask",
            "LOOKALIKE_DASK_ADDRESS": "tcp://10.0.0.5:8786",
            "LOOKALIKE_LOCK_TIMEOUT": "90.5",
        }
    )
    settings = Settings.from_env()
    assert (settings.task_runner, settings.dask_address, settings.lock_timeout) == (
        "dask",
        "tcp://10.0.0.5:8786",
        90.5,
    )


def test_values_are_typed_and_empty_variables_are_unset(set_env: SetEnv) -> None:
    set_env(
        {
            "LOOKALIKE_DATA_DIR": "/srv/lookalike",
            "LOOKALIKE_STAGING_DIR": "",
            "LOOKALIKE_THUMBNAIL_DIR": "/tmp/thumbs",
            "LOOKALIKE_K": " 7 ",
            "LOOKALIKE_WEIGHTS": "none",
            "LOOKALIKE_REDUCED_SCALE_DECODE": " On ",
            "LOOKALIKE_NEIGHBOUR_CACHE": "FALSE",
            "LOOKALIKE_PROJECT_DIR": "/read/by/prefect.yaml/only",
        }
    )
    settings = Settings.from_env()
    assert settings.k == 7 and settings.weights == "none"
    assert (settings.reduced_scale_decode, settings.neighbour_cache) == (True, False)
    assert settings.resolved_staging_dir == Path("/srv/lookalike/staging")
    assert settings.resolved_thumbnail_dir == Path("/tmp/thumbs")
    assert settings.resolved_database_url == "sqlite:////srv/lookalike/lookalike.sqlite"


def test_overrides_win_and_an_explicit_local_runner_drops_the_environment_address(
    set_env: SetEnv,
) -> None:
    set_env({"LOOKALIKE_TASK_RUNNER": "dask", "LOOKALIKE_DASK_ADDRESS": "tcp://h:8786"})
    local = Settings.from_env(task_runner="local", lock_timeout=0)
    assert (local.task_runner, local.dask_address, local.lock_timeout) == ("local", "", 0)
    other = Settings.from_env(dask_address="tcp://other:8786", lock_timeout=None)
    assert (other.task_runner, other.dask_address) == ("dask", "tcp://other:8786")


def test_an_override_hides_a_bad_environment_value(set_env: SetEnv) -> None:
    set_env({"LOOKALIKE_K": "many", "LOOKALIKE_TASK_RUNNER": "ray"})
    settings = Settings.from_env(k=5, task_runner="local")
    assert (settings.k, settings.task_runner) == (5, "local")


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"LOOKALIKE_TASK_RUNNER": "ray"}, "task runner must be one of local, dask, not 'ray'"),
        ({"LOOKALIKE_DASK_ADDRESS": "tcp://h:8786"}, "a Dask address needs the dask task runner"),
        (
            {"LOOKALIKE_TASK_RUNNER": "dask", "LOOKALIKE_DASK_ADDRESS": "tcp://h :8786"},
            "Dask address must not contain spaces",
        ),
        ({"LOOKALIKE_LOCK_TIMEOUT": "an hour"}, "LOOKALIKE_LOCK_TIMEOUT must be a number"),
        ({"LOOKALIKE_LOCK_TIMEOUT": "-5"}, "the lock timeout must be 0 s or more, got -5"),
        ({"LOOKALIKE_LOCK_TIMEOUT": "inf"}, "the lock timeout must be 0 s or more, got inf"),
        ({"LOOKALIKE_LOCK_TIMEOUT": "nan"}, "the lock timeout must be 0 s or more, got nan"),
        ({"LOOKALIKE_K": "1.5"}, "LOOKALIKE_K must be an integer, got '1.5'"),
        ({"LOOKALIKE_K": "0"}, "k must be at least 1, got 0"),
        ({"LOOKALIKE_BATCH_SIZE": "0"}, "batch size must be at least 1, got 0"),
        ({"LOOKALIKE_DECODE_WORKERS": "-1"}, "decode workers must be 0 or more, got -1"),
        (
            {"LOOKALIKE_NEIGHBOUR_CACHE": "maybe"},
            "LOOKALIKE_NEIGHBOUR_CACHE must be true or false, got 'maybe'",
        ),
    ],
)
def test_bad_values_fail_in_one_line(set_env: SetEnv, env: dict[str, str], message: str) -> None:
    set_env(env)
    for read in (Settings.from_env, Settings):  # the constructor reads the environment too
        with pytest.raises(SettingsError) as raised:
            read()
        assert message in str(raised.value) and "\n" not in str(raised.value)


def test_a_bad_keyword_is_named_as_given(set_env: SetEnv) -> None:
    with pytest.raises(SettingsError, match="^k must be an integer, got 'many'$"):
        Settings.from_env(k="many")
    with pytest.raises(SettingsError, match="^unknown setting 'batchsize'$"):
        Settings(batchsize=3)


def test_overrides_are_validated_too(set_env: SetEnv) -> None:
    with pytest.raises(SettingsError, match="task runner must be one of local, dask"):
        Settings.from_env().with_overrides(task_runner="threads")
    with pytest.raises(SettingsError, match="^port must be an integer, got 'http'$"):
        Settings.from_env().with_overrides(port="http")


def test_with_overrides_keeps_the_other_values_and_ignores_none(set_env: SetEnv) -> None:
    base = Settings.from_env(k=7, data_dir=Path("/srv/data"))
    set_env({"LOOKALIKE_K": "9"})  # a copy does not read the environment again
    changed = base.with_overrides(batch_size=8, host=None)
    assert (changed.k, changed.batch_size, changed.host) == (7, 8, "127.0.0.1")
    assert changed.data_dir == Path("/srv/data") and base.batch_size == 64
