"""Loading: staged feature batches and neighbour lists into the database, in bulk."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections import defaultdict
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
from prefect import get_run_logger
from prefect.assets import materialize
from prefect.cache_policies import NO_CACHE
from sqlalchemy import (
    Connection,
    Engine,
    bindparam,
    delete,
    func,
    insert,
    select,
    text,
    update,
)

from lookalike.sql.schema import (
    STATUS_FAILED,
    STATUS_OK,
    STATUS_PENDING,
    image_features,
    image_names,
    image_neighbours,
)
from lookalike.tasks.catalog import collection_model, mark_indexed, stored_feature_dim
from lookalike.tasks.database import (
    DATABASE_RETRIES,
    create_db_engine,
    engine_for,
    is_mariadb,
    parse_database_url,
)
from lookalike.tasks.errors import LookalikeError
from lookalike.tasks.report import record_table_assets
from lookalike.tasks.stage import NEIGHBOURS_SCHEMA, StagingError, feature_matrix, read_table

log = logging.getLogger(__name__)

FEATURE_CHUNK_ROWS = 4096  # images per transaction (and per LOAD DATA file): 32 MiB of vectors
LOAD_CONNECTIONS = 2  # MariaDB feature chunks loading at once, each in its own transaction


class LoadError(LookalikeError, RuntimeError):
    """A bulk load did not write what it should have; one line for the user."""


@dataclass(frozen=True)
class FeatureLoadCounts:
    """Rows a feature load wrote."""

    ok: int
    failed: int


@dataclass(frozen=True)
class StagedRow:
    """A pending image found in a staged batch: where its vector is and how decoding ended."""

    image_id: int
    batch: int  # index into the staged paths
    row: int  # row within that staged batch
    error: str | None
    width: int | None
    height: int | None


def load_feature_batches(
    engine: Engine, paths: Sequence[Path], *, scratch_dir: Path | None = None
) -> FeatureLoadCounts:
    """Write the staged batches' still-pending images to the database, in image-id order.

    Decoded images get their vector, failed ones their reason. Images no longer pending are
    skipped, so a first run and an incremental run take the same path. Each chunk of
    FEATURE_CHUNK_ROWS images (statuses and vectors together) is one transaction.
    """
    rows = find_staged_rows(paths, _pending_ids(engine))
    chunks = [rows[i : i + FEATURE_CHUNK_ROWS] for i in range(0, len(rows), FEATURE_CHUNK_ROWS)]
    model = collection_model(engine)  # what the batches were keyed and extracted with
    if is_mariadb(engine):
        _load_chunks_mariadb(engine, chunks, paths, scratch_dir, model)
    else:
        for chunk in chunks:
            _load_chunk_sqlite(engine, chunk, paths, model)
    failed = sum(1 for row in rows if row.error is not None)
    return FeatureLoadCounts(len(rows) - failed, failed)


def _pending_ids(engine: Engine) -> dict[str, list[int]]:
    """Pending images by content hash: one staged vector serves every file with those bytes."""
    query = select(image_names.c.id, image_names.c.content_hash).where(
        image_names.c.status == STATUS_PENDING
    )
    pending: dict[str, list[int]] = defaultdict(list)
    with engine.connect() as conn:
        for row in conn.execute(query):
            pending[row.content_hash].append(row.id)
    return pending


def find_staged_rows(paths: Sequence[Path], pending: dict[str, list[int]]) -> list[StagedRow]:
    """The staged rows of still-pending images, sorted by image id (primary-key order).

    Matched by content hash alone, not by file name: a batch's key is the content hashes of its
    images (with model, weights and preprocessing), so the batch planned for a copy of an image
    staged earlier under another name has that earlier file's key and is never staged again.
    """
    found: list[StagedRow] = []
    for batch, path in enumerate(paths):
        table = read_table(path)
        hashes, errors, widths, heights = (
            table.column(name).to_pylist() for name in ("content_hash", "error", "width", "height")
        )
        for row, content_hash in enumerate(hashes):
            # pop: an image staged twice is written once
            for image_id in pending.pop(content_hash, ()):
                found.append(
                    StagedRow(image_id, batch, row, errors[row], widths[row], heights[row])
                )
    return sorted(found, key=lambda staged: staged.image_id)


def gather_features(rows: Sequence[StagedRow], paths: Sequence[Path]) -> np.ndarray:
    """The (len(rows), dim) little-endian float32 vectors of these rows, read memory-mapped;
    dim is the staged batches' (their model's)."""
    by_batch: dict[int, list[int]] = defaultdict(list)
    for position, row in enumerate(rows):
        by_batch[row.batch].append(position)
    matrices = {batch: feature_matrix(read_table(paths[batch])) for batch in by_batch}
    dim = next(iter(matrices.values())).shape[1] if matrices else 0
    out = np.empty((len(rows), dim), dtype="<f4")
    for batch, positions in by_batch.items():
        out[positions] = matrices[batch][[rows[p].row for p in positions]]
    return out


def _status_values(row: StagedRow) -> tuple[int, str, str | None, int | None, int | None]:
    """(id, status, error, width, height) of one loaded image."""
    status = STATUS_FAILED if row.error is not None else STATUS_OK
    return row.image_id, status, row.error, row.width, row.height


# --- SQLite: executemany in-process, one transaction per chunk -------------------------

_STATUS_PARAMS = ("b_id", "b_status", "b_error", "b_width", "b_height")
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


def _load_chunk_sqlite(
    engine: Engine, chunk: Sequence[StagedRow], paths: Sequence[Path], model: str
) -> None:
    """executemany UPDATE and INSERT: in-process, so a statement per row costs no round trip."""
    ok = [row for row in chunk if row.error is None]
    features = gather_features(ok, paths)
    statuses = [dict(zip(_STATUS_PARAMS, _status_values(row), strict=True)) for row in chunk]
    vectors = [
        dict(
            image_id=row.image_id,
            model=model,
            staged_batch=paths[row.batch].stem,
            features=vector.tobytes(),
        )
        for row, vector in zip(ok, features, strict=True)
    ]
    with engine.begin() as conn:
        _check_count("image status", conn.execute(_STATUS_UPDATE, statuses).rowcount, len(chunk))
        if vectors:
            inserted = conn.execute(insert(image_features), vectors).rowcount
            _check_count("image_features", inserted, len(vectors))


# --- MariaDB: LOAD DATA LOCAL, chunks written and loaded two at a time -----------------


@dataclass(frozen=True)
class ChunkFiles:
    """The LOAD DATA files of one chunk: image statuses and raw feature vectors."""

    statuses: Path
    features: Path
    images: int
    vectors: int


def _load_chunks_mariadb(
    engine: Engine,
    chunks: Sequence[Sequence[StagedRow]],
    paths: Sequence[Path],
    scratch_dir: Path | None,
    model: str,
) -> None:
    """Each chunk through LOAD DATA LOCAL on a dedicated loader engine, one transaction each.

    LOAD DATA of the vectors' raw bytes is the fastest path benchmarks/load.py measured, ahead
    of multi-row INSERT (escaping in Python) and of hex text with UNHEX() (twice the bytes).
    LOAD_CONNECTIONS chunks are in flight at once, each on its own connection: one is written
    to its files while another loads, and the server works on one per core.
    """
    if not chunks:
        return
    with load_file_errors(scratch_dir or tempfile.gettempdir()):
        if scratch_dir is not None:
            scratch_dir.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix="lookalike-load-", dir=scratch_dir))  # mode 0700
    loader = create_db_engine(engine.url.render_as_string(hide_password=False), local_infile=True)
    try:
        with ThreadPoolExecutor(max_workers=LOAD_CONNECTIONS, thread_name_prefix="load") as pool:
            futures = [
                pool.submit(
                    _write_and_load_chunk, loader, chunk, paths, folder / str(number), model
                )
                for number, chunk in enumerate(chunks)
            ]
            try:
                for future in futures:
                    future.result()
            except BaseException:
                for future in futures:
                    future.cancel()  # chunks not started stay pending for the next run
                raise
    finally:
        shutil.rmtree(folder)
        loader.dispose()


def _write_and_load_chunk(
    loader: Engine, chunk: Sequence[StagedRow], paths: Sequence[Path], prefix: Path, model: str
) -> None:
    """Write one chunk's files, load them in one transaction, remove them."""
    files = write_chunk_files(chunk, paths, prefix)
    try:
        with loader.begin() as conn:
            _load_chunk_files(conn, files, model)
    finally:
        files.statuses.unlink()
        files.features.unlink()


