"""Tests for tasks.report: counted image reads, artifacts, progress and asset keys."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar
from uuid import UUID

import pytest

from lookalike.tasks.catalog import apply_changes, open_collection
from lookalike.tasks.database import connect_checked
from lookalike.tasks.discover import Changes, HashedFile
from lookalike.tasks.image_files import open_regular_file
from lookalike.tasks.report import (
    FAILED_KEY,
    MAX_FAILED_ROWS,
    NEIGHBOURS_KEY,
    PROGRESS_KEY,
    SUMMARY_KEY,
    TABLE_DESCRIPTIONS,
    asset_key,
    count_image_reads,
    failed_images_markdown,
    publish_failed_images,
    publish_neighbour_summary,
    publish_run_summary,
    record_table_assets,
    staging_asset,
    table_asset,
)
from lookalike.tasks.sources import open_source

T = TypeVar("T")

# --- image reads ------------------------------------------------------------------------------


def write(path: Path, size: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    return path


def test_reads_under_the_root_are_counted_in_every_thread(tmp_path: Path) -> None:
    root = tmp_path / "images"
    nested, top = write(root / "a" / "one.jpg", 100), write(root / "two.jpg", 50)
    beside = write(tmp_path / "images-other" / "three.jpg", 70)  # shares the root's prefix
    with count_image_reads(root) as reads:
        nested.read_bytes()
        thread = threading.Thread(target=top.read_bytes)  # a decoder thread, say
        thread.start()
        thread.join()
        with open_regular_file(nested):  # os.open, as discovery and decoding open files
            pass
        beside.read_bytes()
        (root / "new.jpg").write_bytes(b"written, not read")
        with (root / "two.jpg").open("r+b"):  # opened for writing too: not a read
            pass
    assert (reads.files, reads.bytes) == (3, 250)
    nested.read_bytes()  # after the block
    assert (reads.files, reads.bytes) == (3, 250)


def test_an_open_while_the_hook_holds_its_lock_is_counted_not_hung(tmp_path: Path) -> None:
    # A garbage collector callback may open a file (Dask's reads /proc) while the hook, in
    # the same thread, holds its lock: the nested call must not wait for itself. In a
    # child process: a hung hook would block every later open of this one.
    write(tmp_path / "images" / "photo.jpg", 10)
    code = (
        "import sys\n"
        "from lookalike.tasks import report\n"
        "root = sys.argv[1]\n"
        "with report.count_image_reads(root) as reads, report._counter_lock:\n"
        "    open(root + '/photo.jpg', 'rb').close()\n"
        "print(reads.files, reads.bytes)\n"
    )
    args = [sys.executable, "-c", code, str(tmp_path / "images")]
    done = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1", "10"]


def test_nested_counters_both_count_and_a_failed_open_costs_no_bytes(tmp_path: Path) -> None:
    root = tmp_path / "images"
    photo = write(root / "sub" / "photo.jpg", 10)
    with count_image_reads(root) as outer:
        with count_image_reads(root / "sub") as inner:
            photo.read_bytes()
            with pytest.raises(FileNotFoundError):
                (root / "sub" / "gone.jpg").read_bytes()
        write(root / "late.jpg", 5).read_bytes()
    assert (inner.files, inner.bytes) == (2, 10)
    assert (outer.files, outer.bytes) == (3, 15)


def test_reads_under_several_roots_are_counted_once_each(tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    one, two = write(first / "sub" / "one.jpg", 100), write(second / "two.jpg", 50)
    beside = write(tmp_path / "third" / "three.jpg", 70)
    with count_image_reads(first, second, first / "sub") as reads:
        one.read_bytes()  # under two of the roots: one read
        two.read_bytes()
        beside.read_bytes()
    assert reads.roots == (f"{first}/", f"{second}/", f"{first}/sub/")
    assert (reads.files, reads.bytes) == (2, 150)


# --- the failed-images markdown -----------------------------------------------------------------


def test_failed_images_are_a_markdown_table_with_safe_cells() -> None:
    markdown = failed_images_markdown(
        [("a|b.jpg", "corrupt\\data\nsecond  line"), ("empty reason.jpg", "")]
    )
    lines = markdown.splitlines()
    assert lines[0] == "# Failed images: 2"
    assert lines[-2:] == [
        "| a\\|b.jpg | corrupt\\\\data second line |",
        "| empty reason.jpg |   |",
    ]
    assert markdown.endswith("\n")


def test_no_failure_and_too_many_failures() -> None:
    assert "No image failed" in failed_images_markdown([])
    many = [(f"{i:05d}.jpg", "truncated image data") for i in range(MAX_FAILED_ROWS + 3)]
    lines = failed_images_markdown(many).splitlines()
    assert sum(line.startswith("| 0") for line in lines) == MAX_FAILED_ROWS
    assert lines[-1] == "… and 3 more (see `image_names.error`)."


# --- asset keys -------------------------------------------------------------------------------


def test_asset_keys_are_valid_and_skip_empty_parts() -> None:
    assert asset_key("SQLITE", "/data/my db#1.sqlite/", "/image_names") == (
        "sqlite:///data/my-db-1.sqlite/image_names"
    )
    assert asset_key("mysql", "host:3306", "", "image_features") == (
        "mysql://host:3306/image_features"
    )


def test_table_assets_name_the_database_without_its_password(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real, target_is_directory=True)
    sqlite = table_asset(f"sqlite:///{tmp_path / 'link' / 'db.sqlite'}", "image_names")
    assert sqlite.key == f"sqlite://{real}/db.sqlite/image_names"
    assert sqlite.properties is not None
    assert (sqlite.properties.name, sqlite.properties.description) == (
        "image_names",
        TABLE_DESCRIPTIONS["image_names"],
    )
    mariadb = table_asset("mysql+pymysql://me:s3cret@db.example:3307/photos", "image_features")
    assert mariadb.key == "mysql://db.example:3307/photos/image_features"
    default_port = table_asset("mysql+pymysql://me:s3cret@db.example/photos", "image_neighbours")
    assert default_port.key == "mysql://db.example:3306/photos/image_neighbours"
    assert "s3cret" not in mariadb.key + default_port.key
    assert table_asset("sqlite://", "image_names").key == "sqlite://memory/image_names"


def test_the_staging_asset_is_the_real_features_folder(tmp_path: Path) -> None:
    (tmp_path / "link").symlink_to(tmp_path, target_is_directory=True)
    asset = staging_asset(str(tmp_path / "link" / "staging"))
    assert asset.key == f"file://{tmp_path}/staging/features"


def test_table_rows_are_counted_outside_a_materializing_task(sqlite_url: str) -> None:
    engine = connect_checked(sqlite_url)
    open_collection(engine, "weights")
    new = [HashedFile(f"{name}.jpg", 1, 1, name * 16) for name in ("aa", "bb")]
    apply_changes(engine, open_source(engine, Path("/images"), None).id, Changes(new=new))
    engine.dispose()
    counts = {"image_names": 2, "image_features": 0, "image_neighbours": 0}
    assert record_table_assets(sqlite_url) == counts


# --- artifacts (a Prefect API) ------------------------------------------------------------------


def in_a_flow_run(steps: Callable[[], T]) -> T:
    """steps() inside a flow run, where the pipeline publishes its artifacts."""
    from prefect import flow

    @flow(name="report-test")
    def run_steps() -> T:
        return steps()

    return run_steps()


def read_artifact(artifact_id: UUID) -> Any:
    """The artifact with this id, as the API holds it now."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterId

    with get_client(sync_client=True) as client:
        (found,) = client.read_artifacts(
            artifact_filter=ArtifactFilter(id=ArtifactFilterId(any_=[artifact_id]))
        )
    return found


