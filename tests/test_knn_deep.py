"""Deep lists: a reserve beyond k lets knn_update absorb deletions without recomputing rows."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from lookalike.tasks.knn import knn_all, knn_update, list_depth, prefix_lists
from lookalike.tasks.knn.passes import NeighbourLists, list_depths
from lookalike.tasks.knn.plan import reserve
from lookalike.tasks.knn.rerank import _group_pair_sq_distances, _subtracted_pair_sq_distances
from lookalike.tasks.knn.space import KnnInputError, prepare_space
from tests.test_knn_compiled import near_ties
from tests.test_knn_passes import clustered_features, random_features, shuffled_ids

K = 20
N = 3000


def assert_identical(result: NeighbourLists, expected: NeighbourLists) -> None:
    """Bit for bit: rows, neighbours and distances."""
    np.testing.assert_array_equal(result.image_ids, expected.image_ids)
    np.testing.assert_array_equal(result.neighbour_ids, expected.neighbour_ids)
    np.testing.assert_array_equal(result.distances, expected.distances)


def assert_exact_to_depth(deep: NeighbourLists, full: NeighbourLists) -> None:
    """Each ragged row equals the full lists up to its own depth, then holds padding only."""
    np.testing.assert_array_equal(deep.image_ids, full.image_ids)
    width = deep.neighbour_ids.shape[1]
    inside = np.arange(width)[None, :] < list_depths(deep)[:, None]
    np.testing.assert_array_equal(deep.neighbour_ids[inside], full.neighbour_ids[:, :width][inside])
    np.testing.assert_array_equal(deep.distances[inside], full.distances[:, :width][inside])
    assert np.all(deep.neighbour_ids[~inside] == -1)
    assert np.all(np.isposinf(deep.distances[~inside]))


def update(previous: NeighbourLists, x: np.ndarray, ids: np.ndarray, changed, deleted, **options):
    """knn_update with plain lists for the changed and deleted ids, k = K."""
    return knn_update(
        previous,
        x,
        ids,
        changed_ids=np.asarray(changed, dtype=np.int64),
        deleted_ids=np.asarray(deleted, dtype=np.int64),
        k=K,
        **options,
    )


@dataclass
class Removal:
    """Deep lists of N images, and those lists after removing a random tenth of them."""

    x: np.ndarray
    ids: np.ndarray
    depth: int
    deep: NeighbourLists
    keep: np.ndarray
    gone: np.ndarray
    updated: NeighbourLists
    timings: dict[str, float]


@pytest.fixture(scope="module")
def removal() -> Removal:
    x = random_features(N, 32, seed=21)
    ids = shuffled_ids(N, seed=21)
    depth = list_depth(K, N)
    deep = knn_all(x, ids, depth)
    rng = np.random.default_rng(22)
    keep = np.ones(N, dtype=bool)
    keep[rng.choice(N, N // 10, replace=False)] = False  # a source spread over the space
    timings: dict[str, float] = {}
    updated = update(deep, x[keep], ids[keep], [], ids[~keep], depth=depth, timings=timings)
    return Removal(x, ids, depth, deep, keep, ids[~keep], updated, timings)


def test_reserve_and_depth() -> None:
    assert [reserve(k) for k in (1, 20, 32, 33, 100)] == [8, 8, 8, 9, 25]
    assert list_depth(100, 20_000) == 125
    assert list_depth(10, 12) == 11  # every other image
    assert list_depth(5, 1) == 0


@pytest.mark.parametrize(
    ("features", "metric"),
    [
        (random_features(1500, 32, seed=1), "euclidean"),
        (clustered_features(1500, 24, seed=2), "euclidean"),
        (near_ties(1200, 32), "euclidean"),
        (clustered_features(1200, 24, seed=3) + 1.0, "cosine"),
    ],
    ids=["random", "clustered", "near-ties", "cosine"],
)
def test_the_first_k_of_deep_lists_are_the_lists_of_k(features: np.ndarray, metric: str) -> None:
    ids = shuffled_ids(len(features))
    deep = knn_all(features, ids, list_depth(K, len(features)), metric=metric, block_rows=256)
    assert_identical(prefix_lists(deep, K), knn_all(features, ids, K, metric=metric))


def test_a_pair_measures_the_same_inside_a_group_and_alone() -> None:
    # Tight clusters far from the centre: the grouped float64 products lose most digits
    # to cancellation, so some of them would round to another float32 than subtraction.
    rng = np.random.default_rng(12)
    clusters, size, d = 12, 80, 256
    centres = rng.standard_normal((clusters, d)) * 10
    noise = 0.1 * rng.standard_normal((clusters * size, d))
    x = (np.repeat(centres, size, axis=0) + noise).astype(np.float32)
    i, j = np.triu_indices(size, 1)
    starts = np.arange(clusters)[:, None] * size
    low, high = (starts + i).ravel(), (starts + j).ravel()
    space = prepare_space(x, np.arange(len(x), dtype=np.int64), "euclidean", None)
    grouped = np.full(len(low), np.nan, dtype=np.float32)
    rest = _group_pair_sq_distances(space, low, high, grouped)
    done = np.setdiff1d(np.arange(len(low)), rest)
    assert len(done) > 0.9 * len(low)
    alone = _subtracted_pair_sq_distances(space, low[done], high[done], False)
    np.testing.assert_array_equal(grouped[done], alone)


def test_removing_a_tenth_recomputes_almost_no_row(removal: Removal) -> None:
    x, ids, keep = removal.x[removal.keep], removal.ids[removal.keep], removal.keep
    updated = removal.updated
    assert updated.neighbour_ids.shape == (keep.sum(), removal.depth)
    assert_identical(prefix_lists(updated, K), knn_all(x, ids, K))
    assert_exact_to_depth(updated, knn_all(x, ids, removal.depth))
    # Every list lost about 10% of its 28 entries, yet few fell below K and were recomputed.
    assert list_depths(updated).min() >= K
    assert list_depths(updated).mean() < removal.depth - 1
    assert removal.timings.get("refilled_rows", 0) < 0.01 * len(ids)


def test_adding_and_changing_images_keeps_ragged_lists_exact(removal: Removal) -> None:
    rng = np.random.default_rng(23)
    x = removal.x.copy()
    live = removal.keep.copy()
    added = rng.choice(np.flatnonzero(~live), N // 100, replace=False)
    live[added] = True
    moved = rng.choice(np.flatnonzero(removal.keep), 5, replace=False)
    x[moved] = x[rng.choice(np.flatnonzero(live), 5)] + np.float32(1e-3)  # next to others
    changed = removal.ids[np.concatenate([added, moved])]
    timings: dict[str, float] = {}
    result = update(
        removal.updated, x[live], removal.ids[live], changed, [], depth=removal.depth,
        timings=timings, block_rows=512,
    )  # fmt: skip
    assert_identical(prefix_lists(result, K), knn_all(x[live], removal.ids[live], K))
    assert_exact_to_depth(result, knn_all(x[live], removal.ids[live], removal.depth))
    fresh = np.isin(result.image_ids, changed)
    assert np.all(list_depths(result)[fresh] == removal.depth)  # new rows: full depth
    assert timings.get("refilled_rows", 0) < 0.01 * live.sum()


def test_rows_that_fall_below_k_are_recomputed_to_full_depth() -> None:
    x = clustered_features(2000, 24, seed=24)
    ids = shuffled_ids(2000, seed=24)
    depth = list_depth(K, 2000)
    rng = np.random.default_rng(25)
    live = np.ones(2000, dtype=bool)
    lists = knn_all(x, ids, depth)
    recomputed = 0
    for _ in range(4):
        gone = ids[rng.choice(np.flatnonzero(live), live.sum() // 10, replace=False)]
        live &= ~np.isin(ids, gone)
        # What each row keeps of its list: its depth less the neighbours removed now.
        left = list_depths(lists) - np.isin(lists.neighbour_ids, gone).sum(axis=1)
        short = lists.image_ids[(left < K) & ~np.isin(lists.image_ids, gone)]
        timings: dict[str, float] = {}
        lists = update(lists, x[live], ids[live], [], gone, depth=depth, timings=timings)
        full = knn_all(x[live], ids[live], depth)
        assert_exact_to_depth(lists, full)
        assert_identical(prefix_lists(lists, K), prefix_lists(full, K))
        depths = list_depths(lists)
        assert np.all(depths[np.isin(lists.image_ids, short)] == depth)  # back to full depth
        assert depths.min() >= K
        assert short.size <= timings.get("refilled_rows", 0)  # by rows, not a full pass
        recomputed += short.size
    assert recomputed > 0  # the reserve ran out for some rows


def test_depth_none_equals_the_first_k_of_a_deep_update() -> None:
    x = clustered_features(1500, 24, seed=26)
    ids = shuffled_ids(1500, seed=26)
    old = np.arange(1500) < 1425
    depth = list_depth(K, 1500)
    rng = np.random.default_rng(27)
    gone = ids[rng.choice(1425, 15, replace=False)]
    live = ~old | (old & ~np.isin(ids, gone))
    moved = rng.choice(np.flatnonzero(old & live), 3, replace=False)
    current = x.copy()
    current[moved] += np.float32(0.05)
    changed = ids[np.concatenate([np.flatnonzero(~old), moved])]
    args = (current[live], ids[live], changed, gone)
    plain = update(knn_all(x[old], ids[old], K), *args)
    deep = update(knn_all(x[old], ids[old], depth), *args, depth=depth)
    assert plain.neighbour_ids.shape[1] == K
    assert_identical(plain, prefix_lists(deep, K))
    assert_identical(plain, knn_all(current[live], ids[live], K))


def test_numpy_and_numba_give_identical_deep_updates(removal: Removal) -> None:
    x, ids = removal.x[removal.keep], removal.ids[removal.keep]
    plain = update(removal.deep, x, ids, [], removal.gone, depth=removal.depth, backend="numpy")
    compiled = update(removal.deep, x, ids, [], removal.gone, depth=removal.depth, backend="numba")
    assert_identical(compiled, plain)
    assert_identical(compiled, removal.updated)


def test_cosine_deep_update_is_exact() -> None:
    x = near_ties(1200, 24, seed=6) + 0.5
    ids = shuffled_ids(1200, seed=6)
    depth = list_depth(K, 1200)
    keep = np.random.default_rng(28).random(1200) > 0.1
    deep = knn_all(x, ids, depth, metric="cosine")
    result = update(deep, x[keep], ids[keep], [], ids[~keep], depth=depth, metric="cosine")
    assert_exact_to_depth(result, knn_all(x[keep], ids[keep], depth, metric="cosine"))
    assert_identical(prefix_lists(result, K), knn_all(x[keep], ids[keep], K, metric="cosine"))


def test_small_collections_take_every_other_image() -> None:
    x = random_features(12, 8, seed=29)
    ids = shuffled_ids(12, seed=29)
    deep = knn_all(x[:6], ids[:6], list_depth(K, 6))  # lists of 5: every other image
    result = update(deep, x[1:], ids[1:], ids[6:], ids[:1], depth=list_depth(K, 11))
    assert result.neighbour_ids.shape == (11, 10)
    assert_identical(result, knn_all(x[1:], ids[1:], 10))


def test_prefix_lists_refuses_rows_too_short() -> None:
    x = random_features(200, 8, seed=30)
    ids = shuffled_ids(200, seed=30)
    deep = knn_all(x, ids, 12)
    assert_identical(prefix_lists(deep, 12), deep)
    with pytest.raises(KnnInputError, match="first 13 entries of lists of 12"):
        prefix_lists(deep, 13)
    ragged = NeighbourLists(deep.image_ids, deep.neighbour_ids.copy(), deep.distances.copy())
    ragged.neighbour_ids[7, 9:] = -1
    ragged.distances[7, 9:] = np.inf
    assert list_depths(ragged)[7] == 9
    assert prefix_lists(ragged, 9).neighbour_ids.shape == (200, 9)
    with pytest.raises(KnnInputError, match=f"image {int(deep.image_ids[7])} holds fewer than 10"):
        prefix_lists(ragged, 10)


def test_ragged_previous_lists_are_checked_and_short_rows_recomputed() -> None:
    x = random_features(300, 8, seed=31)
    ids = shuffled_ids(300, seed=31)
    deep = knn_all(x, ids, 16)
    ragged = NeighbourLists(deep.image_ids, deep.neighbour_ids.copy(), deep.distances.copy())
    ragged.neighbour_ids[:40, 5:] = -1  # 40 rows of depth 5, below k = 8
    ragged.distances[:40, 5:] = np.inf
    timings: dict[str, float] = {}
    result = knn_update(
        ragged, x, ids, changed_ids=ids[:0], deleted_ids=ids[:0], k=8, depth=16, timings=timings
    )
    assert_identical(result, deep)  # the short rows were recomputed to the full depth
    assert timings["refilled_rows"] == 40
    kk_wide = knn_update(ragged, x, ids, changed_ids=ids[:0], deleted_ids=ids[:0], k=8)
    assert_identical(kk_wide, prefix_lists(deep, 8))
    ragged.neighbour_ids[50, 3] = -1  # padding before a neighbour
    ragged.distances[50, 3] = np.inf
    with pytest.raises(KnnInputError, match="a neighbour follows padding"):
        knn_update(ragged, x, ids, changed_ids=ids[:0], deleted_ids=ids[:0], k=8, depth=16)
    with pytest.raises(KnnInputError, match="depth must be at least k=8"):
        knn_update(deep, x, ids, changed_ids=ids[:0], deleted_ids=ids[:0], k=8, depth=7)
