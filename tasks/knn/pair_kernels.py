"""numba kernels of the re-rank: pair keys, tight groups and direct pair distances."""

from __future__ import annotations

import numba
import numpy as np

_UNIT = 2.0**-53  # float64 unit roundoff
_NO_RANK = np.uint64(0xFFFFFFFF)  # sorts after every id rank (ranks are below n < 2^32)


@numba.njit(nogil=True, cache=True)
def list_pair_keys(positions, sources, n):  # type: ignore[no-untyped-def]
    """Unique pair keys (lower * n + higher) of lists' entries, and each entry's key index.

    Row i of `sources` lists candidates of row positions[i] (-1: none, index -1). A pair
    listed by both its rows gets one key. Keys come grouped by their lower row, rows
    ascending; within one lower row, in the order first met. The same pairs as
    unique_pair_keys of np.minimum / np.maximum of the valid entries, without their
    gathered copies: a counting sort by lower row, then a stamp per higher row.
    """
    rows, width = sources.shape
    starts = np.zeros(n + 1, dtype=np.int64)
    for i in range(rows):
        for t in range(width):
            other = sources[i, t]
            if other >= 0:
                starts[min(positions[i], other) + 1] += 1
    for row in range(n):
        starts[row + 1] += starts[row]
    place = starts[:-1].copy()
    higher = np.empty(starts[n], dtype=np.int64)
    entry = np.empty(starts[n], dtype=np.int64)
    for i in range(rows):
        for t in range(width):
            other = sources[i, t]
            if other >= 0:
                lower = min(positions[i], other)
                at = place[lower]
                higher[at] = max(positions[i], other)
                entry[at] = i * width + t
                place[lower] = at + 1
    return _first_met_keys(starts, higher, entry, n, rows, width)


@numba.njit(nogil=True, cache=True)
def _first_met_keys(starts, higher, entry, n, rows, width):  # type: ignore[no-untyped-def]
    """Keys of the bucketed pairs (see list_pair_keys) and the (rows, width) key index."""
    inverse = np.full(rows * width, -1, dtype=np.int64)
    unique = np.empty(len(higher), dtype=np.int64)
    stamp = np.full(n, -1, dtype=np.int64)  # the lower row whose bucket last met a row
    index = np.empty(n, dtype=np.int64)
    found = 0
    for row in range(n):
        for t in range(starts[row], starts[row + 1]):
            other = higher[t]
            if stamp[other] != row:
                stamp[other] = row
                index[other] = found
                unique[found] = row * n + other
                found += 1
            inverse[entry[t]] = index[other]
    return unique[:found].copy(), inverse.reshape(rows, width)


@numba.njit(nogil=True, cache=True)
def unique_pair_keys(low, high, n):  # type: ignore[no-untyped-def]
    """Sorted unique pair keys (low * n + high) and each pair's index among them.

    The same as sorting the keys (np.unique with return_inverse), 2.4x faster: a counting
    sort by the low row, then one short sort per low row of (high, pair) packed in an int64.
    """
    count = len(low)
    starts = np.zeros(n + 1, dtype=np.int64)
    for t in range(count):
        starts[low[t] + 1] += 1
    for row in range(n):
        starts[row + 1] += starts[row]
    place = starts[:-1].copy()
    packed = np.empty(count, dtype=np.int64)  # high << 32 | pair index (both < 2^31)
    for t in range(count):
        at = place[low[t]]
        packed[at] = (np.int64(high[t]) << 32) | t
        place[low[t]] += 1
    unique = np.empty(count, dtype=np.int64)
    inverse = np.empty(count, dtype=np.int64)
    found = 0
    for row in range(n):
        first, stop = starts[row], starts[row + 1]
        packed[first:stop].sort()
        previous = -1
        for t in range(first, stop):
            other = packed[t] >> 32
            if other != previous:
                unique[found] = row * n + other
                found += 1
                previous = other
            inverse[packed[t] & 0xFFFFFFFF] = found - 1
    return unique[:found].copy(), inverse


@numba.njit(nogil=True, cache=True)
def stable_order(keys, n):  # type: ignore[no-untyped-def]
    """np.argsort(keys, kind="stable") for keys in [0, n), by a counting sort."""
    starts = np.zeros(n + 1, dtype=np.int64)
    for key in keys:
        starts[key + 1] += 1
    for key in range(n):
        starts[key + 1] += starts[key]
    order = np.empty(len(keys), dtype=np.int64)
    for t in range(len(keys)):
        order[starts[keys[t]]] = t
        starts[keys[t]] += 1
    return order


