"""Find duplicates: groups of exact and near-identical images, from the stored neighbour lists.

Nothing is searched again: near pairs are read from image_neighbours (exact distances), exact
pairs from the content hashes, and grouped by tasks.duplicate_groups. The threshold is a
fraction of the collection's scale, the median distance from an image to its k-th neighbour,
so that one setting means the same thing for another model. Pairs up to the largest threshold
offered are stored too, so another threshold regroups them without a new run.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from sqlalchemy import Connection, Engine, delete, func, insert, or_, select

from lookalike.sql.schema import (
    STATUS_OK,
    collection,
    duplicate_groups,
    duplicate_pairs,
    duplicate_state,
    image_names,
    image_neighbours,
)
from lookalike.tasks.database import DATABASE_RETRIES, engine_for
from lookalike.tasks.duplicate_groups import (
    Groups,
    Pairs,
    exact_pairs,
    group_pairs,
    merge_pairs,
)
from lookalike.tasks.settings import MAX_DUPLICATE_THRESHOLD

log = logging.getLogger(__name__)

SCALE_SAMPLE = 2000  # images whose k-th neighbour distance gives the scale's median
HISTOGRAM_BINS = 60  # first-neighbour distances from 0 to the scale
INSERT_CHUNK = 10_000
DUPLICATES_KEY = "find-duplicates-summary"


@dataclass(frozen=True)
class DuplicateCounts:
    """What the find-duplicates step found (or found unchanged)."""

    groups: int
    images: int
    exact_images: int
    threshold: float  # fraction of the scale
    distance: float  # the threshold as a distance
    recomputed: bool


@dataclass(frozen=True)
class DuplicateInputs:
    """Everything the groups depend on, read from the database."""

    ids: np.ndarray
    hashes: list[str]
    fingerprint: str


def read_inputs(conn: Connection, threshold: float) -> DuplicateInputs:
    """Ok images and their hashes, and a fingerprint of what the groups depend on."""
    rows = conn.execute(
        select(image_names.c.id, image_names.c.content_hash)
        .where(image_names.c.status == STATUS_OK)
        .order_by(image_names.c.id)
    ).all()
    weights = conn.execute(select(collection.c.model, collection.c.weights)).first()
    neighbour_rows = conn.execute(select(func.count()).select_from(image_neighbours)).scalar_one()
    digest = hashlib.blake2b(digest_size=16)
    digest.update(repr((tuple(weights or ()), neighbour_rows, round(threshold, 6))).encode())
    for image_id, content_hash in rows:
        digest.update(f"{image_id}:{content_hash};".encode())
    return DuplicateInputs(
        ids=np.array([r[0] for r in rows], dtype=np.int64),
        hashes=[r[1] for r in rows],
        fingerprint=digest.hexdigest(),
    )


def stored_fingerprint(conn: Connection) -> str | None:
    """The fingerprint the stored groups were computed from (None: never computed)."""
    return conn.execute(select(duplicate_state.c.fingerprint)).scalar_one_or_none()


def neighbour_scale(conn: Connection, ids: np.ndarray) -> float:
    """Median distance to the last stored neighbour, over an even sample of the images."""
    if ids.size == 0:
        return 0.0
    sample = ids[np.unique(np.linspace(0, len(ids) - 1, min(len(ids), SCALE_SAMPLE)).astype(int))]
    last = conn.execute(select(func.max(image_neighbours.c.rank))).scalar_one()
    if last is None:
        return 0.0
    distances = conn.execute(
        select(image_neighbours.c.distance).where(
            image_neighbours.c.rank == last, image_neighbours.c.image_id.in_(sample.tolist())
        )
    ).scalars()
    values = np.fromiter(distances, dtype=np.float64)
    return float(np.median(values)) if values.size else 0.0


def read_near_pairs(conn: Connection, ceiling: float) -> tuple[Pairs, np.ndarray]:
    """Neighbour pairs within ceiling, and every image's first-neighbour distance; one scan."""
    rows = conn.execute(
        select(
            image_neighbours.c.image_id,
            image_neighbours.c.neighbour_id,
            image_neighbours.c.rank,
            image_neighbours.c.distance,
        ).where(or_(image_neighbours.c.rank == 1, image_neighbours.c.distance <= ceiling))
    ).all()
    if not rows:
        return Pairs.of([], [], []), np.empty(0)
    table = np.array(rows, dtype=np.float64)
    near = table[:, 3] <= ceiling
    pairs = Pairs.of(table[near, 0], table[near, 1], table[near, 3])
    return pairs, table[table[:, 2] == 1, 3]


