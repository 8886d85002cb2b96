"""The map layout: UMAP on the stored exact neighbour graph, and new images placed among theirs."""

from __future__ import annotations

import numpy as np
import pytest

from lookalike.tasks.map_layout import MISSING, NeighbourGraph, fit_layout, place_new

CLUSTERS, PER_CLUSTER, DIM, K = 6, 40, 32, 20


def exact_graph(points: np.ndarray, ids: np.ndarray, k: int = K) -> NeighbourGraph:
    """Exact k nearest neighbours (self excluded), as the neighbour table stores them."""
    squared = ((points[:, None, :] - points[None, :, :]) ** 2).sum(axis=2)
    np.fill_diagonal(squared, np.inf)
    order = np.argsort(squared, axis=1, kind="stable")[:, :k]
    distances = np.sqrt(np.take_along_axis(squared, order, axis=1)).astype(np.float32)
    return NeighbourGraph.from_ids(ids, ids[order], distances)


def clustered(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 10, (CLUSTERS, DIM))
    labels = np.repeat(np.arange(CLUSTERS), PER_CLUSTER)
    return centres[labels] + rng.normal(0, 1, (len(labels), DIM)), labels


def nearest_on_map(positions: np.ndarray, rows: np.ndarray, among: np.ndarray) -> np.ndarray:
    """For each of rows, the row among `among` closest to it on the map (itself excluded)."""
    found = []
    for row in rows:
        others = among[among != row]
        found.append(others[np.argmin(((positions[others] - positions[row]) ** 2).sum(axis=1))])
    return np.array(found)


def test_neighbour_ids_become_rows_and_unknown_ones_missing() -> None:
    ids = np.array([30, 10, 20])
    graph = NeighbourGraph.from_ids(
        ids, np.array([[10, 99], [20, 30], [30, -1]]), np.ones((3, 2), np.float32)
    )
    assert graph.rows.tolist() == [[1, MISSING], [2, 0], [0, MISSING]]
    assert np.isinf(graph.distances[0, 1]) and graph.distances[1, 1] == 1


@pytest.mark.slow
def test_layout_keeps_clusters_together_and_is_the_same_for_the_same_seed() -> None:
    points, labels = clustered()
    graph = exact_graph(points, np.arange(100, 100 + len(points)))
    positions = fit_layout(graph, seed=7)
    assert positions.shape == (len(points), 2) and positions.dtype == np.float32
    assert np.array_equal(positions, fit_layout(graph, seed=7))
    everyone = np.arange(len(points))
    nearest = nearest_on_map(positions, everyone, everyone)
    assert (labels[nearest] == labels).mean() >= 0.95


@pytest.mark.slow
def test_new_images_are_placed_among_their_neighbours_and_nobody_moves() -> None:
    points, labels = clustered(seed=1)
    ids = np.arange(len(points))
    new = np.arange(0, len(points), 12)  # 20 images, every cluster, arriving later
    old = np.setdiff1d(ids, new)
    before = fit_layout(exact_graph(points[old], ids[old]))
    graph = exact_graph(points, ids)
    positions = np.zeros((len(ids), 2), np.float32)
    positions[old] = before
    placed = np.isin(ids, old)
    after = place_new(graph, positions, placed)
    assert np.array_equal(after[old], before)
    nearest = nearest_on_map(after, new, old)
    assert (labels[nearest] == labels[new]).mean() >= 0.9


def test_images_without_placed_neighbours_go_to_the_middle() -> None:
    ids = np.array([1, 2, 3, 4])
    graph = NeighbourGraph.from_ids(
        ids, np.array([[2], [1], [4], [3]]), np.ones((4, 1), np.float32)
    )
    positions = np.array([[0, 0], [2, 2], [0, 0], [0, 0]], np.float32)
    after = place_new(graph, positions, np.array([True, True, False, False]))
    assert after[2:].tolist() == [[1, 1], [1, 1]]


def test_two_images_or_fewer_lie_on_a_line() -> None:
    graph = NeighbourGraph.from_ids(np.array([5, 6]), np.array([[6], [5]]), np.ones((2, 1)))
    assert fit_layout(graph).tolist() == [[0, 0], [1, 0]]


@pytest.mark.slow
def test_laying_out_does_not_load_tensorflow() -> None:
    """A run that needs no model must not pay for TensorFlow (umap-learn would import it)."""
    import subprocess
    import sys

    script = (
        "import sys, numpy as np\n"
        "from lookalike.tasks.map_layout import NeighbourGraph, fit_layout\n"
        "ids = np.arange(40)\n"
        "rows = (ids[:, None] + np.arange(1, 6)[None, :]) % 40\n"
        "graph = NeighbourGraph.from_ids(ids, rows, np.ones(rows.shape, np.float32))\n"
        "assert fit_layout(graph).shape == (40, 2)\n"
        "print('tensorflow' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "False"
