"""numba kernels of the compiled tile selection; imported only with numba."""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

INF = np.float32(np.inf)
_SCAN_RUN = 256  # entries checked at once before any is looked at alone
_HELD = 1 << 15  # column-side entries held before they are appended (384 kB)


@intrinsic
def _trailing_zeros(typingctx, word):  # type: ignore[no-untyped-def]
    """Trailing zero bits of a non-zero uint64 (LLVM's cttz: one instruction)."""
    if word != types.uint64:
        return None

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.cttz(args[0], ir.Constant(ir.IntType(1), 1))

    return types.uint64(types.uint64), codegen


@numba.njit(nogil=True, cache=True)
def kth_smallest(scratch: np.ndarray, count: int, kth: int) -> np.float32:
    """The kth smallest (0-based) of scratch[:count]; scratch is overwritten.

    Each float becomes an int32 that orders like it (its bits, with the magnitude bits
    flipped for negatives), and the kth is found by bisecting the int range: each step
    counts the entries at or below a key with vector compares and no branches, and stops
    once a key falls between the kth and the next (about 9 steps for 224 entries instead
    of 25). 2x quickselect on the 224 entries of a cut back (0.74 against 1.5 us), whose
    data-dependent branches mispredict on unordered distances.
    """
    keys = scratch[:count].view(np.int32)
    lo, hi = np.int64(2**31 - 1), np.int64(-(2**31))
    for t in range(np.uint64(0), np.uint64(count)):
        key = keys[t] ^ ((keys[t] >> 31) & 0x7FFFFFFF)
        keys[t] = key
        lo, hi = min(lo, np.int64(key)), max(hi, np.int64(key))
    while lo < hi:  # the smallest key with more than kth keys at or below it
        middle = (lo + hi) >> 1
        below = _count_at_most(keys, np.int32(middle))
        if below > kth:
            hi = middle
        elif below == kth:  # middle falls between the kth and the next: that one it is
            lo = _smallest_above(keys, np.int32(middle))
            break
        else:
            lo = middle + 1
    found = np.empty(1, dtype=np.int32)
    found[0] = np.int32(lo) ^ ((np.int32(lo) >> 31) & 0x7FFFFFFF)  # the same flip undoes it
    return found.view(np.float32)[0]


@numba.njit(nogil=True, cache=True, inline="always")
def _count_at_most(keys, key):  # type: ignore[no-untyped-def]
    total = 0
    for t in range(np.uint64(0), np.uint64(len(keys))):
        total += keys[t] <= key
    return total


@numba.njit(nogil=True, cache=True, inline="always")
def _smallest_above(keys, key):  # type: ignore[no-untyped-def]
    smallest = np.int64(2**31 - 1)
    for t in range(np.uint64(0), np.uint64(len(keys))):
        smallest = min(smallest, np.int64(keys[t]) if keys[t] > key else np.int64(2**31 - 1))
    return smallest


@numba.njit(nogil=True, cache=True)
def cut_back(values, sources, fill, limits, slot, width, scratch):  # type: ignore[no-untyped-def]
    """Keep a slot's entries below its (width+1)-th smallest; lower its limit to that."""
    count = fill[slot]
    for t in range(count):
        scratch[t] = values[slot, t]
    dropped = kth_smallest(scratch, count, width)
    kept = 0
    for t in range(count):  # branch-free: every entry written, kept ones advance
        value = values[slot, t]
        values[slot, kept] = value
        sources[slot, kept] = sources[slot, t]
        kept += value < dropped
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
def mark_within(line, limit, col_limit, start, stop, marks):  # type: ignore[no-untyped-def]
    """Mark which entries of line[start:stop] are within their row's or column's limit.

    Branch-free, so it compiles to vector compares; the caller then looks only at marked
    entries (about 1 in 20 of a tile). Unsigned indices spare numba's negative-index
    wraparound, which keeps LLVM from vectorizing (1.7 against 0.3 ns per entry).
    Returns how many are marked.
    """
    hits = 0
    for j in range(np.uint64(start), np.uint64(stop)):
        value = line[j]
        mark = (value <= limit) | (value <= col_limit[j])
        marks[j - np.uint64(start)] = mark
        hits += mark
    return hits


