"""Nearest stored images of outside vectors (uploads), ranked exactly as the stored lists are.

A query space is prepared once (checked, centred rows and their augmented copy); each query
then costs one matrix-vector product over it plus a re-rank of a few candidates. The
candidates, their proof and the re-rank are those of the passes (knn_all, knn_row_block):
the kk + margin best expanded distances, the plausible filter, direct float32 distances with
near-ties recomputed in float64, ties by image id, and an exhaustive redo of a list that
cannot be proven complete. Direct distances are measured by the engine's own functions on a
small space of the query and its candidates, so a pair gets the same float32 value here as
in a pass that measures it by subtraction.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lookalike.tasks.knn.passes import candidate_width
from lookalike.tasks.knn.rerank import plausible_sources, proven_rows, rerank_rows, sq_reach
from lookalike.tasks.knn.space import (
    FeatureSpace,
    KnnInputError,
    NonFiniteFeaturesError,
    Timings,
    ZeroFeatureVectorError,
    _inverse_norms,
    check_k_and_metric,
    checked_ids,
    prepare_space,
    timed,
)

_RIGHT_CHUNK_ROWS = 4096
_QUERY = np.zeros(1, dtype=np.int64)  # the query is row 0 of its small pair space


@dataclass(frozen=True)
class QueryLists:
    """The k nearest stored images of each query, closest first, ties by image id."""

    neighbour_ids: np.ndarray  # (m, kk) int64, kk = min(k, n)
    distances: np.ndarray  # (m, kk) float32


def prepare_query_space(
    features: np.ndarray,
    image_ids: np.ndarray,
    *,
    metric: str = "euclidean",
    timings: Timings = None,
) -> FeatureSpace:
    """Check and centre the stored rows once, keeping right() of every row for the queries.

    The augmented copy is kept whatever its size (the passes keep it only within a memory
    allowance): without it every query would centre all n rows again.
    """
    ids = checked_ids(image_ids, features)
    check_k_and_metric(1, metric)
    space = prepare_space(features, ids, metric, timings, keep_right=True)
    if space.right_rows is None:
        with timed(timings, "prepare"):
            space.right_rows = _all_right_rows(space)
    return space


def _all_right_rows(space: FeatureSpace) -> np.ndarray:
    """right() of every row, built in chunks."""
    right = np.empty((space.n, space.d + 2), dtype=np.float32)
    for start in range(0, space.n, _RIGHT_CHUNK_ROWS):
        rows = slice(start, start + _RIGHT_CHUNK_ROWS)
        right[rows] = space.right(rows)
    return right


def knn_query(space: FeatureSpace, queries: np.ndarray, k: int) -> QueryLists:
    """The k stored rows nearest to each query vector (rows of `queries`), closest first.

    `space` comes from prepare_query_space and is only read, so threads may share it. A
    stored row equal to a query is found at distance 0.
    """
    check_k_and_metric(k, space.metric)
    vectors = checked_queries(space, queries)
    kk = min(int(k), space.n)
    neighbours = np.empty((len(vectors), kk), dtype=np.int64)
    distances = np.empty((len(vectors), kk), dtype=np.float32)
    for row, vector in enumerate(vectors):
        if kk:
            neighbours[row], distances[row] = query_list(space, vector, kk)
    return QueryLists(space.ids[neighbours], distances)


def checked_queries(space: FeatureSpace, queries: np.ndarray) -> np.ndarray:
    """Queries as C-contiguous float32 rows of the space's width; NaN and Inf refused."""
    vectors = np.asarray(queries)
    if vectors.ndim != 2 or (space.d and vectors.shape[1] != space.d):
        raise KnnInputError(
            f"queries must be a 2-D array (queries x {space.d}), got shape {vectors.shape}"
        )
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    bad = np.flatnonzero(~np.isfinite(vectors).all(axis=1))
    if bad.size:
        raise NonFiniteFeaturesError(f"query vector {int(bad[0])} holds NaN or Inf")
    zero = np.flatnonzero(~vectors.any(axis=1))
    if space.metric == "cosine" and zero.size:
        raise ZeroFeatureVectorError(
            f"query vector {int(zero[0])} is all zeros: its cosine distance is undefined"
        )
    return vectors