def write_chunk_files(
    chunk: Sequence[StagedRow], paths: Sequence[Path], prefix: Path
) -> ChunkFiles:
    """Write a chunk's statuses and vectors as LOAD DATA's default tab-separated format."""
    ok = [row for row in chunk if row.error is None]
    features = gather_features(ok, paths)
    statuses, vectors = prefix.with_suffix(".status.tsv"), prefix.with_suffix(".features.tsv")
    with load_file_errors(prefix.parent), statuses.open("wb") as out:
        for row in chunk:
            out.write(b"\t".join(_field(value) for value in _status_values(row)) + b"\n")
    with load_file_errors(prefix.parent), vectors.open("wb") as out:
        for row, vector in zip(ok, features, strict=True):
            key = paths[row.batch].stem.encode()
            out.write(b"%d\t%s\t%s\n" % (row.image_id, key, escape_field(vector.tobytes())))
    return ChunkFiles(statuses, vectors, len(chunk), len(ok))


def _field(value: str | int | None) -> bytes:
    """One LOAD DATA field: \\N for NULL, text as escaped UTF-8."""
    if value is None:
        return b"\\N"
    return escape_field(str(value).encode())


def escape_field(raw: bytes) -> bytes:
    """Bytes as one LOAD DATA field (ESCAPED BY '\\'): backslash, tab and newline escaped."""
    return raw.replace(b"\\", b"\\\\").replace(b"\t", b"\\t").replace(b"\n", b"\\n")


