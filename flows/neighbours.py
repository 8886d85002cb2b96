"""Neighbour passes: the rebuild-neighbours flow, and full passes fanned out as row-block tasks.

With the local task runner the kNN engine runs in one task (tasks.neighbours, symmetric:
n^2 * d / 2). With Dask a full pass is cut into row blocks, each a Prefect task on the
cluster computing its rows against all images (tasks.knn.knn_row_block), and the blocks are
merged into the same lists. Tasks pass file paths and row ranges, never feature arrays: the
flow stages the features once, as an Arrow file beside the other staging files, which every
worker memory-maps.
"""

from __future__ import annotations

import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture
from sqlalchemy import Engine, distinct, func, select

from flows.runners import TaskRunnerSession, build_task_runner, runner_threads
from sql.schema import FEATURE_DIM, image_neighbours
from tasks.catalog import count_images, stale_neighbour_ids
from tasks.database import connect_checked, engine_for, retry_if_transient
from tasks.knn import NeighbourLists, knn_row_block, list_length, merge_row_blocks
from tasks.load import load_neighbours_task
from tasks.lock import hold_run_lock
from tasks.neighbours import (
    INCREMENTAL_LIMIT,
    NeighbourPlan,
    compute_neighbours_task,
    read_features,
)
from tasks.report import publish_neighbour_summary, table_asset
from tasks.settings import Settings
from tasks.stage import feature_matrix, read_table, write_neighbour_lists, write_table_atomically

# A few more blocks than worker threads, so that a slow worker holds up less of the pass.
ROW_BLOCKS_PER_THREAD = 2
KNN_FEATURES_SCHEMA = pa.schema(
    [("image_id", pa.int64()), ("features", pa.list_(pa.float32(), FEATURE_DIM))]
)


@dataclass(frozen=True)
class RowBlockInput:
    """The features of a fanned-out pass, staged where every worker can read them."""

    folder: str  # the pass's own folder under staging/neighbours, removed after the merge
    matrix: str  # Arrow file: image_id and features of every ok image, in id order
    images: int
    refreshed_ids: list[int]  # lists this pass brings up to date (marked indexed on load)


@dataclass(frozen=True)
class NeighbourPass:
    """Staged neighbour lists, and the number of kNN tasks that computed them."""

    plan: NeighbourPlan
    tasks: int


def compute_lists(
    db: str, staging: str, k: int, session: TaskRunnerSession, *, full: bool = False
) -> NeighbourPass:
    """The lists by the local engine; on Dask, a full pass as row-block tasks on the cluster.

    An incremental update (few images changed) costs about changed * n * d and stays in one
    task in the flow's process, whatever the runner.
    """
    engine = engine_for(db)
    fan_out = session.kind == "dask" and count_images(engine)["ok"] > 1
    if fan_out and (full or not incremental_possible(engine, k)):
        return fan_out_full_pass(db, staging, k, session)
    return NeighbourPass(compute_neighbours_task(db, staging, k, full=full), tasks=1)


def incremental_possible(engine: Engine, k: int) -> bool:
    """True when tasks.neighbours would update the stored lists rather than start over."""
    with engine.connect() as conn:
        rows, images = conn.execute(
            select(func.count(), func.count(distinct(image_neighbours.c.image_id)))
        ).one()
    if not images or rows != images * min(k, images - 1):
        return False  # no lists yet, or lists of another length: a full pass
    changed, _ = stale_neighbour_ids(engine)
    return len(changed) <= INCREMENTAL_LIMIT * max(count_images(engine)["ok"], 1)


def fan_out_full_pass(db: str, staging: str, k: int, session: TaskRunnerSession) -> NeighbourPass:
    """Stage the features, run one knn-row-block task per row block, merge the blocks."""
    staged = stage_knn_features_task(db, staging)
    try:
        runner = session.runner()
        blocks = row_blocks(staged.images, ROW_BLOCKS_PER_THREAD * runner_threads(runner))
        futures: list[PrefectFuture[str]] = [
            runner.submit(
                knn_row_block_task,
                dict(
                    matrix=staged.matrix,
                    start=start,
                    stop=stop,
                    k=k,
                    out=str(Path(staged.folder) / f"rows-{start:010d}-{stop:010d}.arrow"),
                ),
            )
            for start, stop in blocks
        ]
        for future in futures:  # every block done (or failed) before its folder goes
            future.wait()
        parts = [future.result() for future in futures]
        plan = merge_row_blocks_task(parts, staging, k, staged)
    finally:
        shutil.rmtree(staged.folder, ignore_errors=True)
    return NeighbourPass(plan, tasks=len(blocks))


