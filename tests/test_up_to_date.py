"""`lookalike process` on a folder that needs nothing: answered without Prefect, and only then.

flows.process.up_to_date_summary asks every step of the flow, read-only, what it would do. Each
test of a change checks both sides of that promise: the check declines, and the flow then run
on the same state does the work (so the check did not decline for nothing), after which the
check answers again.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import delete, func, insert, select, update

from lookalike.sql.schema import (
    RUN_RUNNING,
    STATUS_OK,
    STATUS_PENDING,
    image_features,
    image_names,
    image_neighbours,
    map_state,
    runs,
)
from lookalike.tasks.database import connect_checked, utcnow
from lookalike.tasks.lock import hold_run_lock
from lookalike.tasks.settings import Settings
from lookalike.tasks.sources import SourceSpec
from tests.odd_images import write_photos

K = 3
BATCH = 4
CREDITS = "CREDITS.txt"  # no image suffix: opened for its first bytes by every run
# What differs between two runs that do the same: their clocks and their Prefect ids.
TIMINGS = {"seconds", "extract_seconds", "images_per_second", "lock_wait_seconds", "flow_run_id"}


def ask(root: Path, database_url: str, **settings: Any) -> dict[str, Any] | None:
    """The up-to-date check as the CLI makes it: the summary, or None when the flow must run."""
    from lookalike.flows.process import plan_run, up_to_date_summary

    options: dict[str, Any] = dict(k=K, batch_size=BATCH, weights="none")
    options.update(settings)
    specs = [SourceSpec(root=str(root))]
    plan, check_bytes = plan_run(specs, Settings.from_env(database_url=database_url, **options))
    summary = up_to_date_summary(plan, started=time.perf_counter(), bytes_read=check_bytes)
    return None if summary is None else asdict(summary)


@pytest.fixture
def run_flow(
    prefect_harness: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Callable[..., dict[str, Any]]:
    """process_images with the test's defaults and a private data folder."""
    from lookalike.flows.process import process_images

    monkeypatch.setenv("LOOKALIKE_DATA_DIR", str(tmp_path / "data"))

    def run(root: Path, database_url: str, **options: Any) -> dict[str, Any]:
        params: dict[str, Any] = dict(k=K, batch_size=BATCH, weights="none")
        params.update(options)
        return process_images(root=str(root), database_url=database_url, **params)

    return run


def indexed_folder(root: Path) -> list[Path]:
    """Six photos and a credits file that is not an image."""
    photos = write_photos(root, 6)
    (root / CREDITS).write_text("photos: scikit-image's sample data\n" * 20)
    return photos


