"""Update stored neighbour lists after images are added, changed or deleted, without a full run."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from lookalike.tasks.knn.backends import open_backend
from lookalike.tasks.knn.passes import (
    NeighbourLists,
    all_lists,
    assemble_lists,
    candidate_width,
    empty_lists,
    rows_against_all,
    strip_candidates,
)
from lookalike.tasks.knn.plan import list_length
from lookalike.tasks.knn.rerank import (
    direct_distances,
    finalise_rows,
    proven_rows,
    sorted_list_columns,
    sq_reach,
)
from lookalike.tasks.knn.space import (
    FeatureSpace,
    KnnInputError,
    PairMemo,
    Timings,
    check_k_and_metric,
    checked_ids,
    prepare_space,
)
from lookalike.tasks.knn.threads import tile_workers
from lookalike.tasks.knn.tiles import (
    CandidateLists,
    TileBackend,
    TileShape,
    tile_shape,
    worker_count,
)

log = logging.getLogger(__name__)


def knn_update(
    previous: NeighbourLists,
    features: np.ndarray,
    image_ids: np.ndarray,
    *,
    changed_ids: np.ndarray,
    deleted_ids: np.ndarray,
    k: int,
    metric: str = "euclidean",
    block_rows: int | None = None,
    backend: str | None = None,
    timings: Timings = None,
) -> NeighbourLists:
    """The lists knn_all would give for the current collection, from the previous lists.

    `features`/`image_ids` are the whole collection after the change, `changed_ids` the
    images that are new or whose features changed, `deleted_ids` those gone since
    `previous`. New and changed rows are computed against all (m * n * d); every other
    row merges the new candidates into its kept list, and only a row that lost
    neighbours and cannot prove its list complete is recomputed. Whether an update is worth
    it rather than a full pass is decided by knn.plan.choose_pass, not here.
    """
    ids = checked_ids(image_ids, features)
    check_k_and_metric(k, metric)
    changed = np.unique(np.asarray(changed_ids, dtype=np.int64))
    deleted = np.unique(np.asarray(deleted_ids, dtype=np.int64))
    check_update_plan(previous, ids, changed, deleted)
    kk = list_length(k, len(ids))
    if kk == 0:
        return empty_lists(ids)
    is_changed = np.isin(ids, changed)
    if not _previous_long_enough(previous, k):  # the caller's plan (knn.plan) rules this out
        raise KnnInputError(f"the previous lists are shorter than k={k}: a full pass is needed")
    space = prepare_space(features, ids, metric, timings, keep_right=True)
    with open_backend(backend, space) as tiles:
        shape = tile_shape(space, block_rows, tiles)
        positions, neighbours, distances = _updated_lists(
            space, tiles, shape, previous, is_changed, kk, timings
        )
    return assemble_lists(ids, positions, neighbours, distances)


def _updated_lists(
    space: FeatureSpace,
    tiles: TileBackend,
    shape: TileShape,
    previous: NeighbourLists,
    is_changed: np.ndarray,
    kk: int,
    timings: Timings,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(positions, neighbour positions, distances) of every row after the change."""
    fresh = np.flatnonzero(is_changed)
    kept = np.flatnonzero(~is_changed)
    known = _known_lists(previous, space.ids, is_changed, kept)
    width = candidate_width(kk, space.n)
    fresh_lists = CandidateLists(len(fresh), width)
    kept_lists = CandidateLists(space.n, width)
    kept_lists.limits[:] = -np.inf  # fresh columns take nothing: their rows cover them
    kept_lists.limits[kept] = _initial_limits(space, kept, known, kk)
    with tile_workers(worker_count(tiles)) as workers:
        strip_candidates(space, tiles, workers, fresh, fresh_lists, kept_lists, shape, timings)
    # Kept rows and new rows measure mostly the same (kept, new) pairs: measure them once.
    space.pair_memo = PairMemo()
    kept_neighbours, kept_distances, doubtful = _merge_kept(space, kept, known, kept_lists, kk)
    if 2 * (len(fresh) + len(doubtful)) >= space.n:
        # So many lists lost neighbours that rows against all would cost more than the
        # symmetric full run (deletions refill every list that held a deleted image).
        log.info("%d lists to refill: recomputing all lists instead", len(doubtful))
        space.pair_memo = None
        neighbours, distances = all_lists(space, tiles, kk, shape, timings)
        return np.arange(space.n), neighbours, distances
    fresh_neighbours, fresh_distances = finalise_rows(
        space, tiles, fresh, fresh_lists, kk, shape, timings
    )
    space.pair_memo = None
    if doubtful.size:
        if timings is not None:
            timings["refilled_rows"] = timings.get("refilled_rows", 0.0) + doubtful.size
        redone = rows_against_all(space, tiles, kept[doubtful], kk, shape, timings)
        kept_neighbours[doubtful], kept_distances[doubtful] = redone
    positions = np.concatenate([fresh, kept])
    neighbours = np.concatenate([fresh_neighbours, kept_neighbours])
    distances = np.concatenate([fresh_distances, kept_distances])
    return positions, neighbours, distances


