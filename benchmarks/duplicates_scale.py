"""Benchmark duplicate grouping and the duplicates API at archive scale, on synthetic rows.

    .venv/bin/python benchmarks/duplicates_scale.py                      # 250,000 images, SQLite
    .venv/bin/python benchmarks/duplicates_scale.py --db mysql+pymysql://root@127.0.0.1/bench

Writes a collection of --images images with k neighbour rows each (25,000,000 at the
defaults): ordinary neighbours at 0.4-1.0 of the scale, a share of images with a re-encoded
copy at 0.02 of it, and a share with exact copies (same content hash). Then it times the
find-duplicates step (one scan of the neighbour table, grouping, writing the groups), its
re-run with nothing changed, and the API: a page of groups, a page at another threshold
(regrouped from the stored pairs) and one image's group. Targets: grouping under 30 s, a page
under 50 ms. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from litestar.testing import TestClient
from sqlalchemy import Engine, insert, text

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for a checkout without install
from lookalike.api.app import create_app  # noqa: E402
from lookalike.sql.schema import STATUS_OK, image_names, image_neighbours  # noqa: E402
from lookalike.tasks.database import connect_checked  # noqa: E402
from lookalike.tasks.duplicates import find_duplicates  # noqa: E402
from lookalike.tasks.settings import Settings  # noqa: E402
from lookalike.tasks.sources import open_source  # noqa: E402

SCALE = 10.0
ROWS_PER_INSERT = 200_000
GROUP_TARGET_S = 30.0
PAGE_TARGET_MS = 50.0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=250_000)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--near-share", type=float, default=0.02, help="images with a near copy")
    parser.add_argument("--exact-share", type=float, default=0.005, help="exact copies")
    parser.add_argument("--db", default="", help="database URL (default: a temporary SQLite)")
    parser.add_argument("--requests", type=int, default=30, help="timed requests per route")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--reuse", action="store_true", help="keep the rows already in --db (written before)"
    )
    return parser.parse_args()


def write_collection(engine: Engine, args: argparse.Namespace) -> int:
    """The synthetic images and neighbour rows; the number of rows written."""
    rng = np.random.default_rng(args.seed)
    n, k = args.images, args.k
    hashes = [f"{i:032x}" for i in range(1, n + 1)]
    exact = rng.choice(np.arange(2, n + 1, 2), int(n * args.exact_share), replace=False)
    for image_id in exact.tolist():  # image_id has the content of image_id - 1
        hashes[image_id - 1] = hashes[image_id - 2]
    source = open_source(engine, Path("/archive"), "archive")  # every image in one source
    with engine.begin() as conn:
        for table in ("image_neighbours", "image_names"):
            conn.execute(text(f"DELETE FROM {table}"))
        rows = [
            {
                "id": i,
                "source_id": source.id,
                "file_name": f"campaign/{i:07d}.jpg",
                "content_hash": hashes[i - 1],
                "size": 250_000 + i,
                "mtime_ns": 0,
                "width": 1200,
                "height": 900,
                "status": STATUS_OK,
                "indexed": True,
            }
            for i in range(1, n + 1)
        ]
        for start in range(0, n, ROWS_PER_INSERT):
            conn.execute(insert(image_names), rows[start : start + ROWS_PER_INSERT])
    partners: dict[int, tuple[int, float]] = {}
    for i in rng.choice(np.arange(1, n, 2), int(n * args.near_share), replace=False).tolist():
        partners[i], partners[i + 1] = (i + 1, 0.02 * SCALE), (i, 0.02 * SCALE)
    for e in exact.tolist():
        partners[e], partners[e - 1] = (e - 1, 0.0), (e, 0.0)
    written = 0
    block = max(1, ROWS_PER_INSERT // k)
    for start in range(1, n + 1, block):
        ids = np.arange(start, min(start + block, n + 1))
        written += insert_neighbours(engine, ids, n, k, partners, rng)
    return written


def insert_neighbours(
    engine: Engine,
    ids: np.ndarray,
    n: int,
    k: int,
    partners: dict[int, tuple[int, float]],
    rng: np.random.Generator,
) -> int:
    """k rows per image: random neighbours at 0.4-1.0 of the scale, a copy first if it has one."""
    others = rng.integers(1, n + 1, size=(len(ids), k))
    distances = np.sort(rng.uniform(0.4, 1.0, size=(len(ids), k)), axis=1) * SCALE
    for row, image_id in enumerate(ids.tolist()):
        if image_id in partners:
            others[row, 0], distances[row, 0] = partners[image_id]
    rows = [
        {"image_id": int(i), "rank": r + 1, "neighbour_id": int(o), "distance": float(d)}
        for i, other_row, distance_row in zip(ids, others, distances, strict=True)
        for r, (o, d) in enumerate(zip(other_row, distance_row, strict=True))
    ]
    with engine.begin() as conn:
        conn.execute(insert(image_neighbours), rows)
    return len(rows)


def time_requests(client: TestClient, url: str, count: int) -> dict[str, float]:
    """The first answer's time, then p50 and max of count more requests."""
    start = time.perf_counter()
    assert client.get(url).status_code == 200, url  # the first answer builds the group index
    first_ms = (time.perf_counter() - start) * 1000
    times = []
    for _ in range(count):
        start = time.perf_counter()
        response = client.get(url)
        times.append((time.perf_counter() - start) * 1000)
        assert response.status_code == 200, response.text
    return {
        "first_ms": round(first_ms, 2),
        "p50_ms": round(statistics.median(times), 2),
        "max_ms": round(max(times), 2),
    }


