"""Lay out the map: every image's place in 2-D, from the stored neighbour lists.

The decision is made here, once: nothing when the images, their content, the model and the
lists' length are what the stored map was made from; a full UMAP fit (tasks/map_layout.py)
when there is no map yet, the basis changed, a refit is asked for, or more than
REFIT_FRACTION of the images changed since the last full fit; otherwise only the new and
changed images are placed among their neighbours, and nobody else moves.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from sqlalchemy import Connection, Engine, delete, insert, select

from lookalike.sql.schema import (
    image_map,
    image_neighbours,
    map_state,
)
from lookalike.tasks.catalog import fingerprint_ok_images
from lookalike.tasks.database import DATABASE_RETRIES, engine_for
from lookalike.tasks.map_layout import (
    LAYOUT_NEIGHBOURS,
    LAYOUT_SEED,
    MISSING,
    NeighbourGraph,
    fit_layout,
    place_new,
)
from lookalike.tasks.map_reader import rows_as_array

log = logging.getLogger(__name__)

# Past this share of images added, changed or deleted since the last full fit, refit.
REFIT_FRACTION = 0.2
CHUNK = 5000  # ids per IN (...) list
INSERT_CHUNK = 10_000
MAP_KEY = "layout-map-summary"
MODE_UNCHANGED = "unchanged"  # the inputs' fingerprint is the stored one: nothing done
MODE_INCREMENTAL = "incremental"  # new and changed images placed among their neighbours
MODE_FULL = "full"  # everyone laid out again


@dataclass(frozen=True)
class MapCounts:
    """What the layout-map step did."""

    points: int  # images on the map
    placed: int  # images this run placed among their neighbours (0 for a full fit)
    mode: str  # MODE_UNCHANGED, MODE_INCREMENTAL or MODE_FULL


@dataclass(frozen=True)
class MapInputs:
    """Everything the map depends on, read from the database."""

    hashes: dict[int, str]  # ok image id -> content hash, in id order
    basis: str  # model, weights, neighbours used and seed
    fingerprint: str  # the basis and every (id, hash)


def read_map_inputs(conn: Connection) -> MapInputs:
    """Ok images and their hashes, and a fingerprint of what the map depends on."""
    # Not the lists' length: only their first LAYOUT_NEIGHBOURS entries are used.
    rows, basis, fingerprint = fingerprint_ok_images(conn, LAYOUT_NEIGHBOURS, LAYOUT_SEED)
    return MapInputs(hashes=dict(rows), basis=basis, fingerprint=fingerprint)


def read_graph(conn: Connection, ids: np.ndarray) -> NeighbourGraph:
    """The first LAYOUT_NEIGHBOURS of every stored list, as rows into `ids`."""
    rows = conn.execute(
        select(
            image_neighbours.c.image_id,
            image_neighbours.c.rank,
            image_neighbours.c.neighbour_id,
            image_neighbours.c.distance,
        ).where(image_neighbours.c.rank <= LAYOUT_NEIGHBOURS)
    ).all()
    neighbour_ids = np.full((len(ids), LAYOUT_NEIGHBOURS), MISSING, dtype=np.int64)
    distances = np.full((len(ids), LAYOUT_NEIGHBOURS), np.inf, dtype=np.float32)
    if rows:
        table = rows_as_array(rows, 4)
        owners = np.searchsorted(ids, table[:, 0].astype(np.int64)).clip(0, max(len(ids) - 1, 0))
        known = ids[owners] == table[:, 0] if len(ids) else np.zeros(len(table), bool)
        ranks = table[known, 1].astype(np.int64) - 1
        neighbour_ids[owners[known], ranks] = table[known, 2].astype(np.int64)
        distances[owners[known], ranks] = table[known, 3]
    return NeighbourGraph.from_ids(ids, neighbour_ids, distances)


def unchanged_map(engine: Engine) -> MapCounts | None:
    """What layout_map (without refit) would answer without writing; None when it has work."""
    with engine.connect() as conn:
        return counts_if_unchanged(conn.execute(select(map_state)).first(), read_map_inputs(conn))


def counts_if_unchanged(state: Any, inputs: MapInputs) -> MapCounts | None:
    """The map's counts when its inputs' fingerprint is the stored one, else None: the one
    test of "nothing to redo", for layout_map and for `lookalike process`'s up-to-date check."""
    if state is None or state.fingerprint != inputs.fingerprint:
        return None
    return MapCounts(len(inputs.hashes), 0, MODE_UNCHANGED)


