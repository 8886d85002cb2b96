"""The features as the kNN engine sees them: checked, centred, squared norms, error bounds."""

from __future__ import annotations

import contextlib
import functools
import logging
import mmap
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lookalike.tasks.errors import LookalikeError
from lookalike.tasks.knn.threads import cpu_cores, on_all_cores

log = logging.getLogger(__name__)

METRICS = ("euclidean", "cosine")
# Rounding of the float32 expansion |a|^2 + |b|^2 - 2ab is taken to be at most this many
# times eps * sqrt(d) * (|a|^2 + |b|^2); 16 is far above what is seen in practice.
_ERROR_SAFETY = 16.0
_EPS32 = float(np.finfo(np.float32).eps)
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_PREPARE_CHUNK_ROWS = 2048
_CENTRE_SAMPLE_ROWS = 4096
# The augmented copy of all rows is kept when it fits this. At 20,000 x 2,048 (164 MB) it
# saves building right() once per strip; at 100,000 (820 MB) it saved nothing measurable
# (63.3 s with it, 58.3 s without) and pushed the peak from 1.92 GB to 2.67 GB, past the
# engine's promise of 1.5 x the features + 1 GB (2.20 GB there).
_RIGHT_CACHE_BYTES = 256 << 20
_POPULATE_BYTES = 32 << 20  # fresh arrays this large are mapped in up front (not the chunks)
Timings = dict[str, float] | None
_NO_SCALE = np.empty(0, dtype=np.float32)  # the kernels' "no scale" (euclidean)
_NO_ROWS = np.empty((0, 0), dtype=np.float32)  # the kernels' "write no right() rows"
_TIMINGS_LOCK = threading.Lock()


class NonFiniteFeaturesError(LookalikeError, ValueError):
    """A feature vector holds NaN or Inf (or overflows float32 when squared)."""


class ZeroFeatureVectorError(ValueError):
    """A feature vector is all zeros, so its cosine distance is undefined."""


class KnnInputError(ValueError):
    """The features, ids or previous lists given to the kNN engine do not fit together."""


