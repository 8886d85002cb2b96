"""Exact re-rank: grouped float64 products, float32 subtraction, lists ordered in parts."""

from __future__ import annotations

import numpy as np
import pytest

import lookalike.tasks.knn.rerank as rerank
from lookalike.tasks.knn.rerank import (
    _group_pair_sq_distances,
    _subtracted_pair_sq_distances,
    direct_distances,
    pair_sq_distances,
    sorted_list_columns,
)
from lookalike.tasks.knn.space import FeatureSpace, PairMemo, prepare_space


def grouped_pairs(clusters: int, size: int, d: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Clustered rows (cluster c holds rows c*size ...) and every pair inside each cluster."""
    rng = np.random.default_rng(11)
    centres = rng.standard_normal((clusters, d)) * 4
    x = (np.repeat(centres, size, axis=0) + rng.standard_normal((clusters * size, d))).astype(
        np.float32
    )
    i, j = np.triu_indices(size, 1)
    starts = np.arange(clusters)[:, None] * size
    return x, (starts + i).ravel(), (starts + j).ravel()


def space_of(x: np.ndarray) -> FeatureSpace:
    return prepare_space(x, np.arange(len(x), dtype=np.int64), "euclidean", None)


def test_pairs_inside_groups_come_from_float64_and_are_correctly_rounded() -> None:
    x, low, high = grouped_pairs(clusters=6, size=40, d=64)  # 6 x 780 pairs
    x[45] = x[41]  # an exact duplicate inside cluster 1: left to the subtraction
    out = np.full(len(low), np.nan, dtype=np.float32)
    rest = _group_pair_sq_distances(space_of(x), low, high, out)
    duplicate = np.flatnonzero((low == 41) & (high == 45))
    np.testing.assert_array_equal(rest, duplicate)
    done = np.ones(len(low), dtype=bool)
    done[rest] = False
    diff = x[low].astype(np.float64) - x[high]
    exact = np.einsum("ij,ij->i", diff, diff)
    # Correctly rounded: within half a float32 ulp of the float64 value.
    np.testing.assert_allclose(out[done], exact[done], rtol=2.0**-24, atol=0)


def test_near_duplicates_and_ungrouped_pairs_are_subtracted() -> None:
    x, low, high = grouped_pairs(clusters=6, size=40, d=64)
    x[45] = x[41]
    x[46] = x[42]
    x[46, 3] += np.float32(1e-3)  # a near-duplicate: the float64 expansion would lose digits
    space = space_of(x)
    out = np.full(len(low), np.nan, dtype=np.float32)
    rest = _group_pair_sq_distances(space, low, high, out)
    assert {(int(low[r]), int(high[r])) for r in rest} == {(41, 45), (42, 46)}
    values = pair_sq_distances(space, np.append(low, 45), np.append(high, 41))
    np.testing.assert_array_equal(
        values[rest], _subtracted_pair_sq_distances(space, low[rest], high[rest], False)
    )
    assert values[-1] == 0.0  # the duplicate, asked for as (45, 41)
    # Pairs with no group structure (random rows) all go to the subtraction.
    rng = np.random.default_rng(3)
    a, b = rng.integers(0, len(x), 6000), rng.integers(0, len(x), 6000)
    a, b = np.minimum(a, b)[a != b], np.maximum(a, b)[a != b]
    order = np.argsort(a, kind="stable")
    assert _group_pair_sq_distances(
        space, a[order], b[order], np.empty(len(a), np.float32)
    ).size == len(a)


def test_lists_ordered_in_parallel_parts_equal_one_part(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(9)
    x = rng.integers(0, 3, (5000, 8)).astype(np.float32)  # few distinct rows: many exact ties
    space = space_of(x)
    positions = np.arange(5000)
    sources = (positions[:, None] + rng.integers(1, 5000, (5000, 40))) % 5000
    distances = direct_distances(space, positions, sources)
    settled = rng.random(sources.shape) < 0.5
    results = {}
    for part_rows in (1000, 10**9):  # several parts (on every core), then one
        monkeypatch.setattr(rerank, "_SORT_PART_ROWS", part_rows)
        timings: dict[str, float] = {}
        columns, ordered = sorted_list_columns(
            space, positions, sources, distances, 30, timings, settled=settled
        )
        results[part_rows] = (columns, ordered, timings.get("near_tie_entries", 0))
    (columns, ordered, ties), (one_columns, one_ordered, one_ties) = results.values()
    np.testing.assert_array_equal(columns, one_columns)
    np.testing.assert_array_equal(ordered, one_ordered)
    assert ties == one_ties > 0  # the float64 near-tie path ran
    assert columns.shape == (5000, 30)
    assert np.all(np.diff(ordered, axis=1) >= 0)


def test_pairs_in_the_memo_are_not_measured_again() -> None:
    rng = np.random.default_rng(3)
    space = space_of(rng.standard_normal((50, 16)).astype(np.float32))
    a, b = np.array([1, 4, 30]), np.array([7, 2, 3])
    measured = rerank.pair_sq_distances(space, a, b)
    space.pair_memo = PairMemo()
    space.pair_memo.add(np.array([2 * 50 + 4]), np.array([-1.0]))  # pair (2, 4): a marker
    first = rerank.pair_sq_distances(space, a, b)
    assert first[1] == -1.0  # taken from the memo, not measured
    np.testing.assert_array_equal(first[[0, 2]], measured[[0, 2]])
    assert sorted(space.pair_memo.keys.tolist()) == [1 * 50 + 7, 2 * 50 + 4, 3 * 50 + 30]
    again = rerank.pair_sq_distances(space, b, a)  # the same pairs, either way round
    np.testing.assert_array_equal(again, first)
