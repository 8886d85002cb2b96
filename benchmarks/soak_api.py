"""A soak: ten minutes of mixed traffic against MariaDB, with a run adding images half-way.

Makes the demo set, indexes all but a few of its folders into a scratch MariaDB database on
the server of LOOKALIKE_TEST_DATABASE_URL (default root@127.0.0.1:3306), starts the service
with uvicorn as a user would (default settings: rate limits on, neighbour lists in memory),
then drives it for --minutes with paced clients from one address: neighbour reads, searches
by upload, thumbnails, fingerprints and page loads. At 40% of the time it copies the held-back
folders in and runs `lookalike process`. It prints the answers by route and status, anything
that is neither a success nor a documented refusal (429/503 with Retry-After), the server's
resident memory over time, how often the neighbour cache loaded, and the run's time; the last
line is one JSON object whose ratio is the final resident memory over the one after warm-up.

    .venv/bin/python benchmarks/soak_api.py [--minutes 10]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import shutil
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.api import scratch_database, served  # noqa: E402
from benchmarks.load_api import (  # noqa: E402
    get_request,
    peak_memory_mb,
    read_status,
    run,
    upload_request,
)

HELD_BACK = ("variants/rocket", "variants/retina", "variants/gravel")
WARM_UP_S = 60.0
SAMPLE_EVERY_S = 5.0
RUN_AT = 0.4  # share of the time after which the run adding images starts
CACHE_LOADED = "lists in memory"  # the API's log line each time the lists are loaded
DOCUMENTED_REFUSALS = (429, 503)


@dataclass
class Soak:
    """Everything the clients and the sampler saw."""

    statuses: collections.Counter[tuple[str, int]] = field(default_factory=collections.Counter)
    undocumented: list[str] = field(default_factory=list)
    memory_mb: list[tuple[float, float]] = field(default_factory=list)  # (seconds, RSS)
    ids: list[int] = field(default_factory=list)
    run_seconds: float = 0.0


# --- the traffic ---------------------------------------------------------------------------


def page_requests(image_id: int) -> list[tuple[str, bytes]]:
    """What one page view asks for."""
    return [
        ("page", get_request("/")),
        ("page", get_request("/static/app.js")),
        ("stats", get_request("/api/stats")),
        ("image", get_request(f"/api/images/{image_id}")),
        ("neighbours", get_request(f"/api/images/{image_id}/neighbours")),
        ("fingerprint", get_request(f"/api/images/{image_id}/fingerprint.svg")),
        ("duplicates", get_request("/api/duplicates?limit=20")),
    ]


def client_kinds(photo: bytes) -> dict[str, tuple[int, float, object]]:
    """Client kind: (how many, seconds between requests, what it sends)."""
    return {
        "neighbours": (2, 0.01, None),
        "search": (2, 0.5, upload_request(photo)),
        "thumbnail": (1, 0.1, None),
        "page": (1, 1.0, None),
    }


def next_requests(kind: str, soak: Soak, upload: object) -> list[tuple[str, bytes]]:
    image_id = random.choice(soak.ids)
    if kind == "neighbours":
        return [("neighbours", get_request(f"/api/images/{image_id}/neighbours"))]
    if kind == "search":
        return [("search", upload)]  # type: ignore[list-item]
    if kind == "thumbnail":
        size = random.choice((64, 128, 256, 512))
        return [("thumbnail", get_request(f"/api/images/{image_id}/thumbnail?size={size}"))]
    return page_requests(image_id)


async def client(port: int, kind: str, pause: float, upload: object, soak: Soak,
                 stop_at: float) -> None:  # fmt: skip
    """One keep-alive connection of one kind, paced, until stop_at."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    while time.monotonic() < stop_at:
        for route, request in next_requests(kind, soak, upload):
            writer.write(request)
            status, retry_after = await read_status(reader)
            soak.statuses[(route, status)] += 1
            documented = status in DOCUMENTED_REFUSALS and retry_after is not None
            if status != 200 and not documented:
                soak.undocumented.append(f"{route} {status}")
        await asyncio.sleep(pause)
    writer.close()
    await writer.wait_closed()


# --- what happens around the traffic --------------------------------------------------------


async def sample(port: int, pid: int, soak: Soak, started: float, stop_at: float) -> None:
    """Resident memory every few seconds; the ids, as they grow with the run."""
    while time.monotonic() < stop_at:
        soak.memory_mb.append((time.monotonic() - started, resident_mb(pid)))
        soak.ids = await asyncio.to_thread(indexed_ids, port) or soak.ids
        await asyncio.sleep(SAMPLE_EVERY_S)


def indexed_ids(port: int) -> list[int]:
    """Ids of the images with features (a new image has none until the run extracts it)."""
    url = f"http://127.0.0.1:{port}/api/images?limit=500"
    with urllib.request.urlopen(url) as response:
        return [item["id"] for item in json.loads(response.read())["items"]
                if item["status"] == "ok"]  # fmt: skip


