"""Prefect features of process-images: artifacts, assets, logs, cache, run lock, weights guard."""

from __future__ import annotations

import atexit
import functools
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import numpy as np
import pytest
from sqlalchemy import select, update

from lookalike.sql.schema import (
    RUN_COMPLETED,
    STATUS_PENDING,
    collection,
    image_features,
    image_names,
    runs,
)
from lookalike.tasks.catalog import CollectionMismatchError
from lookalike.tasks.database import connect_checked
from lookalike.tasks.lock import RunLockError, hold_run_lock
from lookalike.tasks.report import PROGRESS_KEY, SUMMARY_KEY, staging_asset, table_asset
from tests.odd_images import write_photos

K = 2
BATCH = 4
BROKEN_REASON = "corrupt image data"


@pytest.fixture
def run_flow(prefect_harness: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """Call process_images with tiny settings and a private data folder."""
    from lookalike.flows.process import process_images

    monkeypatch.setenv("LOOKALIKE_DATA_DIR", str(tmp_path / "data"))

    def run(root: Path, database_url: str, **options: object) -> dict[str, Any]:
        params: dict[str, Any] = dict(batch_size=BATCH, k=K, weights="none")
        params.update(options)
        return process_images(root=str(root), database_url=database_url, **params)

    return run


@pytest.fixture
def info_run_logs() -> Iterator[None]:
    """Send INFO run logs to the API during the test (the session keeps Prefect at WARNING)."""
    prefect_logger = logging.getLogger("prefect")
    level = prefect_logger.level
    prefect_logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        prefect_logger.setLevel(level)


def write_folder(root: Path, photos: int) -> None:
    """Photos plus one truncated JPEG, which sorts first and fails to decode."""
    write_photos(root, photos)
    (root / "a_broken.jpg").write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00 cut off here")


def drain_prefect_queues() -> None:
    """Send the logs and events this process still holds to the API."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=15)
    EventsWorker.drain_all(timeout=15)


def artifacts_of(flow_run_id: str) -> dict[str, Any]:
    """The run's artifacts by key."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[UUID(flow_run_id)]))
        )
    return {artifact.key: artifact for artifact in found}


def task_states_of(flow_run_id: str) -> list[tuple[str, str]]:
    """(task name without its suffix, final state name) of every task run of the run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        task_runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[UUID(flow_run_id)]))
        )
    return sorted((t.name.rsplit("-", 1)[0], t.state.name if t.state else "") for t in task_runs)


def log_messages_of(flow_run_id: str) -> list[str]:
    """Messages the run's task runs logged through Prefect's run logger."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[UUID(flow_run_id)])))
    return [log.message for log in logs if log.task_run_id is not None]


def materializations_of(asset_key: str, expected: int, timeout: float = 30.0) -> list[Any]:
    """Payloads of the asset's materialization events, once `expected` of them have arrived."""
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

    wanted = EventFilter(
        event=EventNameFilter(name=["prefect.asset.materialization.succeeded"]),
        resource=EventResourceFilter(id=[asset_key]),
    )
    deadline = time.monotonic() + timeout
    while True:
        with get_client(sync_client=True) as client:
            events = client.read_events(filter=wanted, limit=50).events
        if len(events) >= expected or time.monotonic() > deadline:
            return sorted((e.payload for e in events), key=lambda p: json.dumps(p, sort_keys=True))
        time.sleep(0.5)


def summary_table(artifact: Any) -> dict[str, Any]:
    """A run-summary table artifact as {measure: value}."""
    return {row["measure"]: row["value"] for row in json.loads(artifact.data)}


