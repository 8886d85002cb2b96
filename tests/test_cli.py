"""The lookalike command: help, bad input in one line without a traceback, and a JSON summary."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lookalike.tasks.catalog import PendingImage
from lookalike.tasks.discover import hash_file
from lookalike.tasks.extract import batch_key, weights_identity
from lookalike.tasks.stage import feature_batch_path
from tests.odd_images import write_photos


def lookalike(
    *args: str, env: dict[str, str], timeout: int = 300
) -> subprocess.CompletedProcess[str]:
    """Run the console script as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "lookalike.flows.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


@pytest.fixture
def cli_env(tmp_path: Path) -> dict[str, str]:
    """A clean environment with private data and Prefect folders."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOKALIKE_")}
    env.update(
        LOOKALIKE_DATA_DIR=str(tmp_path / "data"),
        PREFECT_HOME=str(tmp_path / "prefect"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
    )
    return env


@pytest.mark.parametrize("command", [[], ["process"], ["neighbours"], ["serve"]])
def test_help_of_every_command(command: list[str], cli_env: dict[str, str]) -> None:
    result = lookalike(*command, "--help", env=cli_env)
    assert result.returncode == 0
    assert "usage: lookalike" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["process", "/no/such/folder"], "folder not found: /no/such/folder"),
        (["process", "{images}", "--db", "not a url"], "malformed database URL"),
        (["process", "{images}", "--db", "postgresql://x@127.0.0.1/db"], "unsupported database"),
        (
            ["process", "{images}", "--db", "mysql+pymysql://root@127.0.0.1:9/test"],
            "cannot use database",
        ),
        (
            ["process", "{images}", "--db", "mysql+pymysql://root:wrong@127.0.0.1:3306/test"],
            "Access denied",
        ),
        (["process", "{images}", "--weights", "/no/weights.h5"], "not found: /no/weights.h5"),
        (["process", "{images}", "--batch-size", "0"], "batch size must be at least 1"),
        (["process", "{empty}", "--weights", "none"], "no image files found"),
    ],
)
def test_bad_input_is_one_line_without_traceback(
    args: list[str], message: str, cli_env: dict[str, str], tmp_path: Path
) -> None:
    images, empty = tmp_path / "images", tmp_path / "empty"
    write_photos(images, 1)
    empty.mkdir()
    (empty / "readme.txt").write_text("nothing to see")
    argv = [a.format(images=images, empty=empty) for a in args]
    result = lookalike(*argv, env=cli_env)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("lookalike: error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr


@pytest.mark.parametrize(
    ("env", "args", "message"),
    [
        (
            {"LOOKALIKE_TASK_RUNNER": "ray"},
            [],
            "task runner must be one of local, dask, not 'ray'",
        ),
        ({"LOOKALIKE_LOCK_TIMEOUT": "soon"}, [], "LOOKALIKE_LOCK_TIMEOUT must be a number"),
        ({"LOOKALIKE_LOCK_TIMEOUT": "-1"}, [], "the lock timeout must be 0 s or more, got -1"),
        (
            {"LOOKALIKE_DASK_ADDRESS": "tcp://127.0.0.1:8786"},
            [],
            "a Dask address needs the dask task runner",
        ),
        # The options win over the environment: the folder is what fails.
        (
            {"LOOKALIKE_TASK_RUNNER": "ray", "LOOKALIKE_LOCK_TIMEOUT": "-1"},
            ["--task-runner", "local", "--lock-timeout", "5"],
            "folder not found: /no/such/folder",
        ),
    ],
)
def test_bad_settings_from_the_environment_are_one_line(
    env: dict[str, str], args: list[str], message: str, cli_env: dict[str, str]
) -> None:
    result = lookalike("process", "/no/such/folder", *args, env={**cli_env, **env})
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("lookalike: error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr


def staged_batch_files(staging: Path) -> set[Path]:
    """The feature batches staged under a staging folder."""
    return set((staging / "features").rglob("*.arrow"))


def test_process_json_summary_is_the_last_line(cli_env: dict[str, str], tmp_path: Path) -> None:
    photos = write_photos(tmp_path / "images", 3)
    # Read from the environment and handed to the batch planner: its own cache key.
    cli_env["LOOKALIKE_REDUCED_SCALE_DECODE"] = "true"
    result = lookalike(
        "process",
        str(tmp_path / "images"),
        "--weights",
        "none",
        "--k",
        "2",
        "--batch-size",
        "4",
        "--json",
        env=cli_env,
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert (summary["found"], summary["new"], summary["extracted"], summary["failed"]) == (
        3,
        3,
        3,
        0,
    )
    assert summary["neighbour_rows"] == 6
    assert (summary["task_runner"], summary["neighbour_tasks"]) == ("local", 1)
    assert summary["weights"].startswith("none")
    pending = [PendingImage(i + 1, p.name, hash_file(p)) for i, p in enumerate(sorted(photos))]
    key = batch_key(pending, weights_identity("none"), reduced_scale=True)
    staging = Path(cli_env["LOOKALIKE_DATA_DIR"]) / "staging"
    assert staged_batch_files(staging) == {feature_batch_path(staging, key)}
    assert "not ImageNet" in result.stderr  # random weights are never used silently