@numba.njit(nogil=True, cache=True)
def neighbourhood_labels(low, high, n):  # type: ignore[no-untyped-def]
    """Each row's label: the lowest row paired with it (or itself), followed once more."""
    first = np.arange(n)
    for p in range(len(low)):
        if low[p] < first[high[p]]:
            first[high[p]] = low[p]
    label = np.empty(n, dtype=np.int64)
    for row in range(n):
        label[row] = first[first[row]]
    return label


@numba.njit(nogil=True, cache=True)
def group_plan(  # type: ignore[no-untyped-def]
    low, high, n, min_rows, max_rows, min_share, min_pairs
):
    """Tight groups of rows and the pairs inside them, as rerank._group_pair_sq_distances
    plans them with numpy: (members, member bounds, place, chosen pairs, pair bounds).

    Group g holds rows members[member_bounds[g]:member_bounds[g + 1]] (ascending) and the
    pairs chosen[pair_bounds[g]:pair_bounds[g + 1]] (ascending); place[row] is a member's
    index within its group. No groups when fewer than min_pairs pairs would be chosen.
    """
    label = neighbourhood_labels(low, high, n)
    sizes = np.zeros(n, dtype=np.int64)
    for row in range(n):
        sizes[label[row]] += 1
    inside = np.zeros(n, dtype=np.int64)
    for p in range(len(low)):
        if label[low[p]] == label[high[p]]:
            inside[label[low[p]]] += 1
    dense = np.zeros(n, dtype=np.bool_)
    for g in range(n):
        size = sizes[g]
        wanted = min_share * size * (size - 1) / 2
        dense[g] = min_rows <= size <= max_rows and inside[g] >= wanted
    chosen_count = 0
    for p in range(len(low)):
        chosen_count += label[low[p]] == label[high[p]] and dense[label[low[p]]]
    if chosen_count < min_pairs:
        empty = np.empty(0, dtype=np.int64)
        return empty, np.zeros(1, dtype=np.int64), empty, empty, np.zeros(1, dtype=np.int64)
    nothing_first = np.zeros(n, dtype=np.bool_)
    members, member_bounds, _, group_of, place = _members(label, sizes, dense, nothing_first)
    groups = len(member_bounds) - 1
    pair_bounds = np.zeros(groups + 1, dtype=np.int64)
    for p in range(len(low)):
        g = group_of[low[p]]
        if g >= 0 and g == group_of[high[p]]:
            pair_bounds[g + 1] += 1
    for g in range(groups):
        pair_bounds[g + 1] += pair_bounds[g]
    chosen = np.empty(chosen_count, dtype=np.int64)
    fill = pair_bounds[:-1].copy()
    for p in range(len(low)):
        g = group_of[low[p]]
        if g >= 0 and g == group_of[high[p]]:
            chosen[fill[g]] = p
            fill[g] += 1
    return members, member_bounds, place, chosen, pair_bounds


# reassoc lets the norms' sums run in vector lanes (4x faster); each value written is one
# exact float64 subtraction, which no fast-math flag here can change.
@numba.njit(nogil=True, cache=True, fastmath={"reassoc"})
def centred_block(features, scale, rows, centre, out, norms):  # type: ignore[no-untyped-def]
    """out[r] = rows[r] as the metric measures them (float32), in float64, minus centre;
    norms[r] its squared norm (a float64 sum of exact squares in any order: within d units
    of it, which the settling bound allows for).

    As exact_rows(rows).astype(float64) - centre: cosine rows scaled in float32 first.
    """
    scaled = len(scale) > 0
    for r in range(len(rows)):
        row = rows[r]
        factor = scale[row] if scaled else np.float32(1.0)
        total = 0.0
        for t in range(features.shape[1]):
            value = np.float64(features[row, t] * factor) - centre[t]
            out[r, t] = value
            total += value * value
        norms[r] = total


@numba.njit(nogil=True, cache=True)
def settle_group_pairs(gram, place, low, high, pairs, guard, d, out, done):  # type: ignore[no-untyped-def]
    """Squared distances of a group's pairs from its float64 Gram matrix, where they are safe.

    A pair is settled (out, done) unless _safe_sq_distance finds it unsafe: the same tests
    as rerank._settle_group_pairs, pair by pair.
    """
    for p in pairs:
        a, b = place[low[p]], place[high[p]]
        value = _safe_sq_distance(gram[a, a], gram[b, b], gram[a, b], guard, d)
        if value == value:  # not NaN: safe
            out[p] = value
            done[p] = True


