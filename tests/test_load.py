"""Bulk loads: bit-exact features, checked row counts, atomic neighbour swaps, LOCAL INFILE."""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from sqlalchemy import Engine, insert, select, text
from sqlalchemy.exc import DBAPIError

from lookalike.sql.schema import STATUS_PENDING, image_names
from lookalike.tasks import load
from lookalike.tasks.database import connect_checked, create_db_engine, is_mariadb
from lookalike.tasks.load import (
    LoadError,
    load_feature_batches,
    read_feature_rows,
    scratch_file,
    write_neighbour_table,
)
from lookalike.tasks.models import INCEPTION_V3
from lookalike.tasks.sources import open_source
from lookalike.tasks.stage import NEIGHBOURS_SCHEMA, write_feature_batch


def hash_of(name: str) -> str:
    """A stand-in content hash, the same wherever the test needs it."""
    return name.encode().hex().ljust(32, "0")[:32]


def add_pending(engine: Engine, names: list[str]) -> list[int]:
    """Pending image rows for these names (in one source); their ids in the same order."""
    source = open_source(engine, Path("/images"), None)
    with engine.begin() as conn:
        conn.execute(
            insert(image_names),
            [
                dict(
                    source_id=source.id,
                    file_name=name,
                    content_hash=hash_of(name),
                    size=1,
                    mtime_ns=1,
                    status=STATUS_PENDING,
                    indexed=False,
                )
                for name in names
            ],
        )
        rows = conn.execute(select(image_names.c.id, image_names.c.file_name)).all()
    ids = {r.file_name: r.id for r in rows}
    return [ids[name] for name in names]


FEATURE_DIM = INCEPTION_V3.feature_dim  # the default model's, which the test collection has