SUMMARY = {
    "sources": {"photos": "/images", "scans": "/mnt/scans"},
    "weights": "none (random init)",
    "found": 7,
    "new": 5,
    "changed": 1,
    "deleted": 2,
    "unchanged": 1,
    "extracted": 6,
    "failed": 1,
    "cached_batches": 0,
    "decoded": 6,
    "model_calls": 1,
    "bytes_read": 12345,
    "neighbour_mode": "incremental",
    "neighbour_rows": 30,
    "neighbour_tasks": 1,
    "task_runner": "local",
    "lock_wait_seconds": 0.0,
    "extract_seconds": 1.5,
    "seconds": 2.25,
    "images_per_second": 4.0,
}


def test_the_run_summary_is_a_table_of_every_measure(prefect_harness: None) -> None:
    artifact = read_artifact(in_a_flow_run(lambda: publish_run_summary(SUMMARY)))
    assert (artifact.key, artifact.type) == (SUMMARY_KEY, "table")
    assert artifact.description == (
        "process-images of photos, scans with weights none (random init)"
    )
    rows = {row["measure"]: row["value"] for row in json.loads(artifact.data)}
    assert len(rows) == 18
    assert (rows["images found"], rows["failed"], rows["image bytes read"]) == (7, 1, 12345)
    assert rows["neighbour rows (incremental)"] == 30 and rows["images/s"] == 4.0


