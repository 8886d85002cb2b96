"""API latency at scale: /api/images/{id}/neighbours against a bare Litestar route, and search.

Fills a fresh MariaDB database with synthetic images (features and neighbours), starts the
service in a subprocess as a user would (uvicorn, LOOKALIKE_DATABASE_URL), drives it with
concurrent keep-alive clients, then drops the database. The last line printed is one JSON object.

    .venv/bin/python benchmarks/api.py [--images 100000] [--k 100] [--clients 8] [--seconds 10]
                                       [--keep NAME]   # keep the filled database for reruns
                                       [--server-path DIR]  # serve another version instead
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import numpy as np
from litestar import Litestar, get

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

ADMIN_URL = os.environ.get(
    "LOOKALIKE_TEST_DATABASE_URL", "mysql+pymysql://root:@127.0.0.1:3306/test"
)
TARGET_P99_MS = 20.0
TARGET_RATIO = 0.5
TARGET_SEARCH_MS = 300.0
LOAD_ROWS = 10_000  # rows per generated chunk of a load file


@get("/bare", sync_to_thread=False)
def bare_route() -> dict[str, str]:
    """The smallest Litestar JSON route: the ceiling for one process on this machine."""
    return {"status": "ok"}


bare_app = Litestar(route_handlers=[bare_route], debug=False)


# --- filling the database -----------------------------------------------------------------


@contextmanager
def scratch_database(keep: str | None) -> Iterator[tuple[str, bool]]:
    """A MariaDB database for the benchmark and whether it still needs filling.

    Normally made and dropped afterwards; with --keep NAME it is kept for the next run, which
    finds it filled and skips the few minutes of loading.
    """
    import sqlalchemy

    name = keep or f"lookalike_bench_{uuid.uuid4().hex[:10]}"
    admin = sqlalchemy.create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        exists = conn.exec_driver_sql("SHOW DATABASES LIKE %s", (name,)).first() is not None
        if not exists:
            conn.exec_driver_sql(
                f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"
            )
    url = sqlalchemy.engine.make_url(ADMIN_URL).set(database=name)
    try:
        yield url.render_as_string(hide_password=False), not exists
    finally:
        if keep is None:
            with admin.connect() as conn:
                conn.exec_driver_sql(f"DROP DATABASE IF EXISTS `{name}`")
        admin.dispose()


def fill_database(url: str, images: int, k: int, folder: Path) -> None:
    """Synthetic rows through LOAD DATA LOCAL INFILE: names, features and k neighbours each."""
    from lookalike.sql.schema import (
        RUN_COMPLETED,
        collection,
        image_neighbours,
        metadata,
        runs,
        sources,
    )
    from lookalike.tasks.catalog import DEFAULT_MODEL_NAME as MODEL_NAME
    from lookalike.tasks.database import create_db_engine
    from lookalike.tasks.models import weights_identity

    weights_id = weights_identity("none")  # what `lookalike process --weights none` stores

    engine = create_db_engine(url, local_infile=True)
    metadata.create_all(engine)
    now = datetime.now().replace(microsecond=0)
    with engine.begin() as conn:
        conn.execute(
            collection.insert().values(id=1, model=MODEL_NAME, weights=weights_id, created_at=now)
        )
        run = conn.execute(
            runs.insert().values(
                started_at=now, finished_at=now, status=RUN_COMPLETED, weights=weights_id
            )
        )
        conn.execute(  # one source holds every image (write_names_file's source_id 1)
            sources.insert().values(
                id=1, name="bench", root=str(folder), created_at=now,
                last_run_id=run.inserted_primary_key[0],  # type: ignore[index]
            )
        )  # fmt: skip
    loads = [
        ("image_names", write_names_file, "(id, source_id, file_name, content_hash, size, "
         "mtime_ns, width, height, status, indexed)", ""),
        ("image_features", write_features_file, "(image_id, model, @hex)",
         "SET features = UNHEX(@hex)"),
        ("image_neighbours", write_neighbours_file, "(image_id, `rank`, neighbour_id, distance)",
         ""),
    ]  # fmt: skip
    # Secondary indexes are built once after the load: inserting 10M random neighbour ids
    # into a B-tree row by row is many times slower than sorting them once.
    deferred = list(image_neighbours.indexes)
    for index in deferred:
        index.drop(engine)
    for table, write, columns, assignment in loads:
        started = time.perf_counter()
        path = folder / f"{table}.tsv"
        write(path, images, k)
        with engine.begin() as conn:
            conn.exec_driver_sql(
                f"LOAD DATA LOCAL INFILE '{path}' INTO TABLE {table} "
                f"FIELDS TERMINATED BY '\\t' LINES TERMINATED BY '\\n' {columns} {assignment}"
            )
        path.unlink()
        print(f"loaded {table} in {time.perf_counter() - started:.1f} s", flush=True)
    started = time.perf_counter()
    for index in deferred:
        index.create(engine)
    print(f"indexed image_neighbours in {time.perf_counter() - started:.1f} s", flush=True)
    engine.dispose()


def write_names_file(path: Path, images: int, _k: int) -> None:
    with path.open("w") as out:
        for image_id in range(1, images + 1):
            out.write(
                f"{image_id}\t1\tbench/{image_id // 1000:03d}/{image_id:07d}.jpg\t"
                f"{uuid.UUID(int=image_id).hex}\t123456\t1700000000000000000\t640\t480\tok\t1\n"
            )


def write_features_file(path: Path, images: int, _k: int) -> None:
    rng = np.random.default_rng(1)
    with path.open("w") as out:
        for start in range(1, images + 1, LOAD_ROWS):
            count = min(LOAD_ROWS, images + 1 - start)
            vectors = rng.random((count, 2048), dtype=np.float32).astype("<f4")
            out.writelines(
                f"{start + i}\tInceptionV3\t{vectors[i].tobytes().hex()}\n" for i in range(count)
            )


def write_neighbours_file(path: Path, images: int, k: int) -> None:
    """k random neighbours per image with growing distances, written by Arrow's CSV writer."""
    import pyarrow as pa
    from pyarrow import csv

    rng = np.random.default_rng(2)
    options = csv.WriteOptions(include_header=False, delimiter="\t", quoting_style="none")
    schema = pa.schema([("image_id", pa.int32()), ("rank", pa.int16()),
                        ("neighbour_id", pa.int32()), ("distance", pa.float32())])  # fmt: skip
    with csv.CSVWriter(str(path), schema, write_options=options) as writer:
        for start in range(1, images + 1, LOAD_ROWS):
            count = min(LOAD_ROWS, images + 1 - start)
            distances = np.sort(rng.uniform(5, 30, size=(count, k)), axis=1).ravel()
            columns = [
                np.repeat(np.arange(start, start + count, dtype=np.int32), k),
                np.tile(np.arange(1, k + 1, dtype=np.int16), count),
                rng.integers(1, images + 1, size=count * k, dtype=np.int32),
                distances.astype(np.float32),
            ]
            writer.write_table(pa.Table.from_arrays(columns, schema=schema))