def check_update_plan(
    previous: NeighbourLists, ids: np.ndarray, changed: np.ndarray, deleted: np.ndarray
) -> None:
    """Refuse an update whose ids do not describe the change from `previous` to `ids`."""
    before = previous.image_ids
    if previous.neighbour_ids.shape[0] != len(before) or previous.distances.shape != (
        previous.neighbour_ids.shape
    ):
        raise KnnInputError("previous lists are malformed: their arrays differ in shape")
    # Membership by positions_of (a lookup table for dense ids): a few ms, not set sorts.
    in_before = positions_of(before, ids) >= 0
    kept_before = positions_of(deleted, before) < 0
    problems = [
        (deleted[positions_of(before, deleted) < 0], "is deleted but not in the previous lists"),
        (deleted[positions_of(ids, deleted) >= 0], "is deleted but still has features"),
        (changed[positions_of(ids, changed) < 0], "is changed but has no features"),
        (ids[~in_before & (positions_of(changed, ids) < 0)], "is new but not in changed_ids"),
        (
            before[kept_before & (positions_of(ids, before) < 0)],
            "was in the previous lists but is neither in the collection nor deleted",
        ),
    ]
    for offenders, what in problems:
        if offenders.size:
            raise KnnInputError(f"image {int(offenders.min())} {what}")


def _previous_long_enough(previous: NeighbourLists, k: int) -> bool:
    """True when the previous lists hold k entries, or every other image."""
    return previous.neighbour_ids.shape[1] >= list_length(k, len(previous.image_ids))


@dataclass(frozen=True)
class _KnownLists:
    """Each kept row's previous list without deleted or changed neighbours, still in order."""

    neighbours: np.ndarray  # (kept, w) positions, -1 padding at the end
    distances: np.ndarray  # (kept, w) float32, inf padding
    count: np.ndarray  # (kept,) entries left per row
    complete: bool  # the previous lists held every other image


def _known_lists(
    previous: NeighbourLists, ids: np.ndarray, is_changed: np.ndarray, kept: np.ndarray
) -> _KnownLists:
    """Map previous lists of kept rows onto current positions, dropping stale neighbours.

    A dropped neighbour is deleted (gone) or changed (its old distance is stale); what is
    left of a list is the start of that row's ranking among unchanged images.
    """
    rows = positions_of(previous.image_ids, ids[kept])
    positions = positions_of(ids, previous.neighbour_ids[rows])
    # -1 (gone) indexes the last row, whatever it is: the first test already fails.
    valid = (positions >= 0) & ~is_changed[positions]
    distances = previous.distances[rows].astype(np.float32, copy=False)
    # Only lists that lost an entry need compacting (none when images were only added).
    lost = np.flatnonzero(~valid.all(axis=1))
    if lost.size:
        # Stable sort moves the valid entries to the front without changing their order.
        compact = np.argsort(~valid[lost], axis=1, kind="stable")
        kept_valid = np.take_along_axis(valid[lost], compact, axis=1)
        moved = np.take_along_axis(positions[lost], compact, axis=1)
        positions[lost] = np.where(kept_valid, moved, -1)
        moved_distances = np.take_along_axis(distances[lost], compact, axis=1)
        distances[lost] = np.where(kept_valid, moved_distances, np.float32(np.inf))
        valid[lost] = kept_valid
    complete = previous.neighbour_ids.shape[1] >= len(previous.image_ids) - 1
    return _KnownLists(positions, distances, valid.sum(axis=1), complete)


