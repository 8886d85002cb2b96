"""Loading: staged feature batches and neighbour lists into the database, in bulk."""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
from prefect import task
from prefect.cache_policies import NO_CACHE
from sqlalchemy import Connection, Engine, bindparam, delete, insert, select, text, update

from sql.schema import (
    STATUS_FAILED,
    STATUS_OK,
    STATUS_PENDING,
    image_features,
    image_names,
    image_neighbours,
)
from tasks.catalog import MODEL_NAME, mark_indexed
from tasks.database import create_db_engine, engine_for, retry_if_transient
from tasks.stage import feature_matrix, read_table

log = logging.getLogger(__name__)


class LoadError(RuntimeError):
    """A bulk load did not write what it should have; one line for the user."""


@dataclass(frozen=True)
class FeatureLoadCounts:
    """Rows a feature load wrote."""

    ok: int
    failed: int


def load_feature_batches(engine: Engine, paths: Sequence[Path]) -> FeatureLoadCounts:
    """Write staged batches: features of decoded images, the reason of failed ones."""
    ok = failed = 0
    pending = _pending_ids(engine)
    for path in paths:
        table = read_table(path)
        with engine.begin() as conn:
            good, bad = _load_one_batch(conn, table, pending, path.stem)
        ok, failed = ok + good, failed + bad
    return FeatureLoadCounts(ok, failed)


def _pending_ids(engine: Engine) -> dict[tuple[str, str], int]:
    """Pending images by (file name, content hash): staged rows are matched on both."""
    query = select(image_names.c.id, image_names.c.file_name, image_names.c.content_hash).where(
        image_names.c.status == STATUS_PENDING
    )
    with engine.connect() as conn:
        return {(r.file_name, r.content_hash): r.id for r in conn.execute(query)}


def _load_one_batch(
    conn: Connection, table: pa.Table, pending: dict[tuple[str, str], int], batch_key: str
) -> tuple[int, int]:
    """One staged batch in one transaction; rows no longer pending are skipped."""
    names = table.column("file_name").to_pylist()
    hashes = table.column("content_hash").to_pylist()
    errors = table.column("error").to_pylist()
    widths = table.column("width").to_pylist()
    heights = table.column("height").to_pylist()
    matrix = feature_matrix(table)
    status_rows, feature_rows = [], []
    for i, key in enumerate(zip(names, hashes, strict=True)):
        image_id = pending.pop(key, None)
        if image_id is None:
            continue
        failed = errors[i] is not None
        status_rows.append(
            dict(
                b_id=image_id,
                b_status=STATUS_FAILED if failed else STATUS_OK,
                b_error=errors[i],
                b_width=widths[i],
                b_height=heights[i],
            )
        )
        if not failed:
            feature_rows.append(
                dict(
                    image_id=image_id,
                    model=MODEL_NAME,
                    staged_batch=batch_key,
                    features=matrix[i].astype("<f4").tobytes(),
                )
            )
    if status_rows:
        conn.execute(_STATUS_UPDATE, status_rows)
    if feature_rows:
        conn.execute(insert(image_features), feature_rows)
    return len(feature_rows), len(status_rows) - len(feature_rows)


_STATUS_UPDATE = (
    update(image_names)
    .where(image_names.c.id == bindparam("b_id"))
    .values(
        status=bindparam("b_status"),
        error=bindparam("b_error"),
        width=bindparam("b_width"),
        height=bindparam("b_height"),
        indexed=False,
    )
)


def load_neighbour_table(database_url: str, staged: Path, staging_dir: Path) -> int:
    """Replace the neighbour table with the staged lists; readers never see a half-filled one."""
    table = read_table(staged)
    if database_url.startswith(("mysql", "mariadb")):
        return _swap_in_mariadb(database_url, table, staging_dir)
    engine = create_db_engine(database_url)
    try:
        return _replace_in_sqlite(engine, table)
    finally:
        engine.dispose()


