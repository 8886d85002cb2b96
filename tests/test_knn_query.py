"""Queries from outside the collection: ranked as the passes rank, one product per query."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

import lookalike.tasks.knn.space as knn_space
from lookalike.tasks.knn import NeighbourLists, knn_all, knn_row_block, merge_row_blocks
from lookalike.tasks.knn.query import knn_query, pair_space, prepare_query_space, query_left
from lookalike.tasks.knn.rerank import direct_distances, pair_sq_distances, rerank_rows, to_distance
from lookalike.tasks.knn.space import (
    FeatureSpace,
    KnnInputError,
    NonFiniteFeaturesError,
    ZeroFeatureVectorError,
)

K = 10


def gaussian(rng: np.random.Generator) -> np.ndarray:
    return rng.standard_normal((600, 48)).astype(np.float32)


def duplicates_and_near_duplicates(rng: np.random.Generator) -> np.ndarray:
    """Rows repeated exactly, nearly (1e-4 apart) and to one ulp in one coordinate."""
    x = rng.standard_normal((600, 48)).astype(np.float32)
    x[1::3] = x[0::3][: len(x[1::3])]
    x[2::7] = x[1::7][: len(x[2::7])] + rng.standard_normal((len(x[2::7]), 48)).astype(
        np.float32
    ) * np.float32(1e-4)
    x[5::7] = x[4::7][: len(x[5::7])]
    x[5::7, 0] = np.nextafter(x[5::7, 0], np.float32(np.inf))  # one ulp from the row before
    return x


def lattice(rng: np.random.Generator) -> np.ndarray:
    """Few distinct small-integer rows: many exactly equal distances, broken by id."""
    return rng.integers(0, 3, (600, 6)).astype(np.float32)


def positive_features(rng: np.random.Generator) -> np.ndarray:
    """Like ReLU outputs: non-negative, far from the origin, so centring matters."""
    return (rng.random((600, 256), dtype=np.float32) * 3 + 10).astype(np.float32)


DATA: dict[str, Callable[[np.random.Generator], np.ndarray]] = {
    "gaussian": gaussian,
    "duplicates": duplicates_and_near_duplicates,
    "lattice": lattice,
    "positive": positive_features,
}


def shuffled_ids(n: int, rng: np.random.Generator) -> np.ndarray:
    """Ids in no particular order, not starting at 0, with gaps."""
    return (rng.permutation(n) * 3 + 11).astype(np.int64)


def with_self(lists: NeighbourLists, row: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """A stored list with its own image inserted at distance 0 (after equal ids below it)."""
    image = int(lists.image_ids[row])
    ids, distances = lists.neighbour_ids[row], lists.distances[row]
    at = int(np.count_nonzero((distances == 0) & (ids < image)))
    return (
        np.insert(ids, at, image)[:k],
        np.insert(distances, at, np.float32(0.0))[:k].astype(np.float32),
    )


def assert_queries_equal_stored_lists(
    space: FeatureSpace, features: np.ndarray, ids: np.ndarray, lists: NeighbourLists
) -> None:
    """Each stored vector as a query gives itself plus its stored list, bit for bit."""
    found = knn_query(space, features, K + 1)
    row_of = {int(image): row for row, image in enumerate(ids)}
    for listed, image in enumerate(lists.image_ids):
        expected_ids, expected_distances = with_self(lists, listed, K + 1)
        row = row_of[int(image)]
        np.testing.assert_array_equal(found.neighbour_ids[row], expected_ids, f"image {image}")
        np.testing.assert_array_equal(
            found.distances[row].view(np.uint32), expected_distances.view(np.uint32)
        )


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("data", sorted(DATA))
def test_a_stored_vector_finds_itself_then_its_stored_list(data: str, metric: str) -> None:
    rng = np.random.default_rng(5)
    features = DATA[data](rng)
    ids = shuffled_ids(len(features), rng)
    if metric == "cosine" and data == "lattice":
        features[~features.any(axis=1), 0] = 1.0  # no zero vectors for cosine
    lists = knn_all(features, ids, K, metric=metric)
    space = prepare_query_space(features, ids, metric=metric)
    assert_queries_equal_stored_lists(space, features, ids, lists)


def test_ties_come_out_by_image_id() -> None:
    rng = np.random.default_rng(2)
    features = lattice(rng)
    ids = shuffled_ids(len(features), rng)
    space = prepare_query_space(features, ids)
    found = knn_query(space, features[:50], 40)
    for neighbours, distances in zip(found.neighbour_ids, found.distances, strict=True):
        assert np.all(np.diff(distances) >= 0)
        tied = distances[1:] == distances[:-1]
        assert tied.any()  # the lattice has many equal distances
        assert np.all(neighbours[1:][tied] > neighbours[:-1][tied])


def test_row_block_lists_are_matched_too() -> None:
    rng = np.random.default_rng(8)
    features = duplicates_and_near_duplicates(rng)
    ids = shuffled_ids(len(features), rng)
    parts = [knn_row_block(features, ids, slice(a, a + 150), K) for a in range(0, 600, 150)]
    space = prepare_query_space(features, ids)
    assert_queries_equal_stored_lists(space, features, ids, merge_row_blocks(parts))


def test_clustered_data_ranks_as_the_stored_lists() -> None:
    """Same order; distances within float32 rounding of the stored ones.

    Passes measure pairs inside tight groups by one float64 product per group (correctly
    rounded), other pairs by float32 subtraction; which one a pair gets depends on the
    other pairs of the pass (knn_all and knn_row_block differ in the same way), so a query
    cannot reproduce the last bits of those distances. The order does not depend on it.
    """
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((40, 128)) * 4
    features = (np.repeat(centres, 15, axis=0) + rng.standard_normal((600, 128))).astype(np.float32)
    ids = shuffled_ids(len(features), rng)
    lists = knn_all(features, ids, K)
    space = prepare_query_space(features, ids)
    found = knn_query(space, features[np.argsort(ids)], K + 1)
    np.testing.assert_array_equal(found.neighbour_ids[:, 0], lists.image_ids)
    np.testing.assert_array_equal(found.neighbour_ids[:, 1:], lists.neighbour_ids)
    np.testing.assert_allclose(found.distances[:, 1:], lists.distances, rtol=4 * space.direct_error)


def brute_force(
    features: np.ndarray, ids: np.ndarray, query: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Ids and float64 distances of the k nearest rows, ties by id."""
    distances = np.linalg.norm(features.astype(np.float64) - query.astype(np.float64), axis=1)
    order = np.lexsort((ids, distances))[:k]
    return ids[order], distances[order]