@numba.njit(nogil=True, cache=True, inline="always")
def _safe_sq_distance(norm_a, norm_b, product, guard, d):  # type: ignore[no-untyped-def]
    """|x_a - x_b|^2 (float32) from float64 norms and product, or NaN where it is not safe:
    a near-duplicate (below guard x the norms), or a float64 value within the Gram error
    bound of it could round to another float32."""
    norms = norm_a + norm_b
    value = norms - 2.0 * product
    if not value >= guard * norms:
        return np.float32(np.nan)
    error = (2 * d + 8) * _UNIT * norms + (d + 2) * _UNIT * value
    rounded = np.float32(value)
    centre = np.float64(rounded)
    below = np.float64(np.nextafter(rounded, np.float32(-np.inf)))
    above = np.float64(np.nextafter(rounded, np.float32(np.inf)))
    if value - (centre + below) / 2 > error and (centre + above) / 2 - value > error:
        return rounded
    return np.float32(np.nan)


@numba.njit(nogil=True, cache=True, fastmath={"reassoc", "contract"})
def _row_sq_distance(a, b, scale_a, scale_b):  # type: ignore[no-untyped-def]
    """|a * scale_a - b * scale_b|^2 summed in float64, in lanes (reassociated).

    Each difference of float32 numbers is exact in float64; the sum loses at most about
    d * 2^-53 of itself in any order, so vector lanes keep the error bound the re-rank
    assumes (5.7x faster than one running sum: 0.30 against 1.7 us for 2,048 features).
    """
    total = 0.0
    for t in range(np.uint64(0), np.uint64(a.shape[0])):
        diff = np.float64(a[t] * scale_a) - np.float64(b[t] * scale_b)
        total += diff * diff
    return total


@numba.njit(nogil=True, cache=True)
def pair_sq_distances(features, scale, low, high, order, out):  # type: ignore[no-untyped-def]
    """|x_low - x_high|^2 of the pairs listed in `order`, summed in float64, into `out`.

    Rows are read in place (no gathered copies); cosine rows are scaled in float32 as
    FeatureSpace.exact_rows does (scale is empty for euclidean: a factor 1 is exact).
    A float32 `out` rounds each sum once.
    """
    scaled = len(scale) > 0
    one = np.float32(1.0)
    for p in order:
        a, b = low[p], high[p]
        scale_a = scale[a] if scaled else one
        scale_b = scale[b] if scaled else one
        out[p] = _row_sq_distance(features[a], features[b], scale_a, scale_b)


@numba.njit(nogil=True, cache=True)
def list_groups(  # type: ignore[no-untyped-def]
    positions, sources, n, min_rows, max_rows, min_share, min_entries
):
    """Tight groups of rows among lists' entries, for measuring the lists in place.

    As group_plan, but from the lists (row positions[i] lists sources[i]) instead of
    unique pairs: a group is dense when its rows with a list here list at least min_share
    of their pairs in it (only those rows' products are computed: lists measured in row
    chunks hold part of each group). Returns (members, member bounds, members with a list
    per group, group of each row (-1: none), place of each member in its group (those with
    a list first), each row's label).
    """
    label = _entry_labels(positions, sources, n)
    sizes = np.zeros(n, dtype=np.int64)
    for row in range(n):
        sizes[label[row]] += 1
    listed = np.zeros(n, dtype=np.bool_)
    listed_per_label = np.zeros(n, dtype=np.int64)
    inside = np.zeros(n, dtype=np.int64)
    rows, width = sources.shape
    for i in range(rows):
        own = label[positions[i]]
        listed[positions[i]] = True
        listed_per_label[own] += 1
        for t in range(width):
            other = sources[i, t]
            inside[own] += other >= 0 and label[other] == own
    dense = np.zeros(n, dtype=np.bool_)
    chosen = 0
    for g in range(n):
        size = sizes[g]
        wanted = min_share * listed_per_label[g] * (size - 1)
        dense[g] = min_rows <= size <= max_rows and inside[g] >= wanted
        chosen += inside[g] if dense[g] else 0
    if chosen < min_entries:
        dense[:] = False
    return _members(label, sizes, dense, listed) + (label,)


