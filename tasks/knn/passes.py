"""Exact k-nearest-neighbour lists for every image by a blocked, symmetric matrix multiply."""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from lookalike.tasks.knn.backends import chosen_backend, open_backend, prepare_kernels
from lookalike.tasks.knn.compiled import CompiledTiles
from lookalike.tasks.knn.order import visiting_order
from lookalike.tasks.knn.plan import list_length
from lookalike.tasks.knn.rerank import finalise_rows
from lookalike.tasks.knn.space import (
    FeatureSpace,
    KnnInputError,
    Timings,
    cache_right_rows,
    check_k_and_metric,
    checked_ids,
    fresh_array,
    prepare_space,
    timed,
)
from lookalike.tasks.knn.threads import TileWorkers, tile_workers
from lookalike.tasks.knn.tiles import (
    CandidateLists,
    TileBackend,
    TileShape,
    TileUpdate,
    tile_shape,
    worker_count,
)

# The candidate pass keeps this many entries per row beyond k, so that the exact re-rank
# can reorder near-ties and still prove the final k are the true ones (see proven_rows).
_MIN_MARGIN = 8
_DIAGONAL_LEAF = 512  # a row block's own pairs are halved down to blocks this small
Side = tuple[CandidateLists, np.ndarray]  # lists and the slot of each tile-local index


PAD_ID = -1  # neighbour id of a padding entry; its distance is +inf


@dataclass(frozen=True)
class NeighbourLists:
    """The k nearest neighbours of each image, rows sorted by image id.

    Deep lists (knn_update with a depth) may be ragged: row i holds the exact first d_i
    entries of its ranking, then padding (PAD_ID, +inf) up to the width; see list_depths.
    """

    image_ids: np.ndarray  # (n,) int64, sorted ascending
    neighbour_ids: np.ndarray  # (n, w) int64, w = min(k or depth, n - 1) (0 when n <= 1)
    distances: np.ndarray  # (n, w) float32, true distances, ascending per row, ties by id


def padding_mask(neighbour_ids: np.ndarray, distances: np.ndarray) -> np.ndarray:
    """Where entries are padding: neighbour PAD_ID at distance +inf (a real one is finite)."""
    return (neighbour_ids == PAD_ID) & np.isposinf(distances)


def list_depths(lists: NeighbourLists) -> np.ndarray:
    """Valid entries of each row (its depth); padding only ever ends a row."""
    return (~padding_mask(lists.neighbour_ids, lists.distances)).sum(axis=1)


def prefix_lists(lists: NeighbourLists, kk: int) -> NeighbourLists:
    """The first kk entries of every row; refused when a row holds fewer valid entries."""
    width = lists.neighbour_ids.shape[1]
    if not 0 <= kk <= width:
        raise KnnInputError(f"cannot take the first {kk} entries of lists of {width}")
    neighbour_ids, distances = lists.neighbour_ids[:, :kk], lists.distances[:, :kk]
    short = np.flatnonzero(padding_mask(neighbour_ids, distances).any(axis=1))
    if short.size:
        raise KnnInputError(
            f"the list of image {int(lists.image_ids[short[0]])} holds fewer than {kk} "
            f"entries ({short.size} such list(s))"
        )
    return NeighbourLists(
        image_ids=lists.image_ids,
        neighbour_ids=np.ascontiguousarray(neighbour_ids),
        distances=np.ascontiguousarray(distances),
    )


