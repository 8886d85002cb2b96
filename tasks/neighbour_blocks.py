"""Row blocks of a full pass for a cluster: stage the features once, compute blocks, merge."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from lookalike.tasks.catalog import stale_neighbour_ids
from lookalike.tasks.database import DATABASE_RETRIES, engine_for
from lookalike.tasks.knn import (
    NeighbourLists,
    knn_row_block,
    list_depth,
    list_length,
    merge_row_blocks,
    prefix_lists,
)
from lookalike.tasks.knn.plan import PassKind
from lookalike.tasks.neighbours import StagedNeighbours, read_features
from lookalike.tasks.stage import (
    feature_matrix,
    read_table,
    write_neighbour_lists,
    write_table_atomically,
)


def knn_features_schema(dim: int) -> pa.Schema:
    """The staged feature matrix of a fanned-out pass: ids and vectors of dim values."""
    return pa.schema([("image_id", pa.int64()), ("features", pa.list_(pa.float32(), dim))])


@dataclass(frozen=True)
class RowBlockInput:
    """The features of a fanned-out pass, staged where every worker can read them."""

    folder: str  # the pass's own folder under staging/neighbours, removed after the merge
    matrix: str  # Arrow file: image_id and features of every ok image, in id order
    images: int
    refreshed_ids: list[int]  # lists this pass brings up to date (marked indexed on load)


@dataclass(frozen=True)
class StagedRowBlock:
    """One computed row block: where its lists are staged, and how many of all images."""

    path: str
    lists: int
    images: int


def row_blocks(images: int, blocks: int) -> list[tuple[int, int]]:
    """(start, stop) of at most `blocks` contiguous row ranges of near-equal size."""
    count = max(1, min(images, blocks))
    bounds = [images * i // count for i in range(count + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def write_knn_features(path: Path, ids: np.ndarray, features: np.ndarray) -> Path:
    """Stage ids and features (n, the model's dim) as one memory-mappable Arrow file."""
    dim = features.shape[1]
    flat = pa.array(np.ascontiguousarray(features, dtype="<f4").reshape(-1), type=pa.float32())
    table = pa.Table.from_arrays(
        [pa.array(ids.astype(np.int64)), pa.FixedSizeListArray.from_arrays(flat, dim)],
        schema=knn_features_schema(dim),
    )
    return write_table_atomically(table, path)


def read_row_block(path: Path, width: int) -> NeighbourLists:
    """A staged row block (one row per image and rank) back as NeighbourLists."""
    if width < 1:  # empty lists leave no rows to carry the image ids: never fanned out
        raise ValueError(f"row blocks need lists of at least one neighbour, got width {width}")
    table = read_table(path)
    rows = table.num_rows // width
    return NeighbourLists(
        image_ids=np.ascontiguousarray(table.column("image_id").to_numpy()[::width]),
        neighbour_ids=table.column("neighbour_id").to_numpy().reshape(rows, width),
        distances=table.column("distance").to_numpy().reshape(rows, width),
    )


def stage_knn_features(database_url: str, staging_dir: str) -> RowBlockInput:
    """Write the features of every ok image, in id order, for the row-block tasks to read."""
    engine = engine_for(database_url)
    ids, features = read_features(engine, Path(staging_dir))
    changed, _ = stale_neighbour_ids(engine)
    folder = Path(staging_dir) / "neighbours" / f"blocks-{uuid.uuid4().hex}"
    matrix = write_knn_features(folder / "features.arrow", ids, features)
    return RowBlockInput(str(folder), str(matrix), len(ids), list(changed))


def compute_row_block(matrix: str, start: int, stop: int, k: int, out: str) -> StagedRowBlock:
    """Exact deep lists (tasks.neighbours: k plus a reserve) of rows start..stop against
    every image, staged at `out`."""
    table = read_table(Path(matrix))
    ids = table.column("image_id").to_numpy()
    depth = list_depth(k, len(ids))
    lists = knn_row_block(feature_matrix(table), ids, slice(start, stop), depth)
    write_neighbour_lists(Path(out), lists.image_ids, lists.neighbour_ids, lists.distances)
    return StagedRowBlock(out, len(lists.image_ids), len(ids))


def merge_blocks(
    parts: list[str], staging_dir: str, k: int, staged: RowBlockInput
) -> StagedNeighbours:
    """Join the row blocks (deep lists: the blocks ran at list_depth) into one table of
    lists, staged like the local engine's, with the deep lists beside it."""
    width = list_depth(k, staged.images)
    deep = merge_row_blocks([read_row_block(Path(part), width) for part in parts])
    if deep.neighbour_ids.shape != (staged.images, width):
        raise RuntimeError(f"row blocks gave lists of shape {deep.neighbour_ids.shape}")
    lists = prefix_lists(deep, list_length(k, staged.images))
    name = Path(staging_dir) / "neighbours" / uuid.uuid4().hex
    path = write_neighbour_lists(
        name.with_suffix(".arrow"), lists.image_ids, lists.neighbour_ids, lists.distances
    )
    deep_path = write_neighbour_lists(
        name.with_name(f"{name.name}-deep.arrow"),
        deep.image_ids,
        deep.neighbour_ids,
        deep.distances,
    )
    rows = int(lists.neighbour_ids.size)
    return StagedNeighbours(
        path, PassKind.FULL, staged.images, rows, staged.refreshed_ids, deep=deep_path
    )


@task(
    name="stage-knn-features",
    **DATABASE_RETRIES,
    cache_policy=NO_CACHE,
)
def stage_knn_features_task(database_url: str, staging_dir: str) -> RowBlockInput:
    """Stage the features of every ok image for the row-block tasks (see stage_knn_features)."""
    staged = stage_knn_features(database_url, staging_dir)
    get_run_logger().info("staged the features of %d images for row blocks", staged.images)
    return staged


@task(name="knn-row-block", cache_policy=NO_CACHE)  # deterministic compute: no retries
def knn_row_block_task(matrix: str, start: int, stop: int, k: int, out: str) -> str:
    """Exact lists of rows start..stop against every image; staged at `out`, its path returned."""
    started = time.perf_counter()
    block = compute_row_block(matrix, start, stop, k, out)
    get_run_logger().info(
        "rows %d-%d of %d: %d lists in %.1f s",
        start,
        stop,
        block.images,
        block.lists,
        time.perf_counter() - started,
    )
    return block.path


@task(name="merge-row-blocks", cache_policy=NO_CACHE)
def merge_row_blocks_task(
    parts: list[str], staging_dir: str, k: int, staged: RowBlockInput
) -> StagedNeighbours:
    """Join the row blocks into one table of lists (see merge_blocks)."""
    plan = merge_blocks(parts, staging_dir, k, staged)
    get_run_logger().info("merged %d row blocks: %d lists", len(parts), staged.images)
    return plan
