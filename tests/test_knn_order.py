"""The order a full pass visits rows in: near rows side by side, and the same lists."""

from __future__ import annotations

import numpy as np
import pytest

from lookalike.tasks.knn.backends import open_backend, prepare_kernels
from lookalike.tasks.knn.compiled import numba_installed
from lookalike.tasks.knn.order import visiting_order
from lookalike.tasks.knn.passes import all_lists, assemble_lists, rows_against_all
from lookalike.tasks.knn.space import cache_right_rows, prepare_space
from lookalike.tasks.knn.tiles import tile_shape

BACKENDS = [
    "numpy",
    pytest.param("numba", marks=pytest.mark.skipif(not numba_installed(), reason="no numba")),
]


def scattered_clusters(n: int, d: int, clusters: int, seed: int = 0) -> np.ndarray:
    """Tight, well-apart clusters whose rows lie at random positions."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d)) * 10
    labels = rng.permutation(np.arange(n) % clusters)
    return (centres[labels] + rng.standard_normal((n, d)) * 0.3).astype(np.float32)


def nearest(x: np.ndarray, k: int) -> np.ndarray:
    """Positions of each row's k nearest other rows (brute force)."""
    sq = ((x[:, None, :].astype(np.float64) - x[None]) ** 2).sum(axis=2)
    np.fill_diagonal(sq, np.inf)
    return np.argsort(sq, axis=1)[:, :k]


def share_close(order: np.ndarray, neighbours: np.ndarray, within: int) -> float:
    """Share of (row, neighbour) pairs visited fewer than `within` slots apart."""
    slot = np.empty(len(order), dtype=np.int64)
    slot[order] = np.arange(len(order))
    return float((np.abs(slot[neighbours] - slot[:, None]) < within).mean())


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_the_order_puts_neighbours_side_by_side(metric: str) -> None:
    x = scattered_clusters(1200, 24, clusters=12)
    order = visiting_order(x, metric)
    assert order is not None
    assert np.array_equal(np.sort(order), np.arange(len(x)))  # a permutation
    neighbours = nearest(x, 20)
    # Clusters of 100: in visiting order a row's neighbours are within its group, while
    # in the rows' own order they are spread over the whole range.
    assert share_close(np.arange(len(x)), neighbours, 200) < 0.4
    assert share_close(order, neighbours, 200) > 0.95


def test_too_few_rows_keep_their_own_order() -> None:
    assert visiting_order(np.ones((99, 8), dtype=np.float32), "euclidean") is None


def test_bad_rows_do_not_stop_the_order() -> None:
    x = scattered_clusters(400, 8, clusters=4)
    x[7] = np.nan
    x[9] = np.inf
    order = visiting_order(x, "euclidean")
    assert order is not None and np.array_equal(np.sort(order), np.arange(400))


def lists_of(x: np.ndarray, ids: np.ndarray, metric: str, backend: str, visit, block_rows: int):
    """Lists of the symmetric pass over a space visited in `visit` order (None: as given)."""
    kernels = prepare_kernels(backend)
    space = prepare_space(x, ids, metric, None, keep_right=True, kernels=kernels, visit=visit)
    with open_backend(backend, space) as tiles:
        shape = tile_shape(space, block_rows, tiles)
        positions, neighbours, distances = all_lists(space, tiles, 10, shape, None)
    return space, assemble_lists(ids, positions, neighbours, distances)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_any_visiting_order_gives_the_same_lists(backend: str, metric: str) -> None:
    x = scattered_clusters(900, 16, clusters=9, seed=3)
    x[5] = x[700]  # an exact duplicate: ties ordered by id whatever the order
    ids = np.random.default_rng(1).permutation(10_000)[:900]
    order = visiting_order(x, metric)
    _, plain = lists_of(x, ids, metric, backend, None, 256)
    for visit in (order, np.random.default_rng(2).permutation(900)):
        space, visited = lists_of(x, ids, metric, backend, visit, 256)
        assert np.array_equal(visited.image_ids, plain.image_ids)
        assert np.array_equal(visited.neighbour_ids, plain.neighbour_ids)
        assert np.array_equal(visited.distances, plain.distances)
        # The kept right() rows follow the order; right() of positions still finds them.
        unordered = prepare_space(x, ids, metric, None, kernels=prepare_kernels(backend))
        assert space.right_rows is not None
        assert np.array_equal(space.right_rows, unordered.right(visit))
        assert np.array_equal(space.right(np.arange(40, 90)), unordered.right(np.arange(40, 90)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_right_rows_built_in_visiting_order_match_the_kept_ones(backend: str) -> None:
    x = scattered_clusters(700, 12, clusters=7)
    ids = np.arange(700)
    visit = visiting_order(x, "euclidean")
    kernels = prepare_kernels(backend)
    kept = prepare_space(x, ids, "euclidean", None, keep_right=True, kernels=kernels, visit=visit)
    built = prepare_space(x, ids, "euclidean", None, kernels=kernels, visit=visit)
    assert built.right_rows is None
    buffer = np.empty((300, 14), dtype=np.float32)
    assert np.array_equal(built.right_visited(slice(100, 400), buffer), kept.right_rows[100:400])
    cache_right_rows(built)
    assert np.array_equal(built.right_rows, kept.right_rows)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_against_all_in_a_visited_space_skip_only_themselves(backend: str) -> None:
    x = scattered_clusters(600, 12, clusters=6, seed=4)
    ids = np.arange(600)
    positions = np.array([0, 5, 299, 300, 599])
    results = []
    for visit in (None, visiting_order(x, "euclidean")):
        space = prepare_space(
            x, ids, "euclidean", None, kernels=prepare_kernels(backend), visit=visit
        )
        with open_backend(backend, space) as tiles:
            shape = tile_shape(space, 128, tiles)
            results.append(rows_against_all(space, tiles, positions, 10, shape, None))
    expected = nearest(x, 10)[positions]
    for neighbours, _ in results:
        assert not (neighbours == positions[:, None]).any()
        assert np.array_equal(np.sort(neighbours, axis=1), np.sort(expected, axis=1))
    assert np.array_equal(results[0][0], results[1][0])
    assert np.array_equal(results[0][1], results[1][1])