def _load_chunk_files(conn: Connection, files: ChunkFiles, model: str) -> None:
    """Statuses through a temporary table and one UPDATE ... JOIN, then the vectors.

    executemany of an UPDATE would cost a round trip per image. The temporary table is
    private to the loader's session, and its CREATE and DROP do not end the transaction.
    """
    conn.exec_driver_sql(
        "CREATE TEMPORARY TABLE loaded_status (id INT PRIMARY KEY, status VARCHAR(16) NOT NULL, "
        "error MEDIUMTEXT, width INT, height INT)"
    )
    try:
        load_data_file(
            conn,
            files.statuses,
            "loaded_status",
            "CHARACTER SET utf8mb4 (id, status, error, width, height)",
            files.images,
        )
        updated = conn.exec_driver_sql(
            "UPDATE image_names JOIN loaded_status USING (id) SET "
            "image_names.status = loaded_status.status, image_names.error = loaded_status.error, "
            "image_names.width = loaded_status.width, image_names.height = loaded_status.height, "
            "image_names.indexed = 0"
        ).rowcount  # matched rows: SQLAlchemy connects with CLIENT_FOUND_ROWS
        _check_count("image status", updated, files.images)
    finally:
        conn.exec_driver_sql("DROP TEMPORARY TABLE IF EXISTS loaded_status")
    load_data_file(
        conn,
        files.features,
        "image_features",
        "CHARACTER SET binary (image_id, staged_batch, features) SET model = :model",
        files.vectors,
        {"model": model},
    )


@contextmanager
def load_file_errors(folder: Path | str) -> Iterator[None]:
    """A full or unwritable disk while writing LOAD DATA files: one StagingError line."""
    try:
        yield
    except OSError as exc:  # a raw OSError would reach the user as a traceback
        raise StagingError(f"cannot write load files in {folder}: {exc.strerror or exc}") from exc


@contextmanager
def scratch_file(folder: Path | None, prefix: str, suffix: str) -> Iterator[Path]:
    """A new private (0600) file that the loader writes and LOADs; removed afterwards."""
    with load_file_errors(folder or tempfile.gettempdir()):
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=folder)
    os.close(fd)
    try:
        yield Path(name)
    finally:
        Path(name).unlink(missing_ok=True)


def load_data_file(
    conn: Connection,
    path: Path,
    table_name: str,
    format_clause: str,
    expected: int,
    params: dict[str, object] | None = None,
) -> None:
    """LOAD DATA LOCAL INFILE a file this loader wrote, then check warnings and the row count.

    LOCAL turns errors (a duplicate key, a bad value) into warnings and skipped rows, so a
    load is only trusted when it reports no warning and exactly the expected rows.
    """
    result = conn.execute(
        text(f"LOAD DATA LOCAL INFILE :path INTO TABLE {table_name} {format_clause}"),
        {"path": str(path), **(params or {})},
    )
    warnings = conn.exec_driver_sql("SHOW WARNINGS LIMIT 3").fetchall()
    if warnings:
        detail = "; ".join(str(w[2]) for w in warnings)
        raise LoadError(
            f"loading {table_name} wrote {result.rowcount} of {expected} rows: {detail}"
        )
    _check_count(table_name, result.rowcount, expected)


def _check_count(what: str, written: int, expected: int) -> None:
    """Fail loudly when a bulk write did not write exactly the expected rows."""
    if written != expected:
        raise LoadError(f"{what} load wrote {written} rows, expected {expected}; nothing kept")


def load_neighbour_table(database_url: str, staged: Path, staging_dir: Path) -> int:
    """Replace the neighbour table with the staged lists; readers never see a half-filled one."""
    table = read_table(staged)
    return write_neighbour_table(database_url, table, staging_dir, expected_rows=table.num_rows)