class PairMemo:
    """Direct squared distances already measured, by pair key (lower * n + higher).

    An update measures the same (kept row, new image) pairs twice: once merging the new
    images into kept lists, once ranking the new images' own lists.
    """

    def __init__(self) -> None:
        self.keys = np.empty(0, dtype=np.int64)  # sorted
        self.values = np.empty(0, dtype=np.float32)

    def lookup(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(values, found) for these keys; values of keys not found are undefined."""
        at = np.minimum(np.searchsorted(self.keys, keys), max(len(self.keys) - 1, 0))
        found = self.keys[at] == keys if len(self.keys) else np.zeros(len(keys), dtype=bool)
        values = np.empty(len(keys), dtype=np.float32)
        values[found] = self.values[at[found]]
        return values, found

    def add(self, keys: np.ndarray, values: np.ndarray) -> None:
        """Keep these (new) keys' values."""
        merged = np.concatenate([self.keys, keys])
        order = np.argsort(merged, kind="stable")
        self.keys = merged[order]
        self.values = np.concatenate([self.values, values.astype(np.float32)])[order]


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
    right_rows: np.ndarray | None = None  # right() of every row in visiting order, if it fits
    visit: np.ndarray | None = None  # position of the row a pass visits at each slot (None: same)
    pair_memo: PairMemo | None = None  # direct distances kept for reuse, when wanted
    kernels: Any = None  # the numba kernels (compiled_kernels()) while a compiled pass runs
    labels: np.ndarray | None = None  # (n,) neighbourhood of each row in the lists measured last

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

    @functools.cached_property
    def _slot_of(self) -> np.ndarray:
        slots = np.empty(self.n, dtype=np.int64)
        slots[self.visit] = np.arange(self.n)
        return slots

    def visited(self, slots: slice) -> np.ndarray:
        """Positions of the rows a pass visits at these slots (see visiting_order)."""
        start, stop, _ = slots.indices(self.n)
        return np.arange(start, stop) if self.visit is None else self.visit[start:stop]

    def slots_of(self, positions: np.ndarray) -> np.ndarray:
        """The slot at which a pass visits each of these rows."""
        return positions if self.visit is None else self._slot_of[positions]

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

    def left(self, rows: slice | np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """[y, 1, |y|^2] per row: times right() it gives squared distances in one GEMM.

        Written into `out` (rows, d + 2) when given."""
        out = self._augmented(rows, out)
        out[:, -2] = 1.0
        out[:, -1] = self.sq[rows]
        return out

    def right(self, rows: slice | np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """[-2y, |y|^2, 1] per row (the factor -2 is exact in binary floating point).

        From the cached matrix when there is one (a slice of rows, without a visiting
        order: a view, to treat as read-only). Else written into `out` when given (a
        worker's buffer, (rows, d + 2)).
        """
        if self.right_rows is not None:
            if self.visit is None:
                return self.right_rows[rows]
            return self.right_rows[self.slots_of(_positions(rows, self.n))]
        if self.kernels is not None and out is not None:
            positions = _positions(rows, self.n)
            scale = _NO_SCALE if self.scale is None else self.scale
            places = np.arange(len(positions))
            self.kernels.centre_rows(
                self.features, scale, self.centre, positions, False, self.sq, out, places
            )
            return out[: len(positions)]
        out = self._augmented(rows, out)
        out[:, :-2] *= -2.0
        out[:, -2] = self.sq[rows]
        out[:, -1] = 1.0
        return out

    def right_visited(self, slots: slice, out: np.ndarray | None = None) -> np.ndarray:
        """right() of the rows visited at these slots: a view of the cache when there is
        one (kept in visiting order), else written into `out` when given."""
        if self.right_rows is not None:
            return self.right_rows[slots]
        return self.right(slots if self.visit is None else self.visited(slots), out)

    def error_bound(self, rows: np.ndarray) -> np.ndarray:
        """Largest error of an expanded squared distance from these rows to any row."""
        return self.error_unit * (self.sq[rows].astype(np.float64) + self.sq_max)

    def _augmented(self, rows: slice | np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        if isinstance(rows, slice):
            x = self.features[rows]
            count = len(x)
        else:
            count = len(rows)
        if out is None:
            out = fresh_array((count, self.d + 2))
        body = out[:count, :-2]
        if not isinstance(rows, slice):  # gathered straight into place, no temporary copy
            # (the engine's own positions, in range: "clip" spares the bounds check that
            # makes np.take copy through a buffer)
            np.take(self.features, rows, axis=0, out=body, mode="clip")
            x = body
        if self.scale is not None:
            np.multiply(x, self.scale[rows][:, None], out=body)
            body -= self.centre
        else:
            np.subtract(x, self.centre, out=body)
        return out[:count]


def _positions(rows: slice | np.ndarray, n: int) -> np.ndarray:
    """Rows as an array of positions (a slice of n rows spelled out)."""
    return np.arange(*rows.indices(n)) if isinstance(rows, slice) else rows


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


def prepare_space(
    features: np.ndarray,
    ids: np.ndarray,
    metric: str,
    timings: Timings,
    *,
    keep_right: bool = False,
    kernels: Any = None,
    visit: np.ndarray | None = None,
) -> FeatureSpace:
    """Check every vector, and compute the centre, scales and squared norms in one pass.

    The centre is the mean of an even sample of rows: any point near the data's middle
    keeps the expansion's cancellation small, and sampling saves a pass over all rows.
    With keep_right, the pass also keeps right() of every row when it fits the memory
    allowance (see cache_right_rows): it has each centred row in hand anyway. With the
    compiled kernels (compiled_kernels()) each row is read once and nothing else is
    written; the squared norms are then float64 sums rounded once. `visit` (visiting_order)
    is the order the pass will visit rows in: the kept right() rows follow it.
    """
    with timed(timings, "prepare"):
        x = features
        if x.dtype != np.float32 or not x.flags.c_contiguous:
            x = np.ascontiguousarray(x, dtype=np.float32)
        n, d = x.shape
        scale = np.empty(n, dtype=np.float32) if metric == "cosine" else None
        centre = _sample_centre(x, ids, metric, kernels)
        sq = np.empty(n, np.float32)
        error = _direct_error(d, metric)
        space = FeatureSpace(x, ids, metric, scale, centre, sq, 0.0, error, visit=visit)
        # Not populated up front: each worker below faults in the part it writes.
        cached = keep_right and _cache_fits(n, d)
        right = fresh_array((n, d + 2), populate=False) if cached else None

        def centre_and_measure(start: int) -> None:
            chunk = slice(start, start + _PREPARE_CHUNK_ROWS)
            # Compiled: rows read in order, each written to its slot of the kept rows;
            # numpy: the rows visited at these slots, written in place.
            rows = chunk if kernels is not None or visit is None else space.visited(chunk)
            if scale is not None:
                scale[rows] = _inverse_norms(x[rows], ids[rows])
            if kernels is not None:
                out = _NO_ROWS if right is None else right
                positions = _positions(chunk, n)
                factors = _NO_SCALE if scale is None else scale
                places = space.slots_of(positions)
                kernels.centre_rows(x, factors, centre, positions, True, space.sq, out, places)
                if not np.isfinite(space.sq[rows]).all():
                    _refuse_non_finite(x[rows], ids[rows])
                    _check_finite(space._augmented(rows)[:, :-2], ids[rows])
                return
            with np.errstate(over="ignore", invalid="ignore"):
                y = space._augmented(rows, out=None if right is None else right[chunk])[:, :-2]
                space.sq[rows] = np.einsum("ij,ij->i", y, y)
            if not np.isfinite(space.sq[rows]).all():
                _refuse_non_finite(x[rows], ids[rows])
                _check_finite(y, ids[rows])  # centred: names an overflowing image
            if right is not None:
                y *= -2.0  # exact: right() is [-2y, |y|^2, 1]

        on_all_cores(centre_and_measure, range(0, n, _PREPARE_CHUNK_ROWS))
        _check_finite_norms(space.sq, ids)
        space.sq_max = float(space.sq.max()) if n else 0.0
        if right is not None:
            right[:, -2] = space.sq if visit is None else space.sq[visit]
            right[:, -1] = 1.0
            space.right_rows = right
        space.error_unit = _ERROR_SAFETY * _EPS32 * float(np.sqrt(d + 2))
    return space


def _sample_centre(x: np.ndarray, ids: np.ndarray, metric: str, kernels: Any = None) -> np.ndarray:
    """Mean of up to _CENTRE_SAMPLE_ROWS evenly spaced rows (unit length for cosine).

    The sample is checked first: a bad vector in it would spoil every row's norm.
    """
    n, d = x.shape
    if n == 0:
        return np.zeros(d, dtype=np.float32)
    rows = np.unique(np.linspace(0, n - 1, min(n, _CENTRE_SAMPLE_ROWS)).astype(np.int64))
    if kernels is not None and metric == "euclidean":
        return _compiled_sample_centre(x, ids, rows, kernels)
    sample = x[rows]
    if metric == "cosine":  # a huge vector is fine once scaled to unit length
        with np.errstate(invalid="ignore"):
            sample = sample * _inverse_norms(sample, ids[rows])[:, None]
    _check_finite(sample, ids[rows])
    return sample.mean(axis=0, dtype=np.float64).astype(np.float32)


def cache_right_rows(space: FeatureSpace) -> None:
    """Keep right() of every row (in visiting order) when it fits the memory allowance.

    Each strip reads all later rows, so building them once saves a copy per strip.
    """
    n, d = space.n, space.d
    if space.right_rows is not None or not _cache_fits(n, d):
        return
    right = fresh_array((n, d + 2))

    def fill(start: int) -> None:
        slots = slice(start, start + _PREPARE_CHUNK_ROWS)
        right[slots] = space.right_visited(slots)

    on_all_cores(fill, range(0, n, _PREPARE_CHUNK_ROWS))
    space.right_rows = right


def fresh_array(
    shape: tuple[int, ...], dtype: Any = np.float32, *, populate: bool = True
) -> np.ndarray:
    """An uninitialised array; a large one with its memory mapped in up front.

    A fresh process pays for each page of a new array at first touch, and where the kernel
    backs numpy's large arrays with huge pages it may compact memory first: 0.38 s for the
    164 MB of 20,000 x 2,050 floats, against 0.05-0.06 s populated in one call (0.02 s
    when the process used the memory before). Arrays under _POPULATE_BYTES, and systems
    without MAP_POPULATE (not Linux), get np.empty. Without `populate` a large array is
    still mapped apart, in small pages, and its pages come at first touch: for an array
    that several threads fill part by part, each paying for its own part (the norm pass's
    kept rows: 50 ms populated by one thread, about half on two).
    """
    dtype = np.dtype(dtype)
    size = int(np.prod(shape)) * dtype.itemsize
    flag = getattr(mmap, "MAP_POPULATE", None)
    if flag is None or size < _POPULATE_BYTES:
        return np.empty(shape, dtype=dtype)
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | (flag if populate else 0)
    return np.frombuffer(mmap.mmap(-1, size, flags=flags), dtype=dtype).reshape(shape)


def _cache_fits(n: int, d: int) -> bool:
    """Whether right() of every row fits the memory allowance for the cache."""
    return n * (d + 2) * 4 <= min(_RIGHT_CACHE_BYTES, available_memory() // 4)


def _compiled_sample_centre(
    x: np.ndarray, ids: np.ndarray, rows: np.ndarray, kernels: Any
) -> np.ndarray:
    """_sample_centre of euclidean rows, summed in place on every core (no sample copy)."""
    parts = np.array_split(rows, cpu_cores())
    sums = np.zeros((len(parts), x.shape[1]))
    norms = np.empty(len(rows))
    offsets = np.cumsum([0] + [len(part) for part in parts])
    on_all_cores(
        lambda p: kernels.sum_rows(x, parts[p], sums[p], norms[offsets[p] : offsets[p + 1]]),
        range(len(parts)),
    )
    if not (norms <= _FLOAT32_MAX).all():  # NaN, Inf, or a norm float32 cannot hold
        _check_finite(x[rows], ids[rows])
    return (sums.sum(axis=0) / len(rows)).astype(np.float32)


def _direct_error(d: int, metric: str) -> float:
    """Relative error bound of a direct |a - b|^2 as the re-rank reports it (float32).

    Every path sums exact differences in float64 and rounds once: within a unit of the
    true value (and the square root within a unit more), far inside 16 units, which stay
    as a floor (incremental._LOOSE_WINDOWS counts on a window of 8 ulps at least). Cosine
    rows are scaled in float32 before the difference, as a float32 sum of d/32 partial
    sums would err: that bound, (d/32 + 16) units, stays for them.
    """
    units = 16 + (d / 32 if metric == "cosine" else 0)
    return units * _EPS32 / 2


def _check_finite(block: np.ndarray, ids: np.ndarray) -> None:
    """Refuse NaN, Inf, or a squared norm that overflows float32, naming the first image.

    One pass: a row's squared norm is finite exactly when none of these holds, so only a
    failing block is looked at more closely.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        norms = np.einsum("ij,ij->i", block, block)
    if np.isfinite(norms).all():
        return
    _refuse_non_finite(block, ids)
    huge = np.flatnonzero(~np.isfinite(norms))
    if huge.size:
        raise NonFiniteFeaturesError(
            f"the feature vector of image {int(ids[huge[0]])} is too large: "
            "its squared norm overflows float32"
        )


def _refuse_non_finite(block: np.ndarray, ids: np.ndarray) -> None:
    """Refuse a block holding NaN or Inf, naming the first image that does."""
    bad = np.flatnonzero(~np.isfinite(block).all(axis=1))
    if bad.size:
        raise NonFiniteFeaturesError(
            f"the feature vector of image {int(ids[bad[0]])} holds NaN or Inf "
            f"({bad.size} such image(s) in this batch)"
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


def available_memory() -> int:
    """Bytes of memory available now (MemAvailable), or 4 GB when it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError as error:
        log.debug("cannot read /proc/meminfo: %s", error)
    return 4 << 30


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
