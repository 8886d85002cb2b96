"""The compiled (numba) tile selection and re-rank: the same lists as the numpy path."""

from __future__ import annotations

import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest

from lookalike.tasks.knn import knn_all, knn_row_block, knn_update
from lookalike.tasks.knn.compiled import CompiledTiles, compiled_kernels
from lookalike.tasks.knn.passes import NeighbourLists
from lookalike.tasks.knn.tiles import CandidateLists
from tests.test_knn_passes import (
    brute_force,
    clustered_features,
    duplicate_features,
    shuffled_ids,
)

kernels = compiled_kernels()


def assert_identical(compiled: NeighbourLists, plain: NeighbourLists) -> None:
    """Bit for bit: ids, neighbours and distances."""
    np.testing.assert_array_equal(compiled.image_ids, plain.image_ids)
    np.testing.assert_array_equal(compiled.neighbour_ids, plain.neighbour_ids)
    np.testing.assert_array_equal(compiled.distances, plain.distances)


def near_ties(n: int, d: int, seed: int = 3) -> np.ndarray:
    """Exact and near duplicates (a few ulps apart) among clustered rows."""
    x = clustered_features(n, d, seed=seed)
    x[1::7] = x[::7][: len(x[1::7])]  # exact copies
    x[2::7] = np.nextafter(x[::7][: len(x[2::7])], np.float32(np.inf))  # one ulp apart
    return x


@pytest.mark.parametrize(
    ("features", "metric", "block_rows"),
    [
        (clustered_features(700, 48, seed=1), "euclidean", None),
        (clustered_features(700, 48, seed=2), "euclidean", 96),  # many tiles, fresh columns
        (near_ties(600, 32), "euclidean", 128),
        (duplicate_features(40, 6, 16), "euclidean", 64),
        (clustered_features(500, 40, seed=4) + 3.0, "cosine", 100),
    ],
)
def test_compiled_and_numpy_passes_give_identical_lists(
    features: np.ndarray, metric: str, block_rows: int | None
) -> None:
    ids = shuffled_ids(len(features))
    options = dict(metric=metric, block_rows=block_rows)
    compiled = knn_all(features, ids, 12, backend="numba", **options)
    assert_identical(compiled, knn_all(features, ids, 12, backend="numpy", **options))
    expected = brute_force(features, ids, 12, metric)
    np.testing.assert_array_equal(compiled.neighbour_ids, expected.neighbour_ids)


def test_compiled_row_blocks_and_updates_match_numpy() -> None:
    x = near_ties(500, 24, seed=5)
    ids = shuffled_ids(500)
    rows = slice(100, 260)
    assert_identical(
        knn_row_block(x, ids, rows, 9, backend="numba", block_rows=64),
        knn_row_block(x, ids, rows, 9, backend="numpy", block_rows=64),
    )
    previous = knn_all(x[:480], ids[:480], 9, backend="numpy")
    change = dict(changed_ids=ids[480:], deleted_ids=ids[:0], k=9, block_rows=64)
    assert_identical(
        knn_update(previous, x, ids, backend="numba", **change),
        knn_update(previous, x, ids, backend="numpy", **change),
    )