def write_neighbour_table(
    database_url: str, table: pa.Table, staging_dir: Path, *, expected_rows: int
) -> int:
    """Swap in a new neighbour table of exactly expected_rows rows, in primary-key order.

    On any failure (LoadError on a count or a warning) the current table stays as it was.
    """
    table = in_key_order(table)
    if parse_database_url(database_url).get_backend_name() != "sqlite":
        return _swap_in_mariadb(database_url, table, staging_dir, expected_rows)
    engine = create_db_engine(database_url)
    try:
        return _replace_in_sqlite(engine, table, expected_rows)
    finally:
        engine.dispose()


def in_key_order(table: pa.Table) -> pa.Table:
    """The neighbour rows sorted by (image_id, rank), the primary key; refuses repeated keys."""
    if not _strictly_increasing(table):
        table = table.sort_by([("image_id", "ascending"), ("rank", "ascending")])
        if not _strictly_increasing(table):
            raise LoadError("staged neighbour lists repeat an (image, rank) pair; recompute them")
    return table


def _strictly_increasing(table: pa.Table) -> bool:
    """True when (image_id, rank) increases from every row to the next."""
    ids = table.column("image_id").to_numpy()
    ranks = table.column("rank").to_numpy()
    same_image = ids[1:] == ids[:-1]
    return bool(np.all((ids[1:] > ids[:-1]) | (same_image & (ranks[1:] > ranks[:-1]))))


SQLITE_CHUNK_ROWS = 100_000  # rows per executemany: bounds the Python tuples held at once


def _replace_in_sqlite(engine: Engine, table: pa.Table, expected_rows: int) -> int:
    """Delete and insert in one transaction: WAL readers keep the old snapshot until commit.

    The secondary index is dropped and built again after the insert: one sort instead of two
    million random B-tree inserts. DDL is transactional in SQLite, so readers see none of it.
    """
    with engine.begin() as conn, _sqlite_bulk_pragmas(conn):
        conn.execute(delete(image_neighbours))  # first: pysqlite opens the transaction on DML
        for index in image_neighbours.indexes:
            index.drop(conn, checkfirst=True)
        for start in range(0, table.num_rows, SQLITE_CHUNK_ROWS):
            part = table.slice(start, SQLITE_CHUNK_ROWS)
            conn.exec_driver_sql(_SQLITE_NEIGHBOUR_INSERT, _neighbour_tuples(part))
        for index in image_neighbours.indexes:
            index.create(conn, checkfirst=True)
        count = conn.execute(select(func.count()).select_from(image_neighbours)).scalar_one()
        _check_count("image_neighbours", count, expected_rows)
    return expected_rows


_SQLITE_NEIGHBOUR_INSERT = (
    "INSERT INTO image_neighbours (image_id, rank, neighbour_id, distance) VALUES (?, ?, ?, ?)"
)


def _neighbour_tuples(part: pa.Table) -> list[tuple[int, int, int, float]]:
    """Plain Python rows for executemany, built column-wise (much faster than to_pylist)."""
    columns = [part.column(name).to_numpy().tolist() for name in NEIGHBOURS_SCHEMA.names]
    return list(zip(*columns, strict=True))


@contextmanager
def _sqlite_bulk_pragmas(conn: Connection) -> Iterator[None]:
    """A large page cache and in-memory sort space for the load, the defaults afterwards."""
    conn.exec_driver_sql("PRAGMA cache_size = -262144")  # 256 MiB: both indexes stay cached
    conn.exec_driver_sql("PRAGMA temp_store = MEMORY")  # CREATE INDEX sorts in memory
    try:
        yield
    finally:
        conn.exec_driver_sql("PRAGMA cache_size = -2000")
        conn.exec_driver_sql("PRAGMA temp_store = DEFAULT")


NEW_TABLE = "image_neighbours_new"
OLD_TABLE = "image_neighbours_old"


