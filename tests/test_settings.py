"""The settings object: environment values, typed and validated, with overrides on top."""

from __future__ import annotations

import pytest

from lookalike.tasks.settings import Settings, SettingsError


def test_runner_and_lock_settings_come_from_the_environment() -> None:
    env = {
        "LOOKALIKE_TASK_RUNNER": "dask",
        "LOOKALIKE_DASK_ADDRESS": "tcp://10.0.0.5:8786",
        "LOOKALIKE_LOCK_TIMEOUT": "90.5",
    }
    settings = Settings.from_env(env)
    assert (settings.task_runner, settings.dask_address, settings.lock_timeout) == (
        "dask",
        "tcp://10.0.0.5:8786",
        90.5,
    )
    defaults = Settings.from_env({})
    assert (defaults.task_runner, defaults.dask_address, defaults.lock_timeout) == (
        "local",
        "",
        3600.0,
    )


def test_overrides_win_and_an_explicit_local_runner_drops_the_environment_address() -> None:
    env = {"LOOKALIKE_TASK_RUNNER": "dask", "LOOKALIKE_DASK_ADDRESS": "tcp://h:8786"}
    local = Settings.from_env(env, task_runner="local", lock_timeout=0)
    assert (local.task_runner, local.dask_address, local.lock_timeout) == ("local", "", 0)
    other = Settings.from_env(env, dask_address="tcp://other:8786", lock_timeout=None)
    assert (other.task_runner, other.dask_address) == ("dask", "tcp://other:8786")


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
        ({"LOOKALIKE_K": "1.5"}, "LOOKALIKE_K must be an integer, got '1.5'"),
    ],
)
def test_bad_values_fail_in_one_line(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError) as raised:
        Settings.from_env(env)
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_overrides_are_validated_too() -> None:
    with pytest.raises(SettingsError, match="task runner must be one of local, dask"):
        Settings.from_env({}).with_overrides(task_runner="threads")