# --- serving and measuring ----------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def served(
    target: str, env: dict[str, str], factory: bool, log: Path | None = None
) -> Iterator[tuple[int, int]]:
    """Run `uvicorn target` in a subprocess on a free port until the block ends: (port, pid).

    Its output goes to the file `log` when one is given.
    """
    port = free_port()
    command = [sys.executable, "-m", "uvicorn", target, "--host", "127.0.0.1",
               "--port", str(port), "--log-level", "warning", "--no-access-log"]  # fmt: skip
    if factory:
        command.append("--factory")
    output = open(log, "wb") if log else None  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        command, cwd=REPO, env={**os.environ, **env}, stdout=output, stderr=output
    )
    try:
        wait_until_up(f"http://127.0.0.1:{port}/", process)
        yield port, process.pid
    finally:
        process.terminate()
        process.wait(timeout=30)
        if output:
            output.close()


def wait_until_up(url: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except urllib.error.HTTPError:
            return  # it answers, even if with 404
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"server at {url} did not start")


async def read_response(reader: asyncio.StreamReader) -> int:
    """Read one HTTP/1.1 response with a Content-Length; return its status."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    await reader.readexactly(length)
    return int(head[9:12])


async def client_loop(
    port: int, next_path: Callable[[], str], stop_at: float, latencies: list[float]
) -> int:
    """One keep-alive connection issuing GETs back to back; returns how many failed."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    failures = 0
    while time.perf_counter() < stop_at:
        request = f"GET {next_path()} HTTP/1.1\r\nHost: bench\r\n\r\n".encode()
        started = time.perf_counter()
        writer.write(request)
        status = await read_response(reader)
        latencies.append(time.perf_counter() - started)
        failures += status != 200
    writer.close()
    await writer.wait_closed()
    return failures


