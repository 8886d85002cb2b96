"""Update stored neighbour lists after images are added, changed or deleted, without a full run."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from lookalike.tasks.knn.backends import chosen_backend, open_backend, prepare_kernels
from lookalike.tasks.knn.passes import (
    NeighbourLists,
    all_lists,
    assemble_lists,
    candidate_width,
    empty_lists,
    padding_mask,
    rows_against_all,
    strip_candidates,
)
from lookalike.tasks.knn.plan import list_length
from lookalike.tasks.knn.rerank import (
    close_to_previous,
    direct_distances,
    finalise_rows,
    near_tie_window,
    proven_rows,
    sorted_list_columns,
    sq_reach,
)
from lookalike.tasks.knn.space import (
    FeatureSpace,
    KnnInputError,
    PairMemo,
    Timings,
    cache_right_rows,
    check_k_and_metric,
    checked_ids,
    prepare_space,
    timed,
)
from lookalike.tasks.knn.threads import cpu_cores, on_all_cores, tile_workers
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
    depth: int | None = None,
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

    With `depth` (>= k; see knn.plan.list_depth) the lists are deep and may be ragged: a
    kept row keeps as many exact entries as it still has (at least k), so removing a few
    of its neighbours costs no recomputation; new, changed and recomputed rows get
    list_length(depth, n) entries. Without it every row gets list_length(k, n) entries.
    """
    ids = checked_ids(image_ids, features)
    check_k_and_metric(k, metric)
    # A depth capped by a small collection (list_depth(k, n)) is fine: it is every image.
    if depth is not None and list_length(depth, len(ids)) < list_length(k, len(ids)):
        raise KnnInputError(f"depth must be at least k={k}, got {depth}")
    changed = np.unique(np.asarray(changed_ids, dtype=np.int64))
    deleted = np.unique(np.asarray(deleted_ids, dtype=np.int64))
    check_update_plan(previous, ids, changed, deleted)
    kk = list_length(k, len(ids))
    if kk == 0:
        return empty_lists(ids)
    is_changed = np.isin(ids, changed)
    if not _previous_long_enough(previous, k):  # the caller's plan (knn.plan) rules this out
        raise KnnInputError(f"the previous lists are shorter than k={k}: a full pass is needed")
    target = _Target(kk, kk if depth is None else list_length(depth, len(ids)), depth is not None)
    backend = chosen_backend(backend)  # decided once: the norm pass and the tiles share it
    space = prepare_space(features, ids, metric, timings, kernels=prepare_kernels(backend))
    with open_backend(backend, space) as tiles:
        shape = tile_shape(space, block_rows, tiles)
        positions, neighbours, distances = _updated_lists(
            space, tiles, shape, previous, is_changed, target, timings
        )
    return assemble_lists(ids, positions, neighbours, distances, min_depth=kk)


@dataclass(frozen=True)
class _Target:
    """What the updated lists hold: at least kk entries per row, at most `width`."""

    kk: int  # list_length(k, n)
    width: int  # kk, or list_length(depth, n) for deep lists
    deep: bool  # kept rows keep their own depth (kk..width) instead of exactly kk