@numba.njit(nogil=True, cache=True)
def _entry_labels(positions, sources, n):  # type: ignore[no-untyped-def]
    """neighbourhood_labels of the pairs the lists hold (each (row, candidate) entry)."""
    first = np.arange(n)
    rows, width = sources.shape
    for i in range(rows):
        row = positions[i]
        for t in range(width):
            other = sources[i, t]
            if other >= 0:
                low, high = min(row, other), max(row, other)
                if low < first[high]:
                    first[high] = low
    label = np.empty(n, dtype=np.int64)
    for row in range(n):
        label[row] = first[first[row]]
    return label


@numba.njit(nogil=True, cache=True)
def _members(label, sizes, dense, first):  # type: ignore[no-untyped-def]
    """(members, member bounds, leading, group of each row, place) of the dense labels,
    groups ascending; in each group the rows marked `first` (`leading` of them) come first,
    each part ascending."""
    n = len(label)
    group_of_label = np.full(n, -1, dtype=np.int64)
    groups = 0
    for g in range(n):
        if dense[g]:
            group_of_label[g] = groups
            groups += 1
    bounds = np.zeros(groups + 1, dtype=np.int64)
    leading = np.zeros(groups, dtype=np.int64)
    for row in range(n):
        g = group_of_label[label[row]]
        if g >= 0:
            bounds[g + 1] += 1
            leading[g] += first[row]
    for g in range(groups):
        bounds[g + 1] += bounds[g]
    members = np.empty(bounds[groups], dtype=np.int64)
    group_of = np.full(n, -1, dtype=np.int64)
    place = np.full(n, -1, dtype=np.int64)
    fill = bounds[:-1].copy()
    for leading_part in (True, False):
        for row in range(n):
            g = group_of_label[label[row]]
            if g >= 0 and first[row] == leading_part:
                members[fill[g]] = row
                group_of[row] = g
                place[row] = fill[g] - bounds[g]
                fill[g] += 1
    return members, bounds, leading, group_of, place


@numba.njit(nogil=True, cache=True)
def settle_group_entries(  # type: ignore[no-untyped-def]
    gram, norms, group, members, group_of, place, list_row, sources, guard, d, sq, done
):
    """settle_group_pairs for the list entries of one group's members, written in place.

    members: the group's rows with a list (list_row[row]: that list), which are the first
    rows of its block: gram is their products with every row of the block, norms every
    row's squared norm. Where a pair's two entries read the two products (i, j) and
    (j, i), each value settled is the float32 of the pair's subtraction all the same.
    """
    for row in members:
        i, a = list_row[row], place[row]
        for t in range(sources.shape[1]):
            other = sources[i, t]
            if other < 0 or group_of[other] != group:
                continue
            b = place[other]
            value = _safe_sq_distance(norms[a], norms[b], gram[a, b], guard, d)
            if value == value:
                sq[i, t] = value
                done[i, t] = True


@numba.njit(nogil=True, cache=True)
def listed_sq_distances(  # type: ignore[no-untyped-def]
    features, scale, positions, sources, done, visit, list_row, sq
):
    """|x_row - x_candidate|^2 of the list entries not done, lists taken in `visit` order.

    Each pair is summed as (lower row, higher row), as pair_sq_distances does, so it has
    one value whichever of its rows lists it; an entry whose pair the other row's list
    holds too (list_row[row]: that row's list, -1: none) is left to that list when its
    own row is the higher one. Returns those entries and their mirrors (flat indices):
    sq.flat[entries] = sq.flat[mirrors] completes them once every part has run.
    """
    scaled = len(scale) > 0
    one = np.float32(1.0)
    width = sources.shape[1]
    entries = np.empty(len(visit) * width, dtype=np.int64)
    mirrors = np.empty(len(visit) * width, dtype=np.int64)
    found = 0
    for i in visit:
        row = positions[i]
        for t in range(width):
            other = sources[i, t]
            if other < 0 or done[i, t]:
                continue
            if other < row and list_row[other] >= 0:
                at = _position_in(sources[list_row[other]], row)
                if at >= 0:
                    entries[found] = i * width + t
                    mirrors[found] = list_row[other] * width + at
                    found += 1
                    continue
            a, b = min(row, other), max(row, other)
            scale_a = scale[a] if scaled else one
            scale_b = scale[b] if scaled else one
            sq[i, t] = _row_sq_distance(features[a], features[b], scale_a, scale_b)
    return entries[:found].copy(), mirrors[:found].copy()