def _initial_limits(
    space: FeatureSpace, kept: np.ndarray, known: _KnownLists, kk: int
) -> np.ndarray:
    """What a fresh image must beat to enter each kept row's list (inf: take the best).

    A row that still has kk known entries only takes fresh images whose expanded distance
    could beat its kk-th; the limit sits strictly above that reach, so a row that takes
    nothing is proven complete by proven_rows.
    """
    limits = np.full(len(kept), np.inf, dtype=np.float32)
    full = np.flatnonzero(known.count >= kk)
    if full.size:
        reach = sq_reach(space, kept[full], known.distances[full, kk - 1])
        limits[full] = np.nextafter(reach.astype(np.float32), np.float32(np.inf))
    return limits


def _merge_kept(
    space: FeatureSpace,
    kept: np.ndarray,
    known: _KnownLists,
    kept_lists: CandidateLists,
    kk: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Kept rows' lists: known entries plus fresh candidates.

    Returns their neighbours, distances and which of the rows must be recomputed.
    """
    neighbours = known.neighbours[:, :kk].copy()
    distances = known.distances[:, :kk].copy()
    if neighbours.shape[1] < kk:  # the collection grew past the previous list length
        pad = kk - neighbours.shape[1]
        neighbours = np.pad(neighbours, ((0, 0), (0, pad)), constant_values=-1)
        distances = np.pad(distances, ((0, 0), (0, pad)), constant_values=np.inf)
    used_known = np.minimum(known.count, kk)
    touched = np.flatnonzero(kept_lists.fill[kept] > 0)  # rows that took fresh candidates
    if touched.size:
        rows = kept[touched]
        fresh = kept_lists.best_of(rows)[1]
        fresh = fresh[:, : int((fresh >= 0).sum(axis=1).max())]  # candidates come first
        both = np.concatenate([known.neighbours[touched], fresh], axis=1)
        fresh_distances = direct_distances(space, rows, fresh)
        both_distances = np.concatenate([known.distances[touched], fresh_distances], axis=1)
        settled = np.zeros(both.shape, dtype=bool)
        settled[:, : known.neighbours.shape[1]] = True
        columns, distances[touched] = sorted_list_columns(
            space, rows, both, both_distances, kk, settled=settled
        )
        neighbours[touched] = np.take_along_axis(both, columns, axis=1)
        from_known = (columns < known.neighbours.shape[1]) & (neighbours[touched] >= 0)
        used_known[touched] = from_known.sum(axis=1)
    fresh_ok = proven_rows(space, kept, distances[:, -1], kept_lists.limits[kept])
    # Unknown unchanged images rank after the last known entry; if the list did not use
    # every known entry, or holds kk of them, none of the unknown ones can belong in it.
    known_ok = known.complete | (known.count >= kk) | (used_known < known.count)
    filled = neighbours[:, -1] >= 0
    return neighbours, distances, np.flatnonzero(~(fresh_ok & known_ok & filled))


def positions_of(ids: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Row position of each wanted id in `ids` (-1 where absent).

    Database ids are mostly dense, so a lookup table beats a binary search when the id
    range is small; otherwise the ids are searched in sorted order.
    """
    if ids.size == 0:
        return np.full(wanted.shape, -1, dtype=np.int64)
    low, high = int(ids.min()), int(ids.max())
    if high - low < 8 * len(ids) + 1024:
        table = np.full(high - low + 3, -1, dtype=np.int64)  # first and last: out of range
        table[ids - low + 1] = np.arange(len(ids))
        # mode="clip" sends every id out of range to an end slot, in one pass
        return np.take(table, wanted - (low - 1), mode="clip")
    order = np.argsort(ids, kind="stable")
    at = np.minimum(np.searchsorted(ids[order], wanted), len(ids) - 1)
    return np.where(ids[order][at] == wanted, order[at], -1)
