"""The process-images flow: each source's folder -> changes -> features -> database, then
the neighbour lists, duplicate groups and map over every source."""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.futures import PrefectFuture
from prefect.runtime import flow_run
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner
from sqlalchemy import Engine

from lookalike.flows.neighbours import NeighbourRefresh, refresh_neighbours
from lookalike.flows.runners import TaskRunnerSession, build_task_runner
from lookalike.sql.schema import RUN_COMPLETED, RUN_FAILED
from lookalike.tasks.catalog import (
    ChangeCounts,
    NoImagesError,
    check_collection,
    collection_is_current,
    count_by_status,
    count_unfinished_runs,
    finish_run_task,
    list_failed,
    list_pending,
    open_collection_task,
    sync_catalog_task,
    unchanged_catalog,
)
from lookalike.tasks.database import connect_checked, engine_for, parse_database_url
from lookalike.tasks.discover import any_image, check_root
from lookalike.tasks.duplicates import DuplicateCounts, find_duplicates_task, unchanged_duplicates
from lookalike.tasks.errors import first_line
from lookalike.tasks.extract import (
    Batch,
    ShardResult,
    extract_shard_task,
    plan_batches_task,
    shard_is_staged,
)
from lookalike.tasks.knn.plan import PassKind
from lookalike.tasks.load import FeatureLoadCounts, load_features_task
from lookalike.tasks.lock import RunLockError, confirm_run_lock, hold_run_lock
from lookalike.tasks.map import MapCounts, layout_map_task, unchanged_map
from lookalike.tasks.models import feature_identity
from lookalike.tasks.neighbours import plan_neighbour_pass
from lookalike.tasks.report import (
    ExtractionProgress,
    count_image_reads,
    publish_failed_images,
    publish_run_summary,
    staging_asset,
    table_asset,
)
from lookalike.tasks.settings import Settings
from lookalike.tasks.sources import (
    SourceError,
    SourceSpec,
    mark_sources_run_task,
    open_source_task,
    resolve_source,
)
from lookalike.tasks.stage import feature_batch_path

BATCHES_PER_SHARD = 8  # one Prefect task (and cache entry) per 8 model batches


@dataclass(frozen=True)
class RunSummary:
    """What a run did, as printed by the CLI, stored with the run and shown as an artifact."""

    sources: dict[str, str]  # the run's sources: name -> root folder
    database: str
    model: str  # the stored model name: network, and precision unless float32
    weights: str
    found: int  # these counts add up over the run's sources
    new: int
    changed: int
    deleted: int
    unchanged: int
    extracted: int
    failed: int
    cached_batches: int
    decoded: int  # images handed to the decoder
    model_calls: int  # forward passes of the model
    # Bytes of the files under the folder that the run opened for reading, each at its full
    # size: image files hashed or decoded, and files without an image suffix (a CREDITS.txt)
    # opened for their first 16 bytes to see whether they are images, which happens every run.
    bytes_read: int
    tensorflow_imported: bool  # in the flow's process, by the end of the run
    neighbour_mode: str
    neighbour_rows: int
    neighbour_tasks: int  # kNN tasks run: 0 lists current, 1 local engine, else Dask row blocks
    duplicate_groups: int
    duplicate_images: int  # images in a group of duplicates
    duplicates_recomputed: bool  # False: the inputs were unchanged, the groups kept
    duplicate_mode: str  # unchanged, incremental (from the changed images' lists) or full
    map_points: int  # images on the map
    map_mode: str  # unchanged, incremental (new images placed among neighbours) or full
    seconds: float  # the flow's own time (the up-to-date check's without Prefect), no start-up
    extract_seconds: float  # the extraction stage, model start-up included; 0 when none ran
    images_per_second: float  # extracted / extract_seconds; 0 when nothing was extracted
    lock_wait_seconds: float
    task_runner: str
    flow_run_id: str  # empty when no flow ran (the folder was found up to date without Prefect)


@dataclass(frozen=True)
class SourcePlan:
    """One source of a run: its name (as resolve_source chose it) and its checked folder."""

    name: str
    folder: str


@dataclass(frozen=True)
class RunPlan:
    """Everything a run works with, resolved and checked before the run lock is taken."""

    sources: list[SourcePlan]
    move: bool  # the one source's folder moved: keep its images where the files are the same
    model: str  # stored model name (tasks.models.feature_model_name)
    weights_id: str
    database_url: str
    staging: str
    settings: Settings
    recompute: bool


