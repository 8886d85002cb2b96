"""Neighbours: gather the features, run the kNN engine (full or incremental), stage the lists."""

from __future__ import annotations

import logging
import uuid
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from sqlalchemy import Engine, select

from sql.schema import FEATURE_DIM, STATUS_OK, image_features, image_names, image_neighbours
from tasks.catalog import stale_neighbour_ids
from tasks.database import engine_for
from tasks.knn import NeighbourLists, knn_all
from tasks.knn_incremental import knn_update
from tasks.knn_space import KnnInputError
from tasks.load import read_feature_rows
from tasks.stage import feature_batch_path, feature_matrix, read_table, write_neighbour_lists

log = logging.getLogger(__name__)

# Past this share of changed images an incremental update costs about as much as a full pass.
INCREMENTAL_LIMIT = 0.25


@dataclass(frozen=True)
class NeighbourPlan:
    """What a neighbour computation did, and the staged file holding its lists."""

    staged: Path
    mode: str  # "full" | "incremental"
    images: int
    rows: int
    refreshed_ids: list[int]


def read_features(engine: Engine, staging_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """(ids, features) of ok images: memory-mapped from staging, from the database if it is gone."""
    query = (
        select(
            image_features.c.image_id,
            image_features.c.staged_batch,
            image_names.c.file_name,
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
    matrix = np.empty((len(rows), FEATURE_DIM), dtype=np.float32)
    for key, positions in by_batch.items():
        table = read_table(paths[str(key)])
        index = {
            pair: i
            for i, pair in enumerate(
                zip(
                    table.column("file_name").to_pylist(),
                    table.column("content_hash").to_pylist(),
                    strict=True,
                )
            )
        }
        staged = feature_matrix(table)
        for position in positions:
            found = index.get((rows[position].file_name, rows[position].content_hash))
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
    engine: Engine, staging_dir: Path, k: int, *, full: bool = False, metric: str = "euclidean"
) -> NeighbourPlan:
    """Bring every ok image's list up to date and stage the complete table."""
    ids, features = read_features(engine, staging_dir)
    changed, gone = stale_neighbour_ids(engine)
    previous = None if full else read_neighbour_lists(engine)
    expected_width = min(k, max(len(ids) - 1, 0))
    incremental = (
        previous is not None
        and previous.neighbour_ids.shape[1] == min(k, max(len(previous.image_ids) - 1, 0))
        and len(changed) <= INCREMENTAL_LIMIT * max(len(ids), 1)
    )
    lists = None
    if incremental and previous is not None:
        try:
            lists = knn_update(
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
            incremental = False
    if lists is None:
        lists = knn_all(features, ids, k, metric=metric)
    if lists.neighbour_ids.shape != (len(ids), expected_width):
        raise RuntimeError(f"kNN returned lists of shape {lists.neighbour_ids.shape}")
    staged = write_neighbour_lists(
        staging_dir / "neighbours" / f"{uuid.uuid4().hex}.arrow",
        lists.image_ids,
        lists.neighbour_ids,
        lists.distances,
    )
    return NeighbourPlan(
        staged,
        "incremental" if incremental else "full",
        len(ids),
        int(lists.neighbour_ids.size),
        changed,
    )


@task(name="compute-neighbours", cache_policy=NO_CACHE)  # deterministic compute: no retries
def compute_neighbours_task(
    database_url: str, staging_dir: str, k: int, full: bool = False
) -> NeighbourPlan:
    """Exact kNN of every ok image, incremental when only a few changed; lists staged as Arrow."""
    plan = compute_neighbours(engine_for(database_url), Path(staging_dir), k, full=full)
    get_run_logger().info(
        "%s neighbour pass over %d images: %d rows staged, %d lists refreshed",
        plan.mode,
        plan.images,
        plan.rows,
        len(plan.refreshed_ids),
    )
    return plan
