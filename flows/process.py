"""The process-images flow: folder -> changes -> features -> database -> neighbours."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner

from tasks.catalog import (
    NoImagesError,
    check_collection,
    finish_run_task,
    open_collection_task,
    sync_catalog_task,
)
from tasks.database import connect_checked, parse_database_url
from tasks.discover import any_image, check_root
from tasks.extract import (
    Batch,
    extract_shard_task,
    plan_batches_task,
    shard_is_staged,
    weights_identity,
)
from tasks.load import load_features_task, load_neighbours_task
from tasks.neighbours import compute_neighbours_task
from tasks.settings import Settings

BATCHES_PER_SHARD = 8  # one Prefect task (and cache entry) per 8 model batches


@dataclass(frozen=True)
class RunSummary:
    """What a run did, as printed by the CLI and stored with the run."""

    root: str
    database: str
    weights: str
    found: int
    new: int
    changed: int
    deleted: int
    unchanged: int
    extracted: int
    failed: int
    cached_batches: int
    neighbour_mode: str
    neighbour_rows: int
    seconds: float
    extract_seconds: float
    images_per_second: float


def resolve_settings(**overrides: Any) -> Settings:
    """Environment settings with the flow's parameters on top."""
    return Settings.from_env().with_overrides(**overrides)


def check_inputs(root: str, settings: Settings, recompute: bool = False) -> tuple[str, str]:
    """Fail fast, in one line, on a bad folder, database or weights: (folder, weights id)."""
    folder = check_root(Path(root))
    if not any_image(folder):
        raise NoImagesError(f"no image files found in {folder}")
    weights_id = weights_identity(settings.weights)
    engine = connect_checked(settings.resolved_database_url)
    try:
        check_collection(engine, folder, weights_id, recompute=recompute)
    finally:
        engine.dispose()
    return str(folder), weights_id


def extract_in_shards(
    batches: list[Batch], root: str, staging: str, settings: Settings
) -> list[str]:
    """Submit shards of batches as cached extraction tasks; staged paths in batch order."""
    total = sum(len(b.images) for b in batches)
    futures = []
    for start in range(0, len(batches), BATCHES_PER_SHARD):
        shard = batches[start : start + BATCHES_PER_SHARD]
        runner = extract_shard_task.with_options(
            refresh_cache=not shard_is_staged(shard, Path(staging))
        )
        futures.append(
            runner.submit(
                shard,
                root,
                staging,
                settings.weights,
                settings.batch_size,
                settings.decode_workers,
                settings.max_image_pixels,
                total,
            )
        )
    return [path for future in futures for path in future.result()]


@flow(name="process-images", task_runner=ThreadPoolTaskRunner(max_workers=1))  # type: ignore[arg-type]
def process_images(
    root: str,
    batch_size: int | None = None,
    k: int | None = None,
    weights: str | None = None,
    database_url: str | None = None,
    recompute: bool = False,
) -> dict[str, Any]:
    """Bring the database up to date with the image folder, then the neighbour lists."""
    started = time.perf_counter()
    logger = get_run_logger()
    settings = resolve_settings(
        batch_size=batch_size, k=k, weights=weights, database_url=database_url
    )
    folder, weights_id = check_inputs(root, settings, recompute)
    db = settings.resolved_database_url
    staging = str(settings.resolved_staging_dir.resolve())
    logger.info("processing %s with weights %s", folder, weights_id)
    run_id = open_collection_task(db, folder, weights_id, recompute)
    try:
        counts = sync_catalog_task(db, folder)
        batches = plan_batches_task(db, settings.batch_size, weights_id)
        cached = [b for b in batches if shard_is_staged([b], Path(staging))]
        extracted = sum(len(b.images) for b in batches) - sum(len(b.images) for b in cached)
        extract_started = time.perf_counter()
        loaded = load_features_task(db, extract_in_shards(batches, folder, staging, settings))
        extract_seconds = time.perf_counter() - extract_started
        plan = compute_neighbours_task(db, staging, settings.k)
        rows = load_neighbours_task(db, str(plan.staged), staging, plan.refreshed_ids)
    except BaseException as exc:
        finish_run_task(
            db,
            run_id,
            "failed",
            {"error": str(exc).splitlines()[0] if str(exc) else type(exc).__name__},
        )
        raise
    summary = RunSummary(
        root=folder,
        database=parse_database_url(db).render_as_string(hide_password=True),
        weights=weights_id,
        found=counts.found,
        new=counts.new,
        changed=counts.changed,
        deleted=counts.deleted,
        unchanged=counts.unchanged,
        extracted=extracted,
        failed=loaded.failed,
        cached_batches=len(cached),
        neighbour_mode=plan.mode,
        neighbour_rows=rows,
        seconds=round(time.perf_counter() - started, 3),
        extract_seconds=round(extract_seconds, 3),
        images_per_second=round(extracted / extract_seconds, 2) if extract_seconds > 0 else 0.0,
    )
    finish_run_task(db, run_id, "completed", asdict(summary))
    logger.info("run summary: %s", asdict(summary))
    return asdict(summary)