@dataclass(frozen=True)
class Extraction:
    """What the extraction step did."""

    paths: list[str]
    extracted: int
    cached_batches: int
    decoded: int
    model_calls: int
    bytes_read: int
    seconds: float


def source_specs(
    root: str | None, source: str | None, sources: list[SourceSpec] | None
) -> list[SourceSpec]:
    """The sources a run names: one root (and its name), or a list; never both, never none."""
    if sources and (root is not None or source is not None):
        raise SourceError("give either root (and source) or sources, not both")
    specs = (
        [SourceSpec.model_validate(spec) for spec in sources]
        if sources
        else [SourceSpec(root=root or "", name=source)]
    )
    if any(not spec.root.strip() for spec in specs):  # "" would mean the working folder
        raise SourceError("no folder given: pass root (and optionally source) or sources")
    return specs


def check_inputs(
    specs: list[SourceSpec], settings: Settings, recompute: bool = False, move: bool = False
) -> tuple[list[SourcePlan], str, str]:
    """Fail fast, in one line, on a bad folder, source name, database, model, precision or
    weights: (the sources, stored model name, weights id)."""
    folders = [check_root(Path(spec.root)) for spec in specs]
    for folder in folders:
        if not any_image(folder):
            raise NoImagesError(f"no image files found in {folder}")
    model, weights_id = feature_identity(settings.model, settings.weights, settings.precision)
    engine = connect_checked(settings.resolved_database_url)
    try:
        check_collection(engine, weights_id, recompute=recompute, model=model)
        names = [
            resolve_source(engine, folder, spec.name, move=move)[0]
            for spec, folder in zip(specs, folders, strict=True)
        ]
    finally:
        engine.dispose()
    if len(set(names)) != len(names) or len(set(folders)) != len(folders):
        raise SourceError("a run names each source and each folder once")
    plans = [SourcePlan(n, str(f)) for n, f in zip(names, folders, strict=True)]
    return plans, model, weights_id


@flow(name="process-images", task_runner=ThreadPoolTaskRunner(max_workers=1))  # type: ignore[arg-type]
def process_images(
    root: str | None = None,
    source: str | None = None,
    sources: list[SourceSpec] | None = None,
    move: bool = False,
    batch_size: int | None = None,
    k: int | None = None,
    weights: str | None = None,
    database_url: str | None = None,
    recompute: bool = False,
    task_runner: str | None = None,
    dask_address: str | None = None,
    lock_timeout: float | None = None,
    duplicate_threshold: float | None = None,
    model: str | None = None,
    precision: str | None = None,
) -> dict[str, Any]:
    """Bring the database up to date with one or more image folders (its sources), then the
    neighbour lists over all of them.

    root (and source, its name: default the folder's own) adds or updates one source;
    sources, a list of {root, name}, several in turn; move=True says the source named
    source now lives at root (its images are kept where the files are the same).
    Parameters left out (None) take the LOOKALIKE_* settings of the flow's environment.
    Runs against one database never overlap: the second waits for the run lock up to
    lock_timeout seconds (default one hour) and then fails. Extraction shards and the row
    blocks of a full kNN pass run on task_runner: "local" (a thread here) or "dask" (the
    cluster at dask_address, a temporary local one without).
    """
    started = time.perf_counter()
    logger = get_run_logger()
    settings = Settings.from_env(
        batch_size=batch_size,
        k=k,
        weights=weights,
        database_url=database_url,
        task_runner=task_runner,
        dask_address=dask_address,
        lock_timeout=lock_timeout,
        duplicate_threshold=duplicate_threshold,
        model=model,
        precision=precision,
    )
    build_task_runner(settings.task_runner, settings.dask_address)  # fails before any work
    specs = source_specs(root, source, sources)
    plan, check_bytes = plan_run(specs, settings, recompute, move)
    named = ", ".join(f"{s.name} ({s.folder})" for s in plan.sources)
    logger.info("processing %s with weights %s", named, plan.weights_id)
    with hold_run_lock(plan.database_url, settings.lock_timeout, on_wait=logger.warning) as waited:
        summary = run_locked(plan, started, waited, check_bytes)
    logger.info("run summary: %s", asdict(summary))
    return asdict(summary)