def resident_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def add_images_later(delay: float, held: Path, root: Path, url: str, data: Path,
                           soak: Soak) -> None:  # fmt: skip
    """Copy the held-back folders in and run `lookalike process` on the root."""
    await asyncio.sleep(delay)
    for folder in HELD_BACK:
        shutil.copytree(held / folder, root / folder)
    started = time.monotonic()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "lookalike.flows.cli", "process", str(root), "--weights", "none",
        cwd=REPO, env={**os.environ, "LOOKALIKE_DATABASE_URL": url,
                       "LOOKALIKE_DATA_DIR": str(data)},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    output, _ = await process.communicate()
    soak.run_seconds = time.monotonic() - started
    summary = [line for line in output.decode().splitlines() if line.startswith("  ")]
    print(f"run adding {len(HELD_BACK)} folders at {delay:.0f} s: exit {process.returncode}, "
          f"{soak.run_seconds:.1f} s", *summary, sep="\n", flush=True)  # fmt: skip
    if process.returncode != 0:
        soak.undocumented.append(f"lookalike process exit {process.returncode}")


# --- the whole soak ------------------------------------------------------------------------


def prepare(folder: Path, url: str) -> tuple[Path, Path, bytes]:
    """The demo set with some folders held back, the rest indexed into url."""
    everything, root = folder / "all", folder / "root"
    run([sys.executable, "scripts/make_demo_images.py", str(everything)])
    shutil.copytree(everything, root)
    for held in HELD_BACK:
        shutil.rmtree(root / held)
    env = {"LOOKALIKE_DATABASE_URL": url, "LOOKALIKE_DATA_DIR": str(folder / "data")}
    run([sys.executable, "-m", "lookalike.flows.cli", "process", str(root), "--weights", "none"],
        env=env)  # fmt: skip
    return everything, root, (everything / "originals" / "astronaut.jpg").read_bytes()


async def drive(port: int, pid: int, minutes: float, photo: bytes, soak: Soak,
                add_images: object) -> None:  # fmt: skip
    soak.ids = await asyncio.to_thread(indexed_ids, port)
    started = time.monotonic()
    stop_at = started + minutes * 60
    clients = [
        client(port, kind, pause, upload, soak, stop_at)
        for kind, (count, pause, upload) in client_kinds(photo).items()
        for _ in range(count)
    ]
    await asyncio.gather(sample(port, pid, soak, started, stop_at), add_images, *clients)


def report(soak: Soak, log: Path, peak_mb: float) -> dict[str, object]:
    by_route: dict[str, dict[str, int]] = collections.defaultdict(dict)
    for (route, status), count in sorted(soak.statuses.items()):
        by_route[route][str(status)] = count
    for route, counts in by_route.items():
        print(f"{route:12s} {counts}")
    after_warm_up = [mb for at, mb in soak.memory_mb if at >= WARM_UP_S]
    cache_lines = [line for line in log.read_text().splitlines() if "neighbour cache" in line]
    print(*cache_lines, sep="\n")
    loads = sum(CACHE_LOADED in line for line in cache_lines)
    first, last = after_warm_up[0], after_warm_up[-1]
    print(
        f"resident memory after warm-up: {first:.0f} MB, then {min(after_warm_up):.0f}-"
        f"{max(after_warm_up):.0f} MB, at the end {last:.0f} MB (peak {peak_mb:.0f} MB)"
    )
    print(f"neighbour cache loads: {loads} (at start-up, then {loads - 1} reload(s)); "
          f"dropped while a run held the lock: {len(cache_lines) - loads} time(s)")  # fmt: skip
    print(f"answers that are neither success nor documented refusal: {len(soak.undocumented)} "
          f"{sorted(collections.Counter(soak.undocumented).items())}")  # fmt: skip
    return {
        "benchmark": "soak_api", "ratio": round(last / first, 3),
        "memory_after_warm_up_mb": round(first), "memory_end_mb": round(last),
        "memory_min_mb": round(min(after_warm_up)), "memory_max_mb": round(max(after_warm_up)),
        "peak_mb": round(peak_mb), "cache_loads": loads, "run_seconds": round(soak.run_seconds),
        "undocumented": len(soak.undocumented), "answers": by_route,
        "requests": sum(soak.statuses.values()),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="lookalike-soak-") as scratch, \
            scratch_database(None) as (url, _):  # fmt: skip
        folder = Path(scratch)
        everything, root, photo = prepare(folder, url)
        log = folder / "server.log"
        env = {"LOOKALIKE_DATABASE_URL": url, "LOOKALIKE_DATA_DIR": str(folder / "data"),
               "LOOKALIKE_WEIGHTS": "none"}  # fmt: skip
        with served("lookalike.api.app:create_app", env, factory=True, log=log) as (port, pid):
            soak = Soak()
            later = add_images_later(args.minutes * 60 * RUN_AT, everything, root, url,
                                     folder / "data", soak)  # fmt: skip
            asyncio.run(drive(port, pid, args.minutes, photo, soak, later))
            figures = report(soak, log, peak_memory_mb(pid))
    print(json.dumps(figures))
    return 0 if not soak.undocumented else 1


if __name__ == "__main__":
    sys.exit(main())
