"""On a Dask cluster of two worker processes, extraction and kNN match the local runner."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import select

from lookalike.sql.schema import image_features, image_names, image_neighbours
from lookalike.tasks.database import connect_checked
from lookalike.tasks.settings import SettingsError
from tests.odd_images import write_photos
from tests.test_prefect_features import task_states_of

BATCH = 1  # 9 images in 9 batches make two shards (8 + 1), one for each worker
K = 3
ROW_BLOCKS = 4  # 2 per worker thread, two single-threaded workers (flows.neighbours)


@pytest.fixture(scope="module")
def dask_address() -> Iterator[str]:
    """The scheduler of a local cluster: two single-threaded worker processes."""
    from distributed import LocalCluster

    with LocalCluster(
        n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None
    ) as cluster:
        yield cluster.scheduler_address


Lists = dict[str, list[tuple[str, float]]]


def stored_by_name(database_url: str) -> tuple[dict[str, np.ndarray], Lists]:
    """Features and neighbour lists (name, distance) keyed by file name (ids may differ)."""
    engine = connect_checked(database_url)
    with engine.connect() as conn:
        names = dict(conn.execute(select(image_names.c.id, image_names.c.file_name)).all())
        features = {
            names[r.image_id]: np.frombuffer(r.features, "<f4")
            for r in conn.execute(select(image_features))
        }
        lists: Lists = {}
        query = select(image_neighbours).order_by(
            image_neighbours.c.image_id, image_neighbours.c.rank
        )
        for r in conn.execute(query):
            lists.setdefault(names[r.image_id], []).append((names[r.neighbour_id], r.distance))
    engine.dispose()
    return features, lists


def run_in(data_dir: Path, monkeypatch: pytest.MonkeyPatch, **params: Any) -> dict[str, Any]:
    """process_images with its own data folder (so nothing staged is shared between runs)."""
    from lookalike.flows.process import process_images

    monkeypatch.setenv("LOOKALIKE_DATA_DIR", str(data_dir))
    return process_images(batch_size=BATCH, k=K, weights="none", **params)


def knn_task_names(flow_run_id: str) -> list[tuple[str, str]]:
    """(name, state) of the run's neighbour tasks."""
    wanted = ("compute-neighbours", "stage-knn-features", "knn-row-block", "merge-row-blocks")
    return [(name, state) for name, state in task_states_of(flow_run_id) if name in wanted]


@pytest.mark.slow
def test_dask_workers_extract_and_find_neighbours_as_the_local_runner_does(
    prefect_harness: None, dask_address: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from distributed import Client

    root = tmp_path / "images"
    write_photos(root, 9)
    local_db = f"sqlite:///{tmp_path / 'local.sqlite'}"
    dask_db = f"sqlite:///{tmp_path / 'dask.sqlite'}"
    local = run_in(tmp_path / "local", monkeypatch, root=str(root), database_url=local_db)
    # No runner parameters: the flow takes them from the settings, as a deployment does.
    monkeypatch.setenv("LOOKALIKE_TASK_RUNNER", "dask")
    monkeypatch.setenv("LOOKALIKE_DASK_ADDRESS", dask_address)
    remote = run_in(tmp_path / "dask", monkeypatch, root=str(root), database_url=dask_db)

    assert (local["task_runner"], remote["task_runner"]) == ("local", "dask")
    counts = ("extracted", "decoded", "model_calls", "failed", "neighbour_rows")
    assert [remote[c] for c in counts] == [local[c] for c in counts] == [9, 9, 9, 0, 9 * K]
    assert (local["neighbour_tasks"], remote["neighbour_tasks"]) == (1, ROW_BLOCKS)
    assert knn_task_names(local["flow_run_id"]) == [("compute-neighbours", "Completed")]
    assert knn_task_names(remote["flow_run_id"]) == [
        *[("knn-row-block", "Completed")] * ROW_BLOCKS,
        ("merge-row-blocks", "Completed"),
        ("stage-knn-features", "Completed"),
    ]
    with Client(dask_address) as client:  # both workers loaded the model: the shards were spread
        loaded = client.run(lambda: "tensorflow" in sys.modules)
    assert sorted(loaded.values()) == [True, True]
    # The blocks are removed; the deep lists of the table are kept for the next update.
    left = [p.name for p in (tmp_path / "dask" / "staging" / "neighbours").iterdir()]
    assert len(left) == 1 and left[0].startswith("deep-lists-"), left

    local_features, local_lists = stored_by_name(local_db)
    remote_features, remote_lists = stored_by_name(dask_db)
    assert sorted(remote_features) == sorted(local_features) and len(local_features) == 9
    for name, vector in local_features.items():  # the seeded init is the same in every process
        np.testing.assert_array_equal(remote_features[name], vector, err_msg=name)
    assert remote_lists == local_lists and len(local_lists) == 9

    from lookalike.flows.neighbours import rebuild_neighbours

    rebuilt = rebuild_neighbours(k=K, database_url=dask_db)  # runner, address: the settings
    assert (rebuilt["task_runner"], rebuilt["neighbour_tasks"]) == ("dask", ROW_BLOCKS)
    assert rebuilt["neighbour_rows"] == 9 * K
    assert stored_by_name(dask_db)[1] == local_lists


def test_a_dask_address_needs_the_dask_runner() -> None:
    from lookalike.flows.runners import build_task_runner

    with pytest.raises(SettingsError, match="needs the dask task runner"):
        build_task_runner("local", "tcp://127.0.0.1:8786")
    with pytest.raises(SettingsError, match="must be one of local, dask"):
        build_task_runner("ray")


def test_an_unreachable_scheduler_fails_in_one_line() -> None:
    import dask

    from lookalike.flows.runners import open_task_runner

    with (
        dask.config.set({"distributed.comm.timeouts.connect": "2s"}),
        pytest.raises(SettingsError, match="cannot reach the Dask scheduler at tcp://127.0.0.1:9"),
        open_task_runner("dask", "tcp://127.0.0.1:9"),
    ):
        pass