def main() -> None:
    args = parse_args()
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    workdir = Path(tempfile.mkdtemp(prefix="lookalike-dups-"))
    url = args.db or f"sqlite:///{workdir / 'bench.sqlite'}"
    engine = connect_checked(url)
    start = time.perf_counter()
    if args.reuse:
        with engine.begin() as conn:
            rows = conn.execute(text("SELECT COUNT(*) FROM image_neighbours")).scalar_one()
    else:
        rows = write_collection(engine, args)
    with engine.begin() as conn:  # time a full computation, not a check of stored groups
        conn.execute(text("DELETE FROM duplicate_state"))
    print(
        f"wrote {args.images} images, {rows} neighbour rows in {time.perf_counter() - start:.1f} s"
    )
    start = time.perf_counter()
    counts = find_duplicates(engine, 0.06)
    group_seconds = time.perf_counter() - start
    start = time.perf_counter()
    again = find_duplicates(engine, 0.06)
    rerun_seconds = time.perf_counter() - start
    print(
        f"find-duplicates : {group_seconds:6.2f} s  "
        f"({counts.groups} groups, {counts.images} images)"
    )
    print(f"unchanged re-run: {rerun_seconds:6.2f} s  (recomputed: {again.recomputed})")
    settings = Settings(database_url=url, data_dir=workdir / "data")
    with TestClient(app=create_app(settings)) as client:
        page = time_requests(client, "/api/duplicates?limit=20", args.requests)
        later = time_requests(client, "/api/duplicates?offset=1000&limit=20", args.requests)
        regroup = time_requests(client, "/api/duplicates?threshold=0.1&limit=20", args.requests)
        one = time_requests(client, "/api/images/2/duplicates", args.requests)
    for name, figures in (
        ("page", page),
        ("page at offset 1000", later),
        ("page at threshold 0.1", regroup),
        ("one image's group", one),
    ):
        print(
            f"GET {name:<22}: first {figures['first_ms']:7.2f} ms, "
            f"then p50 {figures['p50_ms']:7.2f} ms, max {figures['max_ms']:7.2f} ms"
        )
    engine.dispose()
    print(
        json.dumps(
            {
                "benchmark": "duplicates_scale",
                "images": args.images,
                "k": args.k,
                "neighbour_rows": rows,
                "backend": engine.dialect.name,
                "groups": counts.groups,
                "images_in_groups": counts.images,
                "group_seconds": round(group_seconds, 2),
                "rerun_seconds": round(rerun_seconds, 3),
                "page": page,
                "page_offset_1000": later,
                "page_regrouped": regroup,
                "image_group": one,
                "ratio": round(group_seconds / GROUP_TARGET_S, 3),
                "page_ratio": round(page["p50_ms"] / PAGE_TARGET_MS, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