def row_blocks(images: int, blocks: int) -> list[tuple[int, int]]:
    """(start, stop) of at most `blocks` contiguous row ranges of near-equal size."""
    count = max(1, min(images, blocks))
    bounds = [images * i // count for i in range(count + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def write_knn_features(path: Path, ids: np.ndarray, features: np.ndarray) -> Path:
    """Stage ids and features as one memory-mappable Arrow file."""
    flat = pa.array(np.ascontiguousarray(features, dtype="<f4").reshape(-1), type=pa.float32())
    table = pa.Table.from_arrays(
        [pa.array(ids.astype(np.int64)), pa.FixedSizeListArray.from_arrays(flat, FEATURE_DIM)],
        schema=KNN_FEATURES_SCHEMA,
    )
    return write_table_atomically(table, path)


def read_row_block(path: Path, width: int) -> NeighbourLists:
    """A staged row block (one row per image and rank) back as NeighbourLists."""
    table = read_table(path)
    rows = table.num_rows // width
    return NeighbourLists(
        image_ids=np.ascontiguousarray(table.column("image_id").to_numpy()[::width]),
        neighbour_ids=table.column("neighbour_id").to_numpy().reshape(rows, width),
        distances=table.column("distance").to_numpy().reshape(rows, width),
    )


@task(
    name="stage-knn-features",
    retries=3,
    retry_delay_seconds=[2, 10, 30],
    retry_condition_fn=retry_if_transient,
    cache_policy=NO_CACHE,
)
def stage_knn_features_task(database_url: str, staging_dir: str) -> RowBlockInput:
    """Write the features of every ok image, in id order, for the row-block tasks to read."""
    engine = engine_for(database_url)
    ids, features = read_features(engine, Path(staging_dir))
    changed, _ = stale_neighbour_ids(engine)
    folder = Path(staging_dir) / "neighbours" / f"blocks-{uuid.uuid4().hex}"
    matrix = write_knn_features(folder / "features.arrow", ids, features)
    get_run_logger().info("staged the features of %d images for row blocks", len(ids))
    return RowBlockInput(str(folder), str(matrix), len(ids), list(changed))


@task(name="knn-row-block", cache_policy=NO_CACHE)  # deterministic compute: no retries
def knn_row_block_task(matrix: str, start: int, stop: int, k: int, out: str) -> str:
    """Exact lists of rows start..stop against every image; staged at `out`, its path returned."""
    started = time.perf_counter()
    table = read_table(Path(matrix))
    ids = table.column("image_id").to_numpy()
    lists = knn_row_block(feature_matrix(table), ids, slice(start, stop), k)
    write_neighbour_lists(Path(out), lists.image_ids, lists.neighbour_ids, lists.distances)
    get_run_logger().info(
        "rows %d-%d of %d: %d lists in %.1f s",
        start,
        stop,
        len(ids),
        len(lists.image_ids),
        time.perf_counter() - started,
    )
    return out


@task(name="merge-row-blocks", cache_policy=NO_CACHE)
def merge_row_blocks_task(
    parts: list[str], staging_dir: str, k: int, staged: RowBlockInput
) -> NeighbourPlan:
    """Join the row blocks into one table of lists, staged like the local engine's."""
    width = list_length(k, staged.images)
    lists = merge_row_blocks([read_row_block(Path(part), width) for part in parts])
    if lists.neighbour_ids.shape != (staged.images, width):
        raise RuntimeError(f"row blocks gave lists of shape {lists.neighbour_ids.shape}")
    path = write_neighbour_lists(
        Path(staging_dir) / "neighbours" / f"{uuid.uuid4().hex}.arrow",
        lists.image_ids,
        lists.neighbour_ids,
        lists.distances,
    )
    get_run_logger().info("merged %d row blocks: %d lists", len(parts), staged.images)
    return NeighbourPlan(
        path, "full", staged.images, int(lists.neighbour_ids.size), staged.refreshed_ids
    )


def load_lists(db: str, staging: str, plan: NeighbourPlan) -> int:
    """Swap the staged lists in as the neighbour table: its row count."""
    return load_neighbours_task.with_options(
        assets=[table_asset(db, "image_neighbours")],
        asset_deps=[table_asset(db, "image_features")],
    )(db, str(plan.staged), staging, plan.refreshed_ids)


@flow(name="rebuild-neighbours")
def rebuild_neighbours(
    k: int | None = None,
    database_url: str | None = None,
    lock_timeout: float | None = None,
    task_runner: str | None = None,
    dask_address: str | None = None,
) -> dict[str, Any]:
    """Recompute all neighbour lists (full pass) and swap them in, holding the run lock.

    Parameters left out (None) take the LOOKALIKE_* settings of the flow's environment.
    """
    started = time.perf_counter()
    logger = get_run_logger()
    settings = Settings.from_env(
        k=k,
        database_url=database_url,
        lock_timeout=lock_timeout,
        task_runner=task_runner,
        dask_address=dask_address,
    )
    db = settings.resolved_database_url
    connect_checked(db).dispose()
    build_task_runner(settings.task_runner, settings.dask_address)  # fails before the lock
    staging = str(settings.resolved_staging_dir.resolve())
    with (
        hold_run_lock(db, settings.lock_timeout, on_wait=logger.warning) as waited,
        TaskRunnerSession(settings.task_runner, settings.dask_address) as session,
    ):
        computed = compute_lists(db, staging, settings.k, session, full=True)
        rows = load_lists(db, staging, computed.plan)
    summary = {
        "images": computed.plan.images,
        "k": settings.k,
        "neighbour_rows": rows,
        "task_runner": settings.task_runner,
        "neighbour_tasks": computed.tasks,
        "lock_wait_seconds": round(waited, 3),
        "seconds": round(time.perf_counter() - started, 3),
    }
    publish_neighbour_summary(summary)
    logger.info("neighbours rebuilt: %s", summary)
    return summary
