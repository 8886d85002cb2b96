"""Run reporting: image reads counted, Prefect artifacts (summary, failures, progress), assets."""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast
from uuid import UUID

from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.assets import Asset, AssetProperties, add_asset_metadata
from prefect.context import AssetContext
from sqlalchemy import func, select

from lookalike.sql.schema import image_features, image_names, image_neighbours
from lookalike.tasks.catalog import DEFAULT_MODEL_NAME, read_collection
from lookalike.tasks.database import engine_for, parse_database_url
from lookalike.tasks.progress import ProgressUpdate, StageProgress

SUMMARY_KEY = "process-images-summary"
FAILED_KEY = "process-images-failed"
PROGRESS_KEY = "process-images-progress"
NEIGHBOURS_KEY = "rebuild-neighbours-summary"
MAX_FAILED_ROWS = 1000  # a markdown artifact is for reading; the rest is in image_names.error
PROGRESS_INTERVAL = 1.0  # seconds between progress updates sent to the API
TABLES = {t.name: t for t in (image_names, image_features, image_neighbours)}
_ASSET_KEY_FORBIDDEN = re.compile(r"[\s#?&%\"'<>\[\]{}|\\^`]")

# ---------------------------------------------------------------------------------------------
# Image reads, counted by an audit hook on open(): the proof that a re-run leaves images alone.


@dataclass
class ImageReads:
    """Image files under the roots opened for reading while the counter was active, and their
    size."""

    roots: tuple[str, ...]
    files: int = 0
    bytes: int = 0


_active_counters: list[ImageReads] = []
# Re-entrant: an open inside the hook's own locked part (a garbage collector callback that
# reads /proc, as Dask's does) enters the hook again in the same thread; a plain lock hung
# such a process for good.
_counter_lock = threading.RLock()
_hook_installed = False


@contextlib.contextmanager
def count_image_reads(*roots: str | os.PathLike[str]) -> Iterator[ImageReads]:
    """Count every opening of a file under the roots, in any thread of this process, during the
    block (a file under two of them once).

    A file opened for hashing or decoding is read whole, so its size is what it cost; a file
    that is never opened costs nothing. Audit hooks cannot be removed, so one hook is installed
    for the life of the process and does nothing while no counter is active.
    """
    global _hook_installed
    counter = ImageReads(tuple(os.path.join(os.path.realpath(root), "") for root in roots))
    with _counter_lock:
        if not _hook_installed:
            sys.addaudithook(_on_audit_event)
            _hook_installed = True
        _active_counters.append(counter)
    try:
        yield counter
    finally:
        with _counter_lock:
            _active_counters.remove(counter)


def _on_audit_event(event: str, args: tuple[Any, ...]) -> None:
    """Count open() of image files for reading; every other event returns at once."""
    if event != "open" or not _active_counters or isinstance(args[0], int):
        return
    if args[2] & (os.O_WRONLY | os.O_RDWR):
        return
    path = os.path.abspath(os.fsdecode(args[0]))
    with _counter_lock:
        counters = [c for c in _active_counters if path.startswith(c.roots)]
    if not counters:
        return
    try:
        size = os.stat(path).st_size
    except OSError:
        size = 0  # the open itself fails too, and the caller reports why
    with _counter_lock:
        for counter in counters:
            counter.files += 1
            counter.bytes += size


# ---------------------------------------------------------------------------------------------
# Artifacts: what a run did, as the Prefect UI shows it.


def publish_run_summary(summary: Mapping[str, Any]) -> UUID:
    """A table artifact of the run's counts, timings and throughput."""
    rows = [
        ("images found", summary["found"]),
        ("new", summary["new"]),
        ("changed", summary["changed"]),
        ("deleted", summary["deleted"]),
        ("unchanged", summary["unchanged"]),
        ("extracted", summary["extracted"]),
        ("failed", summary["failed"]),
        ("cached batches", summary["cached_batches"]),
        ("images decoded", summary["decoded"]),
        ("model calls", summary["model_calls"]),
        ("image bytes read", summary["bytes_read"]),
        (f"neighbour rows ({summary['neighbour_mode']})", summary["neighbour_rows"]),
        ("neighbour tasks", summary["neighbour_tasks"]),
        ("task runner", summary["task_runner"]),
        ("run lock wait (s)", summary["lock_wait_seconds"]),
        ("extraction time (s)", summary["extract_seconds"]),
        ("total time (s)", summary["seconds"]),
        ("images/s", summary["images_per_second"]),
    ]
    return _artifact_id(
        create_table_artifact(
            table=[{"measure": name, "value": value} for name, value in rows],
            key=SUMMARY_KEY,
            description=f"process-images of {', '.join(summary['sources'])} with weights "
            f"{summary['weights']}",
        )
    )


def publish_failed_images(failed: Sequence[tuple[str, str]]) -> UUID:
    """A markdown artifact listing the collection's failed images with their reasons."""
    return _artifact_id(
        create_markdown_artifact(
            markdown=failed_images_markdown(failed),
            key=FAILED_KEY,
            description=f"{len(failed)} images could not be indexed",
        )
    )