def every_byte_features(count: int, seed: int) -> np.ndarray:
    """Vectors whose bytes include every value (tab, newline, backslash, NUL, quotes, NaNs)."""
    rng = np.random.default_rng(seed)
    raw = np.tile(np.arange(256, dtype=np.uint8), count * FEATURE_DIM * 4 // 256)
    rng.shuffle(raw)
    return raw.view("<f4").reshape(count, FEATURE_DIM)


# A reason with every character LOAD DATA treats specially, and some that are not ASCII.
ODD_ERROR = 'corrupt image data: tab\there, newline\nthere, back\\slash, \\N, "quotes", é ✓'


def stage_batch(path: Path, names: list[str], features: np.ndarray, failed: set[str]) -> Path:
    """A staged batch of these images (content hashes as add_pending made them)."""
    return write_feature_batch(
        path,
        names,
        [hash_of(n) for n in names],
        [None if n in failed else (640 + i, 480) for i, n in enumerate(names)],
        [ODD_ERROR if n in failed else None for n in names],
        features,
    )


def test_features_round_trip_bit_exact_and_only_pending_rows_are_written(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(load, "FEATURE_CHUNK_ROWS", 3)  # several transactions per load
    engine = connect_checked(database_url)
    names = [f"img{i}.jpg" for i in range(7)]
    ids = add_pending(engine, names)
    features = every_byte_features(7, seed=1)
    # Batches staged out of id order: the loader writes in id order all the same.
    paths = [
        stage_batch(tmp_path / "b.arrow", names[4:], features[4:], failed={"img5.jpg"}),
        stage_batch(tmp_path / "a.arrow", names[:4], features[:4], failed=set()),
    ]
    counts = load_feature_batches(engine, paths, scratch_dir=tmp_path / "scratch")
    assert (counts.ok, counts.failed) == (6, 1)
    stored_ids, stored = read_feature_rows(engine)
    ok = [i for i, name in enumerate(names) if name != "img5.jpg"]
    assert stored_ids.tolist() == [ids[i] for i in ok]
    np.testing.assert_array_equal(stored.view(np.uint32), features[ok].view(np.uint32))
    with engine.connect() as conn:
        rows = conn.execute(select(image_names).order_by(image_names.c.id)).all()
    assert [r.status for r in rows] == ["ok"] * 5 + ["failed", "ok"]
    assert rows[5].error == ODD_ERROR and rows[5].width is None
    assert (rows[0].width, rows[0].height) == (640, 480)
    # A second run with the same staged batches writes nothing: no image is pending.
    again = load_feature_batches(engine, paths, scratch_dir=tmp_path / "scratch")
    assert (again.ok, again.failed) == (0, 0)
    assert list((tmp_path / "scratch").glob("*")) == []  # LOAD DATA files removed
    engine.dispose()


def neighbour_table(image_ids: np.ndarray, k: int, seed: int) -> pa.Table:
    """k neighbour rows per image, in primary-key order."""
    rng = np.random.default_rng(seed)
    n = len(image_ids)
    return pa.Table.from_arrays(
        [
            pa.array(np.repeat(image_ids, k).astype(np.int64)),
            pa.array(np.tile(np.arange(1, k + 1, dtype=np.int16), n)),
            pa.array(rng.choice(image_ids, n * k).astype(np.int64)),
            pa.array(np.sort(rng.random((n, k), dtype=np.float32), axis=1).reshape(-1)),
        ],
        schema=NEIGHBOURS_SCHEMA,
    )


def rows_per_image(engine: Engine) -> dict[int, int]:
    """{list length: images with a list that long}, as a reader sees it in one query."""
    with engine.connect() as conn:
        counts = conn.execute(
            text("SELECT COUNT(*) FROM image_neighbours GROUP BY image_id")
        ).scalars()
        return dict(Counter(counts))


def test_readers_see_the_old_or_the_new_table_never_a_partial_one(
    database_url: str, tmp_path: Path
) -> None:
    engine = connect_checked(database_url)
    ids = np.arange(1, 801, dtype=np.int64)
    old, new = neighbour_table(ids, 20, seed=1), neighbour_table(ids, 30, seed=2)
    write_neighbour_table(database_url, old, tmp_path, expected_rows=old.num_rows)
    complete = [{20: 800}, {30: 800}]
    seen: list[dict[int, int]] = []
    stop = threading.Event()

    def read_in_a_loop() -> None:
        reader = create_db_engine(database_url)  # the API's kind of engine
        try:
            while not stop.is_set():
                seen.append(rows_per_image(reader))
        finally:
            reader.dispose()

    thread = threading.Thread(target=read_in_a_loop)
    thread.start()
    try:
        for swap in range(3):
            table = new if swap % 2 == 0 else old
            write_neighbour_table(database_url, table, tmp_path, expected_rows=table.num_rows)
    finally:
        stop.set()
        thread.join()
    print(len(seen))
    assert len(seen) >= 4
    partial = [counts for counts in seen if counts not in complete]
    assert partial == []
    assert rows_per_image(engine) == {30: 800}
    engine.dispose()


def test_a_wrong_row_count_raises_and_keeps_the_current_table(
    database_url: str, tmp_path: Path
) -> None:
    engine = connect_checked(database_url)
    ids = np.arange(1, 101, dtype=np.int64)
    write_neighbour_table(database_url, neighbour_table(ids, 5, 1), tmp_path, expected_rows=500)
    bigger = neighbour_table(ids, 8, 2)
    with pytest.raises(LoadError, match="wrote 800 rows, expected 801"):
        write_neighbour_table(database_url, bigger, tmp_path, expected_rows=801)
    assert rows_per_image(engine) == {5: 100}
    if is_mariadb(engine):
        with engine.connect() as conn:
            tables = set(conn.execute(text("SHOW TABLES LIKE 'image_neighbours%'")).scalars())
        assert tables == {"image_neighbours"}  # the fresh table was dropped
    assert list(tmp_path.glob("neighbours-*")) == []
    engine.dispose()


def test_repeated_neighbour_keys_are_refused_before_loading(
    database_url: str, tmp_path: Path
) -> None:
    connect_checked(database_url).dispose()
    table = neighbour_table(np.arange(1, 11, dtype=np.int64), 3, 1)
    doubled = pa.concat_tables([table, table.slice(4, 1)])
    with pytest.raises(LoadError, match=r"repeat an \(image, rank\) pair"):
        write_neighbour_table(database_url, doubled, tmp_path, expected_rows=doubled.num_rows)


def test_unsorted_neighbour_lists_are_loaded_in_key_order(
    database_url: str, tmp_path: Path
) -> None:
    engine = connect_checked(database_url)
    table = neighbour_table(np.arange(1, 21, dtype=np.int64), 4, 1)
    shuffled = table.take(np.random.default_rng(0).permutation(table.num_rows))
    assert write_neighbour_table(database_url, shuffled, tmp_path, expected_rows=80) == 80
    with engine.connect() as conn:
        stored = conn.exec_driver_sql(
            "SELECT image_id, `rank`, neighbour_id FROM image_neighbours ORDER BY image_id, `rank`"
            if is_mariadb(engine)
            else "SELECT image_id, rank, neighbour_id FROM image_neighbours ORDER BY 1, 2"
        ).all()
    expected = zip(*(table.column(i).to_pylist() for i in range(3)), strict=True)
    assert [tuple(row) for row in stored] == list(expected)
    engine.dispose()


@pytest.mark.mariadb
def test_only_the_loader_connection_may_load_local_files(mariadb_url: str, tmp_path: Path) -> None:
    connect_checked(mariadb_url).dispose()
    statement = text(
        "LOAD DATA LOCAL INFILE :path INTO TABLE image_neighbours FIELDS TERMINATED BY ','"
    )
    api, loader = create_db_engine(mariadb_url), create_db_engine(mariadb_url, local_infile=True)
    try:
        with scratch_file(tmp_path, "rows-", ".csv") as path:
            path.write_text("1,1,2,0.5\n")
            with pytest.raises(DBAPIError, match="not allowed"), api.begin() as conn:
                conn.execute(statement, {"path": str(path)})
            with loader.begin() as conn:
                assert conn.execute(statement, {"path": str(path)}).rowcount == 1
        with api.connect() as conn:
            assert conn.exec_driver_sql("SELECT COUNT(*) FROM image_neighbours").scalar() == 1
    finally:
        api.dispose()
        loader.dispose()


def test_a_copy_of_an_image_staged_under_another_name_gets_its_vector(
    database_url: str, tmp_path: Path
) -> None:
    """A copy's one-image batch has the key of the original's, so it is never staged itself."""
    from lookalike.tasks.catalog import PendingImage
    from lookalike.tasks.extract import batch_key

    original = PendingImage(1, "original.jpg", hash_of("original.jpg"))
    copy = PendingImage(2, "copy.jpg", original.content_hash)
    assert batch_key([copy], "w") == batch_key([original], "w")
    engine = connect_checked(database_url)
    features = every_byte_features(1, seed=3)
    staged = stage_batch(tmp_path / "a.arrow", ["original.jpg"], features, failed=set())
    (copy_id,) = add_pending(engine, ["copy.jpg"])
    with engine.begin() as conn:  # the copy's bytes are the original's
        conn.execute(image_names.update().values(content_hash=original.content_hash))
    counts = load_feature_batches(engine, [staged], scratch_dir=tmp_path / "scratch")
    assert (counts.ok, counts.failed) == (1, 0)
    stored_ids, stored = read_feature_rows(engine)
    assert stored_ids.tolist() == [copy_id]
    np.testing.assert_array_equal(stored.view(np.uint32), features.view(np.uint32))
    engine.dispose()