def measure(
    port: int, next_path: Callable[[], str], clients: int, seconds: float
) -> dict[str, float]:
    """p50/p99 latency and requests per second of `clients` concurrent connections."""

    async def run(duration: float) -> tuple[list[float], int]:
        latencies: list[float] = []
        stop_at = time.perf_counter() + duration
        failures = await asyncio.gather(
            *(client_loop(port, next_path, stop_at, latencies) for _ in range(clients))
        )
        return latencies, sum(failures)

    asyncio.run(run(min(2.0, seconds / 4)))  # warm caches and the thread pool
    started = time.perf_counter()
    latencies, failures = asyncio.run(run(seconds))
    elapsed = time.perf_counter() - started
    values = np.array(latencies) * 1000
    return {
        "p50_ms": round(float(np.percentile(values, 50)), 2),
        "p99_ms": round(float(np.percentile(values, 99)), 2),
        "rps": round(len(values) / elapsed, 1),
        "requests": len(values),
        "failures": failures,
    }


def wait_for_neighbour_cache(port: int, timeout_s: float = 600.0) -> None:
    """Wait until /health says the neighbour lists are in memory (the service's steady state)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as response:
            cache = json.loads(response.read()).get("neighbour_cache")
        if cache != "loading":
            print(f"neighbour cache: {cache} after {time.monotonic() - started:.1f} s", flush=True)
            return
        time.sleep(0.5)
    raise RuntimeError("the neighbour cache did not load")


def timed_get(port: int, path: str) -> float:
    """Seconds one GET takes."""
    started = time.perf_counter()
    urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=600).close()
    return time.perf_counter() - started


def sample_jpeg() -> bytes:
    """A photo to search with (scikit-image's bundled astronaut, no download)."""
    from PIL import Image
    from skimage import data

    buffer = io.BytesIO()
    Image.fromarray(data.astronaut()).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def search_once(port: int, photo: bytes, timeout: float) -> float:
    """POST one multipart upload to /api/search; seconds it took."""
    boundary = uuid.uuid4().hex
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.jpg"\r\n'
            f"Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + photo
        + f"\r\n--{boundary}--\r\n".encode()
    )
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/api/search?k=20", data=body, method="POST",
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )  # fmt: skip
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=timeout) as response:
        results = json.loads(response.read())
    if len(results) != 20:
        raise RuntimeError(f"search returned {len(results)} results, expected 20")
    return time.perf_counter() - started


def measure_search(port: int, repeats: int) -> dict[str, float]:
    photo = sample_jpeg()
    started = time.perf_counter()
    search_once(port, photo, timeout=600)  # loads the model and the feature matrix
    first = time.perf_counter() - started
    times = np.array([search_once(port, photo, timeout=60) for _ in range(repeats)]) * 1000
    return {
        "first_s": round(first, 1),
        "p50_ms": round(float(np.percentile(times, 50)), 1),
        "max_ms": round(float(times.max()), 1),
    }