def plan_run(
    specs: list[SourceSpec], settings: Settings, recompute: bool = False, move: bool = False
) -> tuple[RunPlan, int]:
    """check_inputs, then the run's plan; and the bytes of files under the roots the check
    opened."""
    if move and len(specs) != 1:
        raise SourceError("a move names one source and its new folder")
    with count_image_reads(*[spec.root for spec in specs]) as check_reads:
        planned, model, weights_id = check_inputs(specs, settings, recompute, move)
    plan = RunPlan(
        sources=planned,
        move=move,
        model=model,
        weights_id=weights_id,
        database_url=settings.resolved_database_url,
        staging=str(settings.resolved_staging_dir.resolve()),
        settings=settings,
        recompute=recompute,
    )
    return plan, check_reads.bytes


NOTHING_EXTRACTED = Extraction(
    paths=[], extracted=0, cached_batches=0, decoded=0, model_calls=0, bytes_read=0, seconds=0.0
)


def up_to_date_summary(plan: RunPlan, *, started: float, bytes_read: int) -> RunSummary | None:
    """The summary of a run that would change nothing, found without Prefect; None as soon as
    any step of the flow would do something (then the flow runs, as it always did).

    Nothing is written and no image is hashed: each step of update_database is asked what it
    would decide, in its order, by the functions it decides with (tasks.catalog's
    unchanged_catalog for the sync, the pending images, the neighbour pass plan, and the input
    fingerprints of the duplicate groups and the map). The run lock is held while asking, but
    not waited for: when another run holds it, that run is changing the database, and the flow
    waits for it as before. No run is recorded, in Prefect or in the runs table: nothing
    changed, so the API has nothing to reload either.
    """
    try:
        with hold_run_lock(plan.database_url, timeout=0):
            return unchanged_run(plan, started=started, bytes_read=bytes_read)
    except RunLockError:
        return None


def unchanged_run(plan: RunPlan, *, started: float, bytes_read: int) -> RunSummary | None:
    """up_to_date_summary's questions, asked while the run lock is held."""
    engine = engine_for(plan.database_url)
    settings = plan.settings
    # open-collection would bind other weights or mark runs that died as interrupted.
    current = collection_is_current(engine, plan.weights_id, plan.model)
    if plan.move or not current or count_unfinished_runs(engine):
        return None
    with count_image_reads(*[s.folder for s in plan.sources]) as sync_reads:
        counts = unchanged_sources(engine, plan.sources)
    if counts is None:
        return None
    if plan_neighbour_pass(engine, settings.k) is not PassKind.UNCHANGED:
        return None
    listed = count_by_status(engine)  # what refresh_neighbours reports for current lists
    neighbours = NeighbourRefresh(PassKind.UNCHANGED, listed["ok"], listed["neighbours"], tasks=0)
    duplicates = unchanged_duplicates(engine, settings.duplicate_threshold)
    layout = unchanged_map(engine)
    if duplicates is None or layout is None:
        return None
    return build_summary(
        plan,
        counts,
        NOTHING_EXTRACTED,
        FeatureLoadCounts(ok=0, failed=0),
        neighbours,
        duplicates,
        layout,
        started=started,
        lock_wait=0.0,
        bytes_read=bytes_read + sync_reads.bytes,
    )


def unchanged_sources(engine: Engine, planned: list[SourcePlan]) -> ChangeCounts | None:
    """The counts the sync of these sources would report if it wrote nothing (each source
    known at its folder, its files unchanged, none of its images pending); else None."""
    total = ChangeCounts(found=0, new=0, changed=0, deleted=0, unchanged=0, unreadable=0)
    for planned_source in planned:
        folder = Path(planned_source.folder)
        existing = resolve_source(engine, folder, planned_source.name)[1]
        if existing is None or existing.root != str(folder):
            return None
        counts = unchanged_catalog(engine, existing.id, folder)
        if counts is None or list_pending(engine, existing.id):
            return None
        total = ChangeCounts(
            found=total.found + counts.found,
            new=0,
            changed=0,
            deleted=0,
            unchanged=total.unchanged + counts.unchanged,
            unreadable=0,
        )
    return total


def run_locked(plan: RunPlan, started: float, lock_wait: float, bytes_read: int) -> RunSummary:
    """The run proper, recorded in the runs table, while this run holds the run lock."""
    db = plan.database_url
    run_id = open_collection_task(db, plan.weights_id, plan.recompute, plan.model)
    try:
        summary, source_ids = update_database(plan, started, lock_wait, bytes_read)
    except BaseException as exc:
        finish_run_task(db, run_id, RUN_FAILED, {"error": first_line(exc)})
        raise
    finish_run_task(db, run_id, RUN_COMPLETED, asdict(summary))
    mark_sources_run_task(db, source_ids, run_id)
    publish_run_summary(asdict(summary))
    publish_failed_images(list_failed(engine_for(db)))
    return summary


