"""Distance tiles and their candidates: running candidate lists, numpy and TensorFlow tiles."""

from __future__ import annotations

import logging
import shutil
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from lookalike.tasks.knn.space import (
    FeatureSpace,
    KnnInputError,
    Timings,
    available_memory,
    fresh_array,
    timed,
)
from lookalike.tasks.knn.threads import cpu_cores, on_all_cores

log = logging.getLogger(__name__)

# Square tiles on the CPU: with 4096 x 8192 ones a whole pass took 4.3-4.8 s against
# 3.6 s (n = 20,000, d = 2048, 2 cores), the last long tiles leaving a core idle.
_CPU_BLOCK_ROWS = 4096
_LOCK_SLOTS = 256  # candidate list slots one lock guards
_GPU_BLOCK_ROWS = 16384
# Every CPU worker keeps a tile buffer: on 16 cores, 16 tiles of 4096 x 4096 floats took
# 1 GB and broke the memory promise (1.5 x features + 1 GB). Tiles shrink so that all the
# workers' tiles stay within this (4096 rows up to 8 workers, 2048 up to 32).
_CPU_TILES_BYTES = 512 << 20


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
        self.values = fresh_array((size, 2 * width))
        self.values.fill(np.inf)
        self.sources = fresh_array((size, 2 * width), np.int32)  # positions < 2^31
        self.sources.fill(-1)
        self.fill = np.zeros(size, dtype=np.int64)
        self.limits = np.full(size, np.inf, dtype=np.float32)
        # One lock per run of _LOCK_SLOTS slots, for workers that write lists directly.
        self.locks = [threading.Lock() for _ in range(-(-size // _LOCK_SLOTS))]

    def segments(self, slots: np.ndarray) -> Iterator[tuple[int, int, threading.Lock]]:
        """(start, stop, lock): runs of `slots` (indices into it) that one lock guards."""
        if not len(slots):
            return
        ids = np.asarray(slots) // _LOCK_SLOTS
        cuts = (np.flatnonzero(ids[1:] != ids[:-1]) + 1).tolist()
        for start, stop in zip([0, *cuts], [*cuts, len(slots)], strict=True):
            yield start, stop, self.locks[int(ids[start])]

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

    def best(self, kernels: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """Each slot's best `width` candidates (values, int64 sources; inf / -1 padding).

        With the compiled kernels the slots are cut on every core (the same entries kept).
        """
        full = np.flatnonzero(self.fill > self.width)
        if kernels is None:
            self._cut_back(full)
        else:
            parts = np.array_split(full, cpu_cores())
            args = (self.values, self.sources, self.fill, self.limits)
            on_all_cores(
                lambda part: kernels.cut_back_slots(*args, parts[part], self.width),
                range(len(parts)),
            )
        width = self.width
        return self.values[:, :width], self.sources[:, :width].astype(np.int64)

    def best_of(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """best() of some slots only, cutting back just those."""
        self._cut_back(slots[self.fill[slots] > self.width])
        width = self.width
        return self.values[slots, :width], self.sources[slots, :width].astype(np.int64)

    def taken_by(self, slots: np.ndarray) -> np.ndarray:
        """The sources best_of gives these slots, unordered and only as many columns as the
        fullest of them holds (-1 padding): a cheap read where lists take a few each."""
        self._cut_back(slots[self.fill[slots] > self.width])
        most = int(self.fill[slots].max(initial=0))
        return self.sources[slots, :most].astype(np.int64)

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


def worker_count(tiles: TileBackend) -> int:
    """Worker threads for a pass: every core on the CPU; one feeding a GPU."""
    return 1 if tiles.name == "tensorflow" else cpu_cores()


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


def tile_shape(space: FeatureSpace, block_rows: int | None, tiles: TileBackend) -> TileShape:
    """Rows and columns per tile: block_rows if given, else what memory allows."""
    if block_rows is not None and block_rows < 1:
        raise KnnInputError(f"block_rows must be at least 1, got {block_rows}")
    if tiles.name == "tensorflow":
        rows = block_rows or _rows_for_memory(_gpu_memory(), space.d, _GPU_BLOCK_ROWS)
    else:
        # Every worker thread holds a tile and its working copies at once.
        workers = worker_count(tiles)
        most = _CPU_BLOCK_ROWS
        while most > 256 and workers * most * most * 4 > _CPU_TILES_BYTES:
            most //= 2
        rows = block_rows or _rows_for_memory(available_memory() // workers, space.d, most)
    size = max(1, min(rows, space.n))
    return TileShape(rows=size, cols=size)


def _rows_for_memory(memory: int, d: int, rows: int) -> int:
    """Halve the block until a tile and its working copies fit in an eighth of memory."""

    def tile_bytes(r: int) -> int:
        # distances, comparison mask and a dense copy, plus both augmented blocks
        return 9 * r * r + 8 * r * (d + 2)

    while rows > 64 and tile_bytes(rows) > memory // 8:
        rows //= 2
    return rows


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