def layout_map(engine: Engine, refit: bool = False) -> MapCounts:
    """Bring the map up to date (see the module's docstring for what is done when)."""
    with engine.connect() as conn:
        inputs = read_map_inputs(conn)
        state = conn.execute(select(map_state)).first()
        if not refit and (unchanged := counts_if_unchanged(state, inputs)) is not None:
            return unchanged
        stored = read_stored(conn) if state is not None and state.basis == inputs.basis else {}
        ids = np.fromiter(inputs.hashes, dtype=np.int64, count=len(inputs.hashes))
        graph = read_graph(conn, ids)
    kept = np.array([stored.get(i, ("",))[-1] == h for i, h in inputs.hashes.items()], bool)
    since_fit = 0 if state is None else int(state.placed_images)
    moved = (len(ids) - int(kept.sum())) + len(set(stored) - set(inputs.hashes))
    fitted = 0 if state is None else int(state.fitted_images)
    full = refit or not kept.any() or since_fit + moved > REFIT_FRACTION * max(fitted, 1)
    if full:
        positions, placed, mode = fit_layout(graph), 0, MODE_FULL
    else:
        start = np.zeros((len(ids), 2), np.float32)
        start[kept] = [stored[i][:2] for i in ids[kept].tolist()]
        positions, placed, mode = (
            place_new(graph, start, kept),
            int((~kept).sum()),
            MODE_INCREMENTAL,
        )
    with engine.begin() as conn:
        write_map(conn, ids, positions, inputs, None if full else kept)
        write_state(conn, inputs, len(ids) if full else fitted, 0 if full else since_fit + moved)
    return MapCounts(len(ids), placed, mode)


def read_stored(conn: Connection) -> dict[int, tuple[float, float, str]]:
    """The stored map: image id -> (x, y, content hash when placed)."""
    rows = conn.execute(select(image_map.c.image_id, image_map.c.x, image_map.c.y,
                               image_map.c.content_hash)).all()  # fmt: skip
    return {int(r[0]): (float(r[1]), float(r[2]), str(r[3])) for r in rows}


def write_map(conn: Connection, ids: np.ndarray, positions: np.ndarray, inputs: MapInputs,
              kept: np.ndarray | None) -> None:  # fmt: skip
    """Every position (kept None), or only those not kept, replacing the old rows."""
    if kept is None:
        conn.execute(delete(image_map))
        written = np.arange(len(ids))
    else:
        gone = set(read_stored(conn)) - set(ids[kept].tolist())
        for start in range(0, len(gone), CHUNK):
            chunk = sorted(gone)[start : start + CHUNK]
            conn.execute(delete(image_map).where(image_map.c.image_id.in_(chunk)))
        written = np.flatnonzero(~kept)
    rows = [
        {"image_id": int(ids[r]), "x": float(positions[r, 0]), "y": float(positions[r, 1]),
         "content_hash": inputs.hashes[int(ids[r])]}
        for r in written.tolist()
    ]  # fmt: skip
    for start in range(0, len(rows), INSERT_CHUNK):
        conn.execute(insert(image_map), rows[start : start + INSERT_CHUNK])


def write_state(conn: Connection, inputs: MapInputs, fitted: int, placed: int) -> None:
    conn.execute(delete(map_state))
    conn.execute(
        insert(map_state),
        [{"id": 1, "fingerprint": inputs.fingerprint, "basis": inputs.basis,
          "fitted_images": fitted, "placed_images": placed,
          "computed_at": datetime.now(UTC).replace(tzinfo=None)}],
    )  # fmt: skip


@task(name="layout-map", **DATABASE_RETRIES, cache_policy=NO_CACHE)
def layout_map_task(database_url: str, refit: bool = False) -> MapCounts:
    """Lay the map out or bring it up to date; an artifact with what was done."""
    counts = layout_map(engine_for(database_url), refit)
    logger = get_run_logger()
    logger.info("map: %d points, %d placed (%s)", counts.points, counts.placed, counts.mode)
    table: list[dict[str, Any]] = [{"measure": k, "value": v} for k, v in vars(counts).items()]
    create_table_artifact(table=table, key=MAP_KEY, description="layout-map: the archive's map")
    return counts