def knn_all(
    features: np.ndarray,
    image_ids: np.ndarray,
    k: int,
    *,
    metric: str = "euclidean",
    block_rows: int | None = None,
    backend: str | None = None,
    timings: Timings = None,
) -> NeighbourLists:
    """Exact k nearest neighbours of every image among all the others.

    Each pair of row blocks is multiplied once and feeds the lists of both blocks, so the
    cost is about n^2 * d / 2 multiply-adds. `backend` None picks TensorFlow when a GPU is
    visible, numpy otherwise. `timings`, when given, is filled with seconds per phase.
    """
    ids = checked_ids(image_ids, features)
    check_k_and_metric(k, metric)
    kk = list_length(k, len(ids))
    if kk == 0:
        return empty_lists(ids)
    backend = chosen_backend(backend)  # decided once: the norm pass and the tiles share it
    with timed(timings, "order"):
        visit = visiting_order(features, metric)
    kernels = prepare_kernels(backend)
    space = prepare_space(
        features, ids, metric, timings, keep_right=True, kernels=kernels, visit=visit
    )
    with open_backend(backend, space) as tiles:
        shape = tile_shape(space, block_rows, tiles)
        positions, neighbours, distances = all_lists(space, tiles, kk, shape, timings)
    return assemble_lists(ids, positions, neighbours, distances)


def knn_row_block(
    features: np.ndarray,
    image_ids: np.ndarray,
    rows: slice,
    k: int,
    *,
    metric: str = "euclidean",
    block_rows: int | None = None,
    backend: str | None = None,
    timings: Timings = None,
) -> NeighbourLists:
    """Exact lists of the rows in `rows` against all images: one task of a fanned-out run.

    Costs len(rows) * n * d multiply-adds (no symmetry across tasks); combine the parts
    with merge_row_blocks.
    """
    ids = checked_ids(image_ids, features)
    check_k_and_metric(k, metric)
    positions = np.arange(len(ids))[rows]
    kk = list_length(k, len(ids))
    if kk == 0:
        return empty_lists(ids[positions])
    backend = chosen_backend(backend)  # decided once: the norm pass and the tiles share it
    space = prepare_space(features, ids, metric, timings, kernels=prepare_kernels(backend))
    with open_backend(backend, space) as tiles:
        shape = tile_shape(space, block_rows, tiles)
        if len(positions) > shape.rows:
            with timed(timings, "prepare"):
                cache_right_rows(space)
        neighbours, distances = rows_against_all(space, tiles, positions, kk, shape, timings)
    return assemble_lists(ids, positions, neighbours, distances)


def merge_row_blocks(parts: Sequence[NeighbourLists]) -> NeighbourLists:
    """One NeighbourLists from row blocks computed separately (e.g. as parallel tasks)."""
    if not parts:
        return empty_lists(np.empty(0, dtype=np.int64))
    widths = {part.neighbour_ids.shape[1] for part in parts}
    if len(widths) != 1:
        raise KnnInputError(f"row blocks have different list lengths {sorted(widths)}")
    ids = np.concatenate([part.image_ids for part in parts])
    order = np.argsort(ids, kind="stable")
    if np.any(ids[order][1:] == ids[order][:-1]):
        raise KnnInputError("row blocks overlap: an image id appears in two blocks")
    return NeighbourLists(
        image_ids=ids[order],
        neighbour_ids=np.concatenate([part.neighbour_ids for part in parts])[order],
        distances=np.concatenate([part.distances for part in parts])[order],
    )


