"""The kNN engine's feature space: the norm pass and the cache of right-hand rows."""

from __future__ import annotations

import mmap
import resource

import numpy as np
import pytest

from lookalike.tasks.knn.space import (
    _CENTRE_SAMPLE_ROWS,
    NonFiniteFeaturesError,
    PairMemo,
    ZeroFeatureVectorError,
    cache_right_rows,
    fresh_array,
    prepare_space,
)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_right_rows_kept_by_the_norm_pass_equal_those_built_later(metric: str) -> None:
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((5000, 48)) * rng.uniform(0.1, 10, (5000, 1)) + 3).astype(np.float32)
    ids = np.arange(5000, dtype=np.int64)
    kept = prepare_space(x, ids, metric, None, keep_right=True)
    plain = prepare_space(x, ids, metric, None)
    assert kept.right_rows is not None and plain.right_rows is None
    np.testing.assert_array_equal(kept.sq, plain.sq)
    built = plain.right(np.arange(5000))  # built row by row, as without a cache
    assert np.array_equal(kept.right_rows, built)
    cache_right_rows(plain)  # the separate pass gives the same matrix
    assert np.array_equal(plain.right_rows, kept.right_rows)


def test_pair_memo_finds_what_was_added_and_nothing_else() -> None:
    memo = PairMemo()
    values, found = memo.lookup(np.array([5, 9], dtype=np.int64))
    assert not found.any()
    memo.add(np.array([9, 2], dtype=np.int64), np.array([0.5, 1.5], dtype=np.float32))
    memo.add(np.array([7], dtype=np.int64), np.array([2.5], dtype=np.float32))
    values, found = memo.lookup(np.array([2, 3, 7, 9, 10], dtype=np.int64))
    assert found.tolist() == [True, False, True, True, False]
    assert values[found].tolist() == [1.5, 2.5, 0.5]


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, 1e30])
def test_a_bad_vector_outside_the_centre_sample_is_named(metric: str, bad: float) -> None:
    n = 3 * _CENTRE_SAMPLE_ROWS
    x = np.random.default_rng(2).standard_normal((n, 4)).astype(np.float32)
    sampled = np.unique(np.linspace(0, n - 1, _CENTRE_SAMPLE_ROWS).astype(np.int64))
    row = int(np.setdiff1d(np.arange(n), sampled)[1234])
    x[row] = bad
    ids = np.arange(n, dtype=np.int64) + 10
    if metric == "cosine" and np.isfinite(bad):  # huge is fine at unit length
        assert np.isfinite(prepare_space(x, ids, metric, None).sq).all()
        x[sampled[5]] = bad  # inside the sample too
        assert np.isfinite(prepare_space(x, ids, metric, None).sq).all()
        return
    with pytest.raises(
        NonFiniteFeaturesError,
        match=f"image {row + 10} " + ("is too large" if np.isfinite(bad) else "holds NaN"),
    ):
        prepare_space(x, ids, metric, None)


def test_a_zero_vector_outside_the_centre_sample_is_refused_for_cosine() -> None:
    n = 2 * _CENTRE_SAMPLE_ROWS
    x = np.random.default_rng(4).standard_normal((n, 4)).astype(np.float32)
    x[1] = 0.0  # row 1 is not sampled: the sample takes every second row or so
    with pytest.raises(ZeroFeatureVectorError, match="image 1 "):
        prepare_space(x, np.arange(n, dtype=np.int64), "cosine", None)
    prepare_space(x, np.arange(n, dtype=np.int64), "euclidean", None)  # fine for euclidean


@pytest.mark.parametrize(("shape", "dtype"), [((3, 5), np.float32), ((4096, 2050), np.int32)])
def test_fresh_arrays_are_writable_and_the_large_ones_mapped_in(
    shape: tuple[int, int], dtype: type
) -> None:
    array = fresh_array(shape, dtype)
    assert array.shape == shape
    assert array.dtype == dtype
    assert array.flags.c_contiguous and array.flags.writeable
    array[...] = np.arange(array.size, dtype=dtype).reshape(shape)
    assert int(array[-1, -1]) == array.size - 1
    owner: object = array
    while isinstance(owner, np.ndarray | memoryview):  # the chain down to the memory
        owner = owner.base if isinstance(owner, np.ndarray) else owner.obj
    large = array.nbytes >= 32 << 20
    assert isinstance(owner, mmap.mmap) == large  # small ones come from np.empty


@pytest.mark.parametrize("populate", [True, False])
def test_a_large_fresh_array_is_mapped_in_up_front_unless_asked_not_to(populate: bool) -> None:
    def faults() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    pages = (64 << 20) // mmap.PAGESIZE
    before = faults()
    array = fresh_array((64 << 20) // 4, np.float32, populate=populate)
    mapped = faults() - before
    array[::1024] = 1.0  # one write per page: the pages not yet mapped in come now
    touched = faults() - before - mapped
    if populate:
        assert mapped >= 0.9 * pages and touched < 0.1 * pages
    else:
        assert mapped < 0.1 * pages and touched >= 0.9 * pages
