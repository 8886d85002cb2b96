"""Re-run benchmark: a first run, an unchanged re-run and a run after adding 10 images.

    .venv/bin/python benchmarks/rerun.py                    # 1,000 images
    .venv/bin/python benchmarks/rerun.py --images 200       # a smaller folder
    .venv/bin/python benchmarks/rerun.py --prefect-server   # runs talk to a running API server

Every run is a fresh `lookalike process ROOT --weights none --json` subprocess, timed from
spawn to exit: Python, TensorFlow (when imported) and Prefect start-up are included. Without
--prefect-server a run that has work starts Prefect's ephemeral API server, as a plain CLI run
does, and the unchanged re-run is answered without starting Prefect at all; with it, one
`prefect server start` is started before the runs (not timed), as for a deployment, and every
run, the unchanged one too, is a flow run recorded there.
A warm-up run on two other images comes first, so the first timed run is not charged for
Prefect's database migrations or a cold disk cache. The counts (decoded, model calls, image
bytes read) come from the runs' summaries. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

TARGETS = {"unchanged": 0.15, "added": 0.25}  # wall time as a share of the first run
WALL_TARGETS = {"unchanged": 3.0}  # seconds, spawn to exit (issue #16, point 7)
ADDED = 10


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000, help="images in the folder")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--workdir", type=Path, help="keep everything here (default: temporary)")
    parser.add_argument(
        "--prefect-server", action="store_true", help="start one Prefect API server for all runs"
    )
    return parser.parse_args(argv)


def write_images(folder: Path, start: int, count: int, size: tuple[int, int] = (160, 120)) -> None:
    """Distinct small JPEGs: smooth random colour fields with a little noise."""
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(start, start + count):
        rng = np.random.default_rng(index)
        coarse = Image.fromarray(rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8))
        smooth = np.asarray(coarse.resize(size, Image.Resampling.BICUBIC), dtype=np.int16)
        noisy = smooth + rng.integers(-12, 13, size=smooth.shape, dtype=np.int16)
        image = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
        image.save(folder / f"image_{index:06d}.jpg", "JPEG", quality=85)


def lookalike_process(root: Path, env: dict[str, str], args: argparse.Namespace) -> dict[str, Any]:
    """One timed CLI run: its summary plus the wall time it took."""
    command = [
        sys.executable, "-m", "lookalike.flows.cli", "process", str(root), "--weights", "none",
        "--batch-size", str(args.batch_size), "--k", str(args.k), "--json",
    ]  # fmt: skip
    started = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"lookalike process failed ({result.returncode}):\n{result.stderr[-3000:]}")
    summary: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    # The command's own figure (process start to summary) beside ours (spawn to exit).
    summary["reported_wall_seconds"] = summary.get("wall_seconds")
    summary["wall_seconds"] = round(wall, 2)
    return summary


@contextlib.contextmanager
def prefect_server(env: dict[str, str], log: Path) -> Iterator[str]:
    """A `prefect server start` on a free port for the block; its API URL."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    api_url = f"http://127.0.0.1:{port}/api"
    with log.open("wb") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--port", str(port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                urllib.request.urlopen(f"{api_url}/health", timeout=5).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    sys.exit(f"prefect server did not start; see {log}")
                time.sleep(0.5)
        yield api_url
    finally:
        server.terminate()
        server.wait(timeout=60)


def check_counts(name: str, summary: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    """Differences between a run's counts and what the issue requires."""
    return [
        f"{name}: {key} is {summary[key]}, expected {value}"
        for key, value in expected.items()
        if summary[key] != value
    ]


def run_benchmark(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Warm up, then the three timed runs; the figures."""
    root = work / "images"
    print(f"writing {args.images} images to {root}", flush=True)
    write_images(root, 0, args.images)
    write_images(work / "warmup-images", 10**6, 2)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOKALIKE_")}
    env.update(
        PREFECT_HOME=str(work / "prefect"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        LOOKALIKE_DATA_DIR=str(work / "data"),
        TF_CPP_MIN_LOG_LEVEL="2",
    )
    with contextlib.ExitStack() as stack:
        if args.prefect_server:
            env["PREFECT_API_URL"] = stack.enter_context(prefect_server(env, work / "server.log"))
        warm_env = dict(env, LOOKALIKE_DATA_DIR=str(work / "warmup-data"))
        lookalike_process(work / "warmup-images", warm_env, args)
        runs = {}
        for name in ("first", "unchanged", "added"):
            if name == "added":
                write_images(root, args.images, ADDED)
            runs[name] = lookalike_process(root, env, args)
            print(f"{name:9s} run: {json.dumps(runs[name])}", flush=True)
    return runs


def report(args: argparse.Namespace, runs: dict[str, Any]) -> dict[str, Any]:
    """The benchmark's JSON object: ratios, targets, counts and whether each target is met."""
    first = runs["first"]["wall_seconds"]
    ratios = {name: round(runs[name]["wall_seconds"] / first, 4) for name in TARGETS}
    # Against a server every run is recorded; without one the unchanged folder needs no Prefect.
    unchanged_prefect = "server" if args.prefect_server else "not started"
    problems = check_counts(
        "unchanged",
        runs["unchanged"],
        {"decoded": 0, "model_calls": 0, "bytes_read": 0, "new": 0, "tensorflow_imported": False,
         "prefect": unchanged_prefect},
    ) + check_counts("added", runs["added"], {"decoded": ADDED, "new": ADDED})  # fmt: skip
    counts = ("decoded", "model_calls", "bytes_read", "tensorflow_imported", "seconds", "prefect",
              "reported_wall_seconds")  # fmt: skip
    walls = {name: runs[name]["wall_seconds"] for name in WALL_TARGETS}
    return {
        "benchmark": "rerun",
        "images": args.images,
        "prefect": "server" if args.prefect_server else "ephemeral",
        "ratio": ratios["unchanged"],
        "added_ratio": ratios["added"],
        "ratios": ratios,
        "targets": TARGETS,
        "met": {name: ratios[name] <= TARGETS[name] for name in TARGETS},
        "wall_targets": WALL_TARGETS,
        "wall_met": {name: walls[name] < WALL_TARGETS[name] for name in WALL_TARGETS},
        "counts_ok": not problems,
        "problems": problems,
        "wall_seconds": {name: run["wall_seconds"] for name, run in runs.items()},
        "runs": {name: {c: run[c] for c in counts} for name, run in runs.items()},
        "cpus": os.cpu_count(),
    }


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="lookalike-rerun-"))
    try:
        runs = run_benchmark(args, work)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    figures = report(args, runs)
    for name in TARGETS:
        verdict = "met" if figures["met"][name] else "MISSED"
        print(
            f"{name}: {runs[name]['wall_seconds']:.1f} s, first run "
            f"{runs['first']['wall_seconds']:.1f} s: {figures['ratios'][name]:.1%} "
            f"(target <= {TARGETS[name]:.0%}: {verdict})"
        )
    for name, target in WALL_TARGETS.items():
        verdict = "met" if figures["wall_met"][name] else "MISSED"
        print(f"{name}: {runs[name]['wall_seconds']:.1f} s (target < {target:g} s: {verdict})")
    for problem in figures["problems"]:
        print(f"count mismatch: {problem}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main(sys.argv[1:])
