"""The remove-source flow: a source's images leave the archive, every other list is updated."""

from __future__ import annotations

import time
from typing import Any

from prefect import flow, get_run_logger

from lookalike.flows.neighbours import refresh_neighbours
from lookalike.flows.runners import TaskRunnerSession, build_task_runner
from lookalike.sql.schema import RUN_COMPLETED, RUN_FAILED
from lookalike.tasks.catalog import finish_run_task, start_run_task
from lookalike.tasks.database import connect_checked
from lookalike.tasks.duplicates import find_duplicates_task
from lookalike.tasks.errors import first_line
from lookalike.tasks.lock import confirm_run_lock, hold_run_lock
from lookalike.tasks.map import layout_map_task
from lookalike.tasks.settings import Settings
from lookalike.tasks.sources import delete_source_task, find_source


@flow(name="remove-source")
def remove_source(
    name: str,
    database_url: str | None = None,
    k: int | None = None,
    lock_timeout: float | None = None,
    task_runner: str | None = None,
    dask_address: str | None = None,
    duplicate_threshold: float | None = None,
) -> dict[str, Any]:
    """Delete the source `name` (its images, features and neighbour rows) and update every
    other image's neighbour list, the duplicate groups and the map incrementally.

    Parameters left out (None) take the LOOKALIKE_* settings of the flow's environment.
    """
    started = time.perf_counter()
    logger = get_run_logger()
    settings = Settings.from_env(
        database_url=database_url,
        k=k,
        lock_timeout=lock_timeout,
        task_runner=task_runner,
        dask_address=dask_address,
        duplicate_threshold=duplicate_threshold,
    )
    db = settings.resolved_database_url
    engine = connect_checked(db)
    find_source(engine, name)  # an unknown name fails here, in one line, before the lock
    engine.dispose()
    build_task_runner(settings.task_runner, settings.dask_address)
    staging = str(settings.resolved_staging_dir.resolve())
    with hold_run_lock(db, settings.lock_timeout, on_wait=logger.warning) as waited:
        run_id = start_run_task(db)
        try:
            summary = remove_locked(db, staging, name, settings)
        except BaseException as exc:
            finish_run_task(db, run_id, RUN_FAILED, {"error": first_line(exc)})
            raise
        summary |= {"lock_wait_seconds": round(waited, 3)}
        summary["seconds"] = round(time.perf_counter() - started, 3)
        finish_run_task(db, run_id, RUN_COMPLETED, summary)
    logger.info("source removed: %s", summary)
    return summary


def remove_locked(db: str, staging: str, name: str, settings: Settings) -> dict[str, Any]:
    """Delete the source's rows, then bring the lists, groups and map up to date."""
    confirm_run_lock(db)
    removed = delete_source_task(db, name)
    with TaskRunnerSession(settings.task_runner, settings.dask_address) as session:
        neighbours = refresh_neighbours(db, staging, settings.k, session)
    duplicates = find_duplicates_task(db, settings.duplicate_threshold)
    layout = layout_map_task(db)
    return {
        "source": name,
        "removed_images": removed,
        "images": neighbours.images,
        "neighbour_mode": neighbours.kind.value,
        "neighbour_rows": neighbours.rows,
        "duplicate_groups": duplicates.groups,
        "duplicate_mode": duplicates.mode,
        "map_points": layout.points,
        "map_mode": layout.mode,
    }