def first_neighbour_histogram(first: np.ndarray, scale: float) -> dict[str, Any]:
    """Counts of first-neighbour distances in HISTOGRAM_BINS bins from 0 to the scale."""
    top = scale if scale > 0 else float(first.max(initial=1.0)) or 1.0
    counts, edges = np.histogram(np.minimum(first, top), bins=HISTOGRAM_BINS, range=(0.0, top))
    return {"edges": [round(float(e), 6) for e in edges], "counts": counts.tolist()}


def find_duplicates(engine: Engine, threshold: float) -> DuplicateCounts:
    """Recompute the groups when their inputs changed; else report the stored ones."""
    with engine.connect() as conn:
        inputs = read_inputs(conn, threshold)
        if stored_fingerprint(conn) == inputs.fingerprint:
            return _stored_counts(conn, recomputed=False)
        scale = neighbour_scale(conn, inputs.ids)
        near, first = read_near_pairs(conn, MAX_DUPLICATE_THRESHOLD * scale)
    pairs = merge_pairs(near, exact_pairs(inputs.ids.tolist(), inputs.hashes))
    hashes = dict(zip(inputs.ids.tolist(), inputs.hashes, strict=True))
    groups = group_pairs(pairs, threshold * scale, hashes)
    state = {
        "id": 1,
        "fingerprint": inputs.fingerprint,
        "scale": scale,
        "threshold": threshold,
        "histogram": json.dumps(first_neighbour_histogram(first, scale)),
        "computed_at": datetime.now(UTC).replace(tzinfo=None),
    }
    with engine.begin() as conn:
        write_groups(conn, groups, pairs, state)
        return _stored_counts(conn, recomputed=True)


def write_groups(conn: Connection, groups: Groups, pairs: Pairs, state: dict[str, Any]) -> None:
    """Replace the stored groups, pairs and state in the caller's transaction."""
    for table in (duplicate_groups, duplicate_pairs, duplicate_state):
        conn.execute(delete(table))
    group_rows = [
        {"image_id": i, "group_id": g, "distance": d, "kind": k}
        for g, i, d, k in zip(
            groups.group_id.tolist(),
            groups.image_id.tolist(),
            groups.distance.tolist(),
            groups.kinds(),
            strict=True,
        )
    ]
    pair_rows = [
        {"image_id": a, "other_id": b, "distance": d}
        for a, b, d in zip(pairs.a.tolist(), pairs.b.tolist(), pairs.distance.tolist(), strict=True)
    ]
    for table, rows in ((duplicate_groups, group_rows), (duplicate_pairs, pair_rows)):
        for start in range(0, len(rows), INSERT_CHUNK):
            conn.execute(insert(table), rows[start : start + INSERT_CHUNK])
    conn.execute(insert(duplicate_state), [state])


def _stored_counts(conn: Connection, recomputed: bool) -> DuplicateCounts:
    state = conn.execute(select(duplicate_state.c.threshold, duplicate_state.c.scale)).one()
    groups, images = conn.execute(
        select(func.count(func.distinct(duplicate_groups.c.group_id)), func.count())
    ).one()
    exact = conn.execute(
        select(func.count()).select_from(duplicate_groups).where(duplicate_groups.c.kind == "exact")
    ).scalar_one()
    return DuplicateCounts(
        groups=int(groups),
        images=int(images),
        exact_images=int(exact),
        threshold=float(state.threshold),
        distance=float(state.threshold * state.scale),
        recomputed=recomputed,
    )


@task(name="find-duplicates", **DATABASE_RETRIES, cache_policy=NO_CACHE)
def find_duplicates_task(database_url: str, threshold: float) -> DuplicateCounts:
    """Group exact and near duplicates; an artifact with what was found."""
    counts = find_duplicates(engine_for(database_url), threshold)
    logger = get_run_logger()
    logger.info(
        "duplicates: %d groups, %d images (%s)",
        counts.groups,
        counts.images,
        "recomputed" if counts.recomputed else "inputs unchanged, nothing recomputed",
    )
    create_table_artifact(
        table=[{"measure": k, "value": v} for k, v in vars(counts).items()],
        key=DUPLICATES_KEY,
        description="find-duplicates: groups of exact and near-identical images",
    )
    return counts
