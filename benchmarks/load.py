"""Benchmark bulk loads into MariaDB: lookalike's loader against raw and row-by-row paths.

    .venv/bin/python benchmarks/load.py                 # n=20000 images, k=100: 2M rows
    .venv/bin/python benchmarks/load.py --n 5000 --k 50 --rounds 1

Runs against the local MariaDB (--url, default $LOOKALIKE_TEST_DATABASE_URL or root@127.0.0.1) in a
database it creates and drops. Neighbours: lookalike's load_neighbour_table (staged Arrow ->
pyarrow CSV -> LOAD DATA LOCAL into a fresh table -> RENAME TABLE swap) against a raw
LOAD DATA LOCAL INFILE of an already-written CSV of the same rows into an empty table, and
against row-by-row INSERTs committed one by one as the old scripts did (timed on a sample
and extrapolated). Features: lookalike's load_feature_batches (staged Arrow batches, image
statuses included) against the raw paths: multi-row INSERT of BLOBs, LOAD DATA of hex text
with UNHEX(), LOAD DATA of escaped raw bytes (files written beforehand), and the old
one-row-per-statement JSON text (sampled). Timed paths alternate for --rounds rounds and each
counts its best round. The last line printed is one JSON object; its ratio is the smaller of
the two (neighbours, features) ratios of lookalike to the fastest raw path.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import sqlalchemy
from sqlalchemy import Engine, insert

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lookalike.sql.schema import STATUS_PENDING, image_names, metadata  # noqa: E402
from lookalike.tasks.catalog import DEFAULT_MODEL_NAME as MODEL_NAME  # noqa: E402
from lookalike.tasks.database import create_db_engine  # noqa: E402
from lookalike.tasks.load import (  # noqa: E402
    escape_field,
    in_key_order,
    load_feature_batches,
    load_neighbour_table,
)
from lookalike.tasks.models import INCEPTION_V3  # noqa: E402
from lookalike.tasks.sources import open_source  # noqa: E402
from lookalike.tasks.stage import read_table, write_feature_batch, write_neighbour_lists  # noqa: E402

FEATURE_DIM = INCEPTION_V3.feature_dim  # the default model's

DEFAULT_ADMIN_URL = os.environ.get(
    "LOOKALIKE_TEST_DATABASE_URL", "mysql+pymysql://root:@127.0.0.1:3306/test"
)
BATCH = 64  # images per staged feature batch, as extraction stages them
NEIGHBOUR_COLUMNS = "(image_id, `rank`, neighbour_id, distance)"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=DEFAULT_ADMIN_URL, help="MariaDB server (admin) URL")
    parser.add_argument("--n", type=int, default=20_000, help="images")
    parser.add_argument("--k", type=int, default=100, help="neighbours per image")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--row-sample", type=int, default=10_000, help="row-by-row neighbours")
    parser.add_argument("--feature-sample", type=int, default=1_000, help="row-by-row features")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def timed(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def best_of(rounds: int, paths: dict[str, Callable[[], float]]) -> dict[str, float]:
    """Seconds of each path, best of rounds; the paths alternate within a round."""
    best = {name: float("inf") for name in paths}
    for round_ in range(rounds):
        for name, run in paths.items():
            seconds = run()
            best[name] = min(best[name], seconds)
            print(f"  round {round_ + 1} {name:<22} {seconds:8.2f} s", flush=True)
    return best


# --- neighbours ------------------------------------------------------------------------


def stage_neighbours(staging: Path, n: int, k: int, seed: int) -> Path:
    """Neighbour lists of n images as the kNN step stages them (Arrow, primary-key order)."""
    rng = np.random.default_rng(seed)
    ids = np.arange(1, n + 1, dtype=np.int64)
    neighbours = rng.integers(1, n + 1, (n, k))
    distances = np.sort(rng.random((n, k), dtype=np.float32) * 40, axis=1)
    return write_neighbour_lists(staging / "neighbours.arrow", ids, neighbours, distances)


def raw_neighbour_load(engine: Engine, csv_path: Path) -> float:
    """A plain LOAD DATA LOCAL INFILE of an already-written CSV into an empty table."""
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE IF EXISTS raw_neighbours")
        conn.exec_driver_sql("CREATE TABLE raw_neighbours LIKE image_neighbours")
    started = time.perf_counter()
    with engine.begin() as conn:
        conn.exec_driver_sql(
            f"LOAD DATA LOCAL INFILE '{csv_path}' INTO TABLE raw_neighbours "
            f"FIELDS TERMINATED BY ',' LINES TERMINATED BY '\\n' {NEIGHBOUR_COLUMNS}"
        )
    return time.perf_counter() - started


def row_by_row_neighbours(engine: Engine, table: pa.Table, rows: int) -> float:
    """The old scripts' way: one INSERT per row, each committed on its own."""
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE IF EXISTS old_neighbours")
        conn.exec_driver_sql("CREATE TABLE old_neighbours LIKE image_neighbours")
    sample = table.slice(0, rows).to_pylist()
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        started = time.perf_counter()
        for row in sample:
            cursor.execute(
                f"INSERT INTO old_neighbours {NEIGHBOUR_COLUMNS} VALUES (%s, %s, %s, %s)",
                (row["image_id"], row["rank"], row["neighbour_id"], row["distance"]),
            )
            raw.commit()
        return time.perf_counter() - started
    finally:
        raw.close()