@pytest.mark.parametrize("count", [2, 3, 9, 216, 1000])
def test_kth_smallest_is_np_partition(count: int) -> None:
    rng = np.random.default_rng(count)
    many_equal = rng.integers(0, 7, count).astype(np.float32)
    signed = rng.standard_normal(count).astype(np.float32)  # expanded distances can be < 0
    signed[::5] = np.inf
    ordered = np.sort(signed)  # sorted input: the worst case of a naive pivot
    signed_zeros = np.where(many_equal == 0, np.float32(-0.0), many_equal - 3)
    for values in (many_equal, signed, ordered, ordered[::-1].copy(), signed_zeros):
        for kth in {0, 1 % count, count // 2, count - 1}:
            scratch = np.append(values, np.float32(-1.0))  # entries past count do not count
            assert kernels.kth_smallest(scratch, count, kth) == np.partition(values, kth)[kth]


def test_compiled_final_cut_keeps_the_same_candidates_as_numpy() -> None:
    rng = np.random.default_rng(4)
    width = 10
    lists = {name: CandidateLists(300, width) for name in ("numba", "numpy")}
    fill = rng.integers(0, 2 * width + 1, 300)
    values = rng.integers(0, 40, (300, 2 * width)).astype(np.float32)  # ties at the cut
    for candidates in lists.values():
        for slot in range(300):
            candidates.values[slot, : fill[slot]] = values[slot, : fill[slot]]
            candidates.sources[slot, : fill[slot]] = np.arange(fill[slot]) + slot
        candidates.fill[:] = fill
    compiled = lists["numba"].best(kernels)
    plain = lists["numpy"].best()
    for got, expected in zip(compiled, plain, strict=True):
        np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(lists["numba"].limits, lists["numpy"].limits)
    assert np.isfinite(lists["numba"].limits[fill > width]).all()


def test_unique_pair_keys_is_sorting_the_keys() -> None:
    rng = np.random.default_rng(6)
    n = 500
    rows = np.repeat(np.arange(n), 30)
    others = (rows + rng.integers(1, 40, len(rows))) % n  # many pairs listed from both rows
    low, high = np.minimum(rows, others), np.maximum(rows, others)
    unique, inverse = kernels.unique_pair_keys(low, high, n)
    expected, expected_inverse = np.unique(low * n + high, return_inverse=True)
    assert len(unique) < len(low)
    np.testing.assert_array_equal(unique, expected)
    np.testing.assert_array_equal(inverse, expected_inverse)


def test_compiled_pair_distances_are_within_the_bound_of_the_exact_sums() -> None:
    rng = np.random.default_rng(7)
    d = 301  # not a multiple of any vector width
    x = rng.standard_normal((40, d)).astype(np.float32) * 100
    x[3] = np.nextafter(x[2], np.float32(np.inf))  # a near-duplicate pair: cancellation
    low, high = np.array([0, 2, 5, 9]), np.array([1, 3, 30, 39])
    out = np.empty(4, dtype=np.float64)
    kernels.pair_sq_distances(x, np.empty(0, np.float32), low, high, np.arange(4), out)
    for p in range(4):  # float32 differences are exact in Fraction
        pairs = zip(x[low[p]], x[high[p]], strict=True)
        exact = sum((Fraction(float(a)) - Fraction(float(b))) ** 2 for a, b in pairs)
        assert abs(Fraction(out[p]) - exact) <= (d + 2) * Fraction(2) ** -53 * exact


@pytest.mark.parametrize("segmented", [False, True])
def test_a_scanned_tile_keeps_each_side_best_and_limits_bound_the_dropped(segmented: bool) -> None:
    rng = np.random.default_rng(8)
    tile = rng.random((300, 500), dtype=np.float32)
    tile[5, 7] = np.inf  # an image against itself never counts
    width = 20
    lists = CandidateLists(800, width)
    lists.limits[300 + 250 :] = -np.inf  # these columns take nothing
    rows, cols = np.arange(300), np.arange(300, 800)  # slots, which are the positions too
    assert len(list(lists.segments(cols))) > 1  # the columns' side runs under several locks
    tiles = CompiledTiles()
    tiles.segmented = segmented  # one pass under one lock, or both sides in segments
    tiles.scan(tile, (lists, rows), (lists, cols), (rows, cols))
    values, sources = lists.best()
    np.testing.assert_array_equal(np.sort(values[:300], axis=1), np.sort(tile, axis=1)[:, :width])
    np.testing.assert_array_equal(
        np.sort(values[300:550], axis=1), np.sort(tile[:, :250].T, axis=1)[:, :width]
    )
    assert (lists.fill[550:] == 0).all()
    taken = np.take_along_axis(tile, sources[:300] - 300, axis=1)
    np.testing.assert_array_equal(taken, values[:300])
    for row in range(300):  # everything not kept is at or above the row's limit
        dropped = np.setdiff1d(np.arange(500), sources[row] - 300)
        assert (tile[row, dropped] >= lists.limits[row]).all()


def test_without_numba_the_numpy_path_runs_and_numba_is_refused_clearly() -> None:
    script = """
import sys
sys.modules["numba"] = None  # as if numba were not installed
import numpy as np
from lookalike.tasks.knn import knn_all
from lookalike.tasks.knn.space import KnnInputError
x = np.random.default_rng(0).standard_normal((50, 8), dtype=np.float32)
lists = knn_all(x, np.arange(50), 5)
print(lists.neighbour_ids.shape, "numba" in sys.modules and sys.modules["numba"] is not None)
try:
    knn_all(x, np.arange(50), 5, backend="numba")
except KnnInputError as exc:
    print(exc)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "(50, 5) False",
        "the numba kNN backend needs numba: pip install numba",
    ]


def test_compiled_stable_order_is_numpy_s() -> None:
    keys = np.random.default_rng(9).integers(0, 300, 4000)  # equal keys: stability decides
    np.testing.assert_array_equal(kernels.stable_order(keys, 300), np.argsort(keys, kind="stable"))


@pytest.mark.parametrize("segmented", [False, True])
def test_columns_without_limits_keep_their_best_through_many_cut_backs(segmented: bool) -> None:
    rng = np.random.default_rng(12)
    tile = rng.random((1200, 900), dtype=np.float32)  # every entry passes its column first
    width = 30
    lists = CandidateLists(2100, width)
    lists.fill[1200:] = 1  # not fresh: no limit from the tile, every entry is appended
    lists.values[1200:, 0] = 2.0  # and one entry each, worse than any in the tile
    lists.sources[1200:, 0] = 0
    rows, cols = np.arange(1200), np.arange(1200, 2100)
    assert tile.size > 30 * 32768  # one pass: the held entries are appended in many batches
    tiles = CompiledTiles()
    tiles.segmented = segmented
    tiles.scan(tile, (lists, rows), (lists, cols), (rows, cols))
    values, sources = lists.best()
    np.testing.assert_array_equal(
        np.sort(values[1200:], axis=1), np.sort(tile.T, axis=1)[:, :width]
    )
    taken = tile.T[np.arange(900)[:, None], sources[1200:]]
    np.testing.assert_array_equal(taken, values[1200:])


def listed_features(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Clustered rows (8 clusters of 50) with near-duplicates, and lists of candidates:
    most of each row's cluster, now and then a row of another cluster, -1 padding."""
    rng = np.random.default_rng(seed)
    x = clustered_features(400, 48, seed=seed)[np.argsort(np.arange(400) % 8, kind="stable")]
    x[51] = x[50]  # an exact duplicate: never from the float64 products
    x[53] = np.nextafter(x[52], np.float32(np.inf))  # one ulp apart
    positions = np.flatnonzero(rng.random(400) < 0.9)  # some rows have no list
    cluster = positions // 50
    inside = cluster[:, None] * 50 + rng.permuted(
        np.tile(np.arange(50), (len(positions), 1)), axis=1
    )
    outside = rng.integers(0, 400, (len(positions), 1))
    outside[rng.random(len(positions)) < 0.7] = -1  # some rows list one row of another cluster
    sources = np.concatenate([inside[:, :44], outside], axis=1)
    sources[sources == positions[:, None]] = -1  # a row never lists itself
    sources[rng.random(sources.shape) < 0.05] = -1
    return x, positions, sources


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_compiled_direct_distances_are_numpy_s(metric: str) -> None:
    from lookalike.tasks.knn.rerank import direct_distances
    from lookalike.tasks.knn.space import PairMemo, prepare_space

    x, positions, sources = listed_features(seed=13)
    space = prepare_space(x, np.arange(400), metric, None)
    plain = direct_distances(space, positions, sources)
    space.kernels = kernels
    groups = kernels.list_groups(positions, sources, 400, 8, 512, 0.25, 8192)
    assert len(groups[1]) > 2  # several groups: the float64 products ran
    assert 0 < groups[2].sum() < len(groups[0])  # rows without a list are in groups too
    np.testing.assert_array_equal(direct_distances(space, positions, sources), plain)
    space.pair_memo = PairMemo()  # the memo's path: unique pairs, groups of pairs
    np.testing.assert_array_equal(direct_distances(space, positions, sources), plain)
    assert len(space.pair_memo.keys) < np.count_nonzero(sources >= 0)  # mutual pairs once


def test_compiled_group_plan_is_numpy_s() -> None:
    from lookalike.tasks.knn.rerank import _group_plan
    from lookalike.tasks.knn.space import prepare_space

    x, positions, sources = listed_features(seed=14)
    valid = sources >= 0
    rows = np.broadcast_to(positions[:, None], sources.shape)[valid]
    low, high = np.minimum(rows, sources[valid]), np.maximum(rows, sources[valid])
    keys = np.unique(low * 400 + high)
    low, high = keys // 400, keys % 400
    space = prepare_space(x, np.arange(400), "euclidean", None)
    plain = _group_plan(space, low, high)
    space.kernels = kernels
    compiled = _group_plan(space, low, high)
    assert plain is not None and compiled is not None
    members, bounds, place, chosen, pair_bounds = plain
    for got, expected in zip(compiled, plain, strict=True):
        if got is compiled[2]:  # place: defined for members only
            got, expected = got[members], expected[members]
        np.testing.assert_array_equal(got, expected)
    assert len(bounds) == len(pair_bounds) > 2


@pytest.mark.parametrize("settled_share", [None, 0.6])
def test_compiled_list_order_and_near_ties_are_numpy_s(
    settled_share: float | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lookalike.tasks.knn import rerank
    from lookalike.tasks.knn.space import prepare_space

    rng = np.random.default_rng(15)
    space = prepare_space(
        rng.standard_normal((300, 8)).astype(np.float32), rng.permutation(300), "euclidean", None
    )
    sources = rng.integers(0, 300, (300, 40))
    sources[rng.random(sources.shape) < 0.1] = -1
    distances = rng.integers(1, 60, sources.shape).astype(np.float32) / 7  # many exact ties
    distances[::3, ::4] = np.nextafter(distances[::3, ::4], np.float32(np.inf))  # near-ties
    distances[5, :10] = 0.0  # zeros are never near-ties
    distances[6, 3] = -0.0
    distances[sources < 0] = np.inf
    settled = None if settled_share is None else rng.random(sources.shape) < settled_share
    window = rerank.near_tie_window(space) * 1e6  # wide: chains of many entries
    order = rerank._list_order(space, sources, distances)
    ordered = np.take_along_axis(distances, order, axis=1)
    marks = None if settled is None else np.take_along_axis(settled, order, axis=1)
    tie_rows, tie_cols = rerank._near_tie_entries(ordered, 25, window, marks)
    monkeypatch.setattr(rerank, "near_tie_window", lambda space: window)
    space.kernels = kernels
    got = rerank._packed_order(space, sources, distances, 25, settled)
    assert got is not None
    real = sources >= 0
    np.testing.assert_array_equal(got[1], ordered)
    np.testing.assert_array_equal(  # the same entries in each place (padding: any order)
        np.take_along_axis(np.where(real, sources, -1), got[0], axis=1),
        np.take_along_axis(np.where(real, sources, -1), order, axis=1),
    )
    assert len(tie_rows) > 100
    np.testing.assert_array_equal(got[2], tie_rows * 40 + tie_cols)


def test_passes_and_updates_scanned_in_segments_give_the_numpy_lists(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from lookalike.tasks.knn import compiled

    monkeypatch.setattr(compiled, "_ONE_LOCK_WORKERS", 0)  # as on a machine of many cores
    assert compiled.CompiledTiles().segmented
    x = near_ties(700, 24, seed=16)
    ids = shuffled_ids(700)
    options = dict(block_rows=96)  # many tiles, lists split over several locks
    assert_identical(
        knn_all(x, ids, 12, backend="numba", **options),
        knn_all(x, ids, 12, backend="numpy", **options),
    )
    previous = knn_all(x[:680], ids[:680], 12, backend="numpy")
    change = dict(changed_ids=ids[680:], deleted_ids=ids[:0], k=12, block_rows=96)
    assert_identical(
        knn_update(previous, x, ids, backend="numba", **change),
        knn_update(previous, x, ids, backend="numpy", **change),
    )
