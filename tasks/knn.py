"""Exact k-nearest-neighbour lists for every image by a blocked, symmetric matrix multiply."""

from __future__ import annotations

import contextlib
import functools
import logging
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from tasks.knn_threads import TileWorkers, cpu_cores, tile_workers

log = logging.getLogger(__name__)

METRICS = ("euclidean", "cosine")
BACKENDS = ("numpy", "tensorflow")

# The candidate pass keeps this many entries per row beyond k, so that the exact re-rank
# can reorder near-ties and still prove the final k are the true ones (see proven_rows).
_MIN_MARGIN = 8
# Rounding of the float32 expansion |a|^2 + |b|^2 - 2ab is taken to be at most this many
# times eps * sqrt(d) * (|a|^2 + |b|^2); 16 is far above what is seen in practice.
_ERROR_SAFETY = 16.0
_EPS32 = float(np.finfo(np.float32).eps)
_RERANK_CHUNK_ENTRIES = 1 << 22  # candidates re-ranked at once: bounds its temporaries
_RERANK_CHUNK_PAIRS = 256  # 256 rows x 2048 floats = 2 MB: stays in cache
_GROUPED_PAIR_SHARE = 0.5  # re-rank in neighbourhood order when this share of pairs is inside
_GROUP_MAX_ROWS = 512  # a group's float64 block (512 x 2048) stays within 8 MB
_GROUP_MIN_SHARE = 0.25  # of a group's pairs must be wanted to multiply the whole group
_GROUP_MIN_PAIRS = 4096  # fewer grouped pairs than this are not worth the set-up
_GROUP_GUARD = 1e-5  # float64 expansion error <= ~5e-13 x norms: < 1 float32 ulp above this
_PARALLEL_RERANK_CHUNKS = 16  # fewer chunks than this are measured in the calling thread
_SORT_PART_ROWS = 2048  # lists are ordered in parts of at least this many rows, one per core
_PREPARE_CHUNK_ROWS = 2048
_RIGHT_CACHE_BYTES = 1 << 30  # the augmented copy of all rows is kept when it fits this
_CPU_BLOCK_ROWS = 4096  # columns per tile are 2x this on the CPU
_DIAGONAL_SPLIT = 4  # a row block's own pairs go in 4 x 4 sub-tiles, upper half only
_GPU_BLOCK_ROWS = 16384
_NO_ID = np.iinfo(np.int64).max
_NO_RANK = np.iinfo(np.uint32).max  # sorts after every id rank (ranks are below n < 2^32)

Timings = dict[str, float] | None


class NonFiniteFeaturesError(ValueError):
    """A feature vector holds NaN or Inf (or overflows float32 when squared)."""


class ZeroFeatureVectorError(ValueError):
    """A feature vector is all zeros, so its cosine distance is undefined."""


class KnnInputError(ValueError):
    """The features, ids or previous lists given to the kNN engine do not fit together."""


@dataclass(frozen=True)
class NeighbourLists:
    """The k nearest neighbours of each image, rows sorted by image id."""

    image_ids: np.ndarray  # (n,) int64, sorted ascending
    neighbour_ids: np.ndarray  # (n, kk) int64, kk = min(k, n - 1) (0 when n <= 1)
    distances: np.ndarray  # (n, kk) float32, true distances, ascending per row, ties by id


