"""An update's compiled parts (rows centred and measured, kept lists read back and merged)
against the numpy path: the same lists, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

from lookalike.tasks.knn import incremental, knn_all, knn_update
from lookalike.tasks.knn.compiled import compiled_kernels
from lookalike.tasks.knn.passes import NeighbourLists
from lookalike.tasks.knn.space import (
    _CENTRE_SAMPLE_ROWS,
    NonFiniteFeaturesError,
    prepare_space,
)
from tests.test_knn_compiled import assert_identical, near_ties
from tests.test_knn_passes import brute_force, clustered_features, duplicate_features, shuffled_ids

kernels = compiled_kernels()


def both_updates(
    previous: NeighbourLists, x: np.ndarray, ids: np.ndarray, **change: object
) -> tuple[NeighbourLists, NeighbourLists]:
    compiled = knn_update(previous, x, ids, backend="numba", **change)  # type: ignore[arg-type]
    plain = knn_update(previous, x, ids, backend="numpy", **change)  # type: ignore[arg-type]
    return compiled, plain


def test_fresh_near_duplicates_take_the_float64_merge_and_match_numpy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    x = near_ties(600, 24, seed=21)  # the new rows copy kept rows, or sit an ulp from them
    ids = shuffled_ids(600)
    previous = knn_all(x[:560], ids[:560], 10, backend="numpy")
    merged_rows = []
    original = incremental._merged_rows

    def counting(*args: object) -> object:
        merged_rows.append(len(args[1]))  # type: ignore[arg-type]
        return original(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(incremental, "_merged_rows", counting)
    compiled, plain = both_updates(
        previous, x, ids, changed_ids=ids[560:], deleted_ids=ids[:0], k=10, block_rows=64
    )
    assert_identical(compiled, plain)
    np.testing.assert_array_equal(compiled.neighbour_ids, brute_force(x, ids, 10).neighbour_ids)
    # The numpy run merges every touched row there; the compiled one only the doubtful few.
    compiled_share, plain_share = merged_rows[0], merged_rows[-1]
    assert 0 < compiled_share < plain_share


@pytest.mark.parametrize("spread", [3, 1000])  # ids dense enough for a table, or not
def test_adds_deletes_and_changes_together_match_numpy(spread: int) -> None:
    x = duplicate_features(70, 6, 16, seed=22)  # ties everywhere
    ids = np.random.default_rng(1).permutation(np.arange(420) * spread + 5).astype(np.int64)
    previous = knn_all(x[:380], ids[:380], 8, backend="numpy")
    gone = ids[:380][::19]
    current = x.copy()
    current[[4, 9]] = current[[200, 201]]  # changed into duplicates of others
    keep = ~np.isin(ids, gone)
    changed = np.concatenate([ids[[4, 9]], ids[380:]])
    change = dict(changed_ids=changed, deleted_ids=gone, k=8, block_rows=64)
    compiled, plain = both_updates(previous, current[keep], ids[keep], **change)
    assert_identical(compiled, plain)


def test_deep_and_cosine_updates_match_numpy() -> None:
    x = clustered_features(500, 32, seed=23) + 2.0
    ids = shuffled_ids(500, seed=3)
    for metric, depth in (("euclidean", 20), ("cosine", None)):
        previous = knn_all(x[:470], ids[:470], 20 if depth else 10, metric=metric)
        gone = ids[:470][::37]
        keep = ~np.isin(ids, gone)
        change = dict(changed_ids=ids[470:], deleted_ids=gone, k=10, depth=depth, metric=metric)
        compiled, plain = both_updates(previous, x[keep], ids[keep], **change)
        assert_identical(compiled, plain)


def merge(known: tuple, fresh: np.ndarray, fresh_distances: np.ndarray, touched_of: list[int]):  # type: ignore[no-untyped-def]
    """merge_kept_rows over all rows of `known`, written to rows in reverse order."""
    rows = len(known[0])
    out_rows = np.arange(rows)[::-1].copy()
    out = (out_rows, np.zeros((rows, 4), np.int64), np.zeros((rows, 4), np.float32))
    used = np.full(rows, -7, dtype=np.int64)
    doubtful = np.zeros(len(fresh), dtype=bool)
    ranks = np.arange(20, dtype=np.int64)
    touched = np.asarray(touched_of, dtype=np.int64)
    kernels.merge_kept_rows(
        known, touched, fresh, fresh_distances, ranks, 1e-6, (0, rows), (*out, used), doubtful
    )
    return out[1][out_rows], out[2][out_rows], used, doubtful


def test_the_merge_kernel_inserts_orders_cuts_and_leaves_doubtful_rows_alone() -> None:
    row = [5, 6, 7, -1]
    distances = np.float32([1.0, 2.0, 3.0, np.inf])
    known = (
        np.array([row] * 5, dtype=np.int64),
        np.array([distances] * 5),
        np.zeros((5, 4), dtype=bool),
        np.array([4, 4, 2, 4, 3]),
    )
    known[2][3, 1] = True  # row 3 holds a loose entry
    fresh = np.array([[9, 3, -1], [9, -1, -1], [8, -1, -1], [4, -1, -1]], dtype=np.int64)
    tie = np.nextafter(np.float32(2.0), np.float32(3.0))
    fresh_distances = np.float32([[2.5, 0.5, np.inf], [tie, np.inf, np.inf], [0.1] * 3, [9] * 3])
    neighbours, out_distances, used, doubtful = merge(
        known, fresh, fresh_distances, [0, 1, -1, 2, 3]
    )
    # row 0: 3 (0.5) and 9 (2.5) join; cut to width 4, so 7 falls out
    assert neighbours[0].tolist() == [3, 5, 6, 9]
    assert out_distances[0].tolist() == [0.5, 1.0, 2.0, 2.5]
    assert used[0] == 2
    # row 1: 9 is a near-tie of 6: left to the float64 merge (not written, used untouched)
    assert doubtful.tolist() == [False, True, True, False]
    assert used[1] == -7 and neighbours[1].tolist() == [0, 0, 0, 0]
    # row 2 takes nothing: copied as it is, to its depth of 2
    assert neighbours[2].tolist() == [5, 6, -1, -1]
    assert out_distances[2].tolist() == [1.0, 2.0, np.inf, np.inf]
    # row 3 (loose) is doubtful; row 4 takes 4 at 9.0 past its depth of 3
    assert neighbours[4].tolist() == [5, 6, 7, -1] and used[4] == 3


def test_kept_lists_read_back_in_one_pass_as_numpy_reads_them() -> None:
    rng = np.random.default_rng(24)
    before = rng.permutation(np.arange(300) * 2 + 11)
    neighbour_ids = rng.choice(before, (300, 12))
    distances = np.sort(rng.uniform(0, 5, (300, 12)), axis=1)
    short = rng.random(300) < 0.2  # ragged rows end in padding
    neighbour_ids[short, 9:] = -1
    distances[short, 9:] = np.inf
    neighbour_ids[3, 2] = -1  # a real entry whose image is -1 would be padding only at inf
    previous = NeighbourLists(np.sort(before), neighbour_ids, distances)
    gone = before[::13]
    ids = np.concatenate([np.setdiff1d(before, gone), [10_001, 10_003]])
    is_changed = np.isin(ids, np.concatenate([before[5::29], [10_001, 10_003]]))
    kept = np.flatnonzero(~is_changed)
    rows = incremental.positions_of(previous.image_ids, ids[kept])
    compiled = incremental._read_known(previous, ids, is_changed, rows, kernels)
    plain = incremental._read_known(previous, ids, is_changed, rows, None)
    for a, b in zip(compiled, plain, strict=True):
        np.testing.assert_array_equal(a, b)
    assert plain[2].sum() < (neighbour_ids[rows] >= 0).sum()  # some entries were dropped


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_compiled_rows_are_centred_measured_and_built_as_numpy_builds_them(metric: str) -> None:
    rng = np.random.default_rng(25)
    x = (rng.standard_normal((5000, 40)) * rng.uniform(0.1, 10, (5000, 1)) + 3).astype(np.float32)
    ids = np.arange(5000, dtype=np.int64)
    compiled = prepare_space(x, ids, metric, None, keep_right=True, kernels=kernels)
    plain = prepare_space(x, ids, metric, None, keep_right=True)
    np.testing.assert_allclose(compiled.centre, plain.centre, rtol=1e-5, atol=1e-6)
    if metric == "euclidean":  # float64 sums rounded once: within an ulp or two of einsum's
        np.testing.assert_allclose(compiled.sq, plain.sq, rtol=3e-7)
    kept_rows = compiled.right_rows
    assert kept_rows is not None
    compiled.right_rows = None  # built again, block by block, into a worker's buffer
    compiled.kernels = kernels
    buffer = np.full((700, 42), np.nan, dtype=np.float32)
    for start in range(0, 5000, 700):
        built = compiled.right(slice(start, start + 700), buffer)
        rows = min(700, 5000 - start)
        np.testing.assert_array_equal(built[:rows], kept_rows[start : start + rows])
    compiled.kernels = None  # numpy's right() of the same space: the same matrix
    np.testing.assert_array_equal(compiled.right(np.arange(5000)), kept_rows)


@pytest.mark.parametrize("inside_sample", [False, True])
@pytest.mark.parametrize("bad", [np.nan, np.inf, 1e30])
def test_compiled_norm_pass_names_the_bad_vector(bad: float, inside_sample: bool) -> None:
    n = 3 * _CENTRE_SAMPLE_ROWS
    x = np.random.default_rng(26).standard_normal((n, 4)).astype(np.float32)
    sampled = np.unique(np.linspace(0, n - 1, _CENTRE_SAMPLE_ROWS).astype(np.int64))
    row = int(sampled[77] if inside_sample else np.setdiff1d(np.arange(n), sampled)[999])
    x[row] = bad
    message = "is too large" if np.isfinite(bad) else "holds NaN"
    with pytest.raises(NonFiniteFeaturesError, match=f"image {row + 10} {message}"):
        prepare_space(x, np.arange(n, dtype=np.int64) + 10, "euclidean", None, kernels=kernels)


def test_an_image_no_kept_list_takes_and_an_empty_change_keep_the_lists() -> None:
    x = np.random.default_rng(28).standard_normal((300, 16)).astype(np.float32)
    x[-1] += 1000.0  # the new image is far from every kept row: no kept row is touched
    ids = shuffled_ids(300, seed=5)
    previous = knn_all(x[:299], ids[:299], 5)
    compiled, plain = both_updates(
        previous, x, ids, changed_ids=ids[299:], deleted_ids=ids[:0], k=5
    )
    assert_identical(compiled, plain)
    assert_identical(compiled, knn_all(x, ids, 5, backend="numpy"))
    kept_rows = np.isin(compiled.image_ids, ids[:299])
    assert not np.isin(compiled.neighbour_ids[kept_rows], ids[299:]).any()
    unchanged = knn_update(
        previous, x[:299], ids[:299], changed_ids=ids[:0], deleted_ids=ids[:0], k=5
    )
    assert_identical(unchanged, previous)