def test_failed_images_and_neighbour_summaries_are_published(prefect_harness: None) -> None:
    failed = [("photos/a.jpg", "truncated image data"), ("scans/b.jpg", "empty file")]
    markdown = read_artifact(in_a_flow_run(lambda: publish_failed_images(failed)))
    assert (markdown.key, markdown.type) == (FAILED_KEY, "markdown")
    assert markdown.data == failed_images_markdown(failed)
    assert markdown.description == "2 images could not be indexed"
    table = read_artifact(in_a_flow_run(lambda: publish_neighbour_summary({"images": 3, "k": 2})))
    assert table.key == NEIGHBOURS_KEY
    assert json.loads(table.data) == [
        {"measure": "images", "value": 3},
        {"measure": "k", "value": 2},
    ]


def test_the_progress_artifact_follows_a_stage_and_ends_at_100(prefect_harness: None) -> None:
    from lookalike.tasks.progress import StageProgress, advance_progress
    from lookalike.tasks.report import ProgressArtifact

    def steps() -> list[Any]:
        artifact = ProgressArtifact(10)
        seen = [read_artifact(artifact.artifact_id)]
        progress = StageProgress("extract", 10, [artifact])
        advance_progress(progress.token, 3)  # a task in this process: per batch
        seen.append(read_artifact(artifact.artifact_id).data)
        progress.finish_shard(2)  # a shard that ran elsewhere reports fewer: the figure stays
        seen.append(read_artifact(artifact.artifact_id).data)
        progress.close(completed=True)
        seen.append(read_artifact(artifact.artifact_id).data)
        advance_progress(progress.token, 5)  # closed: forgotten, nothing happens
        seen.append(read_artifact(artifact.artifact_id).data)
        return seen

    created, *figures = in_a_flow_run(steps)
    assert (created.key, created.type, created.data) == (PROGRESS_KEY, "progress", 0.0)
    assert figures == [30.0, 30.0, 100.0, 100.0]


def test_a_failed_stage_keeps_its_figure_and_nothing_to_do_is_done(
    prefect_harness: None,
) -> None:
    from lookalike.tasks.progress import StageProgress
    from lookalike.tasks.report import ProgressArtifact

    def steps() -> tuple[UUID, UUID]:
        artifact = ProgressArtifact(4)
        failed = StageProgress("extract", 4, [artifact])
        failed.advance_batch(1)
        failed.close(completed=False)
        return artifact.artifact_id, ProgressArtifact(0).artifact_id

    failed, empty = in_a_flow_run(steps)
    assert (read_artifact(failed).data, read_artifact(empty).data) == (25.0, 100.0)