def test_outside_vectors_are_ranked_by_true_distance() -> None:
    rng = np.random.default_rng(3)
    features = positive_features(rng)
    ids = shuffled_ids(len(features), rng)
    queries = (rng.random((20, 256), dtype=np.float32) * 3 + 10).astype(np.float32)
    found = knn_query(prepare_query_space(features, ids), queries, 25)
    for row, query in enumerate(queries):
        expected_ids, expected = brute_force(features, ids, query, 25)
        np.testing.assert_array_equal(found.neighbour_ids[row], expected_ids)
        np.testing.assert_allclose(found.distances[row], expected, rtol=1e-6)


def test_many_equal_rows_beyond_the_candidates_are_proven_by_the_exhaustive_pass() -> None:
    rng = np.random.default_rng(4)
    features = rng.standard_normal((300, 32)).astype(np.float32)
    features[100:160] = features[0]  # 61 equal rows: far more than k + margin
    ids = shuffled_ids(len(features), rng)
    found = knn_query(prepare_query_space(features, ids), features[:1], 5)
    equal = np.sort(np.append(ids[100:160], ids[0]))
    np.testing.assert_array_equal(found.neighbour_ids[0], equal[:5])
    assert not found.distances.any()


def test_queries_together_equal_queries_one_by_one() -> None:
    rng = np.random.default_rng(6)
    features = gaussian(rng)
    ids = shuffled_ids(len(features), rng)
    space = prepare_query_space(features, ids, metric="cosine")
    queries = rng.standard_normal((7, 48)).astype(np.float32)
    together = knn_query(space, queries, 12)
    for row in range(len(queries)):
        alone = knn_query(space, queries[row : row + 1], 12)
        np.testing.assert_array_equal(alone.neighbour_ids[0], together.neighbour_ids[row])
        np.testing.assert_array_equal(alone.distances[0], together.distances[row])


def test_k_beyond_the_collection_lists_every_row() -> None:
    rng = np.random.default_rng(7)
    features = gaussian(rng)[:5]
    ids = np.array([9, 3, 7, 1, 5])
    found = knn_query(prepare_query_space(features, ids), features[:2], 50)
    assert found.neighbour_ids.shape == (2, 5) and found.distances.dtype == np.float32
    assert sorted(found.neighbour_ids[0]) == [1, 3, 5, 7, 9]
    assert found.neighbour_ids[0, 0] == 9 and found.neighbour_ids[1, 0] == 3


