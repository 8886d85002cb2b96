"""The lookalike command: help, bad input in one line without a traceback, and a JSON summary."""

from __future__ import annotations

import io
import json
import os
import pty
import re
import select
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from rich.console import Console
from sqlalchemy.engine import make_url

from lookalike.flows.cli import TerminalBar, main, terminal_progress
from lookalike.tasks.catalog import PendingImage
from lookalike.tasks.discover import hash_file
from lookalike.tasks.extract import batch_key
from lookalike.tasks.models import weights_identity
from lookalike.tasks.progress import ProgressUpdate, StageProgress
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
    assert_one_error_line(lookalike(*argv, env=cli_env), message)


def assert_one_error_line(result: subprocess.CompletedProcess[str], message: str) -> None:
    """Exit 2, no traceback, one `lookalike: error:` line containing message."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("lookalike: error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr


@pytest.mark.mariadb
def test_a_wrong_database_password_is_one_line(
    mariadb_admin_url: str, cli_env: dict[str, str], tmp_path: Path
) -> None:
    # The suite's own server (or LOOKALIKE_TEST_DATABASE_URL's), never the machine's.
    write_photos(tmp_path / "images", 1)
    wrong = make_url(mariadb_admin_url).set(password="wrong").render_as_string(hide_password=False)
    result = lookalike("process", str(tmp_path / "images"), "--db", wrong, env=cli_env)
    assert_one_error_line(result, "Access denied")


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


def test_process_json_summary_is_the_last_line(
    cli_env: dict[str, str], prefect_api_env: dict[str, str], tmp_path: Path
) -> None:
    photos = write_photos(tmp_path / "images", 3)
    cli_env.update(prefect_api_env)
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
    assert summary["sources"] == {"images": str(tmp_path / "images")}  # named after its folder
    assert (summary["task_runner"], summary["neighbour_tasks"]) == ("local", 1)
    assert summary["weights"].startswith("none")
    pending = [PendingImage(i + 1, p.name, hash_file(p)) for i, p in enumerate(sorted(photos))]
    key = batch_key(pending, weights_identity("none"), reduced_scale=True)
    staging = Path(cli_env["LOOKALIKE_DATA_DIR"]) / "staging"
    assert staged_batch_files(staging) == {feature_batch_path(staging, key)}
    assert "not ImageNet" in result.stderr  # random weights are never used silently


ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def run_on_terminal(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    """Run the console script with stderr on a pseudo-terminal: (status, stdout, terminal)."""
    controller, terminal = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "lookalike.flows.cli", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=terminal,
        env={**env, "COLUMNS": "120", "LINES": "40"},
    )
    os.close(terminal)
    chunks: list[bytes] = []

    def read_terminal() -> None:
        while True:
            try:
                chunk = os.read(controller, 4096)
            except OSError:  # EIO: the program closed its end
                return
            if not chunk:
                return
            chunks.append(chunk)

    reader = threading.Thread(target=read_terminal)
    reader.start()
    stdout, _ = process.communicate(timeout=300)
    reader.join(timeout=10)
    os.close(controller)
    shown = ANSI.sub("", b"".join(chunks).decode(errors="replace"))
    return process.returncode, stdout.decode(), shown


def test_process_draws_a_progress_bar_on_a_terminal(
    cli_env: dict[str, str], prefect_api_env: dict[str, str], tmp_path: Path
) -> None:
    write_photos(tmp_path / "images", 3)
    cli_env.update(prefect_api_env)
    args = ["process", str(tmp_path / "images"), "--weights", "none", "--k", "2"]
    status, stdout, shown = run_on_terminal(*args, "--batch-size", "2", env=cli_env)
    assert status == 0, shown
    # The tasks' batches reach the bar through Prefect: the final line counts every image.
    assert re.search(r"extract .*3/3 images", shown), shown
    assert "Traceback" not in shown
    assert stdout.startswith("processed ") and "extracted 3" in stdout


def test_the_bar_draws_the_stages_of_a_run() -> None:
    screen = io.StringIO()
    bar = TerminalBar(Console(file=screen, force_terminal=True, width=100))
    bar(ProgressUpdate("extract", 0, 0))  # nothing to extract: no bar
    assert not bar.progress.live.is_started
    for done in (0, 2, 3):
        bar(ProgressUpdate("extract", done, 3))
    bar(ProgressUpdate("extract", 3, 3, final=True))
    assert not bar.progress.live.is_started  # the display ends with the last stage
    assert re.search(r"extract .*3/3 images", ANSI.sub("", screen.getvalue()))


def read_available(fd: int, quiet_s: float = 0.3, limit_s: float = 10.0) -> bytes:
    """What a pseudo-terminal has received, once nothing more arrived for quiet_s.

    The kernel hands a pty's output to the reading side asynchronously: on a busy machine
    the last write is not readable at once, and one read may return only part of it.
    """
    os.set_blocking(fd, False)
    chunks: list[bytes] = []
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline and select.select([fd], [], [], quiet_s)[0]:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            continue
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def show_a_stage(enabled: bool) -> None:
    """Run a three-item stage under terminal_progress."""
    with terminal_progress(enabled):
        tracker = StageProgress("extract", 3)
        tracker.advance_batch(3)
        tracker.close(completed=True)


def test_no_bar_without_a_terminal_or_with_json(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    controller, terminal = pty.openpty()
    with os.fdopen(terminal, "w") as terminal_stream:
        monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a terminal
        show_a_stage(enabled=True)
        assert sys.stderr.getvalue() == ""
        monkeypatch.setattr(sys, "stderr", terminal_stream)
        show_a_stage(enabled=False)  # --json
        assert read_available(controller) == b""
        show_a_stage(enabled=True)
        drawn = ANSI.sub("", read_available(controller).decode())
        monkeypatch.undo()
    os.close(controller)
    assert re.search(r"extract .*3/3 images", drawn), drawn
    assert capfd.readouterr() == ("", "")


def test_a_multi_line_error_is_shown_by_its_first_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    for name in [name for name in os.environ if name.startswith("LOOKALIKE_")]:
        monkeypatch.delenv(name)
    # What main() sets in os.environ, set here first so that monkeypatch restores it.
    for name, value in {
        "PREFECT_LOGGING_EXTRA_LOGGERS": "lookalike",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "CRITICAL",
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "LOOKALIKE_DATA_DIR": str(tmp_path),
    }.items():
        monkeypatch.setenv(name, os.environ.get(name, value))
    missing = tmp_path / "no such\nfolder"  # the path, and so the message, spans two lines
    status = main(["process", str(missing), "--data-dir", str(tmp_path)])
    out, err = capsys.readouterr()
    assert (status, out) == (2, "")
    assert err == f"lookalike: error: folder not found: {tmp_path}/no such\n"