def all_lists(
    space: FeatureSpace, tiles: TileBackend, kk: int, shape: TileShape, timings: Timings
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact lists of every row by the symmetric pass: (positions, neighbour positions,
    distances), rows in the space's visiting order."""
    if space.n > shape.rows:
        with timed(timings, "prepare"):
            cache_right_rows(space)
    candidates = CandidateLists(space.n, candidate_width(kk, space.n))
    with tile_workers(worker_count(tiles)) as workers:
        symmetric_candidates(space, tiles, workers, candidates, shape, timings)
    rows = space.visited(slice(0, space.n))
    return rows, *finalise_rows(space, tiles, rows, candidates, kk, shape, timings)


def symmetric_candidates(
    space: FeatureSpace,
    tiles: TileBackend,
    workers: TileWorkers,
    candidates: CandidateLists,
    shape: TileShape,
    timings: Timings,
) -> None:
    """Every pair of row blocks once; each tile feeds its rows' and its columns' lists.

    Blocks are runs of slots of the space's visiting order, and `candidates` is indexed
    by slot (a tile's lists lie together in memory). Strips run from the last row block
    back, so the columns of a tile already hold lists from their own strip and filter the
    tile cheaply instead of selecting densely.
    """
    n = space.n
    if isinstance(tiles, CompiledTiles):
        tiles.expect(shape.rows, shape.cols, space.d + 2)
    lefts = StripLefts(space, workers, shape.rows)
    for r0 in reversed(range(0, n, shape.rows)):
        r1 = min(r0 + shape.rows, n)
        rows = space.visited(slice(r0, r1))
        left = lefts.left(rows)
        _diagonal_block(space, tiles, workers, candidates, left, r0, r1, timings)
        row_side = (candidates, np.arange(r0, r1))
        no_self = (rows[:0], rows[:0])
        for c0, c1 in column_chunks(r1, n, seen=r1 - r0, most=shape.cols):
            cols = space.visited(slice(c0, c1))
            col_side = (candidates, np.arange(c0, c1))
            tile = TileJob(space, left, slice(c0, c1), rows, cols, row_side, col_side, no_self)
            workers.submit(functools.partial(_apply_tile, tiles, workers, tile, timings))
        lefts.release()


class StripLefts:
    """left() of each strip of rows, written into two buffers in turn.

    A buffer is written again once every tile given while its last strip was being
    given has finished. A fresh 33 MB strip each time cost its page faults again, on the
    thread that gives the tiles, beside the workers (0.13-0.34 s a pass at 20,000).
    """

    def __init__(self, space: FeatureSpace, workers: TileWorkers, rows: int) -> None:
        self._space, self._workers, self._rows = space, workers, rows
        self._buffers: list[tuple[np.ndarray, int]] = []  # buffer, jobs that may read it
        self._turn = 0

    def left(self, positions: np.ndarray) -> np.ndarray:
        """space.left(positions) in the next buffer, once its last strip's tiles are done."""
        if len(self._buffers) < 2:
            shape = (min(self._rows, self._space.n), self._space.d + 2)
            self._buffers.append((fresh_array(shape), 0))
        buffer, readers = self._buffers[self._turn % 2]
        self._workers.wait_for(readers)
        return self._space.left(positions, buffer[: len(positions)])

    def release(self) -> None:
        """The current strip's tiles are all given: its buffer is free once they finish."""
        buffer, _ = self._buffers[self._turn % 2]
        self._buffers[self._turn % 2] = (buffer, self._workers.submitted)
        self._turn += 1


def _diagonal_block(
    space: FeatureSpace,
    tiles: TileBackend,
    workers: TileWorkers,
    candidates: CandidateLists,
    left: np.ndarray,
    r0: int,
    r1: int,
    timings: Timings,
    base: int | None = None,
) -> None:
    """The pairs within slots r0..r1: each half's own pairs, then one half against the other.

    Halving down to _DIAGONAL_LEAF rows multiplies only the leaves' pairs twice (a leaf
    tile holds both (i, j) and (j, i), so only its row side is used): 1/16 of a 4096-row
    block's own pairs, against 1/4 with 4 x 4 sub-tiles. `left` holds rows base..; each
    half's lists are filled before it meets the other half, which it then filters.
    """
    base = r0 if base is None else base
    part = left[r0 - base : r1 - base]
    rows = space.visited(slice(r0, r1))
    slots = np.arange(r0, r1)
    row_side = (candidates, slots)
    if r1 - r0 <= _DIAGONAL_LEAF:
        local = np.arange(r1 - r0)
        self_pairs = (local, local)
        tile = TileJob(space, part, slice(r0, r1), rows, rows, row_side, None, self_pairs, True)
        workers.submit(functools.partial(_apply_tile, tiles, workers, tile, timings))
        return
    mid = (r0 + r1) // 2
    _diagonal_block(space, tiles, workers, candidates, left, r0, mid, timings, base)
    _diagonal_block(space, tiles, workers, candidates, left, mid, r1, timings, base)
    upper = part[: mid - r0]
    cols = rows[mid - r0 :]
    no_self = (rows[:0], rows[:0])
    tile = TileJob(
        space,
        upper,
        slice(mid, r1),
        rows[: mid - r0],
        cols,
        (candidates, slots[: mid - r0]),
        (candidates, slots[mid - r0 :]),
        no_self,
    )
    workers.submit(functools.partial(_apply_tile, tiles, workers, tile, timings))


def strip_candidates(
    space: FeatureSpace,
    tiles: TileBackend,
    workers: TileWorkers,
    positions: np.ndarray,
    row_candidates: CandidateLists,
    col_candidates: CandidateLists | None,
    shape: TileShape,
    timings: Timings,
) -> None:
    """Candidates of some rows against all columns, and optionally of the columns.

    `row_candidates` is indexed like `positions`, `col_candidates` by position; a column
    whose limit is -inf takes nothing. Rows never take themselves. Columns come in runs of
    slots of the space's visiting order.
    """
    n = space.n
    width = even_column_width(n, shape.cols, workers.count)
    if isinstance(tiles, CompiledTiles):
        tiles.expect(min(shape.rows, len(positions)), width, space.d + 2)
    lefts = StripLefts(space, workers, min(shape.rows, len(positions)))
    for start in range(0, len(positions), shape.rows):
        chunk = positions[start : start + shape.rows]
        left = lefts.left(chunk)
        chunk_slots = space.slots_of(chunk)
        row_side = (row_candidates, np.arange(start, start + len(chunk)))
        for c0, c1 in column_chunks(0, n, seen=0, most=width, first=width):
            cols = space.visited(slice(c0, c1))
            inside = np.flatnonzero((chunk_slots >= c0) & (chunk_slots < c1))
            self_pairs = (inside, chunk_slots[inside] - c0)
            col_side = None if col_candidates is None else (col_candidates, cols)
            columns = slice(c0, c1)
            tile = TileJob(space, left, columns, chunk, cols, row_side, col_side, self_pairs)
            workers.submit(functools.partial(_apply_tile, tiles, workers, tile, timings))
        lefts.release()


def even_column_width(n: int, most: int, workers: int) -> int:
    """Column chunk width that cuts n columns into equal tiles, a multiple of `workers`.

    A strip's tiles then end together on every worker instead of one long tile last.
    """
    chunks = -(-n // max(1, most))
    chunks = -(-chunks // workers) * workers
    return max(1, -(-n // chunks))


def column_chunks(
    start: int, stop: int, *, seen: int, most: int, first: int = 0
) -> Iterator[tuple[int, int]]:
    """Column ranges of a strip, each no wider than the columns its rows have seen.

    After s columns a row's limit is about its k-th of s, so about k * w / s entries of the
    next w columns pass it; w <= s keeps that at most k (cheap filtering, no dense select).
    """
    c0 = start
    while c0 < stop:
        width = max(first, min(most, seen), 1)
        c1 = min(c0 + width, stop)
        yield c0, c1
        seen += c1 - c0
        c0 = c1


def rows_against_all(
    space: FeatureSpace,
    tiles: TileBackend,
    positions: np.ndarray,
    kk: int,
    shape: TileShape,
    timings: Timings,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact lists (neighbour positions, distances) of some rows against every row."""
    candidates = CandidateLists(len(positions), candidate_width(kk, space.n))
    with tile_workers(worker_count(tiles)) as workers:
        strip_candidates(space, tiles, workers, positions, candidates, None, shape, timings)
    return finalise_rows(space, tiles, positions, candidates, kk, shape, timings)


@dataclass(frozen=True)
class TileJob:
    """One tile to multiply and select: its blocks, positions, the lists it feeds.

    The right block is named by its rows and built by the worker that multiplies it, so
    building blocks (when they are not cached) runs on every core too.
    """

    space: FeatureSpace
    left: np.ndarray
    columns: slice  # slots of the space's visiting order
    row_positions: np.ndarray
    col_positions: np.ndarray
    row_side: Side
    col_side: Side | None
    self_pairs: tuple[np.ndarray, np.ndarray]  # (row, column) of an image against itself
    leaf: bool = False  # a diagonal leaf: its rows against themselves


def _apply_tile(tiles: TileBackend, workers: TileWorkers, tile: TileJob, timings: Timings) -> None:
    """One tile: candidates for its rows from its columns and, if asked, the reverse.

    Limits are read without the lock: they only ever fall, so a stale one lets a few more
    entries through, which the merge then cuts back. Merges hold the lock.
    """
    row_side, col_side = tile.row_side, tile.col_side
    if isinstance(tiles, CompiledTiles) and tile.leaf:
        tiles.feed_leaf(tile.left, row_side, tile.row_positions, timings)
        return
    if isinstance(tiles, CompiledTiles):
        positions = (tile.row_positions, tile.col_positions)
        space, columns = tile.space, tile.columns
        size = (columns.stop - columns.start, space.d + 2)
        buffer = None if space.right_rows is not None else tiles.tile_buffer(*size, use="right")
        right = space.right_visited(columns, buffer)
        feed = (row_side, col_side, positions, tile.self_pairs, timings)
        tiles.feed(tile.left, right, *feed)
        return
    row_limits = row_side[0].limits[row_side[1]]
    col_limits = None if col_side is None else col_side[0].limits[col_side[1]]
    width = row_side[0].width
    row_update, col_update = tiles.updates(
        tile.left,
        tile.space.right_visited(tile.columns),
        row_limits,
        col_limits,
        tile.self_pairs,
        width,
        timings,
    )
    with workers.lock, timed(timings, "merge"):
        if row_update is not None:
            _merge_update(row_side, row_update, tile.col_positions)
        if col_side is not None and col_update is not None:
            _merge_update(col_side, col_update, tile.row_positions)


def _merge_update(side: Side, update: TileUpdate, source_positions: np.ndarray) -> None:
    lists, slots = side
    lists.merge(
        slots[update.targets],
        update.values,
        source_positions[update.sources],
        slots[update.bound_targets],
        update.bounds,
    )


def candidate_width(kk: int, n: int) -> int:
    """Candidates kept per row by the expansion pass: kk plus a margin for near-ties."""
    return min(kk + max(_MIN_MARGIN, kk // 8), n - 1)


def empty_lists(ids: np.ndarray) -> NeighbourLists:
    """Lists of length 0 for these images (no image has a neighbour)."""
    ordered = np.sort(ids.astype(np.int64))
    return NeighbourLists(
        image_ids=ordered,
        neighbour_ids=np.empty((len(ordered), 0), dtype=np.int64),
        distances=np.empty((len(ordered), 0), dtype=np.float32),
    )


def assemble_lists(
    ids: np.ndarray,
    positions: np.ndarray,
    neighbours: np.ndarray,
    distances: np.ndarray,
    *,
    min_depth: int | None = None,
) -> NeighbourLists:
    """NeighbourLists (image ids, rows sorted by id) from position-based results.

    Every row must be full, or hold at least `min_depth` entries before its padding
    (position -1, distance inf) when that is given.
    """
    depth = neighbours.shape[1] if min_depth is None else min_depth
    if neighbours.size and depth and neighbours[:, :depth].min() < 0:
        raise RuntimeError("kNN engine bug: a list came out shorter than k")
    row_ids = ids[positions]
    if np.all(row_ids[1:] > row_ids[:-1]):  # in order already (ids mostly come sorted)
        ordered, distances = neighbours, np.ascontiguousarray(distances, dtype=np.float32)
    else:
        order = np.argsort(row_ids, kind="stable")
        row_ids, ordered = row_ids[order], neighbours[order]
        distances = np.ascontiguousarray(distances[order], dtype=np.float32)
    neighbour_ids = ids[ordered]
    if depth < neighbours.shape[1]:
        neighbour_ids[ordered < 0] = PAD_ID
    return NeighbourLists(image_ids=row_ids, neighbour_ids=neighbour_ids, distances=distances)
