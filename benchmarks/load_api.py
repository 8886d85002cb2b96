"""The service under load: do neighbour reads stay fast while clients flood the expensive routes?

Indexes the demo set into a scratch SQLite database (`lookalike process --weights none`, about a
minute; --data DIR keeps it for reruns), starts the service with uvicorn in a subprocess as a
user would, then runs phases of 0, 4 and 16 clients posting upload searches back to back while
2 clients read neighbour lists, and a last phase of 16 clients asking for thumbnails that are
not cached yet. It prints, per phase, the reads' p50/p99/max, the searches answered and refused,
the slowest refusal, refusals without Retry-After and any other failure, then the server's peak
memory; the last line is one JSON object whose ratio is the reads' p99 under the 16-client flood
over their p99 with no flood.

The flood ignores Retry-After, as an abuser would, and comes from one address; the per-client
rates are therefore off here (LOOKALIKE_SEARCH_RATE=off, LOOKALIKE_RENDER_RATE=off), so what is
measured is what the slots and the queue hold against a flood from many addresses. Loopback only.

    .venv/bin/python benchmarks/load_api.py [--seconds 20] [--data DIR] [--server-path DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import itertools
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.api import served  # noqa: E402

READERS = 2
FLOODS = (0, 4, 16)
THUMBNAIL_CLIENTS = 16
THUMBNAIL_SIZES = (64, 128, 256, 512, 1024)
TARGET_P99_MS = 50.0
TARGET_P50_MS = 10.0
REFUSAL_LIMIT_S = 1.0
LARGE_PHOTOS = 8
LARGE_SIZE = (6000, 4000)


@dataclass
class Tally:
    """What one phase saw."""

    reads: list[float] = field(default_factory=list)
    answered: int = 0
    refused: int = 0
    slowest_refusal_s: float = 0.0
    refusals_without_retry_after: int = 0
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0


# A stream of raw requests; each answer's status is sent back in.
Requests = Generator[bytes, int, None]


# --- the demo database ---------------------------------------------------------------------


def index_demo_set(data: Path) -> Path:
    """The demo set indexed into data/ (made once; reused when already there)."""
    images = data / "images"
    if not (data / "lookalike.sqlite").exists():
        run([sys.executable, "scripts/make_demo_images.py", str(images)])
        write_large_photos(images / "large")
        run([sys.executable, "-m", "lookalike.flows.cli", "process", str(images),
             "--weights", "none"], env={"LOOKALIKE_DATA_DIR": str(data)})  # fmt: skip
    return images


def write_large_photos(folder: Path) -> None:
    """Camera-sized originals (24 megapixels), whose thumbnails cost the most to make."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for source in sorted((folder.parent / "originals").glob("*.jpg"))[:LARGE_PHOTOS]:
        with Image.open(source) as photo:
            large = photo.convert("RGB").resize(LARGE_SIZE, Image.Resampling.BICUBIC)
        large.save(folder / source.name, "JPEG", quality=90)


def run(command: list[str], env: dict[str, str] | None = None) -> None:
    subprocess.run(command, cwd=REPO, env={**os.environ, **(env or {})}, check=True)


def image_ids(port: int, query: str = "") -> list[int]:
    url = f"http://127.0.0.1:{port}/api/images?limit=500&q={query}"
    with urllib.request.urlopen(url) as response:
        return [item["id"] for item in json.loads(response.read())["items"]]


# --- the clients ---------------------------------------------------------------------------


