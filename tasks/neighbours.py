"""Neighbours: plan the pass, gather the features, run the kNN engine, stage the lists.

The engine keeps each list deeper than k (knn.plan.list_depth: k plus a reserve), so that
removing images, a source's for instance, rarely leaves a list with fewer than k known
entries to recompute. The database holds the first k of each list; the deep lists are kept
beside the staged features (deep_lists_path), and used by the next update only while their first
k entries are still what the database holds.
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from sqlalchemy import Engine, distinct, func, make_url, select

from lookalike.sql.schema import (
    STATUS_OK,
    image_features,
    image_names,
    image_neighbours,
)
from lookalike.tasks.catalog import stale_neighbour_ids, stored_feature_dim, unindexed_ids
from lookalike.tasks.database import DATABASE_RETRIES, engine_for
from lookalike.tasks.knn import (
    NeighbourLists,
    knn_all,
    knn_update,
    list_depth,
    list_length,
    prefix_lists,
)
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


def deep_lists_path(staging_dir: Path, database: str) -> Path:
    """Where the deep lists of a database's table are kept (a staging folder may serve
    several databases)."""
    name = make_url(database).render_as_string(hide_password=True)
    digest = hashlib.blake2b(name.encode(), digest_size=8).hexdigest()
    return staging_dir / "neighbours" / f"deep-lists-{digest}.arrow"


@dataclass(frozen=True)
class StagedNeighbours:
    """The lists a neighbour pass computed, staged as Arrow, and what the pass did."""

    staged: Path  # the first k of each list: the rows of the neighbour table
    kind: PassKind  # INCREMENTAL or FULL
    images: int
    rows: int
    refreshed_ids: list[int]
    deep: Path | None = None  # the deep lists, to keep once the table holds `staged`


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


def read_staged_lists(path: Path) -> NeighbourLists:
    """Lists staged by write_neighbour_lists (padding included), as arrays."""
    table = read_table(path)
    image_ids = table.column("image_id").to_numpy()
    width = int(np.count_nonzero(image_ids == image_ids[0])) if len(image_ids) else 0
    return NeighbourLists(
        image_ids=image_ids[::width].copy() if width else image_ids,
        neighbour_ids=table.column("neighbour_id").to_numpy().reshape(-1, max(width, 1)),
        distances=table.column("distance").to_numpy().reshape(-1, max(width, 1)),
    )


# Primes for the table digest: products of an id and a rank (< 2^46) stay exact in int64,
# and so do the sums of 2^31 remainders over any table that fits a database.
_DIGEST_PRIMES = (2_147_483_647, 2_147_483_629)
TableDigest = tuple[int, int, int, int, float]


def stored_digest(engine: Engine) -> TableDigest:
    """A digest of the neighbour table computed by the database, in one scan: rows, the sum
    of image ids, two sums of rank-weighted ids modulo primes, and the sum of distances."""
    t = image_neighbours.c
    first, second = _DIGEST_PRIMES
    query = select(
        func.count(),
        func.coalesce(func.sum(t.image_id), 0),
        func.coalesce(func.sum((t.neighbour_id * t.rank) % first), 0),
        func.coalesce(func.sum((t.image_id * t.rank + t.neighbour_id) % second), 0),
        func.coalesce(func.sum(t.distance), 0.0),
    )
    with engine.connect() as conn:
        rows, ids, weighted, mixed, distance = conn.execute(query).one()
    return int(rows), int(ids), int(weighted), int(mixed), float(distance)


def lists_digest(lists: NeighbourLists) -> TableDigest:
    """stored_digest of the table these lists would be (ranks from 1)."""
    first, second = _DIGEST_PRIMES
    n, width = lists.neighbour_ids.shape
    ranks = np.arange(1, width + 1, dtype=np.int64)
    image = np.repeat(lists.image_ids.astype(np.int64), width).reshape(n, width)
    neighbour = lists.neighbour_ids.astype(np.int64)
    return (
        n * width,
        int(image.sum()),
        int(((neighbour * ranks) % first).sum()),
        int(((image * ranks + neighbour) % second).sum()),
        float(lists.distances.astype(np.float64).sum()),
    )


def read_deep_lists(path: Path, engine: Engine, k: int) -> NeighbourLists | None:
    """The kept deep lists when their first entries are the table's rows (same digest), else
    None (none kept yet, or the table was rewritten without them): one scan of the table
    in the database instead of reading every row."""
    if not path.exists():
        return None
    deep = read_staged_lists(path)
    width = list_length(k, len(deep.image_ids))
    try:
        digest = lists_digest(prefix_lists(deep, width))
    except KnnInputError:  # some row holds fewer than k: not the table's lists
        return None
    stored = stored_digest(engine)
    # The sums of distances differ by rounding only (the database adds the same float32s).
    same = digest[:4] == stored[:4] and np.isclose(digest[4], stored[4], rtol=1e-9, atol=1e-6)
    if not same:
        log.info("the kept deep lists are not the stored ones; updating from the table")
    return deep if same else None


def keep_deep_lists(staged: StagedNeighbours, staging_dir: Path, database_url: str) -> None:
    """The database's table now holds staged's lists: keep their deep lists for the next
    update (or forget the kept ones, which no longer begin the table's lists)."""
    kept = deep_lists_path(staging_dir, database_url)
    if staged.deep is not None and staged.deep.exists():
        staged.deep.replace(kept)
    else:
        kept.unlink(missing_ok=True)


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
    changed = unindexed_ids(engine)
    depth = list_depth(k, len(ids))
    deep = None
    if kind is PassKind.INCREMENTAL:
        deep = update_lists(
            engine, staging_dir, ids, features, changed, k=k, depth=depth, metric=metric
        )
    if deep is None:
        kind = PassKind.FULL
        deep = knn_all(features, ids, depth, metric=metric)
    lists = prefix_lists(deep, list_length(k, len(ids)))
    if lists.neighbour_ids.shape != (len(ids), list_length(k, len(ids))):
        raise RuntimeError(f"kNN returned lists of shape {lists.neighbour_ids.shape}")
    name = uuid.uuid4().hex
    staged = write_neighbour_lists(
        staging_dir / "neighbours" / f"{name}.arrow",
        lists.image_ids,
        lists.neighbour_ids,
        lists.distances,
    )
    deep_path = write_neighbour_lists(
        staging_dir / "neighbours" / f"{name}-deep.arrow",
        deep.image_ids,
        deep.neighbour_ids,
        deep.distances,
    )
    rows = int(lists.neighbour_ids.size)
    return StagedNeighbours(staged, kind, len(ids), rows, changed, deep=deep_path)


def update_lists(
    engine: Engine,
    staging_dir: Path,
    ids: np.ndarray,
    features: np.ndarray,
    changed: list[int],
    *,
    k: int,
    depth: int,
    metric: str,
) -> NeighbourLists | None:
    """The deep lists updated for the change; None when the stored ones cannot describe it.

    The deleted images are the listed ones without features now (lists name only listed
    images, and the table's rows are the deep lists' first entries).
    """
    previous = read_deep_lists(deep_lists_path(staging_dir, str(engine.url)), engine, k)
    if previous is None:
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
            deleted_ids=np.setdiff1d(previous.image_ids, ids),
            k=k,
            depth=depth,
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