def test_an_empty_collection_answers_empty_lists() -> None:
    space = prepare_query_space(np.empty((0, 8), np.float32), np.empty(0, np.int64))
    found = knn_query(space, np.ones((2, 8), np.float32), 3)
    assert found.neighbour_ids.shape == (2, 0) and found.distances.shape == (2, 0)


def test_preparation_happens_once_not_per_query(monkeypatch: pytest.MonkeyPatch) -> None:
    # Even past the memory allowance of the passes, the query space keeps right() of every row.
    monkeypatch.setattr(knn_space, "_RIGHT_CACHE_BYTES", 0)
    rng = np.random.default_rng(1)
    features = gaussian(rng)
    ids = shuffled_ids(len(features), rng)
    space = prepare_query_space(features, ids)
    assert space.right_rows is not None and space.right_rows.shape == (600, 50)
    for array in (features, space.right_rows, space.sq, space.centre):
        array.setflags(write=False)  # a query only reads the space
    calls: list[int] = []
    centre_rows = FeatureSpace._augmented

    def counted(self: FeatureSpace, rows: slice | np.ndarray, out: np.ndarray | None = None):
        calls.append(1)
        return centre_rows(self, rows, out)

    monkeypatch.setattr(FeatureSpace, "_augmented", counted)
    knn_query(space, rng.standard_normal((3, 48)).astype(np.float32), 10)
    assert calls == []  # no stored row is centred again


@pytest.mark.parametrize(
    ("queries", "k", "error", "message"),
    [
        (np.ones((1, 7), np.float32), 3, KnnInputError, "queries x 8"),
        (np.ones(8, np.float32), 3, KnnInputError, "2-D"),
        (np.ones((1, 8), np.float32), 0, KnnInputError, "at least 1"),
        (np.full((1, 8), np.nan, np.float32), 3, NonFiniteFeaturesError, "NaN"),
        (np.full((1, 8), 1e30, np.float32), 3, NonFiniteFeaturesError, "overflows"),
    ],
)
def test_bad_queries_are_refused(
    queries: np.ndarray, k: int, error: type[Exception], message: str
) -> None:
    space = prepare_query_space(np.eye(8, dtype=np.float32), np.arange(8))
    with pytest.raises(error, match=message):
        knn_query(space, queries, k)


def test_a_zero_query_is_refused_for_cosine_only() -> None:
    features = np.eye(8, dtype=np.float32)
    zero = np.zeros((1, 8), np.float32)
    with pytest.raises(ZeroFeatureVectorError, match="query vector 0 is all zeros"):
        knn_query(prepare_query_space(features, np.arange(8), metric="cosine"), zero, 3)
    found = knn_query(prepare_query_space(features, np.arange(8)), zero, 3)
    np.testing.assert_array_equal(found.neighbour_ids[0], [0, 1, 2])  # all at 1, by id


def test_distances_do_not_depend_on_candidates_left_out_by_the_filter() -> None:
    """A list's last entry keeps its float32 distance whether padding or a far row follows it.

    How many candidates pass the plausible filter differs between a pass and a query (their
    expanded distances round differently); the re-rank must not recompute the last entry in
    float64 just because the filter left padding behind it.
    """
    rng = np.random.default_rng(14)  # a seed where float32 and float64 round apart
    features = rng.standard_normal((50, 256)).astype(np.float32)
    space = prepare_query_space(features, np.arange(50))
    query = rng.standard_normal(256).astype(np.float32)
    order = np.argsort(np.linalg.norm(features.astype(np.float64) - query, axis=1))
    rows = order[[0, 1, 2, 49]]  # the three nearest, and the farthest
    pairs = pair_space(space, query, query_left(space, query)[-1], rows)
    in_float32 = direct_distances(pairs, np.zeros(1, np.int64), np.array([[3]]))[0, 0]
    in_float64 = to_distance("euclidean", pair_sq_distances(pairs, [0], [3], precise=True))[0]
    # Direct distances are summed in float64 and rounded once (tasks/knn/pair_kernels.py and the
    # numpy path alike), so here both agree; the list must hold that value either way.
    assert in_float32 == in_float64
    padded = rerank_rows(pairs, np.zeros(1, np.int64), np.array([[1, 2, 3, -1]]), 3)
    followed = rerank_rows(pairs, np.zeros(1, np.int64), np.array([[1, 2, 3, 4]]), 3)
    np.testing.assert_array_equal(padded[0], followed[0])
    np.testing.assert_array_equal(padded[1].view(np.uint32), followed[1].view(np.uint32))
