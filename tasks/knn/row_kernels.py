"""numba kernels over feature rows: centred, measured, and written out as right() blocks."""

from __future__ import annotations

import numba
import numpy as np


# reassoc lets the float64 sum of squares run in vector lanes; each centred value is one
# float32 operation (or two for cosine), which no fast-math flag here can change.
@numba.njit(nogil=True, cache=True, fastmath={"reassoc"})
def centre_rows(features, scale, centre, rows, measure, sq, out, places):  # type: ignore[no-untyped-def]
    """Rows `rows` centred: y = x - centre (cosine, scale not empty: x * scale - centre).

    With measure, sq[row] = |y|^2 (a float64 sum rounded once), else sq is read. Where out
    has rows, out[places[i]] = [-2y, |y|^2, 1] of row rows[i] (FeatureSpace.right; -2 is
    exact).
    """
    d = features.shape[1]
    scaled = len(scale) > 0
    write = out.shape[0] > 0
    for i in range(len(rows)):
        row = rows[i]
        place = places[i] if write else 0
        factor = scale[row] if scaled else np.float32(1.0)
        total = 0.0
        for t in range(d):
            value = (
                features[row, t] * factor - centre[t] if scaled else features[row, t] - centre[t]
            )
            total += np.float64(value) * np.float64(value)
            if write:
                out[place, t] = np.float32(-2.0) * value
        if measure:
            sq[row] = np.float32(total)
        if write:
            out[place, d] = sq[row]
            out[place, d + 1] = np.float32(1.0)


@numba.njit(nogil=True, cache=True, fastmath={"reassoc"})
def sum_rows(features, rows, sums, sq):  # type: ignore[no-untyped-def]
    """sums += the float64 sum of features[rows]; sq[i] = float64 |features[rows[i]]|^2."""
    for i in range(len(rows)):
        total = 0.0
        for t in range(features.shape[1]):
            value = np.float64(features[rows[i], t])
            sums[t] += value
            total += value * value
        sq[i] = total
