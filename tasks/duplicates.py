"""Find duplicates: groups of exact and near-identical images, from the stored neighbour lists.

Nothing is searched again: near pairs are read from image_neighbours (exact distances), exact
pairs from the content hashes, and grouped by tasks.duplicate_groups. The threshold is a
fraction of the collection's scale, the median distance from an image to its k-th neighbour,
so that one setting means the same thing for another model. Pairs up to the largest threshold
offered are stored too, so another threshold regroups them without a new run.
"""

from __future__ import annotations

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
    duplicate_groups,
    duplicate_inputs,
    duplicate_pairs,
    duplicate_state,
    image_neighbours,
)
from lookalike.tasks.catalog import fingerprint_ok_images
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
CHUNK = 5000  # ids per IN (...) list
# Past this share of changed and deleted images, one scan of every list beats an update.
INCREMENTAL_LIMIT = 0.1
MODE_UNCHANGED = "unchanged"  # the inputs' fingerprint is the stored one: nothing done
MODE_INCREMENTAL = "incremental"  # pairs updated from the changed images' lists
MODE_FULL = "full"  # every list scanned


@dataclass(frozen=True)
class DuplicateCounts:
    """What the find-duplicates step found (or found unchanged)."""

    groups: int
    images: int
    exact_images: int
    threshold: float  # fraction of the scale
    distance: float  # the threshold as a distance
    mode: str  # MODE_UNCHANGED, MODE_INCREMENTAL or MODE_FULL

    @property
    def recomputed(self) -> bool:
        return self.mode != MODE_UNCHANGED


@dataclass(frozen=True)
class DuplicateInputs:
    """Everything the groups depend on, read from the database."""

    ids: np.ndarray
    hashes: list[str]
    basis: str  # model, weights, list length and threshold
    fingerprint: str  # the basis and every (id, hash): equal means nothing to redo


@dataclass(frozen=True)
class Change:
    """Images changed (new or other content) and deleted since the stored groups."""

    changed: list[int]
    deleted: list[int]


def read_inputs(conn: Connection, threshold: float) -> DuplicateInputs:
    """Ok images and their hashes, and a fingerprint of what the groups depend on."""
    widest = conn.execute(select(func.max(image_neighbours.c.rank))).scalar_one()
    rows, basis, fingerprint = fingerprint_ok_images(conn, widest, round(threshold, 6))
    return DuplicateInputs(
        ids=np.array([r[0] for r in rows], dtype=np.int64),
        hashes=[r[1] for r in rows],
        basis=basis,
        fingerprint=fingerprint,
    )


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
    """Bring the groups up to date: nothing when their inputs are unchanged, an update from
    the lists of the changed images when few changed, else one scan of every list."""
    with engine.connect() as conn:
        inputs = read_inputs(conn, threshold)
        unchanged = counts_if_unchanged(conn, inputs)
        if unchanged is not None:
            return unchanged
        state = conn.execute(select(duplicate_state)).first()
        change = read_change(conn, inputs) if _can_update(state, inputs) else None
        if change is not None and state is not None:
            scale, histogram = float(state.scale), str(state.histogram)
            near = updated_pairs(conn, change, MAX_DUPLICATE_THRESHOLD * scale)
        else:
            scale = neighbour_scale(conn, inputs.ids)
            near, first = read_near_pairs(conn, MAX_DUPLICATE_THRESHOLD * scale)
            histogram = json.dumps(first_neighbour_histogram(first, scale))
    pairs = merge_pairs(near, exact_pairs(inputs.ids.tolist(), inputs.hashes))
    hashes = dict(zip(inputs.ids.tolist(), inputs.hashes, strict=True))
    groups = group_pairs(pairs, threshold * scale, hashes)
    stored = {
        "id": 1,
        "fingerprint": inputs.fingerprint,
        "basis": inputs.basis,
        "scale": scale,
        "threshold": threshold,
        "histogram": histogram,
        "computed_at": datetime.now(UTC).replace(tzinfo=None),
    }
    with engine.begin() as conn:
        write_groups(conn, groups, pairs, stored)
        write_inputs(conn, inputs, change)
        return _stored_counts(conn, MODE_FULL if change is None else MODE_INCREMENTAL)


def unchanged_duplicates(engine: Engine, threshold: float) -> DuplicateCounts | None:
    """What find_duplicates would answer without writing anything; None when it has work."""
    with engine.connect() as conn:
        return counts_if_unchanged(conn, read_inputs(conn, threshold))


def counts_if_unchanged(conn: Connection, inputs: DuplicateInputs) -> DuplicateCounts | None:
    """The stored groups' counts when their inputs' fingerprint is the stored one, else None:
    the one test of "nothing to redo", for find_duplicates and for `lookalike process`'s
    up-to-date check."""
    state = conn.execute(select(duplicate_state.c.fingerprint)).first()
    if state is None or state.fingerprint != inputs.fingerprint:
        return None
    return _stored_counts(conn, MODE_UNCHANGED)