def query_list(space: FeatureSpace, vector: np.ndarray, kk: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions and distances of the kk rows nearest to one query vector, in order."""
    left = query_left(space, vector)
    expanded = space.right_rows @ left  # the one product over all rows
    width = candidate_width(kk, space.n + 1)  # all n rows are eligible: none is the query
    if width < space.n:
        part = np.argpartition(expanded, width)
        rows, limit = part[:width], expanded[part[width]]  # limit: the best one left out
    else:
        rows, limit = np.arange(space.n), np.float32(np.inf)
    pairs = pair_space(space, vector, left[-1], rows)
    sources = np.arange(1, len(rows) + 1)[None, :]
    plausible = plausible_sources(pairs, _QUERY, expanded[rows][None, :], sources, kk)
    found, distances = rerank_rows(pairs, _QUERY, plausible, kk)
    if not proven_rows(pairs, _QUERY, distances[:, -1], np.array([limit]))[0]:
        # As exhaustive_rows: every row whose expanded distance could be within the last.
        reach = sq_reach(pairs, _QUERY, distances[:, -1])[0]
        rows = np.flatnonzero(expanded <= reach)
        pairs = pair_space(space, vector, left[-1], rows)
        found, distances = rerank_rows(pairs, _QUERY, np.arange(1, len(rows) + 1)[None, :], kk)
    return rows[found[0] - 1], distances[0]


def query_left(space: FeatureSpace, vector: np.ndarray) -> np.ndarray:
    """[y, 1, |y|^2] of the centred query y, as FeatureSpace.left() builds a stored row."""
    left = np.empty(space.d + 2, dtype=np.float32)
    body = left[:-2]
    if space.scale is not None:
        np.multiply(vector, query_scale(vector), out=body)
        body -= space.centre
    else:
        np.subtract(vector, space.centre, out=body)
    with np.errstate(over="ignore", invalid="ignore"):
        left[-1] = np.einsum("i,i->", body, body)
    if not np.isfinite(left[-1]):
        raise NonFiniteFeaturesError(
            "the query vector is too large: its squared norm overflows float32"
        )
    left[-2] = 1.0
    return left


def query_scale(vector: np.ndarray) -> np.float32:
    """1/|query| for cosine, computed as prepare_space computes it for a stored row."""
    return _inverse_norms(vector[None, :], np.full(1, -1, dtype=np.int64))[0]


def pair_space(
    space: FeatureSpace, vector: np.ndarray, query_sq: np.float32, rows: np.ndarray
) -> FeatureSpace:
    """A small space of the query (row 0) and these stored rows (rows 1...), for the re-rank.

    Scales, norms and error constants are the big space's, so rerank's functions measure
    and bound each (query, row) pair exactly as they would inside the big space.
    """
    features = np.empty((len(rows) + 1, space.d), dtype=np.float32)
    features[0] = vector
    np.take(space.features, rows, axis=0, out=features[1:])
    # The query's id is never ranked (it is no one's candidate); -1 only fills the slot.
    ids = np.concatenate([[-1], space.ids[rows]]).astype(np.int64)
    scale = None
    if space.scale is not None:
        scale = np.concatenate([[query_scale(vector)], space.scale[rows]]).astype(np.float32)
    sq = np.concatenate([[query_sq], space.sq[rows]]).astype(np.float32)
    return FeatureSpace(
        features=features,
        ids=ids,
        metric=space.metric,
        scale=scale,
        centre=space.centre,
        sq=sq,
        error_unit=space.error_unit,
        direct_error=space.direct_error,
        sq_max=space.sq_max,
    )