def update_database(
    plan: RunPlan, started: float, lock_wait: float, bytes_read: int
) -> tuple[RunSummary, list[int]]:
    """Bring each source's images up to date, then the neighbour lists, duplicate groups and
    map over all sources: the summary and the ids of the sources done."""
    db = plan.database_url
    settings = plan.settings
    updates: list[SourceUpdate] = []
    # Started on first use: an unchanged re-run starts no Dask client or cluster.
    with TaskRunnerSession(settings.task_runner, settings.dask_address) as session:
        for planned_source in plan.sources:
            updates.append(update_source(plan, planned_source, session))
        neighbours = refresh_neighbours(db, plan.staging, settings.k, session)
    duplicates = find_duplicates_task(db, settings.duplicate_threshold)
    layout = layout_map_task(db)
    summary = build_summary(
        plan,
        add_counts([u.counts for u in updates]),
        add_extractions([u.extraction for u in updates]),
        FeatureLoadCounts(
            ok=sum(u.loaded.ok for u in updates), failed=sum(u.loaded.failed for u in updates)
        ),
        neighbours,
        duplicates,
        layout,
        started=started,
        lock_wait=lock_wait,
        bytes_read=bytes_read + sum(u.bytes_read for u in updates),
    )
    return summary, [u.source_id for u in updates]


@dataclass(frozen=True)
class SourceUpdate:
    """What a run did to one source's images."""

    source_id: int
    counts: ChangeCounts
    extraction: Extraction
    loaded: FeatureLoadCounts
    bytes_read: int  # the sync's and the extraction's


def update_source(plan: RunPlan, planned: SourcePlan, session: TaskRunnerSession) -> SourceUpdate:
    """Sync one source's catalog with its folder, extract and load its pending images."""
    db = plan.database_url
    settings = plan.settings
    source = open_source_task(db, planned.folder, planned.name, plan.move)
    with count_image_reads(planned.folder) as sync_reads:
        counts = sync_catalog_task(db, source.id, planned.folder)
    batches = plan_batches_task(
        db,
        settings.batch_size,
        plan.weights_id,
        settings.reduced_scale_decode,
        plan.model,
        source_id=source.id,
    )
    extraction = extract_features(batches, plan, planned.folder, session)
    loaded = load_extracted(plan, extraction)
    return SourceUpdate(
        source.id, counts, extraction, loaded, sync_reads.bytes + extraction.bytes_read
    )


def add_counts(parts: list[ChangeCounts]) -> ChangeCounts:
    """The sync counts of several sources together."""
    return ChangeCounts(
        *(sum(getattr(p, f) for p in parts) for f in ChangeCounts.__dataclass_fields__)
    )


def add_extractions(parts: list[Extraction]) -> Extraction:
    """The extraction of several sources together."""
    return Extraction(
        paths=[path for p in parts for path in p.paths],
        extracted=sum(p.extracted for p in parts),
        cached_batches=sum(p.cached_batches for p in parts),
        decoded=sum(p.decoded for p in parts),
        model_calls=sum(p.model_calls for p in parts),
        bytes_read=sum(p.bytes_read for p in parts),
        seconds=sum(p.seconds for p in parts),
    )


def load_extracted(plan: RunPlan, extraction: Extraction) -> FeatureLoadCounts:
    """Load the staged features of this run's batches into the database."""
    if not extraction.paths:
        return FeatureLoadCounts(ok=0, failed=0)
    db = plan.database_url
    confirm_run_lock(db)  # the lock may have gone with a dropped connection: never write without
    return load_features_task.with_options(
        assets=[table_asset(db, "image_names"), table_asset(db, "image_features")],
        asset_deps=[staging_asset(plan.staging)],
    )(db, extraction.paths)