@numba.njit(nogil=True, cache=True, inline="always")
def _marked(line, limit, col_limit, start, stop, marks, marked):  # type: ignore[no-untyped-def]
    """Write to `marked` the indices of line[start:stop] within their row's or column's
    limit (mark_within), in order; returns how many. Marks are read 8 at a time, each
    found by the trailing zeros of the word (a branch per mark mispredicts: about 15 of
    a run's 256 are marked)."""
    if mark_within(line, limit, col_limit, start, stop, marks) == 0:
        return 0
    marks[stop - start :] = False  # a last, shorter run leaves no stale marks
    words = marks.view(np.uint64)  # 8 marks (bytes 0 or 1) per word
    found = 0
    for w in range(_SCAN_RUN // 8):
        word = words[w]
        while word != 0:
            marked[found] = start + 8 * w + np.int64(_trailing_zeros(word) >> np.uint64(3))  # type: ignore[call-arg]
            found += 1
            word &= word - np.uint64(1)
    return found


@numba.njit(nogil=True, cache=True)
def scan_tile(  # type: ignore[no-untyped-def]
    tile, rows, cols, both, row_positions, col_positions, width, scratch
):
    """One pass over the tile: each entry within its row's (and column's) limit is kept.

    rows / cols: (slots, values, sources, fill, limits) of each side's lists. Each row is
    taken in runs of _SCAN_RUN entries, whose marked entries _marked lists. Row-side
    entries are appended on the spot (written out here: it runs for every entry that
    passes); column-side ones are held and appended column by column (_append_held).
    """
    row_slots, row_values, row_sources, row_fill, row_limits = rows
    col_slots, col_values, col_sources, col_fill, col_limits = cols
    room = row_values.shape[1]
    fresh_limits(tile, row_slots, row_fill, row_limits, width)
    count = tile.shape[1]
    col_limit = np.full(count, -INF, dtype=np.float32)
    marks = np.empty(_SCAN_RUN, dtype=np.bool_)
    marked = np.empty(_SCAN_RUN, dtype=np.int64)
    if both:
        if has_fresh(col_slots, col_fill, col_limits):  # columns as rows: one copy
            fresh_limits(tile.T.copy(), col_slots, col_fill, col_limits, width)
        _refresh_limits(col_slots, col_limits, col_limit)
    held_values = np.empty(_HELD, dtype=np.float32)  # column-side entries, appended later
    held_sources = np.empty(_HELD, dtype=col_sources.dtype)
    held_columns = np.empty(_HELD, dtype=np.int32)
    held = 0
    for i in range(tile.shape[0]):
        slot = row_slots[i]
        limit = row_limits[slot]
        source = row_positions[i]
        line = tile[i]
        at = row_fill[slot]  # kept in a register: the row's list is all this loop appends to
        for start in range(0, count, _SCAN_RUN):
            stop = min(start + _SCAN_RUN, count)
            found = _marked(line, limit, col_limit, start, stop, marks, marked)
            for m in range(found):
                j = marked[m]
                value = line[j]
                # Branch-free: both sides write their next free place and advance only
                # when the entry passes (a marked entry passes one side or both, at
                # random: a branch on it mispredicts about once per entry).
                row_values[slot, at] = value
                row_sources[slot, at] = col_positions[j]
                at += (value <= limit) & (value < INF)
                held_values[held] = value
                held_sources[held] = source
                held_columns[held] = j
                held += (value <= col_limit[j]) & (value < INF)
                if at == room:
                    row_fill[slot] = at
                    limit = cut_back(
                        row_values, row_sources, row_fill, row_limits, slot, width, scratch
                    )
                    at = row_fill[slot]
                if held == _HELD:
                    row_fill[slot] = at  # the held entries go to other rows' lists
                    held_entries = (held_values, held_sources, held_columns, held)
                    _append_held(*held_entries, cols, width, scratch)
                    _refresh_limits(col_slots, col_limits, col_limit)
                    held = 0
        row_fill[slot] = at
    if held:
        _append_held(held_values, held_sources, held_columns, held, cols, width, scratch)


@numba.njit(nogil=True, cache=True)
def _append_held(values, sources, columns, count, cols, width, scratch):  # type: ignore[no-untyped-def]
    """Append held column-side entries to their columns' lists, column by column.

    A counting sort by column first: each list is then written in one go, where appending
    each entry as it passed wrote all over the column lists (7 MB for a tile's 4,096).
    Entries a cut back has since put beyond their list's limit are dropped.
    """
    col_slots, col_values, col_sources, col_fill, col_limits = cols
    room = col_values.shape[1]
    starts = np.zeros(len(col_slots) + 1, dtype=np.int64)
    for t in range(count):
        starts[columns[t] + 1] += 1
    for j in range(len(col_slots)):
        starts[j + 1] += starts[j]
    order = np.empty(count, dtype=np.int64)
    for t in range(count):
        order[starts[columns[t]]] = t
        starts[columns[t]] += 1
    for t in order:
        other = col_slots[columns[t]]
        value = values[t]
        if value <= col_limits[other]:
            at = col_fill[other]
            col_values[other, at] = value
            col_sources[other, at] = sources[t]
            col_fill[other] = at + 1
            if at + 1 == room:
                cut_back(col_values, col_sources, col_fill, col_limits, other, width, scratch)


@numba.njit(nogil=True, cache=True)
def _refresh_limits(slots, limits, limit):  # type: ignore[no-untyped-def]
    """limit[j] = limits[slots[j]]: a tile's copy of its columns' limits, after cut backs."""
    for j in range(len(slots)):
        limit[j] = limits[slots[j]]


@numba.njit(nogil=True, cache=True)
def scan_columns(tile, start, stop, cols, row_positions, width, scratch):  # type: ignore[no-untyped-def]
    """The columns' side of a tile for its columns start..stop: each entry within its
    column's limit joins that column's list (cols: the tile columns' lists; the rows' side
    is scan_tile's without columns). The tile is read row by row, start..stop of each: the
    lists written are few enough to stay in cache."""
    col_slots, col_values, col_sources, col_fill, col_limits = cols
    room = col_values.shape[1]
    slots = col_slots[start:stop]
    if has_fresh(slots, col_fill, col_limits):  # columns as rows: one copy
        fresh_limits(tile[:, start:stop].T.copy(), slots, col_fill, col_limits, width)
    col_limit = np.full(tile.shape[1], -INF, dtype=np.float32)
    for column in range(start, stop):
        col_limit[column] = col_limits[col_slots[column]]
    marks = np.empty(_SCAN_RUN, dtype=np.bool_)
    marked = np.empty(_SCAN_RUN, dtype=np.int64)
    for i in range(tile.shape[0]):
        line = tile[i]
        source = row_positions[i]
        for run in range(start, stop, _SCAN_RUN):
            run_stop = min(run + _SCAN_RUN, stop)
            found = _marked(line, -INF, col_limit, run, run_stop, marks, marked)
            for m in range(found):
                j = marked[m]
                value = line[j]
                if value < INF:  # marked: within the column's limit, never itself
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
def cut_back_slots(values, sources, fill, limits, slots, width):  # type: ignore[no-untyped-def]
    """cut_back of each of these slots (the final cut of a pass; slots split across cores)."""
    scratch = np.empty(values.shape[1], dtype=np.float32)
    for slot in slots:
        cut_back(values, sources, fill, limits, slot, width, scratch)