@dataclass
class FeatureSpace:
    """The features as the engine sees them: raw rows, plus what the expansion needs."""

    features: np.ndarray  # (n, d) float32, the caller's array, never copied or written
    ids: np.ndarray  # (n,) int64 image id of each row
    metric: str
    scale: np.ndarray | None  # (n,) float32 1/|x| for cosine, None for euclidean
    centre: np.ndarray  # (d,) float32 mean row, subtracted so the expansion loses less
    sq: np.ndarray  # (n,) float32 squared norm of each centred row
    error_unit: float  # expansion error bound per unit of squared norm
    direct_error: float  # relative error bound of a float32 direct squared distance
    sq_max: float = 0.0  # largest entry of sq
    right_rows: np.ndarray | None = None  # right() of every row, when memory allows

    @property
    def n(self) -> int:
        return int(self.features.shape[0])

    @property
    def d(self) -> int:
        return int(self.features.shape[1])

    @functools.cached_property
    def id_ranks(self) -> np.ndarray:
        """Rank of each row's image id among all ids (orders ties by id)."""
        ranks = np.empty(self.n, dtype=np.int64)
        ranks[np.argsort(self.ids, kind="stable")] = np.arange(self.n)
        return ranks

    def exact_rows(self, rows: np.ndarray) -> np.ndarray:
        """Rows as the metric measures them (cosine: unit length), a fresh float32 array."""
        x = np.take(self.features, rows, axis=0)
        if self.scale is not None:
            x *= self.scale[rows][:, None]
        return x

    def precise_rows(self, rows: np.ndarray) -> np.ndarray:
        """Rows as exact_rows, in float64 (cosine: scaled by the float64 norm)."""
        x = np.take(self.features, rows, axis=0).astype(np.float64)
        if self.scale is not None:
            x /= np.linalg.norm(x, axis=1)[:, None]
        return x

    def left(self, rows: slice | np.ndarray) -> np.ndarray:
        """[y, 1, |y|^2] per row: times right() it gives squared distances in one GEMM."""
        out = self._augmented(rows)
        out[:, -2] = 1.0
        out[:, -1] = self.sq[rows]
        return out

    def right(self, rows: slice | np.ndarray) -> np.ndarray:
        """[-2y, |y|^2, 1] per row (the factor -2 is exact in binary floating point).

        A view into the cached matrix when there is one: treat it as read-only.
        """
        if self.right_rows is not None:
            return self.right_rows[rows]
        out = self._augmented(rows)
        out[:, :-2] *= -2.0
        out[:, -2] = self.sq[rows]
        out[:, -1] = 1.0
        return out

    def error_bound(self, rows: np.ndarray) -> np.ndarray:
        """Largest error of an expanded squared distance from these rows to any row."""
        return self.error_unit * (self.sq[rows].astype(np.float64) + self.sq_max)

    def _augmented(self, rows: slice | np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        x = self.features[rows]
        if out is None:
            out = np.empty((x.shape[0], self.d + 2), dtype=np.float32)
        body = out[:, :-2]
        if self.scale is not None:
            np.multiply(x, self.scale[rows][:, None], out=body)
            body -= self.centre
        else:
            np.subtract(x, self.centre, out=body)
        return out


@dataclass(frozen=True)
class TileUpdate:
    """New candidates from one tile for some of its targets (rows or columns), tile-local.

    The entries of one target are contiguous. A target's tile entries that are not listed
    are above its limit, or at least its bound where `bound_targets` gives one.
    """

    targets: np.ndarray  # (e,) local index of the target of each entry
    values: np.ndarray  # (e,) float32 expanded squared distances
    sources: np.ndarray  # (e,) local index of each candidate
    bound_targets: np.ndarray  # (t,) targets with a bound on what was left out
    bounds: np.ndarray  # (t,) float32

    @classmethod
    def from_padded(
        cls, targets: np.ndarray, values: np.ndarray, sources: np.ndarray, bounds: np.ndarray
    ) -> TileUpdate:
        """From one padded row per target (source -1 or value inf: no entry)."""
        flat = np.flatnonzero((sources >= 0) & np.isfinite(values))
        row, col = np.divmod(flat, values.shape[1])
        return cls(targets[row], values[row, col], sources[row, col], targets, bounds)

    def joined(self, other: TileUpdate | None) -> TileUpdate:
        """Both updates in one; their targets must differ."""
        if other is None:
            return self
        parts = zip(
            (self.targets, self.values, self.sources, self.bound_targets, self.bounds),
            (other.targets, other.values, other.sources, other.bound_targets, other.bounds),
            strict=True,
        )
        return TileUpdate(*(np.concatenate(pair) for pair in parts))


class CandidateLists:
    """Running best `width` candidates per slot, fed tile by tile.

    New candidates are appended into spare room (2 x width per slot) and a slot is only
    cut back to its best `width` when full, so a tile costs in proportion to what it adds.
    `limits[s]` is a lower bound of the expanded distance of everything seen for slot s and
    dropped; it doubles as the filter of later tiles (only entries <= limit can matter).
    """

    def __init__(self, size: int, width: int) -> None:
        self.width = width
        self.values = np.full((size, 2 * width), np.inf, dtype=np.float32)
        self.sources = np.full((size, 2 * width), -1, dtype=np.int32)  # positions < 2^31
        self.fill = np.zeros(size, dtype=np.int64)
        self.limits = np.full(size, np.inf, dtype=np.float32)

    def merge(
        self,
        slots: np.ndarray,
        values: np.ndarray,
        sources: np.ndarray,
        bound_slots: np.ndarray,
        bounds: np.ndarray,
    ) -> None:
        """Append new candidates, at most `width` per slot, each slot's entries together."""
        self.limits[bound_slots] = np.minimum(self.limits[bound_slots], bounds)
        if slots.size == 0:
            return
        starts = np.flatnonzero(np.concatenate([[True], slots[1:] != slots[:-1]]))
        counts = np.diff(np.append(starts, len(slots)))
        groups = slots[starts]
        full = groups[self.fill[groups] + counts > self.values.shape[1]]
        if full.size:
            self._cut_back(full)
        place = self.fill[slots] + np.arange(len(slots)) - np.repeat(starts, counts)
        self.values[slots, place] = values
        self.sources[slots, place] = sources
        self.fill[groups] += counts

    def best(self) -> tuple[np.ndarray, np.ndarray]:
        """Each slot's best `width` candidates (values, int64 sources; inf / -1 padding)."""
        self._cut_back(np.flatnonzero(self.fill > self.width))
        width = self.width
        return self.values[:, :width], self.sources[:, :width].astype(np.int64)

    def best_of(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """best() of some slots only, cutting back just those."""
        self._cut_back(slots[self.fill[slots] > self.width])
        width = self.width
        return self.values[slots, :width], self.sources[slots, :width].astype(np.int64)

    def _cut_back(self, slots: np.ndarray) -> None:
        kept, columns, dropped = best_below(self.values[slots], self.width)
        sources = np.take_along_axis(self.sources[slots], np.maximum(columns, 0), axis=1)
        self.values[slots] = np.inf
        self.sources[slots] = -1
        self.values[slots, : self.width] = kept
        self.sources[slots, : self.width] = np.where(columns >= 0, sources, -1)
        self.fill[slots] = (columns >= 0).sum(axis=1)
        self.limits[slots] = np.minimum(self.limits[slots], dropped)


class TileBackend(Protocol):
    """Computes expanded distance tiles and their best candidates on some device."""

    name: str

    def distances(self, left: np.ndarray, right: np.ndarray) -> np.ndarray:
        """The tile left @ right.T of expanded squared distances, as a numpy array."""
        ...

    def updates(
        self,
        left: np.ndarray,
        right: np.ndarray,
        row_limits: np.ndarray,
        col_limits: np.ndarray | None,
        self_pairs: tuple[np.ndarray, np.ndarray],
        width: int,
        timings: Timings,
    ) -> tuple[TileUpdate | None, TileUpdate | None]:
        """New candidates of the tile's rows and (if col_limits is given) its columns.

        Entries above a target's limit may be left out; `self_pairs` (row, column) are
        an image against itself and never count.
        """
        ...


@dataclass(frozen=True)
class TileShape:
    """Rows and columns of one distance tile."""

    rows: int
    cols: int


Side = tuple[CandidateLists, np.ndarray]  # lists and the slot of each tile-local index


# --- public entry points ----------------------------------------------------------------


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
    space = prepare_space(features, ids, metric, timings, keep_right=True)
    with open_backend(backend) as tiles:
        shape = tile_shape(space, block_rows, tiles)
        neighbours, distances = all_lists(space, tiles, kk, shape, timings)
    return assemble_lists(ids, np.arange(space.n), neighbours, distances)


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
    space = prepare_space(features, ids, metric, timings)
    with open_backend(backend) as tiles:
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


# --- candidate passes -------------------------------------------------------------------


def all_lists(
    space: FeatureSpace, tiles: TileBackend, kk: int, shape: TileShape, timings: Timings
) -> tuple[np.ndarray, np.ndarray]:
    """Exact lists (neighbour positions, distances) of every row, by the symmetric pass."""
    if space.n > shape.rows:
        with timed(timings, "prepare"):
            cache_right_rows(space)
    candidates = CandidateLists(space.n, candidate_width(kk, space.n))
    with tile_workers(worker_count(tiles)) as workers:
        symmetric_candidates(space, tiles, workers, candidates, shape, timings)
    rows = np.arange(space.n)
    return finalise_rows(space, tiles, rows, candidates, kk, shape, timings)


def symmetric_candidates(
    space: FeatureSpace,
    tiles: TileBackend,
    workers: TileWorkers,
    candidates: CandidateLists,
    shape: TileShape,
    timings: Timings,
) -> None:
    """Every pair of row blocks once; each tile feeds its rows' and its columns' lists.

    Strips run from the last row block back, so the columns of a tile already hold lists
    from their own strip and filter the tile cheaply instead of selecting densely.
    """
    n = space.n
    for r0 in reversed(range(0, n, shape.rows)):
        r1 = min(r0 + shape.rows, n)
        rows = np.arange(r0, r1)
        left = space.left(slice(r0, r1))
        _diagonal_block(space, tiles, workers, candidates, left, r0, r1, timings)
        row_side = (candidates, rows)
        no_self = (rows[:0], rows[:0])
        for c0, c1 in column_chunks(r1, n, seen=r1 - r0, most=shape.cols):
            cols = np.arange(c0, c1)
            col_side = (candidates, cols)
            tile = TileJob(space, left, slice(c0, c1), rows, cols, row_side, col_side, no_self)
            workers.submit(functools.partial(_apply_tile, tiles, workers, tile, timings))


def _diagonal_block(
    space: FeatureSpace,
    tiles: TileBackend,
    workers: TileWorkers,
    candidates: CandidateLists,
    left: np.ndarray,
    r0: int,
    r1: int,
    timings: Timings,
) -> None:
    """The pairs within one row block, in quarter blocks so little is multiplied twice.

    A tile on the diagonal holds both (i, j) and (j, i), so only its row side is used.
    """
    step = max(1, -(-(r1 - r0) // _DIAGONAL_SPLIT))
    for p0 in range(r0, r1, step):
        p1 = min(p0 + step, r1)
        part = left[p0 - r0 : p1 - r0]
        rows = np.arange(p0, p1)
        local = rows - p0
        row_side = (candidates, rows)
        tile = TileJob(space, part, slice(p0, p1), rows, rows, row_side, None, (local, local))
        workers.submit(functools.partial(_apply_tile, tiles, workers, tile, timings))
        no_self = (local[:0], local[:0])
        for q0 in range(p1, r1, step):
            cols = np.arange(q0, min(q0 + step, r1))
            col_side = (candidates, cols)
            columns = slice(q0, cols[-1] + 1)
            tile = TileJob(space, part, columns, rows, cols, row_side, col_side, no_self)
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
    whose limit is -inf takes nothing. Rows never take themselves.
    """
    n = space.n
    width = even_column_width(n, shape.cols, workers.count)
    for start in range(0, len(positions), shape.rows):
        chunk = positions[start : start + shape.rows]
        left = space.left(chunk)
        row_side = (row_candidates, np.arange(start, start + len(chunk)))
        for c0, c1 in column_chunks(0, n, seen=0, most=width, first=width):
            cols = np.arange(c0, c1)
            inside = np.flatnonzero((chunk >= c0) & (chunk < c1))
            self_pairs = (inside, chunk[inside] - c0)
            col_side = None if col_candidates is None else (col_candidates, cols)
            columns = slice(c0, c1)
            tile = TileJob(space, left, columns, chunk, cols, row_side, col_side, self_pairs)
            workers.submit(functools.partial(_apply_tile, tiles, workers, tile, timings))


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
    columns: slice
    row_positions: np.ndarray
    col_positions: np.ndarray
    row_side: Side
    col_side: Side | None
    self_pairs: tuple[np.ndarray, np.ndarray]  # (row, column) of an image against itself


def _apply_tile(tiles: TileBackend, workers: TileWorkers, tile: TileJob, timings: Timings) -> None:
    """One tile: candidates for its rows from its columns and, if asked, the reverse.

    Limits are read without the lock: they only ever fall, so a stale one lets a few more
    entries through, which the merge then cuts back. Merges hold the lock.
    """
    row_side, col_side = tile.row_side, tile.col_side
    row_limits = row_side[0].limits[row_side[1]]
    col_limits = None if col_side is None else col_side[0].limits[col_side[1]]
    width = row_side[0].width
    row_update, col_update = tiles.updates(
        tile.left,
        tile.space.right(tile.columns),
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


def worker_count(tiles: TileBackend) -> int:
    """Worker threads for a pass: every core on the CPU; one feeding a GPU."""
    return cpu_cores() if tiles.name == "numpy" else 1


def _merge_update(side: Side, update: TileUpdate, source_positions: np.ndarray) -> None:
    lists, slots = side
    lists.merge(
        slots[update.targets],
        update.values,
        source_positions[update.sources],
        slots[update.bound_targets],
        update.bounds,
    )


# --- tile backends ----------------------------------------------------------------------


class NumpyTiles:
    """Tiles by BLAS on the CPU; candidates by threshold filtering (cheap once lists fill)."""

    name = "numpy"

    def distances(self, left: np.ndarray, right: np.ndarray) -> np.ndarray:
        """The tile of expanded squared distances."""
        return left @ right.T

    def updates(
        self,
        left: np.ndarray,
        right: np.ndarray,
        row_limits: np.ndarray,
        col_limits: np.ndarray | None,
        self_pairs: tuple[np.ndarray, np.ndarray],
        width: int,
        timings: Timings,
    ) -> tuple[TileUpdate | None, TileUpdate | None]:
        """Multiply with BLAS, then filter both sides by their limits (see select_both)."""
        with timed(timings, "matmul"):
            tile = left @ right.T
        tile[self_pairs] = np.inf
        with timed(timings, "selection"):
            return select_both(tile, row_limits, col_limits, width)


def select_both(
    tile: np.ndarray, row_limits: np.ndarray, col_limits: np.ndarray | None, width: int
) -> tuple[TileUpdate | None, TileUpdate | None]:
    """Candidates of the tile's rows (and columns) whose entry is <= the target's limit.

    One comparison and one flatnonzero per side find them; a target with more than
    `width` such entries keeps its best `width`. Fresh targets (limit inf) take the best
    `width` of the whole tile directly.
    """
    row_fresh = _fresh(row_limits, tile.shape[1], width)
    row_filter = np.where(row_fresh, -np.inf, row_limits).astype(np.float32)
    row, col, values = _entries_within(tile, tile <= row_filter[:, None])
    rows = _filtered(row, col, values, row_filter, width, grouped=True)
    dense = _select_dense(tile, row_limits, width, 1, np.flatnonzero(row_fresh))
    rows = rows if dense is None else dense.joined(rows)
    if col_limits is None:
        return rows, None
    # Each side takes only its own entries: most entries within one side's limit are far
    # outside the other's, and every entry taken costs a dozen array operations.
    col_fresh = _fresh(col_limits, tile.shape[0], width)
    col_filter = np.where(col_fresh, -np.inf, col_limits).astype(np.float32)
    row, col, values = _entries_within(tile, tile <= col_filter[None, :])
    cols = _filtered(col, row, values, col_filter, width, grouped=False)
    dense = _select_dense(tile, col_limits, width, 0, np.flatnonzero(col_fresh))
    return rows, cols if dense is None else dense.joined(cols)


def _entries_within(tile: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, ...]:
    """(row, column, value) of the tile's entries where mask is set, in row-major order."""
    flat = np.flatnonzero(mask)
    row = flat // tile.shape[1]
    return row, flat - row * tile.shape[1], tile.ravel()[flat]


def _fresh(limits: np.ndarray, tile_width: int, width: int) -> np.ndarray:
    """Targets with nothing to filter by (limit inf) in a tile wider than their lists."""
    if tile_width <= width:
        return np.zeros(len(limits), dtype=bool)
    return np.isinf(limits) & (limits > 0)


def _filtered(
    target: np.ndarray,
    source: np.ndarray,
    values: np.ndarray,
    limits: np.ndarray,
    width: int,
    grouped: bool,
) -> TileUpdate | None:
    """The entries within their target's limit, grouped by target, at most `width` each."""
    keep = (values <= limits[target]) & (values < np.inf)  # self pairs are inf
    target, source, values = target[keep], source[keep], values[keep]
    if target.size == 0:
        return None
    if not grouped:
        # Tile columns fit 16 bits, where numpy's stable sort is a radix sort.
        keys = target.astype(np.uint16) if len(limits) <= 1 << 16 else target
        order = np.argsort(keys, kind="stable")
        target, source, values = target[order], source[order], values[order]
    counts = np.bincount(target, minlength=len(limits))
    heavy = counts[target] > width
    update = TileUpdate(target, values, source, target[:0], values[:0])
    if not heavy.any():
        return update
    light = TileUpdate(target[~heavy], values[~heavy], source[~heavy], target[:0], values[:0])
    return _best_entries(target[heavy], source[heavy], values[heavy], limits, width).joined(light)


def _best_entries(
    target: np.ndarray, source: np.ndarray, values: np.ndarray, limits: np.ndarray, width: int
) -> TileUpdate:
    """The best `width` entries of each target (entries grouped by target)."""
    first = np.flatnonzero(np.concatenate([[True], target[1:] != target[:-1]]))
    counts = np.diff(np.append(first, len(target)))
    row = np.repeat(np.arange(len(first)), counts)
    rank = np.arange(len(target)) - np.repeat(first, counts)
    padded_values = np.full((len(first), int(counts.max())), np.inf, dtype=np.float32)
    padded_sources = np.full(padded_values.shape, -1, dtype=np.int64)
    padded_values[row, rank] = values
    padded_sources[row, rank] = source
    kept, columns, dropped = best_below(padded_values, width)
    sources = np.take_along_axis(padded_sources, np.maximum(columns, 0), axis=1)
    targets = target[first]
    bounds = np.minimum(limits[targets], dropped)
    return TileUpdate.from_padded(targets, kept, np.where(columns >= 0, sources, -1), bounds)


def _select_dense(
    tile: np.ndarray, limits: np.ndarray, width: int, axis: int, targets: np.ndarray
) -> TileUpdate | None:
    """Best `width` entries of some targets (rows: axis 1, columns: axis 0) over the tile."""
    if targets.size == 0:
        return None
    if targets.size == tile.shape[1 - axis]:
        dense = tile if axis == 1 else np.ascontiguousarray(tile.T)
    else:
        dense = tile[targets] if axis == 1 else np.ascontiguousarray(tile[:, targets].T)
    values, columns, dropped = best_below(dense, width)
    return TileUpdate.from_padded(targets, values, columns, np.minimum(limits[targets], dropped))


def best_below(values: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row, the entries below the (width+1)-th smallest: at most `width` of them.

    Returns their values and columns, padded with inf / -1, and that (width+1)-th value,
    which bounds everything left out. np.partition (values only) and one comparison are
    several times faster than np.argpartition on rows of a few hundred entries.
    """
    dropped = np.partition(values, width, axis=1)[:, width]
    flat = np.flatnonzero(values < dropped[:, None])  # inf entries never pass
    row, col = np.divmod(flat, values.shape[1])
    counts = np.bincount(row, minlength=len(values))
    rank = np.arange(len(flat)) - (np.cumsum(counts) - counts)[row]
    kept_values = np.full((len(values), width), np.inf, dtype=np.float32)
    kept_columns = np.full((len(values), width), -1, dtype=np.int64)
    kept_values[row, rank] = values.ravel()[flat]
    kept_columns[row, rank] = col
    return kept_values, kept_columns, dropped


class TensorFlowTiles:
    """Tiles and their top candidates on the GPU; only the candidates come back."""

    name = "tensorflow"

    def __init__(self) -> None:
        import tensorflow as tf

        self._tf = tf

    def distances(self, left: np.ndarray, right: np.ndarray) -> np.ndarray:
        """The tile of expanded squared distances, computed on the GPU."""
        tf = self._tf
        return np.asarray(tf.matmul(tf.constant(left), tf.constant(right), transpose_b=True))

    def updates(
        self,
        left: np.ndarray,
        right: np.ndarray,
        row_limits: np.ndarray,
        col_limits: np.ndarray | None,
        self_pairs: tuple[np.ndarray, np.ndarray],
        width: int,
        timings: Timings,
    ) -> tuple[TileUpdate | None, TileUpdate | None]:
        """Multiply and take each side's best entries on the GPU; bring back only those."""
        tf = self._tf
        with timed(timings, "matmul"):
            tile = tf.matmul(tf.constant(left), tf.constant(right), transpose_b=True)
            if self_pairs[0].size:
                where = np.stack(self_pairs, axis=1).astype(np.int64)
                infs = tf.fill([len(where)], np.float32(np.inf))
                tile = tf.tensor_scatter_nd_update(tile, where, infs)
        with timed(timings, "selection"):
            rows = self._top(tile, row_limits, width)
            cols = None if col_limits is None else self._top(tf.transpose(tile), col_limits, width)
        return rows, cols

    def _top(self, tile: Any, limits: np.ndarray, width: int) -> TileUpdate:
        """Best `width` entries <= limit of each row of the tile, plus a bound on the rest."""
        tf = self._tf
        masked = tf.where(tile <= tf.constant(limits)[:, None], tile, np.float32(np.inf))
        take = min(width + 1, int(tile.shape[1]))
        negated, index = tf.math.top_k(-masked, k=take, sorted=True)
        values = -np.asarray(negated)
        sources = np.asarray(index).astype(np.int64)
        bounds = limits.copy()
        if take > width:
            bounds = np.minimum(bounds, values[:, width])
            values, sources = values[:, :width], sources[:, :width]
        return TileUpdate.from_padded(np.arange(len(limits)), values, sources, bounds)


@contextlib.contextmanager
def open_backend(name: str | None) -> Iterator[TileBackend]:
    """The tile backend: TensorFlow when asked or when a GPU is visible, else numpy.

    Under TensorFlow, TF32 matmuls are switched off while the engine runs: they would make
    the expansion too coarse for the error bound.
    """
    if name not in (None, *BACKENDS):
        raise KnnInputError(f"unknown kNN backend {name!r}; use one of {', '.join(BACKENDS)}")
    if name == "numpy" or (name is None and not gpu_visible()):
        yield NumpyTiles()
        return
    import tensorflow as tf

    tf32 = tf.config.experimental.tensor_float_32_execution_enabled()
    tf.config.experimental.enable_tensor_float_32_execution(False)
    try:
        yield TensorFlowTiles()
    finally:
        tf.config.experimental.enable_tensor_float_32_execution(tf32)


def gpu_visible() -> bool:
    """True when TensorFlow sees a GPU; TensorFlow is only imported if a GPU may exist."""
    if "tensorflow" not in sys.modules and not _gpu_device_files():
        return False
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


def _gpu_device_files() -> bool:
    dev = Path("/dev")
    return any(dev.glob("nvidia[0-9]*")) or (dev / "dxg").exists() or (dev / "kfd").exists()


# --- exact re-rank ------------------------------------------------------------------------


def finalise_rows(
    space: FeatureSpace,
    tiles: TileBackend,
    positions: np.ndarray,
    candidates: CandidateLists,
    kk: int,
    shape: TileShape,
    timings: Timings,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact lists from candidates: direct distances, then rows not proven are redone."""
    with timed(timings, "rerank"):
        values, sources = candidates.best()
        neighbours = np.empty((len(positions), kk), dtype=np.int64)
        distances = np.empty((len(positions), kk), dtype=np.float32)
        # In row chunks: the re-rank needs about 150 bytes per candidate for a while.
        step = max(1, _RERANK_CHUNK_ENTRIES // values.shape[1])
        for start in range(0, len(positions), step):
            part = slice(start, start + step)
            plausible = plausible_sources(space, positions[part], values[part], sources[part], kk)
            neighbours[part], distances[part] = rerank_rows(
                space, positions[part], plausible, kk, timings
            )
    proven = proven_rows(space, positions, distances[:, -1], candidates.limits)
    doubtful = np.flatnonzero(~proven)
    if timings is not None:
        timings["fallback_rows"] = timings.get("fallback_rows", 0.0) + doubtful.size
    if doubtful.size:
        with timed(timings, "fallback"):
            redone = exhaustive_rows(
                space, tiles, positions[doubtful], distances[doubtful, -1], kk, shape
            )
        neighbours[doubtful], distances[doubtful] = redone
    return neighbours, distances


def plausible_sources(
    space: FeatureSpace, positions: np.ndarray, values: np.ndarray, sources: np.ndarray, kk: int
) -> np.ndarray:
    """Candidates that can still make the first kk, or tie with its last; others are -1.

    The kk best expanded distances are each within the error bound of their direct
    distance, so a candidate expanded further than (kk-th + error) plus the near-tie
    tolerance, plus its own error, cannot reach the list.
    """
    if values.shape[1] <= kk:
        return sources
    error = space.error_bound(positions)
    kth = np.partition(values, kk - 1, axis=1)[:, kk - 1].astype(np.float64)
    reach = np.maximum(kth + error, 0.0) * (1 + 4 * space.direct_error) + error
    return np.where(values <= reach[:, None], sources, -1)


def rerank_rows(
    space: FeatureSpace,
    positions: np.ndarray,
    sources: np.ndarray,
    kk: int,
    timings: Timings = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Best kk candidates per row by direct distance, ties by image id (-1/inf pad)."""
    distances = direct_distances(space, positions, sources)
    return sorted_lists(space, positions, sources, distances, kk, timings)


def direct_distances(space: FeatureSpace, positions: np.ndarray, sources: np.ndarray) -> np.ndarray:
    """Reported distance from each row to each of its candidates (-1 candidates: inf)."""
    valid = sources >= 0
    rows = np.broadcast_to(positions[:, None], sources.shape)
    sq = np.full(sources.shape, np.inf, dtype=np.float32)
    sq[valid] = pair_sq_distances(space, rows[valid], sources[valid])
    return to_distance(space.metric, sq)


def sorted_lists(
    space: FeatureSpace,
    positions: np.ndarray,
    sources: np.ndarray,
    distances: np.ndarray,
    kk: int,
    timings: Timings = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The first kk of each row by (distance, image id), near-ties settled in float64."""
    columns, distances = sorted_list_columns(space, positions, sources, distances, kk, timings)
    return np.take_along_axis(sources, columns, axis=1), distances


def sorted_list_columns(
    space: FeatureSpace,
    positions: np.ndarray,
    sources: np.ndarray,
    distances: np.ndarray,
    kk: int,
    timings: Timings = None,
    settled: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Which columns make each row's first kk, in order, and their distances.

    Float32 direct distances are a few ulps off; entries within that error of a neighbour
    in the order (a chain reaching into the first kk) get their distance recomputed in
    float64 and rounded once, so the order is that of the true distances and a tie means
    equal float32 distances. `settled` marks entries already ordered by an earlier run.
    Rows are independent, so large inputs are ordered in row parts on every core.
    """
    parts = max(1, min(cpu_cores(), len(positions) // _SORT_PART_ROWS))
    if parts == 1:
        columns, distances, ties = _sorted_part(space, positions, sources, distances, kk, settled)
    else:
        bounds = np.linspace(0, len(positions), parts + 1).astype(np.int64)
        width = min(kk, sources.shape[1])
        columns = np.empty((len(positions), width), dtype=np.int64)
        ordered = np.empty((len(positions), width), dtype=distances.dtype)
        tie_counts = np.zeros(parts, dtype=np.int64)

        def order_part(part: int) -> None:
            rows = slice(bounds[part], bounds[part + 1])
            some = None if settled is None else settled[rows]
            found = _sorted_part(space, positions[rows], sources[rows], distances[rows], kk, some)
            columns[rows], ordered[rows], tie_counts[part] = found

        _on_all_cores(order_part, range(parts))
        distances, ties = ordered, int(tie_counts.sum())
    if ties and timings is not None:
        timings["near_tie_entries"] = timings.get("near_tie_entries", 0.0) + ties
    return columns, distances


def _sorted_part(
    space: FeatureSpace,
    positions: np.ndarray,
    sources: np.ndarray,
    distances: np.ndarray,
    kk: int,
    settled: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray, int]:
    """sorted_list_columns for some rows, plus how many near-tie entries were recomputed."""
    columns = _list_order(space, sources, distances)
    distances = np.take_along_axis(distances, columns, axis=1)
    if settled is not None:
        settled = np.take_along_axis(settled, columns, axis=1)
    # Two distances each off by their error can swap within this relative window: the
    # squared-distance error halves under the square root of euclidean distances.
    window = space.direct_error * (2.0 if space.metric == "cosine" else 1.0)
    rows, cols = _near_tie_entries(distances, kk, window, settled)
    if rows.size:
        neighbours = sources[rows, columns[rows, cols]]
        sq = pair_sq_distances(space, positions[rows], neighbours, precise=True)
        distances[rows, cols] = to_distance(space.metric, sq)
        touched = np.unique(rows)
        touched_columns = columns[touched]
        touched_sources = np.take_along_axis(sources[touched], touched_columns, axis=1)
        order = _list_order(space, touched_sources, distances[touched])
        columns[touched] = np.take_along_axis(touched_columns, order, axis=1)
        distances[touched] = np.take_along_axis(distances[touched], order, axis=1)
    return columns[:, :kk].copy(), distances[:, :kk].copy(), int(rows.size)


def positions_of(ids: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Row position of each wanted id in `ids` (-1 where absent).

    Database ids are mostly dense, so a lookup table beats a binary search when the id
    range is small; otherwise the ids are searched in sorted order.
    """
    if ids.size == 0:
        return np.full(wanted.shape, -1, dtype=np.int64)
    low, high = int(ids.min()), int(ids.max())
    if high - low < 8 * len(ids) + 1024:
        table = np.full(high - low + 2, -1, dtype=np.int64)  # last slot: out of range
        table[ids - low] = np.arange(len(ids))
        index = np.clip(wanted - low, -1, high - low + 1)
        return table[index]  # -1 indexes the last slot, which is -1
    order = np.argsort(ids, kind="stable")
    at = np.minimum(np.searchsorted(ids[order], wanted), len(ids) - 1)
    return np.where(ids[order][at] == wanted, order[at], -1)


def _list_order(space: FeatureSpace, sources: np.ndarray, distances: np.ndarray) -> np.ndarray:
    """Column order of each row by (distance, image id); padding (-1 sources) goes last.

    One argsort of a 64-bit key, several times faster than np.lexsort: the float32 bits of
    a non-negative distance order like the distances, and the id's rank fills the low half.
    """
    if distances.size and not distances.min() >= 0:  # negative or NaN: cannot pack
        neighbour_ids = np.where(sources >= 0, space.ids[np.maximum(sources, 0)], _NO_ID)
        return np.lexsort((neighbour_ids, distances))
    bits = (distances.astype(np.float32) + np.float32(0.0)).view(np.uint32)  # -0.0 -> 0.0
    ranks = np.where(sources >= 0, space.id_ranks[np.maximum(sources, 0)], _NO_RANK)
    keys = (bits.astype(np.uint64) << np.uint64(32)) | ranks.astype(np.uint64)
    return np.argsort(keys, axis=1)


def _near_tie_entries(
    distances: np.ndarray, kk: int, tolerance: float, settled: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(row, column) of sorted entries in a chain of near-equal distances reaching the top kk.

    Exact zeros are left alone: a zero distance is exact in any precision. Chains made only
    of `settled` entries (already ordered exactly by an earlier run) are left alone too.
    """
    if distances.shape[1] < 2:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    later = distances[:, 1:]
    with np.errstate(invalid="ignore"):
        close = (later - distances[:, :-1] <= tolerance * later) & (later > 0)
    if not close.any():
        return np.empty(0, np.int64), np.empty(0, np.int64)
    member = np.zeros(distances.shape, dtype=bool)
    member[:, 1:] |= close
    member[:, :-1] |= close
    chain = np.zeros(distances.shape, dtype=np.int64)
    chain[:, 1:] = np.cumsum(~close, axis=1)
    reaching = chain <= chain[:, min(kk, distances.shape[1]) - 1, None]
    wanted = member & reaching & np.isfinite(distances)
    if settled is not None:
        # chain ids are unique within a row; offset them by row to make them unique overall
        key = chain + np.arange(len(chain))[:, None] * distances.shape[1]
        unsettled_chain = np.zeros(key.size, dtype=bool)
        unsettled_chain[key[~settled]] = True
        wanted &= unsettled_chain[key]
    rows, cols = np.nonzero(wanted)
    return rows, cols


def pair_sq_distances(
    space: FeatureSpace, a: np.ndarray, b: np.ndarray, *, precise: bool = False
) -> np.ndarray:
    """Direct squared distances |x_a - x_b|^2 (float32, or float64 when precise).

    A pair listed twice costs once, and is always computed as (lower position, higher
    position) so its value does not depend on which of its rows asked. Pairs inside tight
    groups come from an exact-product float64 GEMM, the others from float32 subtraction
    (float64 when precise); both are within the direct error bound of the true value.
    """
    n = space.n
    if len(a) == 0:
        return np.empty(0, dtype=np.float64 if precise else np.float32)
    keys = np.minimum(a, b).astype(np.int64) * n + np.maximum(a, b)
    unique, inverse = _unique_inverse(keys)
    low, high = np.divmod(unique, n)
    out = np.empty(len(unique), dtype=np.float64 if precise else np.float32)
    rest = np.arange(len(unique)) if precise else _group_pair_sq_distances(space, low, high, out)
    if rest.size:
        out[rest] = _subtracted_pair_sq_distances(space, low[rest], high[rest], precise)
    return out[inverse]


def _subtracted_pair_sq_distances(
    space: FeatureSpace, low: np.ndarray, high: np.ndarray, precise: bool
) -> np.ndarray:
    """|x_low - x_high|^2 by subtracting the rows (pairs sorted by low row, low < high)."""
    if _fewer_high_rows(low, high):
        # E.g. a few new images against many rows: run by the high row instead. The
        # value is the same either way: a - b is exactly -(b - a) in floating point.
        order = np.argsort(high, kind="stable")
        out = np.empty(len(low), dtype=np.float64 if precise else np.float32)
        out[order] = _subtracted_by_first(space, high[order], low[order], precise)
        return out
    return _subtracted_by_first(space, low, high, precise)


def _fewer_high_rows(low: np.ndarray, high: np.ndarray) -> bool:
    """Whether the pairs hold far fewer distinct high rows than low rows."""
    if len(low) < 2:
        return False
    low_rows = np.count_nonzero(low[1:] != low[:-1]) + 1  # low is sorted
    return bool(4 * np.unique(high).size < low_rows)


def _subtracted_by_first(
    space: FeatureSpace, low: np.ndarray, high: np.ndarray, precise: bool
) -> np.ndarray:
    """|x_low - x_high|^2 for pairs sorted by `low` (either row of the pair may be lower)."""
    n = space.n
    out = np.empty(len(low), dtype=np.float64 if precise else np.float32)
    rows_of = space.precise_rows if precise else space.exact_rows
    # Pairs come sorted by their lower row. When rows have many partners, subtract each
    # lower row once per run instead of gathering it once per pair.
    grouped = len(low) >= 4 * np.count_nonzero(low[1:] != low[:-1])
    starts = range(0, len(low), _RERANK_CHUNK_PAIRS)
    many = len(starts) >= _PARALLEL_RERANK_CHUNKS
    visit = _neighbourhood_order(low, high, n) if many else None
    if visit is None:
        visit = np.arange(len(low))

    def compute(start: int) -> None:
        pairs = visit[start : start + _RERANK_CHUNK_PAIRS]
        lows = low[pairs]
        diff = rows_of(high[pairs])
        if grouped:
            runs = np.append(np.flatnonzero(np.diff(lows)) + 1, len(lows))
            first = 0
            for end in runs:
                diff[first:end] -= rows_of(lows[first : first + 1])
                first = end
        else:
            diff -= rows_of(lows)
        out[pairs] = np.einsum("ij,ij->i", diff, diff)

    # Chunks write disjoint entries of `out`, so they can run on every core at once.
    if many:
        _on_all_cores(compute, starts)
    else:
        for start in starts:
            compute(start)
    return out


def _group_pair_sq_distances(
    space: FeatureSpace, low: np.ndarray, high: np.ndarray, out: np.ndarray
) -> np.ndarray:
    """Fill `out` for pairs inside tight groups of rows; return the indices of the rest.

    A group's rows are centred and multiplied in float64 (one small GEMM per group, on
    every core). Products of float32 numbers are exact in float64 and the sums lose about
    d * 2^-53 of the squared norms, so where the distance is not tiny against the norms
    the result is far inside float32 rounding: better than subtracting in float32, at a
    fraction of the memory traffic. Near-duplicates (squared distance below
    _GROUP_GUARD of the norms, exact duplicates included) are left to the subtraction,
    which gives them their exact value (0 for a duplicate).
    """
    label = _neighbourhood_labels(low, high, space.n)
    group = label[low]
    sizes = np.bincount(label, minlength=space.n)
    inside = group == label[high]
    pairs_inside = np.bincount(group[inside], minlength=space.n)
    # Dense groups only: the GEMM computes every pair of a group, wanted or not.
    dense = (sizes >= 2) & (sizes <= _GROUP_MAX_ROWS)
    dense &= pairs_inside >= _GROUP_MIN_SHARE * sizes * (sizes - 1) / 2
    chosen = np.flatnonzero(inside & dense[group])
    if chosen.size < _GROUP_MIN_PAIRS:
        return np.arange(len(low))
    members = np.flatnonzero(dense[label])
    members = members[np.argsort(label[members], kind="stable")]
    member_starts = np.flatnonzero(np.diff(label[members], prepend=-1))
    place = np.empty(space.n, dtype=np.int64)  # a member's row within its group's block
    place[members] = np.arange(len(members)) - np.repeat(
        member_starts, np.diff(np.append(member_starts, len(members)))
    )
    chosen = chosen[np.argsort(group[chosen], kind="stable")]
    pair_starts = np.flatnonzero(np.diff(group[chosen], prepend=-1))
    bounds = np.append(member_starts, len(members)), np.append(pair_starts, len(chosen))
    centre = space.centre.astype(np.float64)
    done = np.zeros(len(low), dtype=bool)

    def compute(g: int) -> None:
        rows = members[bounds[0][g] : bounds[0][g + 1]]
        pairs = chosen[bounds[1][g] : bounds[1][g + 1]]
        block = space.exact_rows(rows).astype(np.float64)
        block -= centre  # exact: float32 numbers within 2^29 of each other in scale
        gram = block @ block.T
        norms = np.diagonal(gram)
        i, j = place[low[pairs]], place[high[pairs]]
        sq = norms[i] + norms[j] - 2.0 * gram[i, j]
        good = sq >= _GROUP_GUARD * (norms[i] + norms[j])
        out[pairs[good]] = sq[good]  # rounded to float32 once
        done[pairs[good]] = True

    # Groups write disjoint entries of `out` and `done`; one BLAS thread per worker.
    with tile_workers(cpu_cores() if len(member_starts) > 1 else 1) as workers:
        workers.map(compute, range(len(member_starts)))
    return np.flatnonzero(~done)


def _neighbourhood_labels(low: np.ndarray, high: np.ndarray, n: int) -> np.ndarray:
    """Each row's label: the lowest row paired with it (or itself), followed once more.

    Rows of one tight group mostly share a label.
    """
    label = np.arange(n)
    np.minimum.at(label, high, low)  # low < high: only a high row's label can fall
    return label[label]


def _neighbourhood_order(low: np.ndarray, high: np.ndarray, n: int) -> np.ndarray | None:
    """An order of the pairs (sorted by low row) that takes each neighbourhood's together.

    Pairs of rows with one label (see _neighbourhood_labels) run together and the rows they
    gather are still in cache, instead of coming from memory once per pair. None when most
    pairs cross labels (no groups, e.g. unstructured data): there it only costs.
    """
    label = _neighbourhood_labels(low, high, n)
    group = label[low]
    if np.count_nonzero(group == label[high]) < _GROUPED_PAIR_SHARE * len(low):
        return None
    return np.argsort(group, kind="stable")  # stable: runs of one low row stay whole


def _unique_inverse(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique keys and each key's index among them.

    np.unique hashes in numpy >= 2.3, which is several times slower than sorting here.
    """
    order = np.argsort(keys)
    ordered = keys[order]
    first = np.ones(len(ordered), dtype=bool)
    first[1:] = ordered[1:] != ordered[:-1]
    inverse = np.empty(len(keys), dtype=np.int64)
    inverse[order] = np.cumsum(first) - 1
    return ordered[first], inverse


def to_distance(metric: str, sq: np.ndarray) -> np.ndarray:
    """Reported distance from a direct squared distance: euclidean, or 1 - cos for cosine."""
    if metric == "cosine":
        return (sq * 0.5).astype(np.float32)  # |a - b|^2 / 2 = 1 - cos(a, b) for unit a, b
    return np.sqrt(sq).astype(np.float32)


def sq_upper_bound(metric: str, distances: np.ndarray) -> np.ndarray:
    """The largest squared distance that reports as `distances` (float64)."""
    upper = np.nextafter(distances.astype(np.float32), np.float32(np.inf)).astype(np.float64)
    if metric == "cosine":
        return upper * 2.0
    return upper * upper


def sq_reach(space: FeatureSpace, positions: np.ndarray, last: np.ndarray) -> np.ndarray:
    """Largest expanded squared distance that a row within `last` of these rows can have."""
    reach = sq_upper_bound(space.metric, last) * (1 + 2 * space.direct_error)
    return reach + space.error_bound(positions)


def proven_rows(
    space: FeatureSpace, positions: np.ndarray, last: np.ndarray, limits: np.ndarray
) -> np.ndarray:
    """Rows whose kk-th distance `last` is below what anything not kept could reach.

    Every entry not kept has an expanded distance >= limit; if even a row at distance
    `last` would expand to less than that, nothing left out can tie or beat the list.
    """
    return np.isinf(limits) | (sq_reach(space, positions, last) < limits)


def exhaustive_rows(
    space: FeatureSpace,
    tiles: TileBackend,
    positions: np.ndarray,
    last: np.ndarray,
    kk: int,
    shape: TileShape,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact lists of rows the candidate pass could not prove: every column within reach.

    `last` is a kk-th distance already found, so the true kk nearest all lie within it;
    every column whose expanded distance could be that small is measured directly.
    """
    reach = sq_reach(space, positions, last)
    found_rows, found_cols = [], []
    for start in range(0, len(positions), shape.rows):
        chunk = positions[start : start + shape.rows]
        left = space.left(chunk)
        for c0 in range(0, space.n, shape.cols):
            c1 = min(c0 + shape.cols, space.n)
            tile = tiles.distances(left, space.right(slice(c0, c1)))
            row, col = np.nonzero(tile <= reach[start : start + len(chunk), None])
            found_rows.append(row + start)
            found_cols.append(col + c0)
    rows, cols = np.concatenate(found_rows), np.concatenate(found_cols)
    keep = positions[rows] != cols
    rows, cols = rows[keep], cols[keep]
    order = np.argsort(rows, kind="stable")
    rows, cols = rows[order], cols[order]
    rank = np.arange(len(rows)) - np.searchsorted(rows, rows)
    width = max(kk, int(rank.max(initial=0)) + 1)
    sources = np.full((len(positions), width), -1, dtype=np.int64)
    sources[rows, rank] = cols
    return rerank_rows(space, positions, sources, kk)


# --- preparation, sizes and assembly ------------------------------------------------------


def checked_ids(image_ids: np.ndarray, features: np.ndarray) -> np.ndarray:
    """Image ids as unique int64 matching the rows of a 2-D feature matrix."""
    if getattr(features, "ndim", 0) != 2:
        shape = getattr(features, "shape", None)
        raise KnnInputError(f"features must be a 2-D array (images x dims), got shape {shape}")
    ids = np.asarray(image_ids)
    if ids.ndim != 1 or len(ids) != features.shape[0]:
        raise KnnInputError(f"{ids.shape} image ids for {features.shape[0]} feature rows")
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise KnnInputError(f"image ids must be integers, got {ids.dtype}")
    ids = ids.astype(np.int64, copy=False)
    ordered = np.sort(ids)
    repeated = ordered[1:][ordered[1:] == ordered[:-1]]
    if repeated.size:
        raise KnnInputError(f"image id {int(repeated[0])} appears more than once")
    return ids


def check_k_and_metric(k: int, metric: str) -> None:
    """Refuse a k below 1 or an unknown metric."""
    if int(k) < 1:
        raise KnnInputError(f"k must be at least 1, got {k}")
    if metric not in METRICS:
        raise KnnInputError(f"unknown metric {metric!r}; use one of {', '.join(METRICS)}")


def list_length(k: int, n: int) -> int:
    """Entries per list: k, or every other image when there are fewer."""
    return max(0, min(int(k), n - 1))


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
    ids: np.ndarray, positions: np.ndarray, neighbours: np.ndarray, distances: np.ndarray
) -> NeighbourLists:
    """NeighbourLists (image ids, rows sorted by id) from position-based results."""
    if neighbours.size and neighbours.min() < 0:
        raise RuntimeError("kNN engine bug: a list came out shorter than k")
    row_ids = ids[positions]
    order = np.argsort(row_ids, kind="stable")
    return NeighbourLists(
        image_ids=row_ids[order],
        neighbour_ids=ids[neighbours[order]],
        distances=np.ascontiguousarray(distances[order], dtype=np.float32),
    )


def prepare_space(
    features: np.ndarray,
    ids: np.ndarray,
    metric: str,
    timings: Timings,
    *,
    keep_right: bool = False,
) -> FeatureSpace:
    """Check every vector, and compute the centre, scales and squared norms (two passes).

    With keep_right, the second pass also keeps right() of every row when it fits the
    memory allowance (see cache_right_rows): it has each centred row in hand anyway, so
    this saves the separate pass that would build them again.
    """
    with timed(timings, "prepare"):
        x = features
        if x.dtype != np.float32 or not x.flags.c_contiguous:
            x = np.ascontiguousarray(x, dtype=np.float32)
        n, d = x.shape
        scale = np.empty(n, dtype=np.float32) if metric == "cosine" else None
        starts = range(0, n, _PREPARE_CHUNK_ROWS)
        sums = np.zeros((len(starts), d), dtype=np.float64)

        def check_and_sum(start: int) -> None:
            block = x[start : start + _PREPARE_CHUNK_ROWS]
            _check_finite(block, ids[start : start + len(block)])
            if scale is not None:
                scale[start : start + len(block)] = _inverse_norms(block, ids[start:])
                block = block * scale[start : start + len(block), None]
            sums[start // _PREPARE_CHUNK_ROWS] = block.sum(axis=0, dtype=np.float64)

        _on_all_cores(check_and_sum, starts)
        # Chunk sums added in chunk order: the centre does not depend on thread timing.
        centre = (sums.sum(axis=0) / max(n, 1)).astype(np.float32)
        sq = np.empty(n, np.float32)
        space = FeatureSpace(x, ids, metric, scale, centre, sq, 0.0, _direct_error(d))

        right = np.empty((n, d + 2), dtype=np.float32) if keep_right and _cache_fits(n, d) else None

        def squared_norms(start: int) -> None:
            rows = slice(start, start + _PREPARE_CHUNK_ROWS)
            y = space._augmented(rows, out=None if right is None else right[rows])[:, :-2]
            space.sq[rows] = np.einsum("ij,ij->i", y, y)
            if right is not None:
                y *= -2.0  # exact: right() is [-2y, |y|^2, 1]

        _on_all_cores(squared_norms, starts)
        _check_finite_norms(space.sq, ids)
        space.sq_max = float(space.sq.max()) if n else 0.0
        if right is not None:
            right[:, -2] = space.sq
            right[:, -1] = 1.0
            space.right_rows = right
        space.error_unit = _ERROR_SAFETY * _EPS32 * float(np.sqrt(d + 2))
    return space


def cache_right_rows(space: FeatureSpace) -> None:
    """Keep right() of every row when it fits the memory allowance.

    Each strip reads all later rows, so building them once saves a copy per strip.
    """
    n, d = space.n, space.d
    if space.right_rows is not None or not _cache_fits(n, d):
        return
    right = np.empty((n, d + 2), dtype=np.float32)

    def fill(start: int) -> None:
        rows = slice(start, start + _PREPARE_CHUNK_ROWS)
        right[rows] = space.right(rows)

    _on_all_cores(fill, range(0, n, _PREPARE_CHUNK_ROWS))
    space.right_rows = right


def _cache_fits(n: int, d: int) -> bool:
    """Whether right() of every row fits the memory allowance for the cache."""
    return n * (d + 2) * 4 <= min(_RIGHT_CACHE_BYTES, _available_memory() // 4)


def _on_all_cores(job: Callable[[int], None], starts: range) -> None:
    """job(start) for every start, on every core when there are several chunks.

    Errors come out in chunk order, so the first bad row reported is the first in order.
    """
    workers = TileWorkers(cpu_cores() if len(starts) > 1 else 1)
    try:
        workers.map(job, starts)
    finally:
        workers.close()


def _direct_error(d: int) -> float:
    """Relative error bound of |a - b|^2 by float32 subtract and einsum.

    einsum sums in 32 SIMD partial sums of d/32 terms each, so the bound grows with d/32;
    the extra 16 units cover the subtraction, squaring and the final reduction.
    """
    return (d / 32 + 16) * _EPS32 / 2


def _check_finite(block: np.ndarray, ids: np.ndarray) -> None:
    """Refuse NaN, Inf, or a squared norm that overflows float32, naming the first image.

    One pass: a row's squared norm is finite exactly when none of these holds, so only a
    failing block is looked at more closely.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        norms = np.einsum("ij,ij->i", block, block)
    if np.isfinite(norms).all():
        return
    bad = np.flatnonzero(~np.isfinite(block).all(axis=1))
    if bad.size:
        raise NonFiniteFeaturesError(
            f"the feature vector of image {int(ids[bad[0]])} holds NaN or Inf "
            f"({bad.size} such image(s) in this batch)"
        )
    huge = np.flatnonzero(~np.isfinite(norms))
    if huge.size:
        raise NonFiniteFeaturesError(
            f"the feature vector of image {int(ids[huge[0]])} is too large: "
            "its squared norm overflows float32"
        )


def _inverse_norms(block: np.ndarray, ids: np.ndarray) -> np.ndarray:
    norms = np.sqrt(np.einsum("ij,ij->i", block, block, dtype=np.float64))
    zero = np.flatnonzero(norms == 0)
    if zero.size:
        raise ZeroFeatureVectorError(
            f"the feature vector of image {int(ids[zero[0]])} is all zeros: "
            "its cosine distance is undefined"
        )
    return (1.0 / norms).astype(np.float32)


def _check_finite_norms(sq: np.ndarray, ids: np.ndarray) -> None:
    bad = np.flatnonzero(~np.isfinite(sq))
    if bad.size:
        raise NonFiniteFeaturesError(
            f"the feature vector of image {int(ids[bad[0]])} is too large: "
            "its squared norm overflows float32"
        )


def tile_shape(space: FeatureSpace, block_rows: int | None, tiles: TileBackend) -> TileShape:
    """Rows and columns per tile: block_rows if given, else what memory allows."""
    if block_rows is not None and block_rows < 1:
        raise KnnInputError(f"block_rows must be at least 1, got {block_rows}")
    if tiles.name == "tensorflow":
        rows = block_rows or _rows_for_memory(_gpu_memory(), space.d, _GPU_BLOCK_ROWS, 1)
        cols = rows
    else:
        # Every worker thread holds a tile and its working copies at once.
        memory = _available_memory() // worker_count(tiles)
        rows = block_rows or _rows_for_memory(memory, space.d, _CPU_BLOCK_ROWS, 2)
        cols = 2 * rows
    return TileShape(rows=max(1, min(rows, space.n)), cols=max(1, min(cols, space.n)))


def _rows_for_memory(memory: int, d: int, rows: int, col_factor: int) -> int:
    """Halve the block until a tile and its working copies fit in an eighth of memory."""

    def tile_bytes(r: int) -> int:
        cols = col_factor * r
        # distances, comparison mask and a dense copy, plus both augmented blocks
        return 9 * r * cols + 4 * (r + cols) * (d + 2)

    while rows > 64 and tile_bytes(rows) > memory // 8:
        rows //= 2
    return rows


def _available_memory() -> int:
    """Bytes of memory available now (MemAvailable), or 4 GB when it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError as error:
        log.debug("cannot read /proc/meminfo: %s", error)
    return 4 << 30


def _gpu_memory() -> int:
    """Free memory of the first GPU as nvidia-smi reports it, or 8 GB when unknown."""
    smi = shutil.which("nvidia-smi")
    if smi:
        query = [smi, "--query-gpu=memory.free", "--format=csv,noheader,nounits"]
        try:
            out = subprocess.run(query, capture_output=True, text=True, timeout=10, check=True)
            return int(out.stdout.split()[0]) << 20
        except (OSError, subprocess.SubprocessError, ValueError, IndexError) as error:
            log.info("nvidia-smi gave no free memory (%s); assuming 8 GB", error)
    return 8 << 30


_TIMINGS_LOCK = threading.Lock()


@contextlib.contextmanager
def timed(timings: Timings, key: str) -> Iterator[None]:
    """Add the seconds spent in the block to timings[key] (nothing when timings is None).

    Worker threads add up: a phase run on two threads at once counts both threads' time.
    """
    if timings is None:
        yield
        return
    start = time.perf_counter()
    try:
        yield
    finally:
        elapsed = time.perf_counter() - start
        with _TIMINGS_LOCK:
            timings[key] = timings.get(key, 0.0) + elapsed
