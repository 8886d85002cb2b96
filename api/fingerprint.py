"""A feature vector drawn as a square heatmap in the plasma colour map, as SVG or PNG.

The square is the smallest that holds the vector: 46x46 for InceptionV3's 2048 values, 28x28
for 768, 23x23 for CLIP's 512, 20x20 for DINOv2-small's 384; the cells past the end are 0.
"""

from __future__ import annotations

import io
import math
from functools import lru_cache

import numpy as np
from PIL import Image

DEFAULT_CELL_PIXELS = 6

# Matplotlib's plasma colour map sampled at entries 0, 8, 16, ..., 248 and 255 of its 256;
# plasma is smooth, so linear interpolation between these reproduces it closely.
_PLASMA_ANCHORS = [
    "0d0887", "220690", "310597", "3f049c", "4c02a1", "5901a5", "6600a7", "7201a8",
    "7e03a8", "8a09a5", "9511a1", "a01a9c", "aa2395", "b32c8e", "bc3587", "c43e7f",
    "cc4778", "d35171", "da5a6a", "e06363", "e66c5c", "eb7655", "f0804e", "f58b47",
    "f89540", "fba139", "fdac33", "feb82c", "fdc527", "fcd225", "f8df25", "f4ed27",
    "f0f921",
]  # fmt: skip
_ANCHOR_POSITIONS = [*range(0, 256, 8), 255]


@lru_cache(maxsize=1)
def plasma_table() -> np.ndarray:
    """The 256-entry plasma colour table as uint8 RGB, shape (256, 3)."""
    anchors = np.array([[int(h[i : i + 2], 16) for i in (0, 2, 4)] for h in _PLASMA_ANCHORS])
    levels = np.arange(256)
    channels = [np.interp(levels, _ANCHOR_POSITIONS, anchors[:, c]) for c in range(3)]
    return np.rint(np.stack(channels, axis=1)).astype(np.uint8)


def grid_side(values: int) -> int:
    """The side of the smallest square grid that holds this many values."""
    return math.isqrt(values - 1) + 1 if values > 0 else 1


def colour_levels(vector: np.ndarray) -> np.ndarray:
    """The vector padded with zeros to its square and scaled to colour levels 0..255 (min to
    max); shape (side, side)."""
    flat = np.asarray(vector, dtype=np.float64).ravel()
    side = grid_side(flat.size)
    values = np.zeros(side * side, dtype=np.float64)
    values[: flat.size] = np.nan_to_num(flat, nan=0.0, posinf=0.0, neginf=0.0)
    low, high = values.min(), values.max()
    scaled = (values - low) / (high - low) if high > low else np.zeros_like(values)
    return np.rint(scaled * 255).astype(np.uint8).reshape(side, side)


def render_svg(vector: np.ndarray, cell_pixels: int = DEFAULT_CELL_PIXELS) -> str:
    """The heatmap as SVG: one path per colour level keeps it small (about 30 kB)."""
    levels = colour_levels(vector)
    table = plasma_table()
    grid = len(levels)
    side = grid * cell_pixels
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{side}" height="{side}" '
        f'viewBox="0 0 {grid} {grid}" shape-rendering="crispEdges">'
    ]
    for level in np.unique(levels):
        rows, cols = np.nonzero(levels == level)
        cells = "".join(
            f"M{c} {r}h1v1h-1z" for r, c in zip(rows.tolist(), cols.tolist(), strict=True)
        )
        red, green, blue = table[level]
        parts.append(f'<path fill="#{red:02x}{green:02x}{blue:02x}" d="{cells}"/>')
    parts.append("</svg>")
    return "".join(parts)


def render_png(vector: np.ndarray, cell_pixels: int = DEFAULT_CELL_PIXELS) -> bytes:
    """The heatmap as a PNG of (grid side * cell_pixels) pixels a side."""
    rgb = plasma_table()[colour_levels(vector)]
    image = Image.fromarray(rgb)
    side = len(rgb) * cell_pixels
    image = image.resize((side, side), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
