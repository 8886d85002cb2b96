"""Exact lists from candidates: direct distances, (distance, id) order, proof or exhaustive redo."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from lookalike.tasks.knn.space import FeatureSpace, Timings, timed
from lookalike.tasks.knn.threads import cpu_cores, on_all_cores, tile_workers
from lookalike.tasks.knn.tiles import CandidateLists, TileBackend, TileShape

_RERANK_CHUNK_ENTRIES = 1 << 22  # candidates re-ranked at once: bounds its temporaries
_RERANK_CHUNK_PAIRS = 256  # 256 rows x 2048 floats = 2 MB: stays in cache
_GROUPED_PAIR_SHARE = 0.5  # re-rank in neighbourhood order when this share of pairs is inside
_GROUP_MAX_ROWS = 512  # a group's float64 block (512 x 2048) stays within 8 MB
# Smaller groups cost more in per-group set-up than their few pairs take to subtract: the
# 18,000 (row, last neighbour) pairs of an update form groups of 2-10 rows, 0.51 s
# grouped against 0.06 s subtracted (n = 20,000, d = 2048).
_GROUP_MIN_ROWS = 8
_GROUP_MIN_SHARE = 0.25  # of a group's pairs must be wanted to multiply the whole group
_GROUP_MIN_PAIRS = 4096  # fewer grouped pairs than this are not worth the set-up
_GROUP_GUARD = 1e-5  # float64 expansion error <= ~5e-13 x norms: < 1 float32 ulp above this
_COMPILED_PARTS = 8  # compiled distance calls per re-rank: a few per core balance the load
_PARALLEL_RERANK_CHUNKS = 16  # fewer chunks than this are measured in the calling thread
_SORT_PART_ROWS = 2048  # lists are ordered in parts of at least this many rows, one per core
_NO_ID = np.iinfo(np.int64).max
_NO_RANK = np.iinfo(np.uint32).max  # sorts after every id rank (ranks are below n < 2^32)


def finalise_rows(
    space: FeatureSpace,
    tiles: TileBackend,
    positions: np.ndarray,
    candidates: CandidateLists,
    kk: int,
    shape: TileShape,
    timings: Timings,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact lists from candidates: direct distances, then rows not proven are redone."""
    with timed(timings, "rerank"):
        values, sources = candidates.best(space.kernels)
        neighbours = np.empty((len(positions), kk), dtype=np.int64)
        distances = np.empty((len(positions), kk), dtype=np.float32)
        # In row chunks: the re-rank needs about 150 bytes per candidate for a while.
        step = max(1, _RERANK_CHUNK_ENTRIES // values.shape[1])
        for start in range(0, len(positions), step):
            part = slice(start, start + step)
            plausible = plausible_sources(space, positions[part], values[part], sources[part], kk)
            neighbours[part], distances[part] = rerank_rows(
                space, positions[part], plausible, kk, timings
            )
    proven = proven_rows(space, positions, distances[:, -1], candidates.limits)
    doubtful = np.flatnonzero(~proven)
    if timings is not None:
        timings["fallback_rows"] = timings.get("fallback_rows", 0.0) + doubtful.size
    if doubtful.size:
        with timed(timings, "fallback"):
            redone = exhaustive_rows(
                space, tiles, positions[doubtful], distances[doubtful, -1], kk, shape
            )
        neighbours[doubtful], distances[doubtful] = redone
    return neighbours, distances


def plausible_sources(
    space: FeatureSpace, positions: np.ndarray, values: np.ndarray, sources: np.ndarray, kk: int
) -> np.ndarray:
    """Candidates that can still make the first kk, or tie with its last; others are -1.

    The kk best expanded distances are each within the error bound of their direct
    distance, so a candidate expanded further than (kk-th + error) plus the near-tie
    tolerance, plus its own error, cannot reach the list.
    """
    if values.shape[1] <= kk:
        return sources
    error = space.error_bound(positions)
    kth = np.partition(values, kk - 1, axis=1)[:, kk - 1].astype(np.float64)
    reach = np.maximum(kth + error, 0.0) * (1 + 4 * space.direct_error) + error
    return np.where(values <= reach[:, None], sources, -1)


def rerank_rows(
    space: FeatureSpace,
    positions: np.ndarray,
    sources: np.ndarray,
    kk: int,
    timings: Timings = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Best kk candidates per row by direct distance, ties by image id (-1/inf pad)."""
    distances = direct_distances(space, positions, sources)
    return sorted_lists(space, positions, sources, distances, kk, timings)


def direct_distances(space: FeatureSpace, positions: np.ndarray, sources: np.ndarray) -> np.ndarray:
    """Reported distance from each row to each of its candidates (-1 candidates: inf)."""
    if space.kernels is not None and space.pair_memo is None:
        return to_distance(space.metric, _listed_sq_distances(space, positions, sources))
    if space.kernels is not None:  # the pairs straight from the lists, no gathered copies
        unique, inverse = space.kernels.list_pair_keys(positions, sources, space.n)
        measured = np.append(_unique_pair_sq_distances(space, unique, precise=False), np.inf)
        return to_distance(space.metric, measured[inverse])  # index -1: the inf
    valid = sources >= 0
    rows = np.broadcast_to(positions[:, None], sources.shape)
    sq = np.full(sources.shape, np.inf, dtype=np.float32)
    sq[valid] = pair_sq_distances(space, rows[valid], sources[valid])
    return to_distance(space.metric, sq)


def _listed_sq_distances(
    space: FeatureSpace, positions: np.ndarray, sources: np.ndarray
) -> np.ndarray:
    """Direct squared distances of every list entry, measured in place (compiled).

    Entries inside tight groups come from the group's float64 Gram matrix, the rest by
    subtraction, lists taken neighbourhood by neighbourhood so that the rows they read
    stay in cache. A pair listed by both its rows is measured twice, the same way: no
    pair keys to sort and look up (see _group_pair_sq_distances for why both ways agree).
    """
    kernels = space.kernels
    sq = np.full(sources.shape, np.inf, dtype=np.float32)
    done = np.zeros(sources.shape, dtype=bool)
    members, bounds, leading, group_of, place, space.labels = kernels.list_groups(
        positions,
        sources,
        space.n,
        _GROUP_MIN_ROWS,
        _GROUP_MAX_ROWS,
        _GROUP_MIN_SHARE,
        2 * _GROUP_MIN_PAIRS,
    )
    visit = kernels.stable_order(space.labels[positions], space.n)  # by neighbourhood
    scale = np.empty(0, np.float32) if space.scale is None else space.scale
    list_row = np.full(space.n, -1, dtype=np.int64)
    list_row[positions] = np.arange(len(positions))
    if len(bounds) > 1:
        centre = space.centre.astype(np.float64)
        largest = int(np.diff(bounds).max())
        buffers = threading.local()  # one block per worker: a fresh one each costs page faults

        def settle(g: int) -> None:
            rows = members[bounds[g] : bounds[g + 1]]
            if not hasattr(buffers, "flat"):
                buffers.flat = np.empty(largest * space.d)
            block = buffers.flat[: len(rows) * space.d].reshape(len(rows), space.d)
            norms = np.empty(len(rows))
            kernels.centred_block(space.features, scale, rows, centre, block, norms)
            listed = int(leading[g])  # the rows with a list come first
            # All rows listed: one symmetric product (BLAS syrk, half the work).
            gram = block @ block.T if listed == len(rows) else block[:listed] @ block.T
            args = (group_of, place, list_row, sources, _GROUP_GUARD, space.d, sq, done)
            kernels.settle_group_entries(gram, norms, g, rows[:listed], *args)

        # Groups write disjoint entries of sq and done; one BLAS thread per worker.
        with tile_workers(cpu_cores() if len(bounds) > 2 else 1) as workers:
            workers.map(settle, range(len(bounds) - 1))
    parts = np.array_split(visit, max(1, min(_COMPILED_PARTS, len(visit) // 64)))
    mirrored: list[tuple[np.ndarray, np.ndarray]] = [(visit[:0], visit[:0])] * len(parts)

    def subtract(part: int) -> None:
        args = (positions, sources, done, parts[part], list_row, sq)
        mirrored[part] = kernels.listed_sq_distances(space.features, scale, *args)

    on_all_cores(subtract, range(len(parts)))
    flat = sq.reshape(-1)
    for entries, mirrors in mirrored:
        flat[entries] = flat[mirrors]
    return sq


def sorted_lists(
    space: FeatureSpace,
    positions: np.ndarray,
    sources: np.ndarray,
    distances: np.ndarray,
    kk: int,
    timings: Timings = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The first kk of each row by (distance, image id), near-ties settled in float64."""
    columns, distances = sorted_list_columns(space, positions, sources, distances, kk, timings)
    return np.take_along_axis(sources, columns, axis=1), distances


def sorted_list_columns(
    space: FeatureSpace,
    positions: np.ndarray,
    sources: np.ndarray,
    distances: np.ndarray,
    kk: int,
    timings: Timings = None,
    settled: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Which columns make each row's first kk, in order, and their distances.

    Float32 direct distances are a few ulps off; entries within that error of a neighbour
    in the order (a chain reaching into the first kk) get their distance recomputed in
    float64 and rounded once, so the order is that of the true distances and a tie means
    equal float32 distances. `settled` marks entries already ordered by an earlier run.
    Rows are independent, so large inputs are ordered in row parts on every core.
    """
    parts = max(1, min(cpu_cores(), len(positions) // _SORT_PART_ROWS))
    if parts == 1:
        columns, distances, ties = _sorted_part(space, positions, sources, distances, kk, settled)
    else:
        bounds = np.linspace(0, len(positions), parts + 1).astype(np.int64)
        width = min(kk, sources.shape[1])
        columns = np.empty((len(positions), width), dtype=np.int64)
        ordered = np.empty((len(positions), width), dtype=distances.dtype)
        tie_counts = np.zeros(parts, dtype=np.int64)

        def order_part(part: int) -> None:
            rows = slice(bounds[part], bounds[part + 1])
            some = None if settled is None else settled[rows]
            found = _sorted_part(space, positions[rows], sources[rows], distances[rows], kk, some)
            columns[rows], ordered[rows], tie_counts[part] = found

        on_all_cores(order_part, range(parts))
        distances, ties = ordered, int(tie_counts.sum())
    if ties and timings is not None:
        timings["near_tie_entries"] = timings.get("near_tie_entries", 0.0) + ties
    return columns, distances


def _sorted_part(
    space: FeatureSpace,
    positions: np.ndarray,
    sources: np.ndarray,
    distances: np.ndarray,
    kk: int,
    settled: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray, int]:
    """sorted_list_columns for some rows, plus how many near-tie entries were recomputed."""
    packed = _packed_order(space, sources, distances, kk, settled)
    if packed is not None:
        columns, distances, ties = packed
        rows, cols = np.divmod(ties, max(1, distances.shape[1]))
    else:
        # Settled entries come first and in order: a merge sort (timsort) then costs little
        # more than merging in the rest, about 3x faster than quicksort on such rows.
        columns = _list_order(space, sources, distances, mostly_sorted=settled is not None)
        distances = np.take_along_axis(distances, columns, axis=1)
        if settled is not None:
            settled = np.take_along_axis(settled, columns, axis=1)
        rows, cols = _near_tie_entries(distances, kk, near_tie_window(space), settled)
    if rows.size:
        neighbours = sources[rows, columns[rows, cols]]
        sq = pair_sq_distances(space, positions[rows], neighbours, precise=True)
        distances[rows, cols] = to_distance(space.metric, sq)
        touched = np.unique(rows)
        touched_columns = columns[touched]
        touched_sources = np.take_along_axis(sources[touched], touched_columns, axis=1)
        order = _list_order(space, touched_sources, distances[touched])
        columns[touched] = np.take_along_axis(touched_columns, order, axis=1)
        distances[touched] = np.take_along_axis(distances[touched], order, axis=1)
    return columns[:, :kk].copy(), distances[:, :kk].copy(), int(rows.size)


def near_tie_window(space: FeatureSpace) -> float:
    """Relative gap within which two float32 direct distances may be in the wrong order.

    Two distances each off by their error can swap within it: the squared-distance error
    halves under the square root of euclidean distances.
    """
    return space.direct_error * (2.0 if space.metric == "cosine" else 1.0)


def close_to_previous(distances: np.ndarray, window: float) -> np.ndarray:
    """(rows, w - 1): whether each sorted entry after the first is a near-tie of the one before.

    Exact zeros are never near-ties: a zero distance is exact in any precision.
    """
    later = distances[:, 1:]
    with np.errstate(invalid="ignore"):
        return (later - distances[:, :-1] <= window * later) & (later > 0) & (later < np.inf)


def _list_order(
    space: FeatureSpace, sources: np.ndarray, distances: np.ndarray, mostly_sorted: bool = False
) -> np.ndarray:
    """Column order of each row by (distance, image id); padding (-1 sources) goes last.

    One argsort of a 64-bit key, several times faster than np.lexsort: the float32 bits of
    a non-negative distance order like the distances, and the id's rank fills the low half.
    """
    if distances.size and not distances.min() >= 0:  # negative or NaN: cannot pack
        neighbour_ids = np.where(sources >= 0, space.ids[np.maximum(sources, 0)], _NO_ID)
        return np.lexsort((neighbour_ids, distances))
    packed = _packed_order(space, sources, distances)
    if packed is not None:
        return packed[0]
    bits = (distances.astype(np.float32) + np.float32(0.0)).view(np.uint32)  # -0.0 -> 0.0
    ranks = np.where(sources >= 0, space.id_ranks[np.maximum(sources, 0)], _NO_RANK)
    keys = (bits.astype(np.uint64) << np.uint64(32)) | ranks.astype(np.uint64)
    return np.argsort(keys, axis=1, kind="stable" if mostly_sorted else None)


def _packed_order(
    space: FeatureSpace,
    sources: np.ndarray,
    distances: np.ndarray,
    kk: int | None = None,
    settled: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(columns, distances in order, near-tie entries) by one uint64 sort of each row.

    Compiled kernels pack distance, id rank and column into one key (see order_keys), and
    numpy sorts the keys (vectorized: 0.25 against 0.53 us a row for argsort). Near-ties
    are looked for when kk is given. None where it does not apply: no kernels, a negative
    or NaN distance, or keys that do not fit in 64 bits.
    """
    if space.kernels is None or (distances.size and not distances.min() >= 0):
        return None
    rank_bits = space.n.bit_length()  # ranks are below n; padding takes the largest
    column_bits = max(1, (sources.shape[1] - 1).bit_length())
    if 31 + rank_bits + column_bits > 64:
        return None
    keys = space.kernels.order_keys(distances, sources, space.id_ranks, rank_bits, column_bits)
    keys.sort(axis=1)
    marks = np.empty((len(sources), 0), dtype=bool) if settled is None else settled
    args = (column_bits, kk or 0, near_tie_window(space), marks, kk is not None)
    return space.kernels.unpack_order(keys, distances, *args)  # type: ignore[no-any-return]


def _near_tie_entries(
    distances: np.ndarray, kk: int, tolerance: float, settled: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(row, column) of sorted entries in a chain of near-equal distances reaching the top kk.

    Exact zeros are left alone: a zero distance is exact in any precision. Chains made only
    of `settled` entries (already ordered exactly by an earlier run) are left alone too.
    """
    if distances.shape[1] < 2:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    close = close_to_previous(distances, tolerance)
    if not close.any():
        return np.empty(0, np.int64), np.empty(0, np.int64)
    member = np.zeros(distances.shape, dtype=bool)
    member[:, 1:] |= close
    member[:, :-1] |= close
    chain = np.zeros(distances.shape, dtype=np.int64)
    chain[:, 1:] = np.cumsum(~close, axis=1)
    reaching = chain <= chain[:, min(kk, distances.shape[1]) - 1, None]
    wanted = member & reaching & np.isfinite(distances)
    if settled is not None:
        # chain ids are unique within a row; offset them by row to make them unique overall
        key = chain + np.arange(len(chain))[:, None] * distances.shape[1]
        unsettled_chain = np.zeros(key.size, dtype=bool)
        unsettled_chain[key[~settled]] = True
        wanted &= unsettled_chain[key]
    rows, cols = np.nonzero(wanted)
    return rows, cols


def pair_sq_distances(
    space: FeatureSpace, a: np.ndarray, b: np.ndarray, *, precise: bool = False
) -> np.ndarray:
    """Direct squared distances |x_a - x_b|^2 (float32, or float64 when precise).

    A pair listed twice costs once, and is always computed as (lower position, higher
    position) so its value does not depend on which of its rows asked. Pairs inside tight
    groups come from an exact-product float64 GEMM, the others from float32 subtraction
    (float64 when precise); both are within the direct error bound of the true value.
    """
    n = space.n
    if len(a) == 0:
        return np.empty(0, dtype=np.float64 if precise else np.float32)
    low, high = np.minimum(a, b), np.maximum(a, b)
    if space.kernels is not None:
        unique, inverse = space.kernels.unique_pair_keys(low, high, n)
    else:
        unique, inverse = _unique_inverse(low.astype(np.int64) * n + high)
    return _unique_pair_sq_distances(space, unique, precise)[inverse]


def _unique_pair_sq_distances(space: FeatureSpace, keys: np.ndarray, precise: bool) -> np.ndarray:
    """Direct squared distances of unique pair keys, those in the pair memo not again."""
    memo = None if precise else space.pair_memo
    if memo is None:
        return _measured_pairs(space, keys, precise)
    out, known = memo.lookup(keys)
    missing = np.flatnonzero(~known)
    if missing.size:
        out[missing] = _measured_pairs(space, keys[missing], precise)
        memo.add(keys[missing], out[missing])
    return out


def _measured_pairs(space: FeatureSpace, keys: np.ndarray, precise: bool) -> np.ndarray:
    """Direct squared distances of unique pair keys (lower position * n + higher)."""
    low, high = np.divmod(keys, space.n)
    out = np.empty(len(keys), dtype=np.float64 if precise else np.float32)
    rest = np.arange(len(keys)) if precise else _group_pair_sq_distances(space, low, high, out)
    if rest.size:
        out[rest] = _subtracted_pair_sq_distances(space, low[rest], high[rest], precise)
    return out


def _subtracted_pair_sq_distances(
    space: FeatureSpace, low: np.ndarray, high: np.ndarray, precise: bool
) -> np.ndarray:
    """|x_low - x_high|^2 by subtracting the rows, for pairs sorted by their lower row.

    Even for a few new images against many rows this beats running by the new images (and
    subtracting each once per run): 26 against 35 ms for the 20,000 pairs of 2,048 floats
    that adding 200 images to 19,800 measures; the new rows stay in cache either way.
    """
    n = space.n
    out = np.empty(len(low), dtype=np.float64 if precise else np.float32)
    rows_of = space.precise_rows if precise else space.exact_rows
    # Pairs come sorted by their lower row. When rows have many partners, subtract each
    # lower row once per run instead of gathering it once per pair.
    grouped = len(low) >= 4 * np.count_nonzero(low[1:] != low[:-1])
    starts = range(0, len(low), _RERANK_CHUNK_PAIRS)
    many = len(starts) >= _PARALLEL_RERANK_CHUNKS
    visit: np.ndarray | None = None
    if many and space.labels is not None:  # the neighbourhoods of the lists measured last
        visit = _stable_order(space.labels[low], n, space.kernels)
    elif many:
        visit = _neighbourhood_order(low, high, n, space.kernels)
    if visit is None:
        visit = np.arange(len(low))

    # The compiled kernel scales cosine rows in float32: precise cosine rows are not its.
    kernels = None if precise and space.scale is not None else space.kernels
    if kernels is not None:
        _compiled_pair_sq_distances(space, kernels, low, high, visit, out)
        return out

    def compute(start: int) -> None:
        pairs = visit[start : start + _RERANK_CHUNK_PAIRS]
        lows = low[pairs]
        # In float64 (float32 differences are exact there): the sum rounds once, as in
        # the compiled kernel, so both paths report the same distances.
        diff = rows_of(high[pairs]).astype(np.float64)
        if grouped:
            runs = np.append(np.flatnonzero(np.diff(lows)) + 1, len(lows))
            first = 0
            for end in runs:
                diff[first:end] -= rows_of(lows[first : first + 1])
                first = end
        else:
            diff -= rows_of(lows)
        out[pairs] = np.einsum("ij,ij->i", diff, diff)

    # Chunks write disjoint entries of `out`, so they can run on every core at once.
    if many:
        on_all_cores(compute, starts)
    else:
        for start in starts:
            compute(start)
    return out


def _compiled_pair_sq_distances(
    space: FeatureSpace,
    kernels: Any,
    low: np.ndarray,
    high: np.ndarray,
    visit: np.ndarray,
    out: np.ndarray,
) -> None:
    """The compiled kernel over the pairs in `visit` order, one long call per part and core.

    Parts write disjoint entries of `out`; a float64 `out` keeps the sums unrounded.
    """
    scale = np.empty(0, np.float32) if space.scale is None else space.scale
    parts = np.array_split(visit, max(1, min(_COMPILED_PARTS, len(visit) // _RERANK_CHUNK_PAIRS)))
    on_all_cores(
        lambda part: kernels.pair_sq_distances(space.features, scale, low, high, parts[part], out),
        range(len(parts)),
    )


def _group_pair_sq_distances(
    space: FeatureSpace, low: np.ndarray, high: np.ndarray, out: np.ndarray
) -> np.ndarray:
    """Fill `out` for pairs inside tight groups of rows; return the indices of the rest.

    A group's rows are centred and multiplied in float64 (one small GEMM per group, on
    every core). Products of float32 numbers are exact in float64 and the sums lose about
    d * 2^-53 of the squared norms, so where the distance is not tiny against the norms
    the result is far inside float32 rounding: better than subtracting in float32, at a
    fraction of the memory traffic. Near-duplicates (squared distance below
    _GROUP_GUARD of the norms, exact duplicates included) are left to the subtraction,
    which gives them their exact value (0 for a duplicate). So are the few pairs whose
    float32 rounding the two ways could differ on: a pair reports the same distance
    whichever way it is measured, so whatever other pairs are measured with it.
    """
    plan = _group_plan(space, low, high)
    if plan is None:
        return np.arange(len(low))
    members, member_bounds, place, chosen, pair_bounds = plan
    centre = space.centre.astype(np.float64)
    scale = np.empty(0, np.float32) if space.scale is None else space.scale
    done = np.zeros(len(low), dtype=bool)
    kernels = space.kernels

    def compute(g: int) -> None:
        rows = members[member_bounds[g] : member_bounds[g + 1]]
        pairs = chosen[pair_bounds[g] : pair_bounds[g + 1]]
        if kernels is None:
            block = space.exact_rows(rows).astype(np.float64)
            block -= centre  # exact: float32 numbers within 2^29 of each other in scale
            _settle_group_pairs(space.d, block @ block.T, place, low, high, pairs, out, done)
            return
        block = np.empty((len(rows), space.d))
        kernels.centred_block(space.features, scale, rows, centre, block, np.empty(len(rows)))
        gram = block @ block.T
        kernels.settle_group_pairs(gram, place, low, high, pairs, _GROUP_GUARD, space.d, out, done)

    # Groups write disjoint entries of `out` and `done`; one BLAS thread per worker.
    with tile_workers(cpu_cores() if len(member_bounds) > 2 else 1) as workers:
        workers.map(compute, range(len(member_bounds) - 1))
    return np.flatnonzero(~done)


def _group_plan(
    space: FeatureSpace, low: np.ndarray, high: np.ndarray
) -> tuple[np.ndarray, ...] | None:
    """(members, member bounds, place, chosen pairs, pair bounds) of the dense groups.

    Group g holds rows members[member_bounds[g]:member_bounds[g + 1]] and the pairs
    chosen[pair_bounds[g]:pair_bounds[g + 1]]; place is a member's row in its group's
    block. None when too few pairs lie inside dense groups to be worth the set-up.
    """
    if space.kernels is not None:
        plan = space.kernels.group_plan(
            low, high, space.n, _GROUP_MIN_ROWS, _GROUP_MAX_ROWS, _GROUP_MIN_SHARE, _GROUP_MIN_PAIRS
        )
        return None if len(plan[3]) == 0 else plan
    label = _neighbourhood_labels(low, high, space.n)
    group = label[low]
    sizes = np.bincount(label, minlength=space.n)
    inside = group == label[high]
    pairs_inside = np.bincount(group[inside], minlength=space.n)
    # Dense groups only: the GEMM computes every pair of a group, wanted or not.
    dense = (sizes >= _GROUP_MIN_ROWS) & (sizes <= _GROUP_MAX_ROWS)
    dense &= pairs_inside >= _GROUP_MIN_SHARE * sizes * (sizes - 1) / 2
    chosen = np.flatnonzero(inside & dense[group])
    if chosen.size < _GROUP_MIN_PAIRS:
        return None
    members = np.flatnonzero(dense[label])
    members = members[np.argsort(label[members], kind="stable")]
    member_starts = np.flatnonzero(np.diff(label[members], prepend=-1))
    place = np.empty(space.n, dtype=np.int64)  # a member's row within its group's block
    place[members] = np.arange(len(members)) - np.repeat(
        member_starts, np.diff(np.append(member_starts, len(members)))
    )
    chosen = chosen[np.argsort(group[chosen], kind="stable")]
    pair_starts = np.flatnonzero(np.diff(group[chosen], prepend=-1))
    member_bounds = np.append(member_starts, len(members))
    return members, member_bounds, place, chosen, np.append(pair_starts, len(chosen))


def _settle_group_pairs(
    d: int,
    gram: np.ndarray,
    place: np.ndarray,
    low: np.ndarray,
    high: np.ndarray,
    pairs: np.ndarray,
    out: np.ndarray,
    done: np.ndarray,
) -> None:
    """A group's pairs from its float64 Gram matrix, but near-duplicates and pairs whose
    float32 rounding the two ways could differ on (see _group_pair_sq_distances)."""
    norms = np.diagonal(gram)
    i, j = place[low[pairs]], place[high[pairs]]
    sq = norms[i] + norms[j] - 2.0 * gram[i, j]
    good = sq >= _GROUP_GUARD * (norms[i] + norms[j])
    good &= _rounds_alike(sq, _group_error(d, norms[i] + norms[j], sq))
    out[pairs[good]] = sq[good]  # rounded to float32 once
    done[pairs[good]] = True


def _group_error(d: int, norms: np.ndarray, sq: np.ndarray) -> np.ndarray:
    """Bound on how far a grouped squared distance and a subtracted one can be apart.

    The Gram entries and norms lose at most d units (2^-53) of the norms each; the
    subtraction sums d exact squares in float64 and loses at most d units of the result.
    """
    unit = 2.0**-53
    return (2 * d + 8) * unit * norms + (d + 2) * unit * sq


def _rounds_alike(values: np.ndarray, error: np.ndarray) -> np.ndarray:
    """Whether every float64 within `error` of each value rounds to the same float32."""
    rounded = values.astype(np.float32)
    below = np.nextafter(rounded, np.float32(-np.inf)).astype(np.float64)
    above = np.nextafter(rounded, np.float32(np.inf)).astype(np.float64)
    # Midpoints of neighbouring float32 numbers are exact in float64.
    centre = rounded.astype(np.float64)
    return (values - (centre + below) / 2 > error) & ((centre + above) / 2 - values > error)


def _neighbourhood_labels(low: np.ndarray, high: np.ndarray, n: int) -> np.ndarray:
    """Each row's label: the lowest row paired with it (or itself), followed once more.

    Rows of one tight group mostly share a label.
    """
    label = np.arange(n)
    np.minimum.at(label, high, low)  # low < high: only a high row's label can fall
    return label[label]


def _stable_order(keys: np.ndarray, n: int, kernels: Any) -> np.ndarray:
    """np.argsort(keys, kind="stable") of keys in [0, n); compiled: a counting sort."""
    if kernels is not None:
        return kernels.stable_order(keys, n)  # type: ignore[no-any-return]
    return np.argsort(keys, kind="stable")


def _neighbourhood_order(
    low: np.ndarray, high: np.ndarray, n: int, kernels: Any
) -> np.ndarray | None:
    """An order of the pairs (sorted by low row) that takes each neighbourhood's together.

    Pairs of rows with one label (see _neighbourhood_labels) run together and the rows they
    gather are still in cache, instead of coming from memory once per pair. None when most
    pairs cross labels (no groups, e.g. unstructured data): there it only costs.
    """
    if kernels is not None:
        label = kernels.neighbourhood_labels(low, high, n)
    else:
        label = _neighbourhood_labels(low, high, n)
    group = label[low]
    if np.count_nonzero(group == label[high]) < _GROUPED_PAIR_SHARE * len(low):
        return None
    return _stable_order(group, n, kernels)  # stable: runs of one low row stay whole


def _unique_inverse(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique keys and each key's index among them.

    np.unique hashes in numpy >= 2.3, which is several times slower than sorting here.
    """
    order = np.argsort(keys)
    ordered = keys[order]
    first = np.ones(len(ordered), dtype=bool)
    first[1:] = ordered[1:] != ordered[:-1]
    inverse = np.empty(len(keys), dtype=np.int64)
    inverse[order] = np.cumsum(first) - 1
    return ordered[first], inverse


def to_distance(metric: str, sq: np.ndarray) -> np.ndarray:
    """Reported distance from a direct squared distance: euclidean, or 1 - cos for cosine."""
    if metric == "cosine":
        return (sq * 0.5).astype(np.float32)  # |a - b|^2 / 2 = 1 - cos(a, b) for unit a, b
    return np.sqrt(sq).astype(np.float32)


def sq_upper_bound(metric: str, distances: np.ndarray) -> np.ndarray:
    """The largest squared distance that reports as `distances` (float64)."""
    upper = np.nextafter(distances.astype(np.float32), np.float32(np.inf)).astype(np.float64)
    if metric == "cosine":
        return upper * 2.0
    return upper * upper


def sq_reach(space: FeatureSpace, positions: np.ndarray, last: np.ndarray) -> np.ndarray:
    """Largest expanded squared distance that a row within `last` of these rows can have."""
    reach = sq_upper_bound(space.metric, last) * (1 + 2 * space.direct_error)
    return reach + space.error_bound(positions)


def proven_rows(
    space: FeatureSpace, positions: np.ndarray, last: np.ndarray, limits: np.ndarray
) -> np.ndarray:
    """Rows whose kk-th distance `last` is below what anything not kept could reach.

    Every entry not kept has an expanded distance >= limit; if even a row at distance
    `last` would expand to less than that, nothing left out can tie or beat the list.
    """
    return np.isinf(limits) | (sq_reach(space, positions, last) < limits)


def exhaustive_rows(
    space: FeatureSpace,
    tiles: TileBackend,
    positions: np.ndarray,
    last: np.ndarray,
    kk: int,
    shape: TileShape,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact lists of rows the candidate pass could not prove: every column within reach.

    `last` is a kk-th distance already found, so the true kk nearest all lie within it;
    every column whose expanded distance could be that small is measured directly.
    """
    reach = sq_reach(space, positions, last)
    found_rows, found_cols = [], []
    for start in range(0, len(positions), shape.rows):
        chunk = positions[start : start + shape.rows]
        left = space.left(chunk)
        for c0 in range(0, space.n, shape.cols):
            c1 = min(c0 + shape.cols, space.n)
            tile = tiles.distances(left, space.right(slice(c0, c1)))
            row, col = np.nonzero(tile <= reach[start : start + len(chunk), None])
            found_rows.append(row + start)
            found_cols.append(col + c0)
    rows, cols = np.concatenate(found_rows), np.concatenate(found_cols)
    keep = positions[rows] != cols
    rows, cols = rows[keep], cols[keep]
    order = np.argsort(rows, kind="stable")
    rows, cols = rows[order], cols[order]
    rank = np.arange(len(rows)) - np.searchsorted(rows, rows)
    width = max(kk, int(rank.max(initial=0)) + 1)
    sources = np.full((len(positions), width), -1, dtype=np.int64)
    sources[rows, rank] = cols
    return rerank_rows(space, positions, sources, kk)
