"""Benchmark removing a source: its images leave, every other neighbour list is updated.

    .venv/bin/python benchmarks/remove_source.py                 # 20,000 images, a 10% source
    .venv/bin/python benchmarks/remove_source.py --n 5000 --db mysql+pymysql://root:@127.0.0.1/x

A database of --n images in two sources (a --share source and the rest), their vectors drawn
from clusters that both sources share (a campaign's photos are spread over the archive's
subjects), is indexed by a full neighbour pass. Then the small source is removed the way
`lookalike remove-source` does it, through the pipeline's own functions without Prefect:
delete its rows (tasks.sources), the planned incremental pass (tasks.neighbours), the swap
into the table (tasks.load). Beside it, in the same process, the full recomputation it saves
on the same remaining images: a full pass and its swap (best of --repeat). The lists of both
must be identical. The ratio is the neighbour computation's (the step the issue asks about);
the swap writes every row either way (every list loses entries) and is reported as well.
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import Engine, create_engine, insert, select, text

from lookalike.sql.schema import STATUS_OK, image_features, image_names
from lookalike.tasks.catalog import DEFAULT_MODEL_NAME, mark_indexed, open_collection
from lookalike.tasks.database import connect_checked
from lookalike.tasks.knn.plan import PassKind
from lookalike.tasks.load import load_neighbour_table
from lookalike.tasks.models import INCEPTION_V3
from lookalike.tasks.neighbours import (
    compute_neighbours,
    keep_deep_lists,
    plan_neighbour_pass,
    read_neighbour_lists,
)
from lookalike.tasks.sources import delete_source, find_source, open_source
from lookalike.tasks.stage import feature_batch_path, write_feature_batch

ROWS_PER_INSERT = 2000


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000, help="images in the database")
    parser.add_argument("--share", type=float, default=0.10, help="the removed source's share")
    parser.add_argument("--k", type=int, default=100, help="neighbours per image")
    parser.add_argument("--clusters", type=int, default=200, help="subjects shared by sources")
    parser.add_argument("--repeat", type=int, default=2, help="full passes timed (best kept)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--db", help="SQLAlchemy URL of an empty database (default: SQLite)")
    return parser.parse_args(argv)


def vectors(rng: np.random.Generator, count: int, centres: np.ndarray) -> np.ndarray:
    """Photos of shared subjects: a centre each, plus the photo's own variation."""
    picks = centres[rng.integers(len(centres), size=count)]
    noise = rng.standard_normal((count, centres.shape[1]), dtype=np.float32)
    return (picks + 0.5 * noise).astype(np.float32)


def build(engine: Engine, args: argparse.Namespace, base: Path, staging: Path) -> None:
    """Two sources with their images and features, as a feature load leaves them: in the
    table and in staged batches, which the neighbour step reads memory-mapped."""
    rng = np.random.default_rng(args.seed)
    centres = rng.standard_normal((args.clusters, INCEPTION_V3.feature_dim), dtype=np.float32)
    open_collection(engine, "none-benchmark")
    removed = round(args.n * args.share)
    for name, count in (("archive", args.n - removed), ("campaign", removed)):
        source = open_source(engine, base / name, name)
        for start in range(0, count, ROWS_PER_INSERT):
            size = min(ROWS_PER_INSERT, count - start)
            batch = vectors(rng, size, centres)
            key = hashlib.blake2b(f"{name}{start}".encode(), digest_size=20).hexdigest()
            insert_images(engine, source.id, name, start, batch, key)
            names = [f"{name}/{start + i:06d}.jpg" for i in range(size)]
            write_feature_batch(
                feature_batch_path(staging, key), names, [content_hash(name, start + i)
                for i in range(size)], [(1, 1)] * size, [None] * size, batch,
            )  # fmt: skip


def content_hash(name: str, index: int) -> str:
    return f"{name[:4]}{index:028d}"


