"""numba kernels of an update: the kept rows' lists read back, fresh candidates merged in."""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(nogil=True, cache=True)
def merge_kept_rows(  # type: ignore[no-untyped-def]
    known, touched_of, fresh_sources, fresh_distances, ranks, window, rows, out, doubtful
):
    """Kept rows rows[0]..rows[1] of an update: known entries and fresh candidates in order.

    known = (neighbours, distances, loose, depths): each kept row's known list (in order,
    -1 / inf padding at its end), its entries to measure again, and its depth. A row takes
    the fresh candidates of touched row touched_of[r] (-1: none); entries are ordered by
    (distance, id rank) and cut to out's width and to the row's depth (-1 / inf past it).
    out = (out_rows, neighbours, distances, used_known): kept row r is written to row
    out_rows[r], and used_known[r] counts the known entries it kept. A row that takes no
    candidate is copied as it is. A touched row where a fresh entry is a near-tie of a
    neighbour in the order, or that holds a loose known entry or a negative or NaN
    distance, is left unwritten and marked in doubtful: its near-tie chains need measuring
    in float64 (incremental._merged_rows does that).
    """
    neighbours, distances, loose, depths = known
    wk, wf = neighbours.shape[1], fresh_sources.shape[1]
    keys = np.empty(wk + wf, dtype=np.uint64)
    line = np.empty(wk + wf, dtype=np.float32)
    sources = np.empty(wk + wf, dtype=np.int64)
    one = np.empty(1, dtype=np.float32)  # a distance's float32 bits order like it
    one_bits = one.view(np.uint32)
    window32 = np.float32(window)
    for r in range(rows[0], rows[1]):
        t = touched_of[r]
        if t < 0:
            _copy_known(neighbours, distances, r, depths[r], out)
            continue
        total = 0
        for c in range(wk + wf):
            source = neighbours[r, c] if c < wk else fresh_sources[t, c - wk]
            if source < 0:
                continue
            value = distances[r, c] if c < wk else fresh_distances[t, c - wk]
            if not value >= 0 or (c < wk and loose[r, c]):
                total = -1
                break
            one[0] = value + np.float32(0.0)  # -0.0 -> 0.0
            key = (np.uint64(one_bits[0]) << np.uint64(32)) | np.uint64(ranks[source])
            at = total  # insertion: known entries come in order, few fresh ones follow
            while at > 0 and keys[at - 1] > key:
                keys[at], line[at], sources[at] = keys[at - 1], line[at - 1], sources[at - 1]
                at -= 1
            keys[at], line[at], sources[at] = key, value, (source if c < wk else -2 - source)
            total += 1
        if total < 0 or _fresh_near_tie(line, sources, total, window32):
            doubtful[t] = True
            continue
        _write_merged(line, sources, total, r, depths[r], out)


@numba.njit(nogil=True, cache=True, inline="always")
def _fresh_near_tie(line, sources, total, window32):  # type: ignore[no-untyped-def]
    """Whether a fresh entry (source <= -2) is a near-tie of the entry before or after it."""
    for e in range(total):
        if sources[e] <= -2:
            if e > 0 and _close(line, e, window32):
                return True
            if e + 1 < total and _close(line, e + 1, window32):
                return True
    return False


@numba.njit(nogil=True, cache=True, inline="always")
def _close(line, c, window32):  # type: ignore[no-untyped-def]
    """Whether sorted entry c is a near-tie of entry c - 1 (rerank.close_to_previous)."""
    later = line[c]
    return later - line[c - 1] <= window32 * later and later > 0 and later < np.inf


@numba.njit(nogil=True, cache=True, inline="always")
def _write_merged(line, sources, total, r, depth, out):  # type: ignore[no-untyped-def]
    """Row r of out: the first entries of the merged order, to its depth."""
    out_rows, out_neighbours, out_distances, used_known = out
    row = out_rows[r]
    kept = 0
    for j in range(out_neighbours.shape[1]):
        if j < min(total, depth):
            source = sources[j]
            kept += source >= 0
            out_neighbours[row, j] = source if source >= 0 else -2 - source
            out_distances[row, j] = line[j]
        else:
            out_neighbours[row, j] = -1
            out_distances[row, j] = np.inf
    used_known[r] = kept


@numba.njit(nogil=True, cache=True, inline="always")
def _copy_known(neighbours, distances, r, depth, out):  # type: ignore[no-untyped-def]
    """Row r's known list as it is, cut to its depth and to out's width (_padded)."""
    out_rows, out_neighbours, out_distances, _ = out
    row = out_rows[r]
    for j in range(out_neighbours.shape[1]):
        if j < min(depth, neighbours.shape[1]):
            out_neighbours[row, j] = neighbours[r, j]
            out_distances[row, j] = distances[r, j]
        else:
            out_neighbours[row, j] = -1
            out_distances[row, j] = np.inf


@numba.njit(nogil=True, cache=True)
def read_known_lists(  # type: ignore[no-untyped-def]
    previous, rows, table, offset, is_changed, start, stop, out
):
    """Previous lists of kept rows start..stop as current positions (incremental._known_lists).

    previous = (neighbour ids, distances); rows[i] is kept row i's row in it. Ids become
    positions through table (position of id - offset, clipped to its ends, which hold -1).
    out = (positions, distances, valid, count, listed): an entry is valid when its image
    still exists unchanged and it is not padding (id -1 at distance +inf); invalid entries
    get position -1 (their distance is copied as it is). count holds each row's valid
    entries, listed its entries that are not padding.
    """
    neighbour_ids, distances = previous
    positions, out_distances, valid, count, listed = out
    last = len(table) - 1
    for i in range(start, stop):
        row = rows[i]
        found = 0
        entries = 0
        for t in range(neighbour_ids.shape[1]):
            image = neighbour_ids[row, t]
            value = np.float32(distances[row, t])
            out_distances[i, t] = value
            padding = image == -1 and value == np.inf
            position = table[min(max(image - offset, 0), last)]
            ok = position >= 0 and not padding and not is_changed[position]
            positions[i, t] = position if ok else -1
            valid[i, t] = ok
            found += ok
            entries += not padding
        count[i] = found
        listed[i] = entries