def upload_request(photo: bytes) -> bytes:
    """One multipart POST to /api/search, as raw HTTP/1.1 bytes."""
    boundary = uuid.uuid4().hex
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.jpg"\r\n'
            "Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + photo
        + f"\r\n--{boundary}--\r\n".encode()
    )
    head = (
        "POST /api/search?k=20 HTTP/1.1\r\nHost: bench\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def exchange(port: int, requests: Requests, stop: Callable[[], bool], tally: Tally,
                   is_read: bool) -> None:  # fmt: skip
    """One keep-alive connection sending requests back to back until stop() or none is left.

    Each request's status is sent back into its generator, which may then ask again.
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = next(requests, None)
    while request is not None and not stop():
        started = time.perf_counter()
        writer.write(request)
        status, retry_after = await read_status(reader)
        seconds = time.perf_counter() - started
        if is_read:
            tally.reads.append(seconds)
            if status != 200:
                tally.failures.append(f"read {status}")
        else:
            count_expensive(tally, status, retry_after, seconds)
        try:
            request = requests.send(status)
        except StopIteration:
            request = None
    writer.close()
    await writer.wait_closed()


async def read_status(reader: asyncio.StreamReader) -> tuple[int, str | None]:
    """Status and Retry-After of one response (its body read and dropped)."""
    head = await reader.readuntil(b"\r\n\r\n")
    retry_after = None
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"retry-after":
            retry_after = value.strip().decode()
        if name.strip().lower() == b"content-length":
            length = int(value)
    await reader.readexactly(length)
    return int(head[9:12]), retry_after


def count_expensive(tally: Tally, status: int, retry_after: str | None, seconds: float) -> None:
    if status == 200:
        tally.answered += 1
    elif status in (429, 503):
        tally.refused += 1
        tally.slowest_refusal_s = max(tally.slowest_refusal_s, seconds)
        tally.refusals_without_retry_after += retry_after is None
    else:
        tally.failures.append(f"expensive {status}")


def phase(port: int, seconds: float, readers: Callable[[], Requests],
          flood: Callable[[], Requests], clients: int) -> Tally:  # fmt: skip
    """Readers and flooding clients together for `seconds`, or until the flood has run out."""
    tally = Tally()

    async def together() -> None:
        stop_at = time.perf_counter() + seconds
        flood_over = False

        def stop() -> bool:
            return flood_over or time.perf_counter() >= stop_at

        async def flooding() -> None:
            nonlocal flood_over
            await asyncio.gather(
                *(exchange(port, flood(), stop, tally, False) for _ in range(clients))
            )
            flood_over = clients > 0

        started = time.perf_counter()
        await asyncio.gather(
            *(exchange(port, readers(), stop, tally, True) for _ in range(READERS)), flooding()
        )
        tally.seconds = time.perf_counter() - started

    asyncio.run(together())
    return tally


def get_request(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode()


def repeated(request: bytes) -> Callable[[], Requests]:
    def requests() -> Requests:
        while True:
            yield request

    return requests


def neighbour_reads(ids: list[int]) -> Callable[[], Requests]:
    def reads() -> Requests:
        while True:
            yield get_request(f"/api/images/{random.choice(ids)}/neighbours")

    return reads


def uncached_thumbnails(ids: list[int]) -> Callable[[], Requests]:
    """Every id at every size, none cached yet; a refused one is asked for again later, and
    the flood ends when each has been made once."""
    pending = collections.deque(itertools.product(ids, THUMBNAIL_SIZES))
    random.Random(7).shuffle(pending)

    def requests() -> Requests:
        while pending:
            image_id, size = pending.popleft()
            status = yield get_request(f"/api/images/{image_id}/thumbnail?size={size}")
            if status != 200:
                pending.append((image_id, size))

    return requests


def time_one_thumbnail(port: int, image_id: int, size: int) -> float:
    """Milliseconds of one thumbnail request."""
    started = time.perf_counter()
    url = f"http://127.0.0.1:{port}/api/images/{image_id}/thumbnail?size={size}"
    urllib.request.urlopen(url, timeout=60).close()
    return (time.perf_counter() - started) * 1000


# --- reporting -----------------------------------------------------------------------------


def summary(name: str, tally: Tally) -> dict[str, object]:
    reads = np.array(tally.reads) * 1000
    figures: dict[str, object] = {
        "read_p50_ms": round(float(np.percentile(reads, 50)), 2),
        "read_p99_ms": round(float(np.percentile(reads, 99)), 2),
        "read_max_ms": round(float(reads.max()), 1),
        "reads": len(reads),
        "answered": tally.answered,
        "refused": tally.refused,
        "slowest_refusal_ms": round(tally.slowest_refusal_s * 1000, 1),
        "refusals_without_retry_after": tally.refusals_without_retry_after,
        "failures": len(tally.failures),
    }
    print(f"{name:24s} reads p50 {figures['read_p50_ms']:7.2f} ms  p99 "
          f"{figures['read_p99_ms']:7.2f} ms  max {figures['read_max_ms']:7.1f} ms  "
          f"({len(reads)} reads); answered {tally.answered}, refused {tally.refused} "
          f"(slowest refusal {figures['slowest_refusal_ms']} ms, "
          f"{tally.refusals_without_retry_after} without Retry-After); "
          f"other failures {sorted(set(tally.failures)) or 0}", flush=True)  # fmt: skip
    return figures


def peak_memory_mb(pid: int) -> float:
    """The peak resident memory of a process (VmHWM), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@contextmanager