def neighbour_benchmark(
    args: argparse.Namespace, url: str, engine: Engine, work: Path
) -> dict[str, Any]:
    staged = stage_neighbours(work / "staging", args.n, args.k, args.seed)
    rows = args.n * args.k
    started = time.perf_counter()
    table = in_key_order(read_table(staged))
    read_seconds = time.perf_counter() - started
    csv_path = work / "neighbours.csv"
    csv_seconds = timed(
        lambda: pacsv.write_csv(table, str(csv_path), pacsv.WriteOptions(include_header=False))
    )
    print(f"neighbours: {rows:,} rows, CSV {csv_path.stat().st_size / 1e6:.1f} MB")
    best = best_of(
        args.rounds,
        {
            "lookalike": lambda: timed(lambda: load_neighbour_table(url, staged, work / "staging")),
            "raw LOAD DATA": lambda: raw_neighbour_load(engine, csv_path),
        },
    )
    sample = min(args.row_sample, rows)
    old_seconds = row_by_row_neighbours(engine, table, sample)
    rates = {
        "lookalike_rows_per_s": rows / best["lookalike"],
        "raw_load_data_rows_per_s": rows / best["raw LOAD DATA"],
        "row_by_row_rows_per_s": sample / old_seconds,
    }
    ratio = rates["lookalike_rows_per_s"] / rates["raw_load_data_rows_per_s"]
    prepare = read_seconds + csv_seconds
    split = {
        "read_and_order_arrow": round(read_seconds, 2),
        "write_csv": round(csv_seconds, 2),
        "load_and_swap": round(best["lookalike"] - prepare, 2),
    }
    for name, rate in rates.items():
        print(f"  {name:<26} {rate:12,.0f}")
    print(f"  ratio lookalike / raw LOAD DATA: {ratio:.3f} (target 0.8)")
    print(f"  lookalike split (s): {split}")
    print(
        f"  row by row: {sample:,} rows timed, extrapolated to {rows:,} rows: "
        f"{rows / rates['row_by_row_rows_per_s'] / 60:.1f} min"
    )
    return {
        "rows": rows,
        "ratio": round(ratio, 3),
        **{name: round(rate) for name, rate in rates.items()},
        "row_by_row_sample_rows": sample,
        "row_by_row_extrapolated_s": round(rows / rates["row_by_row_rows_per_s"], 1),
        "lookalike_split_s": split,
    }


# --- features --------------------------------------------------------------------------