def _updated_lists(
    space: FeatureSpace,
    tiles: TileBackend,
    shape: TileShape,
    previous: NeighbourLists,
    is_changed: np.ndarray,
    target: _Target,
    timings: Timings,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(positions, neighbour positions, distances) of every row after the change."""
    fresh = np.flatnonzero(is_changed)
    kept = np.flatnonzero(~is_changed)
    with timed(timings, "known_lists"):
        known, depths = _kept_lists(space, previous, is_changed, kept, target)
    redo = int(np.count_nonzero(depths == 0))
    if 2 * (len(fresh) + redo) >= space.n:
        return _full_pass(space, tiles, shape, target, redo, timings)
    if len(fresh) > shape.rows:
        # Each strip of new rows reads every column: build their right() blocks once. One
        # strip builds each block once anyway, without keeping all of them (164 MB at
        # 20,000 x 2,048), and recomputed rows read them once each.
        with timed(timings, "prepare"):
            cache_right_rows(space)
    limits = _initial_limits(space, kept, known, depths)
    fresh_lists, kept_lists = _candidates(space, tiles, shape, fresh, kept, limits, target, timings)
    # Kept rows and new rows measure mostly the same (kept, new) pairs: measure them once.
    space.pair_memo = PairMemo()
    lists = (
        np.empty((space.n, target.width), np.int64),
        np.empty((space.n, target.width), np.float32),
    )
    with timed(timings, "kept_merge"):
        doubtful = _merge_kept(space, kept, known, kept_lists, depths, lists)
    if 2 * (len(fresh) + len(doubtful)) >= space.n:
        space.pair_memo = None
        return _full_pass(space, tiles, shape, target, len(doubtful), timings)
    neighbours, distances = lists
    neighbours[fresh], distances[fresh] = finalise_rows(
        space, tiles, fresh, fresh_lists, target.width, shape, timings
    )
    space.pair_memo = None
    if doubtful.size:
        _count(timings, "refilled_rows", doubtful.size)
        with timed(timings, "refill"):
            redone = rows_against_all(space, tiles, kept[doubtful], target.width, shape, timings)
        neighbours[kept[doubtful]], distances[kept[doubtful]] = redone
    return np.arange(space.n), neighbours, distances


def _candidates(
    space: FeatureSpace,
    tiles: TileBackend,
    shape: TileShape,
    fresh: np.ndarray,
    kept: np.ndarray,
    limits: np.ndarray,
    target: _Target,
    timings: Timings,
) -> tuple[CandidateLists, CandidateLists]:
    """Fresh rows' candidates among all images, and kept rows' among the fresh ones."""
    width = candidate_width(target.width, space.n)
    fresh_lists = CandidateLists(len(fresh), width)
    kept_lists = CandidateLists(space.n, width)
    kept_lists.limits[:] = -np.inf  # fresh columns take nothing: their rows cover them
    kept_lists.limits[kept] = limits
    with tile_workers(worker_count(tiles)) as workers:
        strip_candidates(space, tiles, workers, fresh, fresh_lists, kept_lists, shape, timings)
    return fresh_lists, kept_lists


def _kept_lists(
    space: FeatureSpace,
    previous: NeighbourLists,
    is_changed: np.ndarray,
    kept: np.ndarray,
    target: _Target,
) -> tuple[_KnownLists, np.ndarray]:
    """What is still known of each kept row's list, and the depth it is to have."""
    window = near_tie_window(space) * _LOOSE_WINDOWS[space.metric]
    known = _known_lists(previous, space.ids, is_changed, kept, window, space.kernels)
    # Deep rows live through many updates without a recomputation: they also give up a
    # last entry whose distance may be stale. kk-wide rows keep it, as they always have;
    # for them it would mean recomputing every row that ends in a chain of equal distances.
    if target.deep and len(previous.image_ids) > len(kept):  # images were deleted or changed
        _uncertify_tails(space, kept, known, target)
    return known, _kept_depths(known, target)


def _count(timings: Timings, key: str, amount: int) -> None:
    """Add a count (rows, entries) to timings, which holds them beside the seconds."""
    if timings is not None:
        timings[key] = timings.get(key, 0.0) + amount


def _full_pass(
    space: FeatureSpace,
    tiles: TileBackend,
    shape: TileShape,
    target: _Target,
    refills: int,
    timings: Timings,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every list from scratch, when rows against all would cost more than the pass.

    Deletions refill every list that held a deleted image and cannot prove itself
    without it; past half the rows the symmetric pass (n * n * d / 2) is cheaper.
    """
    log.info("%d lists to refill: recomputing all lists instead", refills)
    return all_lists(space, tiles, target.width, shape, timings)


def check_update_plan(
    previous: NeighbourLists, ids: np.ndarray, changed: np.ndarray, deleted: np.ndarray
) -> None:
    """Refuse an update whose ids do not describe the change from `previous` to `ids`."""
    before = previous.image_ids
    if previous.neighbour_ids.shape[0] != len(before) or previous.distances.shape != (
        previous.neighbour_ids.shape
    ):
        raise KnnInputError("previous lists are malformed: their arrays differ in shape")
    padded = padding_mask(previous.neighbour_ids, previous.distances)
    if np.any(padded[:, :-1] & ~padded[:, 1:]):  # deep lists may end in padding, only end
        raise KnnInputError("previous lists are malformed: a neighbour follows padding")
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
    """True when the previous lists are k wide, or hold every other image.

    Ragged rows (deep lists) shorter than k pass here: each one is recomputed.
    """
    return previous.neighbour_ids.shape[1] >= list_length(k, len(previous.image_ids))


# Kept entries linked to a dropped neighbour by near-ties within this many windows are
# measured again: their stored distances may be the float64 ones of a near-tie chain that
# no longer exists, where a pass over the current images reports float32 ones. A stored
# float64 distance differs from the float32 one a pass compares: euclidean by about 2
# ulps (both round a float64 sum once; a window is at least 8 ulps), so the two gaps of an
# entry differ by at most half a window; cosine rows are scaled in float32 first, which
# near-duplicates turn into differences of up to a window, hence 4 there.
_LOOSE_WINDOWS = {"euclidean": 2.0, "cosine": 4.0}


@dataclass(frozen=True)
class _KnownLists:
    """Each kept row's previous list without deleted or changed neighbours, still in order."""

    neighbours: np.ndarray  # (kept, w) positions, -1 padding at the end
    distances: np.ndarray  # (kept, w) float32, inf padding
    count: np.ndarray  # (kept,) entries left per row
    complete: np.ndarray  # (kept,) bool: the previous list held every other image
    loose: np.ndarray  # (kept, w) bool: distance to measure again (see _LOOSE_WINDOWS)


def _known_lists(
    previous: NeighbourLists,
    ids: np.ndarray,
    is_changed: np.ndarray,
    kept: np.ndarray,
    window: float,
    kernels: Any = None,
) -> _KnownLists:
    """Map previous lists of kept rows onto current positions, dropping stale neighbours.

    A dropped neighbour is deleted (gone) or changed (its old distance is stale); what is
    left of a list is the start of that row's ranking among unchanged images. Entries in
    a chain of gaps within `window` that lost a member are marked loose.
    """
    rows = positions_of(previous.image_ids, ids[kept])
    read = _read_known(previous, ids, is_changed, rows, kernels)
    positions, distances, valid, count, listed = read
    loose = np.zeros(valid.shape, dtype=bool)
    # Only lists that lost an entry need compacting (none when images were only added).
    lost = np.flatnonzero(count < listed)
    if lost.size:
        padded = padding_mask(previous.neighbour_ids[rows[lost]], distances[lost])
        dropped = ~(valid[lost] | padded)
        loose[lost] = _broken_chains(distances[lost], dropped, window)
        # Stable sort moves the valid entries to the front without changing their order.
        compact = np.argsort(~valid[lost], axis=1, kind="stable")
        kept_valid = np.take_along_axis(valid[lost], compact, axis=1)
        moved = np.take_along_axis(positions[lost], compact, axis=1)
        positions[lost] = np.where(kept_valid, moved, -1)
        moved_distances = np.take_along_axis(distances[lost], compact, axis=1)
        distances[lost] = np.where(kept_valid, moved_distances, np.float32(np.inf))
        loose[lost] = np.take_along_axis(loose[lost], compact, axis=1) & kept_valid
        valid[lost] = kept_valid
    complete = listed >= len(previous.image_ids) - 1
    return _KnownLists(positions, distances, count, complete, loose)


def _read_known(
    previous: NeighbourLists,
    ids: np.ndarray,
    is_changed: np.ndarray,
    rows: np.ndarray,
    kernels: Any,
) -> tuple[np.ndarray, ...]:
    """(positions, distances, valid, count, listed) of previous rows `rows` in current
    positions.

    An entry is valid when its image still exists unchanged and it is not padding;
    invalid entries get position -1; count counts each row's valid entries, listed its
    entries that are not padding (compacting a row keeps its count). Compiled in one pass
    on every core when the ids are dense enough for a lookup table (see positions_of),
    else in numpy passes.
    """
    table = _position_table(ids)
    if kernels is None or table is None:
        distances = previous.distances[rows].astype(np.float32, copy=True)
        padded = padding_mask(previous.neighbour_ids[rows], distances)
        positions = positions_of(ids, previous.neighbour_ids[rows])
        # -1 (gone) indexes the last row, whatever it is: the first test already fails.
        valid = (positions >= 0) & ~is_changed[positions] & ~padded
        positions[~valid] = -1
        return positions, distances, valid, valid.sum(axis=1), (~padded).sum(axis=1)
    shape = (len(rows), previous.neighbour_ids.shape[1])
    out = (
        np.empty(shape, dtype=np.int64),
        np.empty(shape, dtype=np.float32),
        np.empty(shape, dtype=bool),
        np.empty(len(rows), dtype=np.int64),
        np.empty(len(rows), dtype=np.int64),
    )
    bounds = np.linspace(0, len(rows), cpu_cores() + 1).astype(np.int64)
    lists = (previous.neighbour_ids, previous.distances)

    def read(part: int) -> None:
        args = (rows, table[0], table[1], is_changed, bounds[part], bounds[part + 1], out)
        kernels.read_known_lists(lists, *args)

    on_all_cores(read, range(len(bounds) - 1))
    return out


def _broken_chains(distances: np.ndarray, dropped: np.ndarray, window: float) -> np.ndarray:
    """Entries in a chain of near-ties (within `window` in turn) with a dropped entry.

    A pass over the current images decides such a chain anew on float32 distances, so all
    of it is measured again, not only the dropped entry's neighbours: beside its float64
    distances they could link differently (see rerank._near_tie_entries).
    """
    close = close_to_previous(distances, window)
    chain = np.zeros(distances.shape, dtype=np.int64)
    chain[:, 1:] = np.cumsum(~close, axis=1)
    chain += np.arange(len(chain))[:, None] * distances.shape[1]  # unique over all rows
    hit = np.zeros(chain.size, dtype=bool)
    hit[chain[dropped]] = True
    return hit[chain] & ~dropped


def _uncertify_tails(
    space: FeatureSpace, kept: np.ndarray, known: _KnownLists, target: _Target
) -> None:
    """Leave out of `count` a row's last known entry when its distance may be stale.

    A pass reports a distance in float64 when it is a near-tie of the entry before or
    after it (see rerank._near_tie_entries). What followed the last known entry is not
    known: if it was deleted or changed, the stored float64 distance of a last entry that
    was a near-tie only of it is now wrong by an ulp or so. That needs its stored distance
    to differ from the float32 one and no near-tie with the entry before; rare, except in
    chains of equal distances, which that test keeps. The entry stays in the arrays (it is
    still a known neighbour, ranked last); only the exact depth shrinks by one.
    """
    rows = np.flatnonzero(~known.complete & (known.count >= 1) & (known.count <= target.width))
    last = known.count[rows] - 1
    measured = direct_distances(space, kept[rows], known.neighbours[rows, last][:, None])[:, 0]
    doubt = measured != known.distances[rows, last]
    rows, last, measured = rows[doubt], last[doubt], measured[doubt]
    # A loose last entry is measured again and ordered anew; its link to the one before
    # is then decided afresh, so only a settled one can count on it.
    linked = (last >= 1) & ~known.loose[rows, last]
    before = np.where(linked, known.neighbours[rows, np.maximum(last - 1, 0)], -1)
    pair = np.stack([direct_distances(space, kept[rows], before[:, None])[:, 0], measured], axis=1)
    linked &= close_to_previous(pair, near_tie_window(space))[:, 0]
    known.count[rows[~linked]] -= 1


def _kept_depths(known: _KnownLists, target: _Target) -> np.ndarray:
    """Entries each kept row's updated list holds; 0 marks a row to recompute at once.

    A list that holds every other image can take any depth from the new images. Otherwise
    a deep row keeps the exact entries it still has (new ones can only push out its last
    ones), which needs at least kk of them; a kk-wide row aims at kk and is proven or
    recomputed after the merge (see _merge_kept).
    """
    if not target.deep:
        return np.full(len(known.count), target.kk, dtype=np.int64)
    depths = np.where(known.count >= target.kk, np.minimum(known.count, target.width), 0)
    return np.where(known.complete, target.width, depths)


def _initial_limits(
    space: FeatureSpace, kept: np.ndarray, known: _KnownLists, depths: np.ndarray
) -> np.ndarray:
    """What a fresh image must beat to enter each kept row's list (inf: take the best).

    A row that still has as many known entries as its depth only takes fresh images whose
    expanded distance could beat the last of them; the limit sits strictly above that
    reach, so a row that takes nothing is proven complete by proven_rows. A row to
    recompute (depth 0) takes nothing.
    """
    limits = np.where(depths > 0, np.float32(np.inf), np.float32(-np.inf)).astype(np.float32)
    full = np.flatnonzero((depths > 0) & (known.count >= depths))
    if full.size:
        last = known.distances[full, depths[full] - 1]
        reach = sq_reach(space, kept[full], last)
        limits[full] = np.nextafter(reach.astype(np.float32), np.float32(np.inf))
    return limits


def _merge_kept(
    space: FeatureSpace,
    kept: np.ndarray,
    known: _KnownLists,
    kept_lists: CandidateLists,
    depths: np.ndarray,
    lists: tuple[np.ndarray, np.ndarray],
) -> np.ndarray:
    """Kept rows' lists: known entries plus fresh candidates, each to its row's depth.

    Writes their neighbours and distances into rows `kept` of `lists` (padded past a
    row's depth); returns which of the kept rows (indices into kept) must be recomputed.
    """
    width = lists[0].shape[1]
    used_known = np.minimum(known.count, depths)
    # Rows that took fresh candidates, or hold entries to measure again.
    touched = np.flatnonzero(((kept_lists.fill[kept] > 0) | known.loose.any(axis=1)) & (depths > 0))
    if space.kernels is not None:
        _compiled_merge(space, kept, known, touched, kept_lists, depths, lists, used_known)
    else:
        neighbours, distances = _padded(known.neighbours, known.distances, width, depths)
        if touched.size:
            merged = _merged_rows(space, kept[touched], known, touched, kept_lists, depths, width)
            neighbours[touched], distances[touched], used_known[touched] = merged
        lists[0][kept], lists[1][kept] = neighbours, distances
    last = np.maximum(depths, 1) - 1
    fresh_ok = proven_rows(space, kept, lists[1][kept, last], kept_lists.limits[kept])
    # Unknown unchanged images rank after the last known entry; if the list did not use
    # every known entry, or all its entries are known ones, none of them can belong in it.
    known_ok = known.complete | (known.count >= depths) | (used_known < known.count)
    filled = lists[0][kept, last] >= 0
    settled = fresh_ok & known_ok & filled & (depths > 0)
    return np.flatnonzero(~settled)


def _compiled_merge(
    space: FeatureSpace,
    kept: np.ndarray,
    known: _KnownLists,
    touched: np.ndarray,
    kept_lists: CandidateLists,
    depths: np.ndarray,
    lists: tuple[np.ndarray, np.ndarray],
    used_known: np.ndarray,
) -> None:
    """_padded and _merged_rows in compiled passes over the kept rows, on every core.

    Most touched rows take a fresh candidate or two, far from their neighbours in the
    order: their merge is an insertion into the known order. The few with a near-tie (or
    a loose entry) go through _merged_rows, which measures the chain in float64. Writes
    rows `kept` of lists, and used_known of the touched rows.
    """
    fresh = kept_lists.taken_by(kept[touched])
    fresh_distances = direct_distances(space, kept[touched], fresh)
    touched_of = np.full(len(kept), -1, dtype=np.int64)
    touched_of[touched] = np.arange(len(touched))
    doubtful = np.zeros(len(touched), dtype=bool)
    known_parts = (known.neighbours, known.distances, known.loose, depths)
    out = (kept, *lists, used_known)
    bounds = np.linspace(0, len(kept), cpu_cores() + 1).astype(np.int64)

    def merge(part: int) -> None:
        rows = (bounds[part], bounds[part + 1])
        args = (touched_of, fresh, fresh_distances, space.id_ranks, near_tie_window(space))
        space.kernels.merge_kept_rows(known_parts, *args, rows, out, doubtful)

    on_all_cores(merge, range(len(bounds) - 1))
    again = touched[doubtful]
    if again.size:
        width = lists[0].shape[1]
        merged = _merged_rows(space, kept[again], known, again, kept_lists, depths, width)
        lists[0][kept[again]], lists[1][kept[again]], used_known[again] = merged


def _merged_rows(
    space: FeatureSpace,
    positions: np.ndarray,
    known: _KnownLists,
    touched: np.ndarray,
    kept_lists: CandidateLists,
    depths: np.ndarray,
    width: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Touched rows' known entries and fresh candidates in order, cut to each row's depth.

    Returns neighbours, distances and how many known entries each list kept.
    """
    fresh = kept_lists.best_of(positions)[1]
    fresh = fresh[:, : int((fresh >= 0).sum(axis=1).max())]  # candidates come first
    both = np.concatenate([known.neighbours[touched], fresh], axis=1)
    fresh_distances = direct_distances(space, positions, fresh)
    known_distances = known.distances[touched]
    loose = known.loose[touched]
    if loose.any():  # measured as a pass over all would, then ordered with the fresh ones
        again = direct_distances(space, positions, np.where(loose, known.neighbours[touched], -1))
        known_distances = np.where(loose, again, known_distances)
    both_distances = np.concatenate([known_distances, fresh_distances], axis=1)
    settled = np.zeros(both.shape, dtype=bool)
    settled[:, : known.neighbours.shape[1]] = ~loose
    columns, ordered = sorted_list_columns(
        space, positions, both, both_distances, width, settled=settled
    )
    chosen = np.take_along_axis(both, columns, axis=1)
    neighbours, distances = _padded(chosen, ordered, width, depths[touched])
    from_known = np.zeros(neighbours.shape, dtype=bool)
    from_known[:, : columns.shape[1]] = columns < known.neighbours.shape[1]
    return neighbours, distances, (from_known & (neighbours >= 0)).sum(axis=1)


def _padded(
    neighbours: np.ndarray, distances: np.ndarray, width: int, depths: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Lists `width` wide holding each row's first `depths` entries, then -1 / inf padding.

    Only rows shorter than the copied part are masked: most rows are full, and a mask over
    all of them cost more than the copy.
    """
    out_neighbours = np.empty((len(neighbours), width), dtype=np.int64)
    out_distances = np.empty((len(neighbours), width), dtype=np.float32)
    w = min(width, neighbours.shape[1])
    out_neighbours[:, :w] = neighbours[:, :w]
    out_distances[:, :w] = distances[:, :w]
    out_neighbours[:, w:] = -1
    out_distances[:, w:] = np.inf
    short = np.flatnonzero(depths < w)
    if short.size:
        beyond = np.arange(w)[None, :] >= depths[short, None]
        out_neighbours[short, :w] = np.where(beyond, -1, out_neighbours[short, :w])
        out_distances[short, :w] = np.where(beyond, np.inf, out_distances[short, :w])
    return out_neighbours, out_distances


def positions_of(ids: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Row position of each wanted id in `ids` (-1 where absent).

    Database ids are mostly dense, so a lookup table beats a binary search when the id
    range is small; otherwise the ids are searched in sorted order.
    """
    if ids.size == 0:
        return np.full(wanted.shape, -1, dtype=np.int64)
    table = _position_table(ids)
    if table is not None:
        # mode="clip" sends every id out of range to an end slot, in one pass
        return np.take(table[0], wanted - table[1], mode="clip")
    order = np.argsort(ids, kind="stable")
    at = np.minimum(np.searchsorted(ids[order], wanted), len(ids) - 1)
    return np.where(ids[order][at] == wanted, order[at], -1)


def _position_table(ids: np.ndarray) -> tuple[np.ndarray, int] | None:
    """(table, offset): table[id - offset] is the id's position, its two ends -1 for ids
    out of range; None when the ids spread too thinly for a table to pay (or are none)."""
    if ids.size == 0:
        return None
    low, high = int(ids.min()), int(ids.max())
    if high - low >= 8 * len(ids) + 1024:
        return None
    table = np.full(high - low + 3, -1, dtype=np.int64)
    table[ids - low + 1] = np.arange(len(ids))
    return table, low - 1
