"""The exact kNN engine against a float64 brute force, its edge cases and incremental updates."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from lookalike.tasks.knn.incremental import knn_update, positions_of
from lookalike.tasks.knn.passes import (
    NeighbourLists,
    column_chunks,
    even_column_width,
    knn_all,
    knn_row_block,
    merge_row_blocks,
)
from lookalike.tasks.knn.space import KnnInputError, NonFiniteFeaturesError, ZeroFeatureVectorError


def brute_force(
    features: np.ndarray, ids: np.ndarray, k: int, metric: str = "euclidean"
) -> NeighbourLists:
    """Every distance in float64; rows by id, each list by (distance as float32, id).

    The engine reports float32 distances and orders equal float32 distances by id, so the
    reference rounds to float32 before sorting.
    """
    x = features.astype(np.float64)
    if metric == "cosine":
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
    # Row by row, directly: exact for identical rows, no n x n x d temporary.
    distances = (
        np.stack([np.sqrt(((x - row) ** 2).sum(axis=1)) for row in x])
        if len(x)
        else np.zeros((0, 0))
    )
    if metric == "cosine":
        distances = distances**2 / 2  # |a - b|^2 / 2 = 1 - cos for unit vectors
    np.fill_diagonal(distances, np.inf)
    order = np.argsort(ids)
    ids, distances = ids[order], distances[order][:, order]
    kk = max(0, min(k, len(ids) - 1))
    rounded = distances.astype(np.float32)
    ranking = np.lexsort((np.broadcast_to(ids, distances.shape), rounded))[:, :kk]
    return NeighbourLists(
        image_ids=ids,
        neighbour_ids=ids[ranking],
        distances=np.take_along_axis(distances, ranking, axis=1).astype(np.float32),
    )


def assert_same_lists(result: NeighbourLists, expected: NeighbourLists) -> None:
    assert result.image_ids.dtype == np.int64
    assert result.neighbour_ids.dtype == np.int64
    assert result.distances.dtype == np.float32
    np.testing.assert_array_equal(result.image_ids, expected.image_ids)
    np.testing.assert_array_equal(result.neighbour_ids, expected.neighbour_ids)
    np.testing.assert_allclose(result.distances, expected.distances, rtol=1e-4, atol=1e-6)


def shuffled_ids(n: int, seed: int = 0) -> np.ndarray:
    """Unsorted, non-contiguous ids, so rows and positions differ."""
    return np.random.default_rng(seed).permutation(np.arange(n) * 3 + 7).astype(np.int64)


def random_features(n: int, d: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d), dtype=np.float32)


def clustered_features(n: int, d: int, seed: int = 0, clusters: int = 12) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d)) * 10
    labels = rng.integers(0, clusters, n)
    return (centres[labels] + rng.standard_normal((n, d)) * 0.3).astype(np.float32)


def duplicate_features(n_distinct: int, copies: int, d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    distinct = rng.standard_normal((n_distinct, d), dtype=np.float32)
    return distinct[rng.permutation(np.repeat(np.arange(n_distinct), copies))]


@pytest.mark.parametrize(
    ("features", "k", "block_rows"),
    [
        (random_features(600, 48), 10, 64),
        (random_features(300, 16, seed=1), 25, None),
        (clustered_features(800, 32), 15, 100),
        (clustered_features(200, 2048, seed=2), 12, 64),
    ],
    ids=["random", "random-default-blocks", "clustered", "clustered-d2048"],
)
def test_lists_equal_brute_force(features: np.ndarray, k: int, block_rows: int | None) -> None:
    ids = shuffled_ids(len(features))
    timings: dict[str, float] = {}
    result = knn_all(features, ids, k, block_rows=block_rows, timings=timings)
    assert_same_lists(result, brute_force(features, ids, k))
    assert timings["matmul"] > 0 and timings["rerank"] > 0


def test_exact_duplicates_get_zero_and_id_order() -> None:
    features = duplicate_features(40, 15, 24)
    ids = shuffled_ids(len(features))
    result = knn_all(features, ids, 20, block_rows=64)
    assert_same_lists(result, brute_force(features, ids, 20))
    # Each image has 14 copies: all at exactly 0, ordered by id, then the others.
    assert np.all(result.distances[:, :14] == 0.0)
    assert np.all(result.distances[:, 14:] > 0.0)
    assert np.all(np.diff(result.neighbour_ids[:, :14], axis=1) > 0)


def test_near_duplicates_beyond_float32_expansion_are_exact() -> None:
    # Two groups far from the origin (and from each other, so centring cannot help):
    # the float32 expansion cannot order neighbours 1e-3 apart, the exact pass must.
    rng = np.random.default_rng(5)
    offsets = np.where(rng.random((1, 64)) < 0.5, 1000.0, -1000.0)
    group = rng.integers(0, 2, 300)[:, None]
    base = np.where(group == 0, offsets, -offsets)
    features = (base + rng.standard_normal((300, 64)) * 1e-3).astype(np.float32)
    ids = shuffled_ids(300)
    timings: dict[str, float] = {}
    result = knn_all(features, ids, 8, block_rows=64, timings=timings)
    assert_same_lists(result, brute_force(features, ids, 8))
    assert timings["fallback_rows"] > 0  # the lists could not be proven from the expansion


def test_all_vectors_equal() -> None:
    features = np.ones((50, 8), dtype=np.float32)
    ids = np.arange(50, dtype=np.int64) * 2
    result = knn_all(features, ids, 10)
    assert np.all(result.distances == 0.0)
    for row, image in enumerate(result.image_ids):
        others = ids[ids != image]
        np.testing.assert_array_equal(result.neighbour_ids[row], others[:10])


@pytest.mark.parametrize(("n", "k"), [(0, 5), (1, 5), (2, 5), (5, 5), (6, 5), (7, 5)])
def test_small_collections_list_every_other_image(n: int, k: int) -> None:
    features = random_features(n, 6, seed=n)
    ids = shuffled_ids(n)
    result = knn_all(features, ids, k)
    kk = max(0, min(k, n - 1))
    assert result.image_ids.shape == (n,)
    assert result.neighbour_ids.shape == (n, kk)
    assert result.distances.shape == (n, kk)
    assert_same_lists(result, brute_force(features, ids, k))


def test_an_image_is_never_its_own_neighbour() -> None:
    features = duplicate_features(5, 4, 8)  # every image has exact copies at distance 0
    ids = shuffled_ids(20)
    result = knn_all(features, ids, 19)
    assert not np.any(result.neighbour_ids == result.image_ids[:, None])
    assert result.neighbour_ids.shape == (20, 19)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_vector_is_refused_naming_the_image(bad: float) -> None:
    features = random_features(30, 8)
    features[17, 3] = bad
    ids = np.arange(30, dtype=np.int64) + 1000
    with pytest.raises(NonFiniteFeaturesError, match="image 1017 "):
        knn_all(features, ids, 5)


def test_overflowing_vector_is_refused() -> None:
    features = random_features(10, 8)
    features[4] = 1e30
    with pytest.raises(NonFiniteFeaturesError, match="image 4 is too large"):
        knn_all(features, np.arange(10), 3)


def test_cosine_equals_brute_force() -> None:
    features = clustered_features(400, 32, seed=3) + 0.5
    ids = shuffled_ids(400)
    result = knn_all(features, ids, 12, metric="cosine", block_rows=64)
    assert_same_lists(result, brute_force(features, ids, 12, metric="cosine"))


def test_cosine_ignores_length_and_refuses_zero_vectors() -> None:
    features = random_features(60, 16)
    scaled = features * np.random.default_rng(1).uniform(0.1, 50, (60, 1)).astype(np.float32)
    ids = np.arange(60, dtype=np.int64)
    plain = knn_all(features, ids, 7, metric="cosine")
    np.testing.assert_array_equal(
        plain.neighbour_ids, knn_all(scaled, ids, 7, metric="cosine").neighbour_ids
    )
    features[9] = 0.0
    with pytest.raises(ZeroFeatureVectorError, match="image 9 "):
        knn_all(features, ids, 7, metric="cosine")


@pytest.mark.parametrize("block_rows", [2, 7, 50, 1000])
def test_block_size_does_not_change_the_result(block_rows: int) -> None:
    features = clustered_features(120, 12, seed=4)
    ids = shuffled_ids(120)
    result = knn_all(features, ids, 9, block_rows=block_rows)
    assert_same_lists(result, brute_force(features, ids, 9))


def test_read_only_memory_map_is_used_in_place(tmp_path) -> None:
    features = random_features(200, 32)
    path = tmp_path / "features.f32"
    features.tofile(path)
    mapped = np.memmap(path, dtype=np.float32, mode="r", shape=(200, 32))
    ids = shuffled_ids(200)
    assert_same_lists(knn_all(mapped, ids, 6), brute_force(features, ids, 6))


def test_memory_stays_far_below_an_n_by_n_matrix() -> None:
    n = 4000
    features = random_features(n, 4, seed=15)
    ids = np.arange(n, dtype=np.int64)
    tracemalloc.start()
    try:
        knn_all(features, ids, 5, block_rows=500)  # one tile per worker thread at a time
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < n * n * 4 / 4  # a quarter of one float32 n x n matrix


def test_row_blocks_merge_into_the_full_lists() -> None:
    features = clustered_features(300, 16, seed=6)
    ids = shuffled_ids(300)
    parts = [
        knn_row_block(features, ids, slice(start, start + 70), 11) for start in range(0, 300, 70)
    ]
    assert_same_lists(merge_row_blocks(parts), knn_all(features, ids, 11))
    assert parts[0].image_ids.shape == (70,) and parts[-1].image_ids.shape == (20,)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda x: knn_all(x, np.arange(10), 0), "k must be at least 1"),
        (lambda x: knn_all(x, np.arange(10), 3, metric="manhattan"), "unknown metric"),
        (lambda x: knn_all(x, np.arange(9), 3), "9,.* image ids for 10 feature rows"),
        (lambda x: knn_all(x, np.r_[np.arange(9), 4], 3), "image id 4 appears more than once"),
        (lambda x: knn_all(x[0], np.arange(8), 3), "2-D array"),
        (lambda x: knn_all(x, np.arange(10), 3, backend="cuda"), "unknown kNN backend"),
        (lambda x: knn_all(x, np.arange(10), 3, block_rows=0), "block_rows must be"),
    ],
)
def test_bad_input_is_refused(call, message: str) -> None:
    with pytest.raises(KnnInputError, match=message):
        call(random_features(10, 8))


# --- incremental updates ----------------------------------------------------------------


def update(previous: NeighbourLists, features, ids, changed, deleted, k, **options):
    """knn_update with plain lists for the changed and deleted ids."""
    return knn_update(
        previous,
        features,
        ids,
        changed_ids=np.asarray(changed, dtype=np.int64),
        deleted_ids=np.asarray(deleted, dtype=np.int64),
        k=k,
        **options,
    )


def test_adding_images_equals_a_full_recompute() -> None:
    features = clustered_features(500, 24, seed=7)
    ids = shuffled_ids(500)
    previous = knn_all(features[:480], ids[:480], 10)
    timings: dict[str, float] = {}
    result = update(previous, features, ids, ids[480:], [], 10, block_rows=64, timings=timings)
    assert_same_lists(result, knn_all(features, ids, 10))
    assert_same_lists(result, brute_force(features, ids, 10))
    assert timings.get("refilled_rows", 0) == 0  # adding never needs a refill


def test_deleting_a_few_images_refills_only_their_lists() -> None:
    features = clustered_features(400, 24, seed=8)
    ids = shuffled_ids(400)
    previous = knn_all(features, ids, 10)
    gone = ids[[5, 77, 301]]
    keep = ~np.isin(ids, gone)
    timings: dict[str, float] = {}
    result = update(previous, features[keep], ids[keep], [], gone, 10, timings=timings)
    assert_same_lists(result, brute_force(features[keep], ids[keep], 10))
    lists_with_gone = np.isin(previous.neighbour_ids, gone).any(axis=1).sum()
    assert 0 < timings["refilled_rows"] <= lists_with_gone


def test_deleting_many_images_equals_a_full_recompute() -> None:
    features = clustered_features(400, 24, seed=8)
    ids = shuffled_ids(400)
    previous = knn_all(features, ids, 10)
    gone = ids[::9]
    keep = ~np.isin(ids, gone)
    result = update(previous, features[keep], ids[keep], [], gone, 10)
    assert_same_lists(result, brute_force(features[keep], ids[keep], 10))


def test_changing_images_equals_a_full_recompute() -> None:
    features = clustered_features(400, 24, seed=9)
    ids = shuffled_ids(400)
    previous = knn_all(features, ids, 10)
    changed = features.copy()
    moved = np.array([3, 50, 51, 200])
    changed[moved] = changed[[10, 11, 300, 0]] + 0.01  # moved next to other images
    result = update(previous, changed, ids, ids[moved], [], 10, block_rows=32)
    assert_same_lists(result, brute_force(changed, ids, 10))


def test_add_delete_and_change_together() -> None:
    features = duplicate_features(60, 6, 16, seed=10)  # ties everywhere
    ids = shuffled_ids(360)
    previous = knn_all(features[:300], ids[:300], 8)
    gone = ids[:300][::17]
    current = features.copy()
    current[[5, 6]] = current[[100, 101]]  # changed into duplicates of others
    keep = ~np.isin(ids, gone)
    changed = np.concatenate([ids[[5, 6]], ids[300:]])
    result = update(previous, current[keep], ids[keep], changed, gone, 8, block_rows=64)
    assert_same_lists(result, brute_force(current[keep], ids[keep], 8))


def test_update_with_smaller_k_and_a_collection_that_outgrows_it() -> None:
    features = random_features(40, 8, seed=11)
    ids = shuffled_ids(40)
    previous = knn_all(features[:6], ids[:6], 10)  # lists of 5: every other image
    result = update(previous, features, ids, ids[6:], [], 10)
    assert_same_lists(result, brute_force(features, ids, 10))
    shorter = update(knn_all(features, ids, 10), features, ids, [], [], 4)
    assert_same_lists(shorter, brute_force(features, ids, 4))


def test_update_from_shorter_lists_is_refused() -> None:
    # Lists of 3 cannot give lists of 9: the plan (knn.plan) asks for a full pass instead.
    features = random_features(80, 8, seed=12)
    ids = shuffled_ids(80)
    previous = knn_all(features[:70], ids[:70], 3)
    with pytest.raises(KnnInputError, match="shorter than k=9"):
        update(previous, features, ids, ids[70:], [], 9)


def test_cosine_update_equals_a_full_recompute() -> None:
    features = clustered_features(300, 16, seed=13) + 1.0
    ids = shuffled_ids(300)
    previous = knn_all(features[:290], ids[:290], 7, metric="cosine")
    result = update(previous, features, ids, ids[290:], [], 7, metric="cosine")
    assert_same_lists(result, knn_all(features, ids, 7, metric="cosine"))


@pytest.mark.parametrize(
    ("changed", "deleted", "message"),
    [
        ([], [999], "image 999 is deleted but not in the previous lists"),
        ([], [7], "image 7 is deleted but still has features"),
        ([999], [], "image 999 is changed but has no features"),
        ([], [], "image 32 is new but not in changed_ids"),
    ],
)
def test_inconsistent_update_is_refused(changed, deleted, message: str) -> None:
    features = random_features(30, 8)
    ids = np.arange(30, dtype=np.int64) + 7
    previous = knn_all(features[:25], ids[:25], 4)
    with pytest.raises(KnnInputError, match=message):
        update(previous, features, ids, changed, deleted, 4)


def test_update_missing_a_previous_image_is_refused() -> None:
    features = random_features(30, 8)
    ids = np.arange(30, dtype=np.int64)
    previous = knn_all(features, ids, 4)
    with pytest.raises(KnnInputError, match="image 29 was in the previous lists"):
        update(previous, features[:29], ids[:29], [], [], 4)


@pytest.mark.slow
def test_tensorflow_backend_gives_the_same_lists() -> None:
    pytest.importorskip("tensorflow")
    features = clustered_features(300, 32, seed=14)
    ids = shuffled_ids(300)
    result = knn_all(features, ids, 10, backend="tensorflow", block_rows=64)
    assert_same_lists(result, brute_force(features, ids, 10))
    previous = knn_all(features[:280], ids[:280], 10, backend="tensorflow")
    updated = update(previous, features, ids, ids[280:], [], 10, backend="tensorflow")
    assert_same_lists(updated, result)


def test_strip_columns_split_into_equal_tiles_per_worker() -> None:
    assert even_column_width(20_000, 8192, 2) == 5000  # 4 tiles: 2 rounds on 2 workers
    assert even_column_width(20_000, 8192, 1) == 6667  # 3 tiles, no wider than 8192
    assert even_column_width(100, 8192, 2) == 50
    assert even_column_width(1, 8192, 4) == 1
    width = even_column_width(20_000, 8192, 2)
    widths = [c1 - c0 for c0, c1 in column_chunks(0, 20_000, seen=0, most=width, first=width)]
    assert widths == [5000, 5000, 5000, 5000]


@pytest.mark.parametrize("spread", [1, 10**9])  # dense ids (lookup table), sparse (search)
def test_positions_of_finds_ids_and_marks_the_absent(spread: int) -> None:
    ids = np.array([7, 3, 12, 5], dtype=np.int64) * spread
    wanted = np.array([[12, 3], [4, 7], [2, 13], [5, -1]], dtype=np.int64) * spread
    expected = np.array([[2, 1], [-1, 0], [-1, -1], [3, -1]])
    np.testing.assert_array_equal(positions_of(ids, wanted), expected)
    np.testing.assert_array_equal(positions_of(ids[:0], wanted), np.full((4, 2), -1))