def data_folder(given: str | None) -> Iterator[Path]:
    if given:
        Path(given).mkdir(parents=True, exist_ok=True)
        yield Path(given)
        return
    with tempfile.TemporaryDirectory(prefix="lookalike-load-") as scratch:
        yield Path(scratch)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each phase")
    parser.add_argument("--data", help="data folder to make (or reuse) the demo database in")
    parser.add_argument(
        "--server-path",
        help="PYTHONPATH of the server: another version's lookalike package, to compare "
        "(a folder holding lookalike/{api,tasks,flows,sql} links into a worktree)",
    )
    args = parser.parse_args(argv)
    with data_folder(args.data) as data:
        images = index_demo_set(data)
        photo = (images / "originals" / "astronaut.jpg").read_bytes()
        env = {"LOOKALIKE_DATA_DIR": str(data), "LOOKALIKE_WEIGHTS": "none",
               "LOOKALIKE_SEARCH_RATE": "off", "LOOKALIKE_RENDER_RATE": "off",
               "LOOKALIKE_THUMBNAIL_DIR": tempfile.mkdtemp(prefix="lookalike-thumbs-")}  # fmt: skip
        if args.server_path:
            env["PYTHONPATH"] = args.server_path
        with served("lookalike.api.app:create_app", env, factory=True) as (port, pid):
            return measure_phases(port, pid, photo, args.seconds)


def measure_phases(port: int, pid: int, photo: bytes, seconds: float) -> int:
    ids = image_ids(port)
    searches = upload_request(photo)
    print(f"{len(ids)} images (demo set, weights none); {READERS} clients reading neighbour lists")
    phase(port, 3.0, neighbour_reads(ids), repeated(searches), 1)  # warm up
    results = {}
    for clients in FLOODS:
        tally = phase(port, seconds, neighbour_reads(ids), repeated(searches), clients)
        results[f"search_flood_{clients}"] = summary(f"{clients:2d} clients searching", tally)
    large = image_ids(port, "large/")
    once = {size: time_one_thumbnail(port, large[0], size) for size in (256, 1024)}
    print(f"one thumbnail of a {LARGE_SIZE[0]}x{LARGE_SIZE[1]} JPEG, not cached: "
          f"{once[256]:.0f} ms at 256 px, {once[1024]:.0f} ms at 1024 px")  # fmt: skip
    rest = [image_id for image_id in ids if image_id != large[0]]
    tally = phase(port, 3 * seconds, neighbour_reads(ids), uncached_thumbnails(rest),
                  THUMBNAIL_CLIENTS)  # fmt: skip
    results["thumbnail_flood_16"] = summary("16 clients, thumbnails", tally)
    made = len(rest) * len(THUMBNAIL_SIZES)
    print(
        f"  {tally.answered} of {made} thumbnails made in {tally.seconds:.1f} s "
        f"({tally.answered / tally.seconds:.0f}/s; {len(large) - 1} large photos among them)"
    )
    results["thumbnail_flood_16"]["thumbnails_made"] = tally.answered
    results["thumbnail_flood_16"]["seconds"] = round(tally.seconds, 1)
    results["large_thumbnail_ms"] = {str(size): round(ms) for size, ms in once.items()}
    peak = peak_memory_mb(pid)
    print(f"server peak resident memory: {peak:.0f} MB")
    flood, calm = results["search_flood_16"], results["search_flood_0"]
    ratio = float(flood["read_p99_ms"]) / float(calm["read_p99_ms"])  # type: ignore[arg-type]
    p99, p50 = float(flood["read_p99_ms"]), float(flood["read_p50_ms"])  # type: ignore[arg-type]
    met = p99 <= TARGET_P99_MS and p50 <= TARGET_P50_MS
    print(f"under the 16-client flood: p99 {p99} ms (target {TARGET_P99_MS}), p50 {p50} ms "
          f"(target {TARGET_P50_MS}): {'met' if met else 'NOT met'}")  # fmt: skip
    print(json.dumps({"benchmark": "load_api", "ratio": round(ratio, 2), "images": len(ids),
                      "seconds_per_phase": seconds, "phases": results,
                      "server_peak_mb": round(peak), "target_met": met}))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