def test_artifacts_assets_logs_and_an_unchanged_rerun(  # type: ignore[no-untyped-def]
    run_flow, info_run_logs: None, sqlite_url: str, tmp_path: Path
) -> None:
    root = tmp_path / "images"
    write_folder(root, 4)

    first = run_flow(root, sqlite_url)
    assert (first["found"], first["new"], first["failed"], first["extracted"]) == (5, 5, 1, 5)
    # Sorted by name: [a_broken + 3 photos], [1 photo]: two model calls, every file read twice
    # (hashed by the catalog sync, then decoded).
    sizes = sum(p.stat().st_size for p in root.iterdir())
    assert (first["decoded"], first["model_calls"], first["bytes_read"]) == (5, 2, 2 * sizes)
    drain_prefect_queues()

    artifacts = artifacts_of(first["flow_run_id"])
    table = summary_table(artifacts[SUMMARY_KEY])
    assert (table["images found"], table["new"], table["failed"], table["model calls"]) == (
        5,
        5,
        1,
        2,
    )
    assert table["images decoded"] == 5 and table["neighbour rows (full)"] == 4 * K
    failed = artifacts["process-images-failed"].data
    assert "| images/a_broken.jpg |" in failed and BROKEN_REASON in failed  # source/file
    assert artifacts[PROGRESS_KEY].data == 100.0

    messages = log_messages_of(first["flow_run_id"])
    assert any("found 5 images: 5 new, 0 changed, 0 deleted" in m for m in messages)
    assert any("staged 2 of 2 batches: 5 images decoded, 2 model calls" in m for m in messages)

    staged = materializations_of(staging_asset(str(tmp_path / "data" / "staging")).key, 1)
    assert staged == [{"images": 5, "batches": 2, "model": "InceptionV3", "weights": "none"}]
    names = materializations_of(table_asset(sqlite_url, "image_names").key, 1)
    features = materializations_of(table_asset(sqlite_url, "image_features").key, 1)
    neighbours = materializations_of(table_asset(sqlite_url, "image_neighbours").key, 1)
    assert [p["rows"] for p in names + features + neighbours] == [5, 4, 4 * K]
    assert features[0]["model"] == "InceptionV3" and features[0]["weights"].startswith("none")

    again = run_flow(root, sqlite_url)
    assert (again["unchanged"], again["decoded"], again["model_calls"], again["bytes_read"]) == (
        5,
        0,
        0,
        0,
    )
    assert (again["neighbour_mode"], again["neighbour_rows"]) == ("unchanged", 4 * K)
    drain_prefect_queues()
    assert again["duplicates_recomputed"] is False and again["map_mode"] == "unchanged"
    assert task_states_of(again["flow_run_id"]) == [
        ("find-duplicates", "Completed"),  # finds its inputs' fingerprint unchanged: no work
        ("finish-run", "Completed"),
        ("layout-map", "Completed"),  # likewise
        ("mark-sources-run", "Completed"),
        ("open-collection", "Completed"),
        ("open-source", "Completed"),
        ("plan-batches", "Completed"),
        ("plan-neighbour-pass", "Completed"),  # finds the lists current: no kNN task runs
        ("sync-catalog", "Completed"),
    ]
    assert PROGRESS_KEY not in artifacts_of(again["flow_run_id"])


def test_staged_shard_is_cached_after_a_crash_before_loading(  # type: ignore[no-untyped-def]
    run_flow, sqlite_url: str, tmp_path: Path
) -> None:
    root = tmp_path / "images"
    write_photos(root, 3)
    run_flow(root, sqlite_url)
    # A crash between staging and loading leaves the images pending and the features staged.
    engine = connect_checked(sqlite_url)
    with engine.begin() as conn:
        conn.execute(image_features.delete())
        conn.execute(update(image_names).values(status=STATUS_PENDING, indexed=False))
    engine.dispose()

    resumed = run_flow(root, sqlite_url)
    assert (resumed["cached_batches"], resumed["decoded"], resumed["model_calls"]) == (1, 0, 0)
    assert ("extract-shard", "Cached") in task_states_of(resumed["flow_run_id"])
    engine = connect_checked(sqlite_url)
    with engine.connect() as conn:
        assert len(conn.execute(select(image_features.c.image_id)).all()) == 3
    engine.dispose()


@functools.cache
def other_weights_file() -> Path:
    """A Keras weights file for InceptionV3 that differs from the seeded random init.

    Written once per test session (building and saving the model takes a while) into a folder
    that is removed when the session ends.
    """
    import keras

    path = Path(tempfile.mkdtemp(prefix="lookalike-weights-")) / "other.weights.h5"
    atexit.register(shutil.rmtree, path.parent, ignore_errors=True)
    keras.utils.set_random_seed(1234)
    model = keras.applications.InceptionV3(
        include_top=False, pooling="avg", input_shape=(299, 299, 3), weights=None
    )
    model.save_weights(str(path))
    return path


def stored_features(database_url: str) -> np.ndarray:
    """Every stored feature vector, by image id."""
    engine = connect_checked(database_url)
    with engine.connect() as conn:
        rows = conn.execute(select(image_features).order_by(image_features.c.image_id)).all()
        weights = conn.execute(select(collection.c.weights)).scalar()
    engine.dispose()
    assert weights is not None
    return np.stack([np.frombuffer(r.features, "<f4") for r in rows])