def add_pending_images(engine: Engine, n: int) -> list[int]:
    """n pending image rows (of one source); their ids in file-name order."""
    source = open_source(engine, Path("/photos"), "photos")
    with engine.begin() as conn:
        conn.execute(
            insert(image_names),
            [
                dict(
                    source_id=source.id,
                    file_name=f"photo{i:07d}.jpg",
                    content_hash=f"{i:032x}",
                    size=1,
                    mtime_ns=1,
                    status=STATUS_PENDING,
                    indexed=False,
                )
                for i in range(n)
            ],
        )
        return list(conn.exec_driver_sql("SELECT id FROM image_names ORDER BY file_name").scalars())


def stage_features(staging: Path, features: np.ndarray) -> list[Path]:
    """The vectors as extraction stages them: one Arrow file per batch of 64 images."""
    paths = []
    for start in range(0, len(features), BATCH):
        count = min(BATCH, len(features) - start)
        paths.append(
            write_feature_batch(
                staging / f"{start:08d}.arrow",
                [f"photo{i:07d}.jpg" for i in range(start, start + count)],
                [f"{i:032x}" for i in range(start, start + count)],
                [(640, 480)] * count,
                [None] * count,
                features[start : start + count],
            )
        )
    return paths


def reset_features(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.exec_driver_sql("TRUNCATE TABLE image_features")
        conn.exec_driver_sql(f"UPDATE image_names SET status = '{STATUS_PENDING}'")


def write_hex_csv(path: Path, ids: list[int], features: np.ndarray) -> None:
    """id,hex-of-the-vector lines, written by pyarrow."""
    digits = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
    raw = np.ascontiguousarray(features, dtype="<f4").view(np.uint8)
    text = np.empty((len(raw), raw.shape[1] * 2), dtype=np.uint8)
    text[:, 0::2], text[:, 1::2] = digits[raw >> 4], digits[raw & 15]
    column = pa.FixedSizeBinaryArray.from_buffers(
        pa.binary(text.shape[1]), len(text), [None, pa.py_buffer(text)]
    ).cast(pa.string())
    table = pa.table({"image_id": pa.array(ids, pa.int64()), "features": column})
    options = pacsv.WriteOptions(include_header=False, quoting_style="none")
    pacsv.write_csv(table, str(path), options)


def write_escaped_tsv(path: Path, ids: list[int], features: np.ndarray) -> None:
    """id<TAB>raw bytes escaped for LOAD DATA, as lookalike writes them."""
    with path.open("wb") as out:
        for image_id, vector in zip(ids, features, strict=True):
            out.write(b"%d\t%s\n" % (image_id, escape_field(vector.tobytes())))


def raw_load_data(engine: Engine, path: Path, clause: str) -> float:
    reset_features(engine)
    started = time.perf_counter()
    with engine.begin() as conn:
        conn.exec_driver_sql(f"LOAD DATA LOCAL INFILE '{path}' INTO TABLE image_features {clause}")
    return time.perf_counter() - started


def raw_multirow_insert(engine: Engine, ids: list[int], features: np.ndarray) -> float:
    """executemany of BLOB rows, which PyMySQL sends as multi-row INSERTs, one transaction."""
    reset_features(engine)
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        started = time.perf_counter()
        for start in range(0, len(ids), 1000):
            cursor.executemany(
                "INSERT INTO image_features (image_id, model, features) VALUES (%s, %s, %s)",
                [
                    (ids[i], MODEL_NAME, features[i].tobytes())
                    for i in range(start, min(start + 1000, len(ids)))
                ],
            )
        raw.commit()
        return time.perf_counter() - started
    finally:
        raw.close()


def row_by_row_json(engine: Engine, ids: list[int], features: np.ndarray, rows: int) -> float:
    """The old scripts' way: the vector as JSON text, one INSERT per image, each committed."""
    reset_features(engine)
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        started = time.perf_counter()
        for image_id, vector in zip(ids[:rows], features[:rows], strict=True):
            cursor.execute(
                "INSERT INTO image_features (image_id, model, features) VALUES (%s, %s, %s)",
                (image_id, MODEL_NAME, json.dumps(vector.tolist())),
            )
            raw.commit()
        return time.perf_counter() - started
    finally:
        raw.close()


def feature_benchmark(
    args: argparse.Namespace, engine: Engine, loader: Engine, work: Path
) -> dict[str, Any]:
    ids = add_pending_images(engine, args.n)
    features = np.random.default_rng(args.seed).standard_normal((args.n, FEATURE_DIM), "<f4")
    megabytes = features.nbytes / 1e6
    staged = stage_features(work / "features", features)
    hex_path, escaped_path = work / "features-hex.csv", work / "features-escaped.tsv"
    write_hex_csv(hex_path, ids, features)
    write_escaped_tsv(escaped_path, ids, features)
    print(f"\nfeatures: {args.n:,} vectors, {megabytes:.1f} MB as float32")

    def lookalike() -> float:
        reset_features(engine)
        return timed(lambda: load_feature_batches(engine, staged, scratch_dir=work / "scratch"))

    model = f"SET model = '{MODEL_NAME}'"
    best = best_of(
        args.rounds,
        {
            "lookalike": lookalike,
            "raw multi-row INSERT": lambda: raw_multirow_insert(loader, ids, features),
            "raw LOAD DATA hex": lambda: raw_load_data(
                loader,
                hex_path,
                f"FIELDS TERMINATED BY ',' (image_id, @hex) {model}, features = UNHEX(@hex)",
            ),
            "raw LOAD DATA escaped": lambda: raw_load_data(
                loader, escaped_path, f"CHARACTER SET binary (image_id, features) {model}"
            ),
        },
    )
    sample = min(args.feature_sample, args.n)
    old_seconds = row_by_row_json(engine, ids, features, sample)
    rates = {name: megabytes / seconds for name, seconds in best.items()}
    rates["row-by-row JSON"] = megabytes * sample / args.n / old_seconds
    fastest_raw = max(
        (name for name in rates if name.startswith("raw")), key=lambda name: rates[name]
    )
    ratio = rates["lookalike"] / rates[fastest_raw]
    for name, rate in rates.items():
        print(f"  {name:<24} {rate:8.1f} MB/s")
    print(f"  ratio lookalike / {fastest_raw}: {ratio:.3f} (target 0.8)")
    print(f"  row by row: {sample:,} images timed, extrapolated to {args.n:,}")
    return {
        "megabytes": round(megabytes, 1),
        "ratio": round(ratio, 3),
        "fastest_raw_path": fastest_raw,
        "mb_per_s": {name: round(rate, 2) for name, rate in rates.items()},
        "row_by_row_sample_images": sample,
        "row_by_row_extrapolated_s": round(megabytes / rates["row-by-row JSON"], 1),
    }


def main(argv: list[str]) -> dict[str, Any]:
    args = parse_args(argv)
    admin = sqlalchemy.create_engine(args.url, isolation_level="AUTOCOMMIT")
    name = f"lookalike_bench_load_{uuid.uuid4().hex[:10]}"
    with admin.connect() as conn:
        conn.exec_driver_sql(
            f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_nopad_bin"
        )
    url = sqlalchemy.make_url(args.url).set(database=name).render_as_string(hide_password=False)
    work = Path(tempfile.mkdtemp(prefix="lookalike-bench-load-"))
    engine, loader = create_db_engine(url), create_db_engine(url, local_infile=True)
    load_before = os.getloadavg()[0]
    try:
        metadata.create_all(engine)
        neighbours = neighbour_benchmark(args, url, loader, work)
        features = feature_benchmark(args, engine, loader, work)
    finally:
        engine.dispose()
        loader.dispose()
        shutil.rmtree(work)
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS `{name}`")
        admin.dispose()
    load_after = os.getloadavg()[0]
    print(f"\nload average before/after: {load_before:.2f}/{load_after:.2f}")
    return {
        "benchmark": "load",
        "ratio": min(neighbours["ratio"], features["ratio"]),
        "n": args.n,
        "k": args.k,
        "neighbours": neighbours,
        "features": features,
        "load_average": [round(load_before, 2), round(load_after, 2)],
    }


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])))
