"""Neighbour passes: the rebuild-neighbours flow, and full passes fanned out as row-block tasks.

With the local task runner the kNN engine runs in one task (tasks.neighbours, symmetric:
n^2 * d / 2). With Dask a full pass is cut into row blocks (tasks.neighbour_blocks): the features
are staged once, each block is a Prefect task on the cluster computing its rows against all
images, and the blocks are merged into the same lists. Tasks pass file paths and row ranges,
never feature arrays.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.futures import PrefectFuture

from lookalike.flows.runners import TaskRunnerSession, build_task_runner, runner_threads
from lookalike.tasks.catalog import count_by_status
from lookalike.tasks.database import connect_checked, engine_for
from lookalike.tasks.knn.plan import PassKind
from lookalike.tasks.load import load_neighbours_task
from lookalike.tasks.lock import confirm_run_lock, hold_run_lock
from lookalike.tasks.neighbour_blocks import (
    knn_row_block_task,
    merge_row_blocks_task,
    row_blocks,
    stage_knn_features_task,
)
from lookalike.tasks.neighbours import (
    StagedNeighbours,
    compute_neighbours_task,
    keep_deep_lists,
    plan_neighbour_pass_task,
)
from lookalike.tasks.report import publish_neighbour_summary, table_asset
from lookalike.tasks.settings import Settings

# A few more blocks than worker threads, so that a slow worker holds up less of the pass.
ROW_BLOCKS_PER_THREAD = 2


@dataclass(frozen=True)
class NeighbourRefresh:
    """What a run did to the neighbour lists."""

    kind: PassKind
    images: int
    rows: int  # rows of the neighbour table afterwards
    tasks: int  # kNN tasks run: 0 lists current, 1 local engine, else Dask row blocks


def refresh_neighbours(
    db: str, staging: str, k: int, session: TaskRunnerSession, *, rebuild: bool = False
) -> NeighbourRefresh:
    """Bring the lists up to date by the pass the plan chooses; nothing when they are current."""
    kind = plan_neighbour_pass_task(db, k, rebuild)
    if kind is PassKind.UNCHANGED:
        counts = count_by_status(engine_for(db))
        get_run_logger().info("neighbour lists are up to date: nothing to do")
        return NeighbourRefresh(kind, counts["ok"], counts["neighbours"], tasks=0)
    staged, tasks = compute_lists(db, staging, k, kind, session)
    return NeighbourRefresh(staged.kind, staged.images, swap_in_lists(db, staging, staged), tasks)


def compute_lists(
    db: str, staging: str, k: int, kind: PassKind, session: TaskRunnerSession
) -> tuple[StagedNeighbours, int]:
    """The staged lists and the number of kNN tasks that computed them.

    On Dask a full pass runs as row-block tasks on the cluster; an incremental update
    (about changed * n * d) stays in one task in the flow's process, whatever the runner.
    """
    fan_out = session.kind == "dask" and count_by_status(engine_for(db))["ok"] > 1
    if fan_out and kind is PassKind.FULL:
        return fan_out_full_pass(db, staging, k, session)
    return compute_neighbours_task(db, staging, k, kind), 1


def fan_out_full_pass(
    db: str, staging: str, k: int, session: TaskRunnerSession
) -> tuple[StagedNeighbours, int]:
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
        merged = merge_row_blocks_task(parts, staging, k, staged)
    finally:
        shutil.rmtree(staged.folder, ignore_errors=True)
    return merged, len(blocks)


def swap_in_lists(db: str, staging: str, lists: StagedNeighbours) -> int:
    """Swap the staged lists in as the neighbour table: its row count."""
    confirm_run_lock(db)  # the lock may have gone with a dropped connection: never write without
    rows = load_neighbours_task.with_options(
        assets=[table_asset(db, "image_neighbours")],
        asset_deps=[table_asset(db, "image_features")],
    )(db, str(lists.staged), staging, lists.refreshed_ids)
    keep_deep_lists(lists, Path(staging), db)
    return rows


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
        refreshed = refresh_neighbours(db, staging, settings.k, session, rebuild=True)
    summary = {
        "images": refreshed.images,
        "k": settings.k,
        "neighbour_rows": refreshed.rows,
        "task_runner": settings.task_runner,
        "neighbour_tasks": refreshed.tasks,
        "lock_wait_seconds": round(waited, 3),
        "seconds": round(time.perf_counter() - started, 3),
    }
    publish_neighbour_summary(summary)
    logger.info("neighbours rebuilt: %s", summary)
    return summary
