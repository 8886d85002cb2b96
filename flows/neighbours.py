"""The rebuild-neighbours flow: recompute every neighbour list from the stored features."""

from __future__ import annotations

import time
from typing import Any

from prefect import flow, get_run_logger

from tasks.database import connect_checked
from tasks.load import load_neighbours_task
from tasks.neighbours import compute_neighbours_task
from tasks.settings import Settings


@flow(name="rebuild-neighbours")
def rebuild_neighbours(k: int | None = None, database_url: str | None = None) -> dict[str, Any]:
    """Recompute all neighbour lists (full pass) and swap them in."""
    started = time.perf_counter()
    settings = Settings.from_env().with_overrides(k=k, database_url=database_url)
    db = settings.resolved_database_url
    connect_checked(db).dispose()
    staging = str(settings.resolved_staging_dir.resolve())
    plan = compute_neighbours_task(db, staging, settings.k, full=True)
    rows = load_neighbours_task(db, str(plan.staged), staging, plan.refreshed_ids)
    summary = {
        "images": plan.images,
        "k": settings.k,
        "neighbour_rows": rows,
        "seconds": round(time.perf_counter() - started, 3),
    }
    get_run_logger().info("neighbours rebuilt: %s", summary)
    return summary
