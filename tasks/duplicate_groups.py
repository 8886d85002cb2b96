"""Duplicate groups from stored neighbour pairs and content hashes, without Prefect or a database.

A group is a representative and the images within the threshold of it. Images are taken in
order of how many near pairs they have (most first, lower id on ties); each one not yet in a
group becomes a representative and takes every image not yet grouped that lies within the
threshold of it. Every member is therefore within the threshold of its representative: a
chain A-B-C-D of near pairs never puts A and D together unless one of them is within the
threshold of the representative. Images with the same content hash are pairs at distance 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

KIND_EXACT = "exact"  # same content hash as the representative (the representative itself too)
KIND_NEAR = "near"


@dataclass(frozen=True)
class Pairs:
    """Near pairs (a < b) and their distances, as parallel arrays."""

    a: np.ndarray  # int64
    b: np.ndarray  # int64
    distance: np.ndarray  # float32

    @classmethod
    def of(cls, a: ArrayLike, b: ArrayLike, distance: ArrayLike) -> Pairs:
        """Pairs from sequences, each pair once with its smaller id first (the smaller distance
        is kept where a pair is given twice)."""
        a_ids = np.asarray(a, dtype=np.int64)
        b_ids = np.asarray(b, dtype=np.int64)
        low, high = np.minimum(a_ids, b_ids), np.maximum(a_ids, b_ids)
        dist = np.asarray(distance, dtype=np.float32)
        keep = low != high
        low, high, dist = low[keep], high[keep], dist[keep]
        order = np.lexsort((dist, high, low))
        low, high, dist = low[order], high[order], dist[order]
        first = np.ones(len(low), dtype=bool)
        first[1:] = (low[1:] != low[:-1]) | (high[1:] != high[:-1])
        return cls(low[first], high[first], dist[first])


@dataclass(frozen=True)
class Groups:
    """One row per grouped image: its group (the representative's id), distance and kind."""

    group_id: np.ndarray  # int64
    image_id: np.ndarray  # int64
    distance: np.ndarray  # float32, 0 for the representative
    exact: np.ndarray  # bool: same content hash as the representative

    def __len__(self) -> int:
        return len(self.image_id)

    def kinds(self) -> list[str]:
        return [KIND_EXACT if e else KIND_NEAR for e in self.exact.tolist()]

    def rows(self) -> list[tuple[int, int, float, str]]:
        """(group id, image id, distance, kind) per grouped image, as Python values."""
        return list(
            zip(
                self.group_id.tolist(),
                self.image_id.tolist(),
                self.distance.tolist(),
                self.kinds(),
                strict=True,
            )
        )


def exact_pairs(image_ids: Sequence[int], hashes: Sequence[str]) -> Pairs:
    """Pairs at distance 0 between images with the same content hash (each to the first)."""
    first_of: dict[str, int] = {}
    a: list[int] = []
    b: list[int] = []
    for image_id, content_hash in sorted(zip(image_ids, hashes, strict=True)):
        first = first_of.setdefault(content_hash, image_id)
        if first != image_id:
            a.append(first)
            b.append(image_id)
    return Pairs.of(a, b, [0.0] * len(a))


def merge_pairs(*parts: Pairs) -> Pairs:
    """All pairs of the parts, each once at its smallest distance."""
    return Pairs.of(
        np.concatenate([p.a for p in parts]),
        np.concatenate([p.b for p in parts]),
        np.concatenate([p.distance for p in parts]),
    )


def group_pairs(pairs: Pairs, threshold: float, hashes: dict[int, str]) -> Groups:
    """Groups of the pairs within threshold, by the representative rule (module docstring).

    Exact pairs (same hash) join whatever the threshold, at distance 0.
    """
    within = pairs.distance <= np.float32(threshold)
    a, b, dist = pairs.a[within], pairs.b[within], pairs.distance[within]
    nodes = np.concatenate([a, b])
    others = np.concatenate([b, a])
    dists = np.concatenate([dist, dist])
    if nodes.size == 0:
        return _empty_groups()
    order = np.lexsort((dists, others, nodes))
    nodes, others, dists = nodes[order], others[order], dists[order]
    ids, starts, degree = np.unique(nodes, return_index=True, return_counts=True)
    by_degree = np.lexsort((ids, -degree))
    grouped: set[int] = set()
    rows: list[tuple[int, int, float]] = []
    for index in by_degree.tolist():
        representative = int(ids[index])
        if representative in grouped:
            continue
        span = slice(int(starts[index]), int(starts[index] + degree[index]))
        members = [
            (int(o), float(d))
            for o, d in zip(others[span].tolist(), dists[span].tolist(), strict=True)
            if o not in grouped
        ]
        if not members:
            continue
        grouped.add(representative)
        rows.append((representative, representative, 0.0))
        for member, distance in members:
            grouped.add(member)
            rows.append((representative, member, distance))
    return _as_groups(rows, hashes)


def _as_groups(rows: list[tuple[int, int, float]], hashes: dict[int, str]) -> Groups:
    group = np.array([r[0] for r in rows], dtype=np.int64)
    image = np.array([r[1] for r in rows], dtype=np.int64)
    exact = np.array(
        [hashes.get(g) is not None and hashes.get(g) == hashes.get(i) for g, i, _ in rows],
        dtype=bool,
    )
    distance = np.array([r[2] for r in rows], dtype=np.float32)
    distance[exact] = 0.0
    return Groups(group, image, distance, exact)


def _empty_groups() -> Groups:
    empty = np.empty(0, dtype=np.int64)
    return Groups(empty, empty.copy(), np.empty(0, dtype=np.float32), np.empty(0, dtype=bool))


def largest_first(groups: Groups) -> list[int]:
    """Group ids ordered by size (largest first), then by smallest mean distance, then id."""
    if not len(groups):
        return []
    ids, inverse, sizes = np.unique(groups.group_id, return_inverse=True, return_counts=True)
    mean = np.bincount(inverse, weights=groups.distance.astype(np.float64)) / sizes
    return [int(i) for i in ids[np.lexsort((ids, mean, -sizes))]]