@numba.njit(nogil=True, cache=True, inline="always")
def _position_in(values, value):  # type: ignore[no-untyped-def]
    """Index of value in values, or -1."""
    at = -1
    for t in range(len(values)):
        if values[t] == value:
            at = t
    return at


@numba.njit(nogil=True, cache=True)
def order_keys(distances, sources, ranks, rank_bits, column_bits):  # type: ignore[no-untyped-def]
    """uint64 keys that order each row by (distance, id rank), padding last, then column.

    Each key packs the float32 bits of a non-negative distance (-0.0 as 0.0; 31 bits), the
    id rank of the source (padding: the largest rank_bits number, above every real rank)
    and the column, so a plain sort of each row gives the order and the column is in the
    key. The caller makes sure the three fit in 64 bits.
    """
    rows, width = distances.shape
    keys = np.empty((rows, width), dtype=np.uint64)
    line = np.empty(width, dtype=np.float32)
    bits = line.view(np.uint32)
    padding = (np.uint64(1) << np.uint64(rank_bits)) - np.uint64(1)
    rank_shift = np.uint64(column_bits)
    bits_shift = np.uint64(rank_bits + column_bits)
    for i in range(rows):
        for t in range(width):
            line[t] = distances[i, t] + np.float32(0.0)  # -0.0 -> 0.0
        for t in range(width):
            rank = np.uint64(ranks[sources[i, t]]) if sources[i, t] >= 0 else padding
            keys[i, t] = (np.uint64(bits[t]) << bits_shift) | (rank << rank_shift) | t
    return keys


@numba.njit(nogil=True, cache=True)
def unpack_order(  # type: ignore[no-untyped-def]
    keys, distances, column_bits, kk, window, settled, find_ties
):
    """From sorted keys (order_keys): each row's columns in order, its distances in that
    order and, with find_ties, its near-tie entries to measure again (flat indices).

    As rerank._near_tie_entries: entries in chains of near-equal distances that reach the
    first kk; chains all of whose entries are settled are left alone. settled is (rows, 0)
    when no entry is settled.
    """
    rows, width = keys.shape
    columns = np.empty((rows, width), dtype=np.int64)
    ordered = np.empty((rows, width), dtype=np.float32)
    ties = np.empty(rows * width if find_ties else 0, dtype=np.int64)
    mask = (np.uint64(1) << np.uint64(column_bits)) - np.uint64(1)
    found = 0
    for i in range(rows):
        for t in range(width):
            column = np.int64(keys[i, t] & mask)
            columns[i, t] = column
            ordered[i, t] = distances[i, column]
        if find_ties:
            found = _row_ties(ordered[i], settled, i, columns[i], kk, window, ties, found)
    return columns, ordered, ties[:found].copy()


@numba.njit(nogil=True, cache=True)
def _row_ties(line, settled, i, columns, kk, window, ties, found):  # type: ignore[no-untyped-def]
    """Append to ties the flat indices of row i's entries in near-tie chains reaching its
    first kk; chains whose entries are all settled are left alone."""
    width = len(line)
    window32 = np.float32(window)
    last_chain = 0  # chain of the kk-th entry
    chain = 0
    top = min(kk, width) - 1
    for c in range(1, top + 1):
        chain += not _close(line, c, window32)
    last_chain = chain
    chain = 0
    c = 0
    while c < width and chain <= last_chain:
        stop = c + 1  # the chain starting at c ends before stop
        while stop < width and _close(line, stop, window32):
            stop += 1
        wanted = stop - c > 1
        if wanted and settled.shape[1] > 0:
            wanted = False
            for e in range(c, stop):
                wanted |= not settled[i, columns[e]]
        if wanted:
            for e in range(c, stop):
                if line[e] < np.inf:
                    ties[found] = i * width + e
                    found += 1
        chain += 1
        c = stop
    return found


@numba.njit(nogil=True, cache=True, inline="always")
def _close(line, c, window32):  # type: ignore[no-untyped-def]
    """Whether sorted entry c is a near-tie of entry c - 1 (rerank.close_to_previous)."""
    later = line[c]
    return later - line[c - 1] <= window32 * later and later > 0 and later < np.inf