def build_summary(
    plan: RunPlan,
    counts: ChangeCounts,
    extraction: Extraction,
    loaded: FeatureLoadCounts,
    neighbours: NeighbourRefresh,
    duplicates: DuplicateCounts,
    layout: MapCounts,
    *,
    started: float,
    lock_wait: float,
    bytes_read: int,
) -> RunSummary:
    """The run's summary from what each step returned."""
    seconds = extraction.seconds
    return RunSummary(
        sources={s.name: s.folder for s in plan.sources},
        database=parse_database_url(plan.database_url).render_as_string(hide_password=True),
        model=plan.model,
        weights=plan.weights_id,
        found=counts.found,
        new=counts.new,
        changed=counts.changed,
        deleted=counts.deleted,
        unchanged=counts.unchanged,
        extracted=extraction.extracted,
        failed=loaded.failed,
        cached_batches=extraction.cached_batches,
        decoded=extraction.decoded,
        model_calls=extraction.model_calls,
        bytes_read=bytes_read,
        tensorflow_imported="tensorflow" in sys.modules,
        neighbour_mode=neighbours.kind.value,
        neighbour_rows=neighbours.rows,
        neighbour_tasks=neighbours.tasks,
        duplicate_groups=duplicates.groups,
        duplicate_images=duplicates.images,
        duplicates_recomputed=duplicates.recomputed,
        duplicate_mode=duplicates.mode,
        map_points=layout.points,
        map_mode=layout.mode,
        seconds=round(time.perf_counter() - started, 3),
        extract_seconds=round(seconds, 3),
        images_per_second=round(extraction.extracted / seconds, 2) if seconds > 0 else 0.0,
        lock_wait_seconds=round(lock_wait, 3),
        task_runner=plan.settings.task_runner,
        flow_run_id=str(flow_run.get_id() or ""),
    )


def extract_features(
    batches: list[Batch], plan: RunPlan, root: str, session: TaskRunnerSession
) -> Extraction:
    """Submit shards of one source's batches as cached extraction tasks on the task runner."""
    started = time.perf_counter()
    staging = Path(plan.staging)
    shards = [
        batches[start : start + BATCHES_PER_SHARD]
        for start in range(0, len(batches), BATCHES_PER_SHARD)
    ]
    todo = [
        sum(len(b.images) for b in shard if not shard_is_staged([b], staging)) for shard in shards
    ]
    cached_batches = sum(1 for batch in batches if shard_is_staged([batch], staging))
    results = run_shards(shards, todo, plan, root, session) if shards else []
    return Extraction(
        paths=[str(feature_batch_path(staging, batch.key)) for batch in batches],
        extracted=sum(todo),
        cached_batches=cached_batches,
        decoded=sum(r.decoded for r in results),
        model_calls=sum(r.model_calls for r in results),
        bytes_read=sum(r.bytes_read for r in results),
        seconds=time.perf_counter() - started,
    )


def run_shards(
    shards: list[list[Batch]],
    todo: list[int],
    plan: RunPlan,
    root: str,
    session: TaskRunnerSession,
) -> list[ShardResult]:
    """Run every shard on the task runner while a progress artifact follows them."""
    progress = ExtractionProgress(sum(todo))
    try:
        runner = session.runner()
        futures = [submit_shard(runner, shard, plan, root, progress) for shard in shards]
        results = [
            collect_shard(future, progress, images)
            for future, images in zip(futures, todo, strict=True)
        ]
    except BaseException:
        progress.close(completed=False)
        raise
    progress.close(completed=True)
    return results


def submit_shard(
    runner: TaskRunner[Any],
    shard: list[Batch],
    plan: RunPlan,
    root: str,
    progress: ExtractionProgress,
) -> PrefectFuture[ShardResult]:
    """One extraction task; its Prefect cache is bypassed when its staged files are gone."""
    settings = plan.settings
    task = extract_shard_task.with_options(
        refresh_cache=not shard_is_staged(shard, Path(plan.staging)),
        assets=[staging_asset(plan.staging)],
    )
    parameters = dict(
        batches=shard,
        root=root,
        staging_dir=plan.staging,
        weights=settings.weights,
        batch_size=settings.batch_size,
        workers=settings.decode_workers,
        max_pixels=settings.max_image_pixels,
        progress_token=progress.token,
    )
    return runner.submit(task, parameters)


NOTHING_RUN = ShardResult(paths=[], decoded=0, model_calls=0, bytes_read=0, seconds=0.0)


def collect_shard(
    future: PrefectFuture[ShardResult], progress: ExtractionProgress, images: int
) -> ShardResult:
    """The shard's result; a cached shard ran nothing, whatever its stored result says."""
    future.wait()
    if future.state.name == "Cached":
        return NOTHING_RUN
    result = future.result()
    progress.finish_shard(images)
    return result
