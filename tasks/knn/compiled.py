"""Compiled tile selection (numba): one scan of a distance tile feeds both sides' lists.

The numpy selection finds a tile's candidates with a dozen whole-array passes per side
(compare, flatnonzero, gathers, bincount, partition) and merges them in more; here one
pass over the tile compares each entry with its row's and its column's limit and appends
the few that pass straight into the candidate buffers, cutting a full buffer back to its
best `width` on the spot. The multiply stays in BLAS. Without numba the engine keeps the
numpy path (tiles.NumpyTiles), which gives the same lists.
"""

from __future__ import annotations

import importlib.util
import threading
import types
from typing import Any

import numpy as np

from lookalike.tasks.knn.space import Timings, fresh_array, timed
from lookalike.tasks.knn.threads import cpu_cores
from lookalike.tasks.knn.tiles import CandidateLists, NumpyTiles

# Up to this many workers scan each tile in one pass under one lock (see scan; measured
# better at 2 workers, the segments better at 16).
_ONE_LOCK_WORKERS = 4


def numba_installed() -> bool:
    """True when numba can be imported (checked without importing it: that takes 0.3 s)."""
    try:
        return importlib.util.find_spec("numba") is not None
    except ValueError:  # sys.modules["numba"] is None: imports of numba are blocked
        return False


def compiled_kernels() -> Any:
    """Every kernel of a compiled pass, the rows' (row_kernels), the selection's (kernels),
    the re-rank's (pair_kernels) and an update's merge (merge_kernels), as one namespace;
    numba compiles each kernel on its first call, or loads it from its cache on disk
    (beside the module), once per process."""
    from lookalike.tasks.knn import kernels, merge_kernels, pair_kernels, row_kernels

    public = {}
    for module in (row_kernels, kernels, pair_kernels, merge_kernels):
        found = vars(module).items()  # jitted functions carry their py_func
        public.update({name: f for name, f in found if hasattr(f, "py_func") and name[0] != "_"})
    return types.SimpleNamespace(**public)


def _side(lists: CandidateLists, slots: np.ndarray) -> tuple[np.ndarray, ...]:
    return (slots, lists.values, lists.sources, lists.fill, lists.limits)


class CompiledTiles(NumpyTiles):
    """Tiles by BLAS on the CPU; candidates by one compiled scan per tile (see module doc)."""

    name = "numba"

    def __init__(self) -> None:
        self.kernels = compiled_kernels()
        self._buffers = threading.local()
        self._one_lock = threading.Lock()
        self.segmented = cpu_cores() > _ONE_LOCK_WORKERS  # see scan
        self._largest: dict[str, int] = {}

    def expect(self, rows: int, cols: int, width: int) -> None:
        """The largest tile (rows x cols) and right() block (cols x width) a pass will ask
        for: each worker's buffers are made that large at once instead of growing tile by
        tile (from a 512-row leaf up), each growth mapping fresh memory (0.17-0.34 CPU-s
        of a pass at 20,000 x 2,048, against 0.04 s for the two workers' buffers once)."""
        self._largest = {"tile": rows * cols, "right": cols * width}

    def tile_buffer(self, rows: int, cols: int, use: str = "tile") -> np.ndarray:
        """A (rows, cols) float32 array kept by this worker thread for all its tiles
        (`use`: "tile" for products, "right" for the right blocks it builds).

        A fresh 64 MB tile per multiply costs page faults (and, where the kernel compacts
        memory for huge pages, far more) every time; one buffer, populated up front, pays
        them once.
        """
        flat = getattr(self._buffers, use, None)
        if flat is None or flat.size < rows * cols:
            flat = fresh_array((max(rows * cols, self._largest.get(use, 0)),))
            setattr(self._buffers, use, flat)
        return flat[: rows * cols].reshape(rows, cols)

    def feed(
        self,
        left: np.ndarray,
        right: np.ndarray,
        row_side: tuple[CandidateLists, np.ndarray],
        col_side: tuple[CandidateLists, np.ndarray] | None,
        positions: tuple[np.ndarray, np.ndarray],
        self_pairs: tuple[np.ndarray, np.ndarray],
        timings: Timings,
    ) -> None:
        """Multiply (no lock), then scan the tile into both sides' lists (see scan)."""
        with timed(timings, "matmul"):
            tile = np.matmul(left, right.T, out=self.tile_buffer(len(left), len(right)))
        tile[self_pairs] = np.inf
        with timed(timings, "selection"):
            self.scan(tile, row_side, col_side, positions)

    def feed_leaf(
        self,
        left: np.ndarray,
        row_side: tuple[CandidateLists, np.ndarray],
        positions: np.ndarray,
        timings: Timings,
    ) -> None:
        """A diagonal leaf, its rows against themselves: one symmetric product (numpy's
        A @ A.T runs BLAS syrk, half the multiply-adds, and mirrors it), then squared
        distances -2 y.y + |y|^2 + |y'|^2 (5.2 -> 4.0 ms a 512-row leaf), and the rows' side.

        The rounding differs from a tile's (left times right()): both are within the
        expansion's error bound (FeatureSpace.error_bound), which the re-rank proves with.
        """
        with timed(timings, "matmul"):
            body = left[:, :-2]
            tile = np.matmul(body, body.T, out=self.tile_buffer(len(left), len(left)))
            tile *= np.float32(-2.0)  # exact
            sq = left[:, -1]
            tile += sq[:, None]
            tile += sq[None, :]
            np.fill_diagonal(tile, np.inf)
        with timed(timings, "selection"):
            self.scan(tile, row_side, None, (positions, positions))

    def scan(
        self,
        tile: np.ndarray,
        row_side: tuple[CandidateLists, np.ndarray],
        col_side: tuple[CandidateLists, np.ndarray] | None,
        positions: tuple[np.ndarray, np.ndarray],
    ) -> None:
        """Each tile entry within its row's (and column's) limit joins that list.

        With few workers, one pass over the tile feeds both sides under one lock. With
        many, the rows' side and then the columns' side run in runs of slots that one lock
        of their lists guards (CandidateLists.segments), the columns' side a second pass:
        on 16 cores workers queued behind each other's scans on the one lock (1.08 against
        0.86 s at 20,000), on 2 the second pass costs more than the waiting (0.63 against
        0.37 CPU-s of selection).
        """
        lists, slots = row_side
        width = lists.width
        scratch = np.empty(lists.values.shape[1], dtype=np.float32)
        row_positions, col_positions = (p.astype(np.int32) for p in positions)
        both = col_side is not None
        if not self.segmented:
            cols = _side(*col_side) if col_side is not None else _side(lists, slots)
            with self._one_lock:
                args = (row_positions, col_positions, width, scratch)
                self.kernels.scan_tile(tile, _side(lists, slots), cols, both, *args)
            return
        for start, stop, lock in lists.segments(slots):
            rows = _side(lists, slots[start:stop])
            with lock:
                args = (row_positions[start:stop], col_positions, width, scratch)
                self.kernels.scan_tile(tile[start:stop], rows, rows, False, *args)
        if col_side is None:
            return
        lists, slots = col_side
        cols = _side(lists, slots)
        for start, stop, lock in lists.segments(slots):
            with lock:
                self.kernels.scan_columns(tile, start, stop, cols, row_positions, width, scratch)
