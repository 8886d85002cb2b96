"""Map layout: 2-D positions of every image, from the stored exact neighbour graph (UMAP).

UMAP's costly first half is a k-nearest-neighbour search; lookalike has stored the exact lists
already, so they go in as UMAP's precomputed graph and no second search runs. Images added
later are placed among their stored neighbours (a distance-weighted mean of the positions of
those already on the map), so that nobody else moves; a full refit redoes everyone.
Pure engine: no Prefect, no database.
"""

from __future__ import annotations

import logging
import sys
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

LAYOUT_NEIGHBOURS = 15  # UMAP's n_neighbors: the first of each stored list
LAYOUT_SEED = 20241203
PLACE_NEIGHBOURS = 5  # placed neighbours a new image's position is averaged from
SMALL_LAYOUT = 16  # fewer images than this: spectral initialisation is not worth it
MISSING = -1  # no neighbour at this rank (a short list, or one deleted since)


@dataclass(frozen=True)
class NeighbourGraph:
    """The first neighbours of n images, as row numbers into the same n images."""

    ids: np.ndarray  # (n,) image ids, the rows' order
    rows: np.ndarray  # (n, m) int32 row numbers of the neighbours, MISSING where none
    distances: np.ndarray  # (n, m) float32, closest first

    @classmethod
    def from_ids(
        cls, ids: np.ndarray, neighbour_ids: np.ndarray, distances: np.ndarray
    ) -> NeighbourGraph:
        """Neighbour image ids turned into row numbers; ids outside `ids` become MISSING."""
        if len(ids) == 0:
            return cls(ids, np.full(neighbour_ids.shape, MISSING, np.int32), distances + np.inf)
        order = np.argsort(ids)
        sorted_ids = ids[order]
        where = np.searchsorted(sorted_ids, neighbour_ids).clip(0, len(ids) - 1)
        known = sorted_ids[where] == neighbour_ids
        rows = np.where(known, order[where], MISSING).astype(np.int32)
        return cls(ids, rows, np.where(known, distances, np.inf).astype(np.float32))


def fit_layout(graph: NeighbourGraph, seed: int = LAYOUT_SEED) -> np.ndarray:
    """(n, 2) float32 positions, the same for the same graph and seed."""
    count = len(graph.ids)
    if count < 3:  # UMAP needs a few points; two or fewer go on a line
        return np.column_stack([np.arange(count), np.zeros(count)]).astype(np.float32)
    umap = import_umap()
    indices, distances = with_self_first(graph)
    neighbours = min(LAYOUT_NEIGHBOURS, indices.shape[1], count - 1)
    reducer = umap.UMAP(
        n_neighbors=neighbours,
        random_state=seed,  # also makes the optimisation single-threaded: deterministic
        precomputed_knn=(indices[:, :neighbours], distances[:, :neighbours]),
        init="random" if count < SMALL_LAYOUT else "spectral",
        n_jobs=1,
    )
    # The data only give UMAP the number of points: the graph is all it uses.
    placeholder = np.zeros((count, 1), dtype=np.float32)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*knn_search_index.*")
        warnings.filterwarnings("ignore", message=".*n_jobs value 1 overridden.*")
        positions = reducer.fit_transform(placeholder)
    return np.asarray(positions, dtype=np.float32)


def import_umap() -> Any:
    """umap-learn, imported on first use (its numba functions compile then), without its
    parametric model: umap/__init__ imports that, and it loads TensorFlow (2.8 s, 640 MB)
    into every run that lays the map out even when no image needed the model."""
    if "umap" not in sys.modules and "tensorflow" not in sys.modules:
        sys.modules.setdefault("umap.parametric_umap", None)  # type: ignore[arg-type]
    import umap

    return umap


def with_self_first(graph: NeighbourGraph) -> tuple[np.ndarray, np.ndarray]:
    """UMAP's form: each point its own first neighbour at distance 0; MISSING stays -1."""
    count = len(graph.ids)
    own = np.arange(count, dtype=np.int32)[:, np.newaxis]
    indices = np.hstack([own, graph.rows])
    distances = np.hstack([np.zeros((count, 1), np.float32), graph.distances])
    distances[indices == MISSING] = np.inf  # UMAP skips -1 entries; keep them last
    return indices, np.where(np.isfinite(distances), distances, 0).astype(np.float32)


def place_new(graph: NeighbourGraph, positions: np.ndarray, placed: np.ndarray) -> np.ndarray:
    """Positions for the rows not `placed`, from those that are; the placed ones unchanged.

    A new image goes to the distance-weighted mean of its closest placed neighbours. One whose
    neighbours are all new waits for them (rounds until nothing changes); one with none placed
    at all goes to the middle of the map.
    """
    positions = positions.astype(np.float32, copy=True)
    placed = placed.copy()
    while not placed.all():
        progress = False
        for row in np.flatnonzero(~placed).tolist():
            position = weighted_position(graph, positions, placed, row)
            if position is not None:
                positions[row], placed[row], progress = position, True, True
        if not progress:
            middle = positions[placed].mean(axis=0) if placed.any() else np.zeros(2)
            positions[~placed] = middle
            break
    return positions


def weighted_position(
    graph: NeighbourGraph, positions: np.ndarray, placed: np.ndarray, row: int
) -> np.ndarray | None:
    """The mean position of a row's closest placed neighbours, weighted by 1 / distance."""
    rows = graph.rows[row]
    usable = (rows != MISSING) & placed[np.maximum(rows, 0)]
    chosen = rows[usable][:PLACE_NEIGHBOURS]
    if len(chosen) == 0:
        return None
    weights = 1.0 / (graph.distances[row][usable][:PLACE_NEIGHBOURS] + 1e-6)
    return (positions[chosen] * weights[:, np.newaxis]).sum(axis=0) / weights.sum()