def failed_images_markdown(failed: Sequence[tuple[str, str]]) -> str:
    """The failed images as a markdown table (the first MAX_FAILED_ROWS of them)."""
    if not failed:
        return "# Failed images\n\nNo image failed: every image of every source is indexed.\n"
    lines = [
        f"# Failed images: {len(failed)}",
        "",
        "These files stay in the collection with status `failed`; they are retried when they",
        "change.",
        "",
        "| file | reason |",
        "| --- | --- |",
    ]
    lines += [f"| {_cell(name)} | {_cell(reason)} |" for name, reason in failed[:MAX_FAILED_ROWS]]
    if len(failed) > MAX_FAILED_ROWS:
        lines += ["", f"… and {len(failed) - MAX_FAILED_ROWS} more (see `image_names.error`)."]
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    """Text safe inside one markdown table cell."""
    return " ".join(text.split()).replace("\\", "\\\\").replace("|", "\\|") or " "


def publish_neighbour_summary(summary: Mapping[str, Any]) -> UUID:
    """A table artifact for a rebuild-neighbours run."""
    return _artifact_id(
        create_table_artifact(
            table=[{"measure": name, "value": value} for name, value in summary.items()],
            key=NEIGHBOURS_KEY,
            description="rebuild-neighbours: every list recomputed",
        )
    )


def _artifact_id(created: Any) -> UUID:
    """The id from a create_*_artifact call made from synchronous code (typed as a union)."""
    return cast(UUID, created)


class ProgressArtifact:
    """The process-images-progress artifact: a listener of the extraction's StageProgress."""

    def __init__(self, total_images: int) -> None:
        self._sent = 0.0 if total_images else 100.0  # the figure the artifact starts with
        self._sent_at = 0.0
        self.artifact_id = _artifact_id(
            create_progress_artifact(
                progress=self._sent,
                key=PROGRESS_KEY,
                description=f"feature extraction of {total_images} images",
            )
        )

    def __call__(self, update: ProgressUpdate) -> None:
        """Send the figure, at most once per PROGRESS_INTERVAL unless final or complete."""
        total = update.total
        percent = round(100.0 * update.done / total, 1) if total else 100.0
        now = time.monotonic()
        due = update.final or percent >= 100.0 or now - self._sent_at >= PROGRESS_INTERVAL
        if percent == self._sent or not due:
            return
        self._sent, self._sent_at = percent, now
        update_progress_artifact(artifact_id=self.artifact_id, progress=percent)


class ExtractionProgress(StageProgress):
    """The extraction step's progress: the artifact, and whoever watches the run (the CLI)."""

    def __init__(self, total_images: int) -> None:
        super().__init__("extract", total_images, [ProgressArtifact(total_images)])


# ---------------------------------------------------------------------------------------------
# Assets: the staged features and the three tables, with row counts and the model.


def asset_key(scheme: str, *parts: str) -> str:
    """A valid Prefect asset key: lowercase scheme, no spaces or reserved characters."""
    first, *rest = [part for part in parts if part]
    path = "/".join([first.rstrip("/"), *(part.strip("/") for part in rest)])
    return f"{scheme.lower()}://" + _ASSET_KEY_FORBIDDEN.sub("-", path)


def table_asset(database_url: str, table: str) -> Asset:
    """The asset of one table of this database (the key never holds a password)."""
    parsed = parse_database_url(database_url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        where = os.path.realpath(parsed.database) if parsed.database else "memory"
        key = asset_key("sqlite", where, table)
    else:
        key = asset_key(
            backend, f"{parsed.host}:{parsed.port or 3306}", parsed.database or "", table
        )
    return Asset(
        key=key,
        properties=AssetProperties(name=table, description=TABLE_DESCRIPTIONS[table]),
    )


def staging_asset(staging_dir: str) -> Asset:
    """The asset of the staged feature batches (Arrow IPC files under staging_dir/features)."""
    return Asset(
        key=asset_key("file", os.path.realpath(staging_dir), "features"),
        properties=AssetProperties(
            name="staged features",
            description="feature vectors per content-addressed batch, Arrow IPC files",
        ),
    )


TABLE_DESCRIPTIONS = {
    "image_names": "one row per image file: path, content hash, status, error",
    "image_features": "one float32 feature vector of the collection's model per indexed image",
    "image_neighbours": "the k nearest neighbours of every indexed image",
}


def record_table_assets(database_url: str, **extra: Any) -> dict[str, int]:
    """Row counts and model as metadata of the table assets the running task materializes."""
    engine = engine_for(database_url)
    with engine.connect() as conn:
        rows = {
            name: int(conn.execute(select(func.count()).select_from(table)).scalar() or 0)
            for name, table in TABLES.items()
        }
    collection = read_collection(engine) or {}
    metadata = {
        "model": collection.get("model", DEFAULT_MODEL_NAME),
        "weights": collection.get("weights"),
    }
    for asset in _materializing_assets():
        table = asset.key.rsplit("/", 1)[-1]
        if table in rows:
            add_asset_metadata(asset, {"rows": rows[table], **metadata, **extra})
    return rows


def record_staging_asset(
    images: int, batches: int, weights_id: str, model: str = DEFAULT_MODEL_NAME
) -> None:
    """Metadata of the staged-features asset the running task materializes."""
    for asset in _materializing_assets():
        if asset.key.startswith("file://"):
            add_asset_metadata(
                asset,
                {"images": images, "batches": batches, "model": model, "weights": weights_id},
            )


def _materializing_assets() -> list[Asset]:
    """The assets of the running materializing task; none outside one."""
    context = AssetContext.get()
    return sorted(context.downstream_assets, key=lambda a: a.key) if context else []