def _swap_in_mariadb(
    database_url: str, table: pa.Table, staging_dir: Path, expected_rows: int
) -> int:
    """LOAD DATA into a fresh table, then one atomic RENAME TABLE swaps it in."""
    loader = create_db_engine(database_url, local_infile=True)  # the only LOCAL INFILE engine
    try:
        with scratch_file(staging_dir, "neighbours-", ".csv") as path:
            with load_file_errors(staging_dir):
                pacsv.write_csv(table, str(path), pacsv.WriteOptions(include_header=False))
            with loader.connect() as conn:
                _create_fresh_table(conn)
                try:
                    _bulk_load_fresh_table(conn, path, expected_rows)
                except BaseException:
                    conn.rollback()
                    conn.exec_driver_sql(f"DROP TABLE IF EXISTS {NEW_TABLE}")
                    raise
                conn.exec_driver_sql(
                    f"RENAME TABLE image_neighbours TO {OLD_TABLE}, {NEW_TABLE} TO image_neighbours"
                )
                conn.exec_driver_sql(f"DROP TABLE {OLD_TABLE}")
                conn.commit()
    finally:
        loader.dispose()
    return expected_rows


def _create_fresh_table(conn: Connection) -> None:
    """An empty copy of image_neighbours (same columns and indexes) beside the live one."""
    conn.exec_driver_sql(f"DROP TABLE IF EXISTS {NEW_TABLE}, {OLD_TABLE}")
    conn.exec_driver_sql(f"CREATE TABLE {NEW_TABLE} LIKE image_neighbours")
    conn.commit()  # DDL commits anyway; this ends SQLAlchemy's transaction too


def _bulk_load_fresh_table(conn: Connection, path: Path, expected_rows: int) -> None:
    """One LOAD DATA into the empty fresh table in one transaction, checked before commit.

    unique_checks=0 and foreign_key_checks=0 let InnoDB load an empty table in bulk (sorted
    index builds, table-level undo). Safe here: no one else sees this table, it has no foreign
    keys, and the row count check below catches any row a duplicate key would have dropped.
    """
    conn.exec_driver_sql("SET SESSION unique_checks = 0, foreign_key_checks = 0")
    try:
        load_data_file(
            conn,
            path,
            NEW_TABLE,
            "FIELDS TERMINATED BY ',' LINES TERMINATED BY '\\n' "
            "(image_id, `rank`, neighbour_id, distance)",
            expected_rows,
        )
        conn.commit()
    finally:
        conn.exec_driver_sql("SET SESSION unique_checks = 1, foreign_key_checks = 1")


def read_feature_rows(engine: Engine) -> tuple[np.ndarray, np.ndarray]:
    """(ids, features) of every ok image from the database, ordered by id; LoadError when a
    stored vector is not of the collection's model's length."""
    query = (
        select(image_features.c.image_id, image_features.c.features)
        .join(image_names, image_names.c.id == image_features.c.image_id)
        .where(image_names.c.status == STATUS_OK)
        .order_by(image_features.c.image_id)
    )
    dim = stored_feature_dim(engine)
    ids: list[int] = []
    blobs: list[bytes] = []
    with engine.connect() as conn:
        for row in conn.execute(query):
            if len(row.features) != dim * 4:
                raise LoadError(
                    f"stored features of image {row.image_id} have {len(row.features)} bytes, "
                    f"the collection's model gives {dim * 4}"
                )
            ids.append(row.image_id)
            blobs.append(row.features)
    matrix = np.frombuffer(b"".join(blobs), dtype="<f4").reshape(len(ids), dim)
    return np.asarray(ids, dtype=np.int64), matrix.astype(np.float32, copy=False)


@materialize(
    "lookalike://tables/image_names",  # the flow names the tables of its database
    "lookalike://tables/image_features",
    name="load-features",
    **DATABASE_RETRIES,
    cache_policy=NO_CACHE,
)
def load_features_task(database_url: str, paths: list[str]) -> FeatureLoadCounts:
    """Bulk-load staged feature batches into image_names and image_features."""
    counts = load_feature_batches(engine_for(database_url), [Path(p) for p in paths])
    rows = record_table_assets(database_url)
    get_run_logger().info(
        "loaded %d staged batches: %d images ok, %d failed; tables now hold %s",
        len(paths),
        counts.ok,
        counts.failed,
        rows,
    )
    return counts


@materialize(
    "lookalike://tables/image_neighbours",  # the flow names the table of its database
    name="load-neighbours",
    **DATABASE_RETRIES,
    cache_policy=NO_CACHE,
)
def load_neighbours_task(
    database_url: str, staged: str, staging_dir: str, refreshed_ids: list[int]
) -> int:
    """Swap the staged neighbour lists in, then mark their images as indexed."""
    rows = load_neighbour_table(database_url, Path(staged), Path(staging_dir))
    mark_indexed(engine_for(database_url), refreshed_ids)
    Path(staged).unlink(missing_ok=True)  # the lists now live in the database
    record_table_assets(database_url)
    get_run_logger().info(
        "swapped in %d neighbour rows; %d lists refreshed", rows, len(refreshed_ids)
    )
    return rows