def settle(url: str, timeout_s: float = 300.0) -> None:
    """Wait until InnoDB has written the loaded pages out, so flushing does not skew latency."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(url)
    deadline = time.monotonic() + timeout_s
    with engine.connect() as conn:
        while time.monotonic() < deadline:
            status: dict[str, str] = dict(
                conn.exec_driver_sql(
                    "SHOW GLOBAL STATUS WHERE Variable_name IN "
                    "('Innodb_buffer_pool_pages_dirty', 'Innodb_buffer_pool_pages_total')"
                ).all()
            )
            if int(status["Innodb_buffer_pool_pages_dirty"]) * 100 < int(
                status["Innodb_buffer_pool_pages_total"]
            ):
                break
            time.sleep(2)
    engine.dispose()


def alternate(
    routes: dict[str, tuple[int, Callable[[], str]]], rounds: int, clients: int, seconds: float
) -> dict[str, dict[str, float]]:
    """Measure the routes in turns; per route, the round with the median requests per second.

    Taking turns exposes every route to the same background load of a shared machine.
    """
    results: dict[str, list[dict[str, float]]] = {name: [] for name in routes}
    for round_number in range(1, rounds + 1):
        for name, (port, next_path) in routes.items():
            result = measure(port, next_path, clients, seconds)
            results[name].append(result)
            print(f"round {round_number} {name}: {result}", flush=True)
    return {
        name: sorted(runs, key=lambda r: r["rps"])[len(runs) // 2] for name, runs in results.items()
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--searches", type=int, default=10)
    parser.add_argument("--no-search", action="store_true", help="skip POST /api/search")
    parser.add_argument(
        "--keep", metavar="NAME", help="keep the filled database NAME (reused when it exists)"
    )
    parser.add_argument(
        "--server-path",
        help="serve another version's lookalike package, to compare (a folder holding "
        "lookalike/{api,tasks,flows,sql} links into a worktree); the bare route stays",
    )
    args = parser.parse_args(argv)

    python_path = {"PYTHONPATH": str(REPO)}
    with scratch_database(args.keep) as (url, empty), tempfile.TemporaryDirectory() as scratch:
        if empty:
            fill_database(url, args.images, args.k, Path(scratch))
        settle(url)
        env = {"LOOKALIKE_DATABASE_URL": url, "LOOKALIKE_DATA_DIR": scratch, **python_path}
        if args.server_path:
            env["PYTHONPATH"] = os.pathsep.join([args.server_path, str(REPO)])
        with (
            served("benchmarks.api:bare_app", python_path, factory=False) as (bare_port, _),
            served("lookalike.api.app:create_app", env, factory=True) as (port, _),
        ):
            wait_for_neighbour_cache(port)
            ids = random.Random(3)
            routes = {
                "bare": (bare_port, lambda: "/bare"),
                "neighbours": (
                    port,
                    lambda: f"/api/images/{ids.randint(1, args.images)}/neighbours",
                ),
            }
            measured = alternate(routes, args.rounds, args.clients, args.seconds)
            stats_ms = timed_get(port, "/api/stats") * 1000
            print(f"/api/stats, first request: {stats_ms:.0f} ms", flush=True)
            search = None if args.no_search else measure_search(port, args.searches)
            print(f"/api/search: {search}", flush=True)

    bare, neighbours = measured["bare"], measured["neighbours"]
    ratio = neighbours["rps"] / bare["rps"]
    summary = {
        "benchmark": "api",
        "images": args.images,
        "k": args.k,
        "clients": args.clients,
        "cpus": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "neighbours_p50_ms": neighbours["p50_ms"],
        "neighbours_p99_ms": neighbours["p99_ms"],
        "neighbours_rps": neighbours["rps"],
        "neighbours_failures": neighbours["failures"],
        "bare_p50_ms": bare["p50_ms"],
        "bare_p99_ms": bare["p99_ms"],
        "bare_rps": bare["rps"],
        "ratio": round(ratio, 3),
        "stats_first_ms": round(stats_ms, 1),
        "search_first_s": None if search is None else search["first_s"],
        "search_p50_ms": None if search is None else search["p50_ms"],
        "search_max_ms": None if search is None else search["max_ms"],
        "p99_target_met": neighbours["p99_ms"] <= TARGET_P99_MS,
        "ratio_target_met": ratio >= TARGET_RATIO,
        "search_target_met": None if search is None else search["p50_ms"] <= TARGET_SEARCH_MS,
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