def test_other_weights_are_refused_unless_recompute(  # type: ignore[no-untyped-def]
    run_flow, sqlite_url: str, tmp_path: Path
) -> None:
    root = tmp_path / "images"
    write_photos(root, 3)
    run_flow(root, sqlite_url)
    before = stored_features(sqlite_url)

    with pytest.raises(CollectionMismatchError, match="pass --recompute"):
        run_flow(root, sqlite_url, weights="imagenet")
    np.testing.assert_array_equal(stored_features(sqlite_url), before)

    other = other_weights_file()
    redone = run_flow(root, sqlite_url, weights=str(other), recompute=True)
    assert (redone["extracted"], redone["decoded"], redone["neighbour_mode"]) == (3, 3, "full")
    assert redone["weights"].startswith("file other.weights.h5")
    after = stored_features(sqlite_url)
    assert after.shape == before.shape and not np.allclose(after, before)


def test_a_run_waiting_for_the_lock_fails_in_one_line(  # type: ignore[no-untyped-def]
    run_flow, database_url: str, tmp_path: Path
) -> None:
    root = tmp_path / "images"
    write_photos(root, 2)
    with hold_run_lock(database_url, timeout=5):
        started = time.monotonic()
        with pytest.raises(RunLockError, match="another lookalike run holds the run lock") as err:
            run_flow(root, database_url, lock_timeout=1)
    assert 1.0 <= time.monotonic() - started < 30
    assert "\n" not in str(err.value)
    engine = connect_checked(database_url)
    with engine.connect() as conn:
        assert conn.execute(select(runs)).all() == []  # it never started its run
    engine.dispose()


def running_process_images() -> list[UUID]:
    """Ids of the process-images flow runs in the Running state on the test API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["process-images"])),
            flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING]))
            ),
        )
    return [run.id for run in runs]


def runs_waiting_for_the_lock() -> int:
    """Running process-images flow runs that have logged that they wait for the run lock."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    running = running_process_images()
    if not running:
        return 0
    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=running)))
    return len({log.flow_run_id for log in logs if LOCK_WAIT_LOG in log.message})


LOCK_WAIT_LOG = "another run holds the run lock of"  # the flow's warning while it waits


def wait_until(condition: Any, timeout: float) -> bool:
    """Poll condition() until it is true; False when timeout seconds pass first."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.25)
    return True


@pytest.mark.slow
def test_two_concurrent_cli_runs_never_interleave(  # type: ignore[no-untyped-def]
    prefect_harness: None, database_url: str, tmp_path: Path
) -> None:
    from prefect.settings import PREFECT_API_URL

    root = tmp_path / "images"
    write_photos(root, 3)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOKALIKE_")}
    env.update(
        LOOKALIKE_DATA_DIR=str(tmp_path / "data"),
        PREFECT_API_URL=str(PREFECT_API_URL.value()),  # the test's API: no server start-up each
    )
    command = [
        sys.executable, "-m", "lookalike.flows.cli", "process", str(root), "--db", database_url,
        "--weights", "none", "--k", str(K), "--batch-size", str(BATCH), "--json",
        "--lock-timeout", "300",
    ]  # fmt: skip
    logs = [(tmp_path / f"run{i}.out", tmp_path / f"run{i}.err") for i in range(2)]
    processes: list[subprocess.Popen[bytes]] = []
    try:
        with hold_run_lock(database_url, timeout=5):
            for out, err in logs:
                with out.open("wb") as stdout, err.open("wb") as stderr:
                    processes.append(
                        subprocess.Popen(command, env=env, stdout=stdout, stderr=stderr)
                    )

            # Both flows are running and have reached the lock this test holds: each flow
            # logs that it waits (a running flow alone may still be on its way there).
            both_waiting = wait_until(lambda: runs_waiting_for_the_lock() == 2, timeout=300)
            assert both_waiting, " | ".join(err.read_text() for _, err in logs)
            assert [p.poll() for p in processes] == [None, None]
        for process, (_, err) in zip(processes, logs, strict=True):
            assert process.wait(timeout=300) == 0, err.read_text()
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    summaries = sorted(
        (json.loads(out.read_text().strip().splitlines()[-1]) for out, _ in logs),
        key=lambda s: -s["new"],
    )
    # One run found and extracted the folder; the other came after it and found nothing to do.
    assert [(s["new"], s["extracted"], s["unchanged"]) for s in summaries] == [(3, 3, 0), (0, 0, 3)]
    assert all(s["lock_wait_seconds"] > 0 for s in summaries)
    engine = connect_checked(database_url)
    with engine.connect() as conn:
        rows = conn.execute(select(runs).order_by(runs.c.started_at)).all()
    engine.dispose()
    assert [r.status for r in rows] == [RUN_COMPLETED, RUN_COMPLETED]
    assert rows[0].finished_at <= rows[1].started_at  # the runs never overlapped