def _replace_in_sqlite(engine: Engine, table: pa.Table) -> int:
    """Delete and insert in one transaction: WAL readers keep the old snapshot until commit."""
    rows = table.to_pylist()
    with engine.begin() as conn:
        conn.execute(delete(image_neighbours))
        if rows:
            conn.execute(insert(image_neighbours), rows)
    return len(rows)


def _swap_in_mariadb(database_url: str, table: pa.Table, staging_dir: Path) -> int:
    """LOAD DATA into a fresh table, then one atomic RENAME TABLE swaps it in."""
    loader = create_db_engine(database_url, local_infile=True)  # the only LOCAL INFILE engine
    staging_dir.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix="neighbours-", suffix=".csv", dir=staging_dir)
    os.close(fd)
    try:
        pacsv.write_csv(table, name, pacsv.WriteOptions(include_header=False))
        with loader.begin() as conn:
            conn.exec_driver_sql("DROP TABLE IF EXISTS image_neighbours_new, image_neighbours_old")
            conn.exec_driver_sql("CREATE TABLE image_neighbours_new LIKE image_neighbours")
            _load_data_checked(conn, name, "image_neighbours_new", table.num_rows)
            conn.exec_driver_sql(
                "RENAME TABLE image_neighbours TO image_neighbours_old, "
                "image_neighbours_new TO image_neighbours"
            )
            conn.exec_driver_sql("DROP TABLE image_neighbours_old")
    finally:
        os.unlink(name)
        loader.dispose()
    return table.num_rows


def _load_data_checked(conn: Connection, csv_path: str, table_name: str, expected: int) -> None:
    """LOAD DATA LOCAL turns errors into warnings: check them and the row count."""
    result = conn.execute(
        text(
            f"LOAD DATA LOCAL INFILE :path INTO TABLE {table_name} "
            "FIELDS TERMINATED BY ',' LINES TERMINATED BY '\\n' "
            "(image_id, `rank`, neighbour_id, distance)"
        ),
        {"path": csv_path},
    )
    warnings = conn.exec_driver_sql("SHOW WARNINGS LIMIT 5").fetchall()
    if warnings or result.rowcount != expected:
        detail = "; ".join(str(w[2]) for w in warnings) or "no warnings"
        raise LoadError(f"neighbour load wrote {result.rowcount} of {expected} rows ({detail})")


def read_feature_rows(engine: Engine) -> tuple[np.ndarray, np.ndarray]:
    """(ids, features) of every ok image from the database, ordered by id."""
    query = (
        select(image_features.c.image_id, image_features.c.features)
        .join(image_names, image_names.c.id == image_features.c.image_id)
        .where(image_names.c.status == STATUS_OK)
        .order_by(image_features.c.image_id)
    )
    ids: list[int] = []
    blobs: list[bytes] = []
    with engine.connect() as conn:
        for row in conn.execute(query):
            ids.append(row.image_id)
            blobs.append(row.features)
    matrix = np.frombuffer(b"".join(blobs), dtype="<f4").reshape(len(ids), -1)
    return np.asarray(ids, dtype=np.int64), matrix.astype(np.float32, copy=False)


@task(
    name="load-features",
    retries=3,
    retry_delay_seconds=[2, 10, 30],
    retry_condition_fn=retry_if_transient,
    cache_policy=NO_CACHE,
)
def load_features_task(database_url: str, paths: list[str]) -> FeatureLoadCounts:
    """Bulk-load staged feature batches into image_names and image_features."""
    return load_feature_batches(engine_for(database_url), [Path(p) for p in paths])


@task(
    name="load-neighbours",
    retries=3,
    retry_delay_seconds=[2, 10, 30],
    retry_condition_fn=retry_if_transient,
    cache_policy=NO_CACHE,
)
def load_neighbours_task(
    database_url: str, staged: str, staging_dir: str, refreshed_ids: list[int]
) -> int:
    """Swap the staged neighbour lists in, then mark their images as indexed."""
    rows = load_neighbour_table(database_url, Path(staged), Path(staging_dir))
    mark_indexed(engine_for(database_url), refreshed_ids)
    Path(staged).unlink(missing_ok=True)  # the lists now live in the database
    return rows
