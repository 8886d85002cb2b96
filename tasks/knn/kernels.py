"""numba kernels of the compiled tile selection; imported only where numba is installed."""

from __future__ import annotations

import numba
import numpy as np

INF = np.float32(np.inf)


@numba.njit(nogil=True, cache=True)
def kth_smallest(scratch: np.ndarray, count: int, kth: int) -> np.float32:
    """The kth smallest (0-based) of scratch[:count], by quickselect; scratch is reordered."""
    lo, hi = 0, count - 1
    while lo < hi:
        pivot = scratch[(lo + hi) // 2]
        i, j = lo, hi
        while i <= j:
            while scratch[i] < pivot:
                i += 1
            while scratch[j] > pivot:
                j -= 1
            if i <= j:
                scratch[i], scratch[j] = scratch[j], scratch[i]
                i += 1
                j -= 1
        if kth <= j:
            hi = j
        elif kth >= i:
            lo = i
        else:
            break
    return scratch[kth]


@numba.njit(nogil=True, cache=True)
def cut_back(values, sources, fill, limits, slot, width, scratch):  # type: ignore[no-untyped-def]
    """Keep a slot's entries below its (width+1)-th smallest; lower its limit to that."""
    count = fill[slot]
    for t in range(count):
        scratch[t] = values[slot, t]
    dropped = kth_smallest(scratch, count, width)
    kept = 0
    for t in range(count):
        value = values[slot, t]
        if value < dropped:
            values[slot, kept] = value
            sources[slot, kept] = sources[slot, t]
            kept += 1
    for t in range(kept, count):
        values[slot, t] = INF
        sources[slot, t] = -1
    fill[slot] = kept
    if dropped < limits[slot]:
        limits[slot] = dropped
    return limits[slot]


@numba.njit(nogil=True, cache=True)
def fresh_limits(tile, slots, fill, limits, width):  # type: ignore[no-untyped-def]
    """Fresh slots (no limit, nothing kept) of tile rows take their row's (width+1)-th
    smallest as their limit first: the scan then appends about `width` of the row's
    entries instead of all of them, each to be cut back later."""
    count = tile.shape[1]
    if count <= width:
        return
    line = np.empty(count, dtype=np.float32)
    for t in range(len(slots)):
        slot = slots[t]
        if limits[slot] < INF or fill[slot] > 0:
            continue
        line[:] = tile[t, :]
        limits[slot] = kth_smallest(line, count, width)


@numba.njit(nogil=True, cache=True)
def has_fresh(slots, fill, limits):  # type: ignore[no-untyped-def]
    """True when some slot has no limit and nothing kept yet."""
    for slot in slots:  # noqa: SIM110 - numba compiles loops, not generators in any()
        if limits[slot] == INF and fill[slot] == 0:
            return True
    return False


@numba.njit(nogil=True, cache=True)
def scan_tile(  # type: ignore[no-untyped-def]
    tile, rows, cols, both, row_positions, col_positions, width, scratch
):
    """One pass over the tile: each entry within its row's (and column's) limit is kept.

    rows / cols: (slots, values, sources, fill, limits) of each side's lists. Appending
    is written out here rather than called: it runs for every entry that passes.
    """
    row_slots, row_values, row_sources, row_fill, row_limits = rows
    col_slots, col_values, col_sources, col_fill, col_limits = cols
    room = row_values.shape[1]
    fresh_limits(tile, row_slots, row_fill, row_limits, width)
    col_limit = np.full(tile.shape[1], -INF, dtype=np.float32)
    if both:
        if has_fresh(col_slots, col_fill, col_limits):  # columns as rows: one copy
            fresh_limits(tile.T.copy(), col_slots, col_fill, col_limits, width)
        for j in range(tile.shape[1]):
            col_limit[j] = col_limits[col_slots[j]]
    for i in range(tile.shape[0]):
        slot = row_slots[i]
        limit = row_limits[slot]
        source = row_positions[i]
        for j in range(tile.shape[1]):
            value = tile[i, j]
            if value <= limit and value < INF:  # an image against itself is INF
                at = row_fill[slot]
                row_values[slot, at] = value
                row_sources[slot, at] = col_positions[j]
                row_fill[slot] = at + 1
                if at + 1 == room:
                    limit = cut_back(
                        row_values, row_sources, row_fill, row_limits, slot, width, scratch
                    )
            if value <= col_limit[j] and value < INF:
                other = col_slots[j]
                at = col_fill[other]
                col_values[other, at] = value
                col_sources[other, at] = source
                col_fill[other] = at + 1
                if at + 1 == room:
                    col_limit[j] = cut_back(
                        col_values, col_sources, col_fill, col_limits, other, width, scratch
                    )


@numba.njit(nogil=True, cache=True)
def pair_sq_distances(features, scale, low, high, out):  # type: ignore[no-untyped-def]
    """|x_low - x_high|^2 of each pair, summed in float64 and rounded once into `out`.

    Rows are read in place (no gathered copies); cosine rows are scaled in float32 as
    FeatureSpace.exact_rows does (scale is empty for euclidean). The difference of two
    float32 numbers is exact in float64, so only the sum rounds, by about d * 2^-53.
    """
    scaled = len(scale) > 0
    for p in range(len(low)):
        a, b = low[p], high[p]
        total = 0.0
        if scaled:
            sa, sb = scale[a], scale[b]
            for t in range(features.shape[1]):
                diff = np.float64(features[a, t] * sa) - np.float64(features[b, t] * sb)
                total += diff * diff
        else:
            for t in range(features.shape[1]):
                diff = np.float64(features[a, t]) - np.float64(features[b, t])
                total += diff * diff
        out[p] = total
