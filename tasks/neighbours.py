"""Neighbours: plan the pass, gather the features, run the kNN engine, stage the lists."""

from __future__ import annotations

import logging
import uuid
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from sqlalchemy import Engine, distinct, func, select

from lookalike.sql.schema import (
    STATUS_OK,
    image_features,
    image_names,
    image_neighbours,
)
from lookalike.tasks.catalog import stale_neighbour_ids, stored_feature_dim
from lookalike.tasks.database import DATABASE_RETRIES, engine_for
from lookalike.tasks.knn import NeighbourLists, knn_all, knn_update, list_length
from lookalike.tasks.knn.plan import ListState, PassKind, choose_pass
from lookalike.tasks.knn.space import KnnInputError
from lookalike.tasks.load import read_feature_rows
from lookalike.tasks.stage import (
    feature_batch_path,
    feature_matrix,
    read_table,
    write_neighbour_lists,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StagedNeighbours:
    """The lists a neighbour pass computed, staged as Arrow, and what the pass did."""

    staged: Path
    kind: PassKind  # INCREMENTAL or FULL
    images: int
    rows: int
    refreshed_ids: list[int]


def read_list_state(engine: Engine) -> ListState:
    """The counts knn.plan.choose_pass decides on, read from the database."""
    changed, gone = stale_neighbour_ids(engine)
    with engine.connect() as conn:
        images = conn.execute(
            select(func.count()).select_from(image_names).where(image_names.c.status == STATUS_OK)
        ).scalar_one()
        rows, listed = conn.execute(
            select(func.count(), func.count(distinct(image_neighbours.c.image_id)))
        ).one()
    return ListState(
        images=int(images),
        changed=len(changed),
        deleted=len(gone),
        stored_rows=int(rows),
        stored_images=int(listed),
    )


def plan_neighbour_pass(engine: Engine, k: int, *, rebuild: bool = False) -> PassKind:
    """Which pass the stored lists need (see knn.plan.choose_pass)."""
    return choose_pass(read_list_state(engine), k, rebuild=rebuild)


def read_features(engine: Engine, staging_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """(ids, features) of ok images: memory-mapped from staging, from the database if it is gone."""
    query = (
        select(
            image_features.c.image_id,
            image_features.c.staged_batch,
            image_names.c.content_hash,
        )
        .join(image_names, image_names.c.id == image_features.c.image_id)
        .where(image_names.c.status == STATUS_OK)
        .order_by(image_features.c.image_id)
    )
    with engine.connect() as conn:
        rows = conn.execute(query).all()
    by_batch: dict[str | None, list[int]] = defaultdict(list)
    for position, row in enumerate(rows):
        by_batch[row.staged_batch].append(position)
    paths = {key: feature_batch_path(staging_dir, key) for key in by_batch if key}
    if None in by_batch or not all(path.exists() for path in paths.values()):
        log.info("staging incomplete; reading features from the database")
        return read_feature_rows(engine)
    matrix = np.empty((len(rows), stored_feature_dim(engine)), dtype=np.float32)
    for key, positions in by_batch.items():
        table = read_table(paths[str(key)])
        # By content hash alone, as the loader matched them (tasks.load.find_staged_rows).
        index = {
            content_hash: i
            for i, content_hash in enumerate(table.column("content_hash").to_pylist())
        }
        staged = feature_matrix(table)
        for position in positions:
            found = index.get(rows[position].content_hash)
            if found is None:
                log.info("staged batch %s lacks an image; reading from the database", key)
                return read_feature_rows(engine)
            matrix[position] = staged[found]
    return np.array([r.image_id for r in rows], dtype=np.int64), matrix


def read_neighbour_lists(engine: Engine) -> NeighbourLists | None:
    """The stored lists as arrays, or None when they are missing or ragged."""
    query = select(image_neighbours).order_by(image_neighbours.c.image_id, image_neighbours.c.rank)
    with engine.connect() as conn:
        rows = conn.execute(query).all()
    if not rows:
        return None
    data = np.array([(r.image_id, r.neighbour_id, r.distance) for r in rows], dtype=np.float64)
    image_ids, counts = np.unique(data[:, 0].astype(np.int64), return_counts=True)
    if counts.min() != counts.max():
        return None
    width = int(counts[0])
    return NeighbourLists(
        image_ids=image_ids,
        neighbour_ids=data[:, 1].astype(np.int64).reshape(-1, width),
        distances=data[:, 2].astype(np.float32).reshape(-1, width),
    )


def compute_neighbours(
    engine: Engine, staging_dir: Path, k: int, kind: PassKind, *, metric: str = "euclidean"
) -> StagedNeighbours:
    """Run the planned pass (incremental or full) over every ok image; stage the lists."""
    ids, features = read_features(engine, staging_dir)
    changed, gone = stale_neighbour_ids(engine)
    lists = None
    if kind is PassKind.INCREMENTAL:
        lists = update_lists(engine, ids, features, changed, gone, k=k, metric=metric)
    if lists is None:
        kind = PassKind.FULL
        lists = knn_all(features, ids, k, metric=metric)
    if lists.neighbour_ids.shape != (len(ids), list_length(k, len(ids))):
        raise RuntimeError(f"kNN returned lists of shape {lists.neighbour_ids.shape}")
    staged = write_neighbour_lists(
        staging_dir / "neighbours" / f"{uuid.uuid4().hex}.arrow",
        lists.image_ids,
        lists.neighbour_ids,
        lists.distances,
    )
    return StagedNeighbours(staged, kind, len(ids), int(lists.neighbour_ids.size), changed)


def update_lists(
    engine: Engine,
    ids: np.ndarray,
    features: np.ndarray,
    changed: list[int],
    gone: list[int],
    *,
    k: int,
    metric: str,
) -> NeighbourLists | None:
    """The stored lists updated for the change; None when they cannot describe it."""
    previous = read_neighbour_lists(engine)
    if previous is None:
        log.warning("stored neighbour lists are ragged; full pass instead")
        return None
    try:
        return knn_update(
            previous,
            features,
            ids,
            changed_ids=np.asarray(changed, np.int64),
            deleted_ids=np.asarray(gone, np.int64),
            k=k,
            metric=metric,
        )
    except KnnInputError as exc:
        # Stored lists that do not describe the change (e.g. edited by hand): start over.
        log.warning("incremental neighbour update impossible (%s); full pass instead", exc)
        return None


@task(name="plan-neighbour-pass", **DATABASE_RETRIES, cache_policy=NO_CACHE)
def plan_neighbour_pass_task(database_url: str, k: int, rebuild: bool = False) -> PassKind:
    """Which pass the stored lists need: unchanged, incremental or full."""
    kind = plan_neighbour_pass(engine_for(database_url), k, rebuild=rebuild)
    get_run_logger().info("neighbour lists: %s", kind.value)
    return kind


@task(name="compute-neighbours", cache_policy=NO_CACHE)  # deterministic compute: no retries
def compute_neighbours_task(
    database_url: str, staging_dir: str, k: int, kind: PassKind
) -> StagedNeighbours:
    """Exact kNN of every ok image by the planned pass; lists staged as Arrow."""
    result = compute_neighbours(engine_for(database_url), Path(staging_dir), k, kind)
    get_run_logger().info(
        "%s neighbour pass over %d images: %d rows staged, %d lists refreshed",
        result.kind.value,
        result.images,
        result.rows,
        len(result.refreshed_ids),
    )
    return result
