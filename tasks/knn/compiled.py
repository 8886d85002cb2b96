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
from lookalike.tasks.knn.tiles import CandidateLists, NumpyTiles


def numba_installed() -> bool:
    """True when numba can be imported (checked without importing it: that takes 0.3 s)."""
    try:
        return importlib.util.find_spec("numba") is not None
    except ValueError:  # sys.modules["numba"] is None: imports of numba are blocked
        return False


def compiled_kernels() -> Any:
    """Every kernel of a compiled pass, the selection's (kernels) and the re-rank's
    (pair_kernels), as one namespace; numba compiles each kernel on its first call, or
    loads it from its cache on disk (beside the module), once per process."""
    from lookalike.tasks.knn import kernels, pair_kernels

    public = {}
    for module in (kernels, pair_kernels):  # jitted functions carry their py_func
        found = vars(module).items()
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

    def tile_buffer(self, rows: int, cols: int) -> np.ndarray:
        """A (rows, cols) float32 array kept by this worker thread for all its tiles.

        A fresh 64 MB tile per multiply costs page faults (and, where the kernel compacts
        memory for huge pages, far more) every time; one buffer, populated up front, pays
        them once.
        """
        flat = getattr(self._buffers, "flat", None)
        if flat is None or flat.size < rows * cols:
            flat = fresh_array((rows * cols,))
            self._buffers.flat = flat
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

    def scan(
        self,
        tile: np.ndarray,
        row_side: tuple[CandidateLists, np.ndarray],
        col_side: tuple[CandidateLists, np.ndarray] | None,
        positions: tuple[np.ndarray, np.ndarray],
    ) -> None:
        """Each tile entry within its row's (and column's) limit joins that list.

        The rows' side, then the columns' side, each in runs of slots that one lock of
        their lists guards (CandidateLists.segments): workers scanning tiles of one strip
        take turns per run instead of one lock for the whole scan, which on 16 cores left
        the multiplies waiting on each other's scans.
        """
        lists, slots = row_side
        scratch = np.empty(lists.values.shape[1], dtype=np.float32)
        row_positions, col_positions = (p.astype(np.int32) for p in positions)
        for start, stop, lock in lists.segments(slots):
            rows = _side(lists, slots[start:stop])
            with lock:
                self.kernels.scan_rows(tile[start:stop], rows, col_positions, lists.width, scratch)
        if col_side is None:
            return
        lists, slots = col_side
        cols = _side(lists, slots)
        for start, stop, lock in lists.segments(slots):
            with lock:
                args = (row_positions, lists.width, scratch)
                self.kernels.scan_columns(tile, start, stop, cols, *args)