def _can_update(state: Any, inputs: DuplicateInputs) -> bool:
    """Whether stored groups exist for the same model, weights, list length and threshold."""
    return state is not None and state.basis == inputs.basis


def read_change(conn: Connection, inputs: DuplicateInputs) -> Change | None:
    """The images changed and deleted since the stored groups; None past INCREMENTAL_LIMIT."""
    before = dict(
        conn.execute(select(duplicate_inputs.c.image_id, duplicate_inputs.c.content_hash)).all()
    )
    now = dict(zip(inputs.ids.tolist(), inputs.hashes, strict=True))
    changed = [i for i, h in now.items() if before.get(i) != h]
    deleted = [i for i in before if i not in now]
    if len(changed) + len(deleted) > INCREMENTAL_LIMIT * max(len(now), len(before), 1):
        return None
    return Change(changed=changed, deleted=deleted)


def updated_pairs(conn: Connection, change: Change, ceiling: float) -> Pairs:
    """Stored pairs without the changed and deleted images, plus the changed images' pairs.

    A pair of two unchanged images keeps its exact distance, and no new one can appear: their
    lists only ever gain changed images. A changed image's pairs are in its own list or in
    the lists it entered, found through the neighbour table's two indexes.
    """
    touched = set(change.changed) | set(change.deleted)
    kept = [
        row
        for row in conn.execute(
            select(
                duplicate_pairs.c.image_id, duplicate_pairs.c.other_id, duplicate_pairs.c.distance
            )
        ).all()
        if row[0] not in touched and row[1] not in touched
    ]
    columns = (
        image_neighbours.c.image_id,
        image_neighbours.c.neighbour_id,
        image_neighbours.c.distance,
    )
    fresh: list[Any] = []
    for start in range(0, len(change.changed), CHUNK):
        chunk = change.changed[start : start + CHUNK]
        for side in (image_neighbours.c.image_id, image_neighbours.c.neighbour_id):
            fresh += conn.execute(
                select(*columns).where(side.in_(chunk), image_neighbours.c.distance <= ceiling)
            ).all()
    rows = kept + fresh
    return Pairs.of([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows])


def write_groups(conn: Connection, groups: Groups, pairs: Pairs, state: dict[str, Any]) -> None:
    """Replace the stored groups, pairs and state in the caller's transaction."""
    for table in (duplicate_groups, duplicate_pairs, duplicate_state):
        conn.execute(delete(table))
    group_rows = [
        {"image_id": i, "group_id": g, "distance": d, "kind": k} for g, i, d, k in groups.rows()
    ]
    pair_rows = [
        {"image_id": a, "other_id": b, "distance": d}
        for a, b, d in zip(pairs.a.tolist(), pairs.b.tolist(), pairs.distance.tolist(), strict=True)
    ]
    _insert_chunked(conn, duplicate_groups, group_rows)
    _insert_chunked(conn, duplicate_pairs, pair_rows)
    conn.execute(insert(duplicate_state), [state])


def write_inputs(conn: Connection, inputs: DuplicateInputs, change: Change | None) -> None:
    """Record the images the groups now stand for: all of them, or the change."""
    hashes = dict(zip(inputs.ids.tolist(), inputs.hashes, strict=True))
    if change is None:
        conn.execute(delete(duplicate_inputs))
        written = list(hashes)
    else:
        gone = change.changed + change.deleted
        for start in range(0, len(gone), CHUNK):
            chunk = gone[start : start + CHUNK]
            conn.execute(delete(duplicate_inputs).where(duplicate_inputs.c.image_id.in_(chunk)))
        written = change.changed
    rows = [{"image_id": i, "content_hash": hashes[i]} for i in written]
    _insert_chunked(conn, duplicate_inputs, rows)


def _insert_chunked(conn: Connection, table: Any, rows: list[dict[str, Any]]) -> None:
    for start in range(0, len(rows), INSERT_CHUNK):
        conn.execute(insert(table), rows[start : start + INSERT_CHUNK])


def _stored_counts(conn: Connection, mode: str) -> DuplicateCounts:
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
        mode=mode,
    )


@task(name="find-duplicates", **DATABASE_RETRIES, cache_policy=NO_CACHE)
def find_duplicates_task(database_url: str, threshold: float) -> DuplicateCounts:
    """Group exact and near duplicates; an artifact with what was found."""
    counts = find_duplicates(engine_for(database_url), threshold)
    logger = get_run_logger()
    logger.info("duplicates: %d groups, %d images (%s)", counts.groups, counts.images, counts.mode)
    create_table_artifact(
        table=[{"measure": k, "value": v} for k, v in vars(counts).items()],
        key=DUPLICATES_KEY,
        description="find-duplicates: groups of exact and near-identical images",
    )
    return counts
