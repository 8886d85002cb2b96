"""The rebuild-neighbours flow: recompute every neighbour list from the stored features."""

from __future__ import annotations

import time
from typing import Any

from prefect import flow, get_run_logger

from tasks.database import connect_checked
from tasks.load import load_neighbours_task
from tasks.lock import DEFAULT_LOCK_TIMEOUT, hold_run_lock
from tasks.neighbours import compute_neighbours_task
from tasks.report import publish_neighbour_summary, table_asset
from tasks.settings import Settings


@flow(name="rebuild-neighbours")
def rebuild_neighbours(
    k: int | None = None, database_url: str | None = None, lock_timeout: float | None = None
) -> dict[str, Any]:
    """Recompute all neighbour lists (full pass) and swap them in, holding the run lock."""
    started = time.perf_counter()
    logger = get_run_logger()
    settings = Settings.from_env().with_overrides(k=k, database_url=database_url)
    db = settings.resolved_database_url
    connect_checked(db).dispose()
    staging = str(settings.resolved_staging_dir.resolve())
    timeout = DEFAULT_LOCK_TIMEOUT if lock_timeout is None else lock_timeout
    with hold_run_lock(db, timeout, on_wait=logger.warning) as waited:
        plan = compute_neighbours_task(db, staging, settings.k, full=True)
        rows = load_neighbours_task.with_options(
            assets=[table_asset(db, "image_neighbours")],
            asset_deps=[table_asset(db, "image_features")],
        )(db, str(plan.staged), staging, plan.refreshed_ids)
    summary = {
        "images": plan.images,
        "k": settings.k,
        "neighbour_rows": rows,
        "lock_wait_seconds": round(waited, 3),
        "seconds": round(time.perf_counter() - started, 3),
    }
    publish_neighbour_summary(summary)
    logger.info("neighbours rebuilt: %s", summary)
    return summary