def flow_run_count() -> int:
    """Flow runs the test session's Prefect API holds."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.count_flow_runs()


def run_rows(database_url: str) -> int:
    engine = connect_checked(database_url)
    with engine.connect() as conn:
        count = int(conn.execute(select(func.count()).select_from(runs)).scalar_one())
    engine.dispose()
    return count


def test_an_unchanged_folder_is_answered_as_the_flow_answers_it(
    run_flow: Callable[..., dict[str, Any]], database_url: str, tmp_path: Path
) -> None:
    root = tmp_path / "images"
    indexed_folder(root)
    first = run_flow(root, database_url)
    assert first["new"] == 6
    flows_before, runs_before = flow_run_count(), run_rows(database_url)

    answer = ask(root, database_url)

    assert answer is not None
    assert (flow_run_count(), run_rows(database_url)) == (flows_before, runs_before)
    assert answer["flow_run_id"] == ""
    again = run_flow(root, database_url)  # what the flow itself says of the same folder
    assert set(answer) == set(again)
    assert {k: v for k, v in answer.items() if k not in TIMINGS} == {
        k: v for k, v in again.items() if k not in TIMINGS
    }
    assert (answer["found"], answer["unchanged"], answer["decoded"], answer["model_calls"]) == (
        6,
        6,
        0,
        0,
    )
    assert answer["neighbour_mode"] == answer["duplicate_mode"] == answer["map_mode"] == "unchanged"
    # No image is read; the credits file is opened for its first bytes by the check that the
    # folder holds an image and by the comparison with the catalog, and counted at its size.
    assert answer["bytes_read"] == 2 * (root / CREDITS).stat().st_size


def leave_an_image_pending(database_url: str) -> None:
    """As a crash leaves a new image: in the catalog, not extracted yet."""
    engine = connect_checked(database_url)
    with engine.begin() as conn:
        first = conn.execute(select(func.min(image_names.c.id))).scalar_one()
        conn.execute(delete(image_features).where(image_features.c.image_id == first))
        conn.execute(
            update(image_names)
            .where(image_names.c.id == first)
            .values(status=STATUS_PENDING, indexed=False)
        )
    engine.dispose()


def drop_a_neighbour_list(database_url: str) -> None:
    engine = connect_checked(database_url)
    with engine.begin() as conn:
        some = conn.execute(
            select(func.min(image_names.c.id)).where(image_names.c.status == STATUS_OK)
        ).scalar_one()
        conn.execute(delete(image_neighbours).where(image_neighbours.c.image_id == some))
    engine.dispose()


def forget_the_map(database_url: str) -> None:
    engine = connect_checked(database_url)
    with engine.begin() as conn:
        conn.execute(delete(map_state))
    engine.dispose()


def leave_a_run_running(database_url: str) -> None:
    engine = connect_checked(database_url)
    with engine.begin() as conn:
        conn.execute(insert(runs).values(started_at=utcnow(), status=RUN_RUNNING, weights="x"))
    engine.dispose()


def touch(path: Path) -> None:
    """Same bytes, another mtime."""
    info = path.stat()
    os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns + 2_000_000_000))


def add_a_photo(root: Path, photos: list[Path], db: str) -> None:
    write_photos(root / "more", 1, seed=7)


def give_other_content(root: Path, photos: list[Path], db: str) -> None:
    shutil.copyfile(photos[1], photos[0])


def no_running_runs(db: str) -> bool:
    engine = connect_checked(db)
    with engine.connect() as conn:
        count = conn.execute(
            select(func.count()).select_from(runs).where(runs.c.status == RUN_RUNNING)
        ).scalar_one()
    engine.dispose()
    return int(count) == 0


Change = Callable[[Path, list[Path], str], None]
Shown = Callable[[dict[str, Any], str], bool]

# name -> (the change, settings of the check and the flow, what the flow's run then shows)
CHANGES: dict[str, tuple[Change, dict[str, Any], Shown]] = {
    "new file": (add_a_photo, {}, lambda done, db: done["new"] == 1),
    "other content": (give_other_content, {}, lambda done, db: done["changed"] == 1),
    "same content, new mtime": (lambda root, photos, db: touch(photos[0]), {},
                                lambda done, db: (done["changed"], done["unchanged"]) == (0, 6)),
    "deleted file": (lambda root, photos, db: photos[0].unlink(), {},
                     lambda done, db: done["deleted"] == 1),
    "missing neighbour list": (lambda root, photos, db: drop_a_neighbour_list(db), {},
                               lambda done, db: done["neighbour_mode"] != "unchanged"),
    "pending image": (lambda root, photos, db: leave_an_image_pending(db), {},
                      lambda done, db: done["extracted"] == 1),
    "other k": (lambda root, photos, db: None, {"k": K + 1},
                lambda done, db: done["neighbour_mode"] == "full"),
    "other duplicate threshold": (lambda root, photos, db: None, {"duplicate_threshold": 0.1},
                                  lambda done, db: done["duplicate_mode"] == "full"),
    "map gone": (lambda root, photos, db: forget_the_map(db), {},
                 lambda done, db: done["map_mode"] == "full"),
    "a run that died": (lambda root, photos, db: leave_a_run_running(db), {},
                        lambda done, db: no_running_runs(db)),
}  # fmt: skip


@pytest.mark.parametrize("change", list(CHANGES))
def test_any_change_takes_the_flow(
    change: str, run_flow: Callable[..., dict[str, Any]], sqlite_url: str, tmp_path: Path
) -> None:
    root = tmp_path / "images"
    photos = indexed_folder(root)
    run_flow(root, sqlite_url)
    assert ask(root, sqlite_url) is not None
    make, settings, shows = CHANGES[change]
    make(root, photos, sqlite_url)
    flows_before = flow_run_count()

    assert ask(root, sqlite_url, **settings) is None
    assert flow_run_count() == flows_before  # asking is no run either

    done = run_flow(root, sqlite_url, **settings)
    assert shows(done, sqlite_url), done
    assert ask(root, sqlite_url, **settings) is not None  # the flow made it current


def test_a_run_holding_the_lock_sends_the_check_to_the_flow(
    run_flow: Callable[..., dict[str, Any]], sqlite_url: str, tmp_path: Path
) -> None:
    root = tmp_path / "images"
    indexed_folder(root)
    run_flow(root, sqlite_url)
    with hold_run_lock(sqlite_url, timeout=0):  # another run, busy with the database
        assert ask(root, sqlite_url) is None
    assert ask(root, sqlite_url) is not None


# --- the command, as a user runs it -------------------------------------------------------------


def lookalike(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lookalike.flows.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


@pytest.fixture
def cli_env(tmp_path: Path) -> dict[str, str]:
    """A clean environment with private data and Prefect folders, no Prefect server."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("LOOKALIKE_") and k != "PREFECT_API_URL"
    }
    env.update(
        LOOKALIKE_DATA_DIR=str(tmp_path / "data"),
        PREFECT_HOME=str(tmp_path / "prefect"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
    )
    return env


def recorded_flow_runs(prefect_home: Path) -> int:
    """Flow runs in the ephemeral mode's Prefect database."""
    with sqlite3.connect(prefect_home / "prefect.db") as conn:
        return int(conn.execute("SELECT count(*) FROM flow_run").fetchone()[0])


def test_the_command_answers_an_unchanged_folder_without_starting_prefect(
    cli_env: dict[str, str], tmp_path: Path
) -> None:
    root = tmp_path / "images"
    photos = indexed_folder(root)
    process = ("process", str(root), "--weights", "none", "--k", str(K))
    first = lookalike(*process, "--json", env=cli_env)
    assert first.returncode == 0, first.stderr
    summary = json.loads(first.stdout.splitlines()[-1])
    assert (summary["prefect"], summary["new"]) == ("ephemeral", 6) and summary["flow_run_id"]
    prefect_home = Path(cli_env["PREFECT_HOME"])
    recorded = recorded_flow_runs(prefect_home)

    quick = lookalike(*process, "--json", env=cli_env)
    said = lookalike(*process, env=cli_env)

    assert quick.returncode == said.returncode == 0, quick.stderr + said.stderr
    answer = json.loads(quick.stdout.splitlines()[-1])
    assert set(answer) == set(summary)
    assert (answer["prefect"], answer["flow_run_id"], answer["unchanged"]) == ("not started", "", 6)
    assert 0 < answer["wall_seconds"] < 60 and answer["wall_seconds"] > answer["seconds"]
    assert said.stdout.startswith(
        "up to date: 6 images, nothing to do (checked without starting Prefect)\n"
    )
    assert "since the command started (start-up included; the check" in said.stdout
    assert "nothing extracted" in said.stdout
    assert recorded_flow_runs(prefect_home) == recorded  # no flow run, not even a failed one

    photos[0].write_bytes(photos[1].read_bytes())  # one file with other content
    changed = lookalike(*process, "--json", env=cli_env)
    assert changed.returncode == 0, changed.stderr
    after = json.loads(changed.stdout.splitlines()[-1])
    assert (after["prefect"], after["changed"], after["extracted"]) == ("ephemeral", 1, 1)
    assert after["flow_run_id"] and recorded_flow_runs(prefect_home) == recorded + 1


def free_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize("command", ["process", "neighbours"])
def test_an_unreachable_prefect_server_is_one_line(
    command: str, cli_env: dict[str, str], tmp_path: Path
) -> None:
    write_photos(tmp_path / "images", 1)
    url = f"http://127.0.0.1:{free_port()}/api"
    args = ["process", str(tmp_path / "images"), "--weights", "none"]
    result = lookalike(*(args if command == "process" else ["neighbours"]),
                       env={**cli_env, "PREFECT_API_URL": url})  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert result.stdout == "" and "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if not line.startswith("note:")]
    assert lines == [
        f"lookalike: error: no Prefect server answers at {url} (PREFECT_API_URL): start it "
        "with prefect server start, or unset PREFECT_API_URL in the environment to let each "
        "run start a temporary one"
    ]