def insert_images(
    engine: Engine, source_id: int, name: str, start: int, batch: np.ndarray, key: str
) -> None:
    rows = [
        dict(source_id=source_id, file_name=f"{name}/{start + i:06d}.jpg", size=1, mtime_ns=1,
             content_hash=content_hash(name, start + i), status=STATUS_OK, indexed=False)
        for i in range(len(batch))
    ]  # fmt: skip
    with engine.begin() as conn:
        conn.execute(insert(image_names), rows)
        ids = conn.execute(
            select(image_names.c.id)
            .where(image_names.c.source_id == source_id)
            .order_by(image_names.c.id.desc())
            .limit(len(batch))
        ).scalars().all()[::-1]  # fmt: skip
        conn.execute(insert(image_features), [
            dict(image_id=i, model=DEFAULT_MODEL_NAME, features=v.tobytes(), staged_batch=key)
            for i, v in zip(ids, batch, strict=True)
        ])  # fmt: skip


def neighbour_step(
    engine: Engine, url: str, staging: Path, k: int, kind: PassKind
) -> dict[str, float]:
    """One neighbour step of a run: compute (the planned kind), swap in, mark indexed."""
    started = time.perf_counter()
    staged = compute_neighbours(engine, staging, k, kind)
    computed = time.perf_counter()
    load_neighbour_table(url, staged.staged, staging)
    mark_indexed(engine, staged.refreshed_ids)
    keep_deep_lists(staged, staging, url)
    staged.staged.unlink(missing_ok=True)
    done = time.perf_counter()
    kind_done = staged.kind.value
    print(f"  {kind_done}: compute {computed - started:.2f} s, swap {done - computed:.2f} s")
    return {"kind": staged.kind.value, "compute_s": computed - started, "swap_s": done - computed}


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    url = args.db or f"sqlite:///{work / 'remove.sqlite'}"
    engine = connect_checked(url)
    staging = work / "staging"
    staging.mkdir()
    build(engine, args, work, staging)
    print(f"{args.n} images, removing a {args.share:.0%} source, k={args.k}", flush=True)
    neighbour_step(engine, url, staging, args.k, PassKind.FULL)  # the lists before the removal

    started = time.perf_counter()
    removed = delete_source(engine, find_source(engine, "campaign"))
    deleted_s = time.perf_counter() - started
    kind = plan_neighbour_pass(engine, args.k)
    print(f"removal: {removed} images deleted in {deleted_s:.2f} s, plan {kind.value}")
    update = neighbour_step(engine, url, staging, args.k, kind)
    after_removal = read_neighbour_lists(engine)

    print("full recomputation of the remaining images:")
    fulls = [
        neighbour_step(engine, url, staging, args.k, PassKind.FULL) for _ in range(args.repeat)
    ]
    full = min(fulls, key=lambda f: f["compute_s"])
    recomputed = read_neighbour_lists(engine)
    assert after_removal is not None and recomputed is not None
    identical = bool(
        np.array_equal(after_removal.image_ids, recomputed.image_ids)
        and np.array_equal(after_removal.neighbour_ids, recomputed.neighbour_ids)
    )
    engine.dispose()
    return {
        "benchmark": "remove_source",
        "n": args.n,
        "removed": removed,
        "k": args.k,
        "database": create_engine(url).dialect.name,
        "plan": kind.value,
        "pass": update["kind"],
        "update_compute_s": round(update["compute_s"], 3),
        "full_compute_s": round(full["compute_s"], 3),
        "ratio": round(update["compute_s"] / full["compute_s"], 4),
        "delete_s": round(deleted_s, 3),
        "update_swap_s": round(update["swap_s"], 3),
        "full_swap_s": round(full["swap_s"], 3),
        "end_to_end_ratio": round(
            (deleted_s + update["compute_s"] + update["swap_s"])
            / (full["compute_s"] + full["swap_s"]),
            4,
        ),
        "identical_lists": identical,
    }


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="lookalike-remove-") as work:
        figures = run(args, Path(work))
    if args.db:  # leave the given database empty again
        engine = create_engine(args.db)
        with engine.begin() as conn:
            for table in (
                "image_neighbours",
                "image_features",
                "image_names",
                "sources",
                "runs",
                "collection",
            ):
                conn.execute(text(f"DELETE FROM {table}"))
        engine.dispose()
    print(json.dumps(figures))


if __name__ == "__main__":
    main(sys.argv[1:])
