"""Benchmark removing a source: deep lists updated by knn_update against a full recomputation.

    .venv/bin/python benchmarks/knn_remove.py                 # n=20000, d=2048, k=100, 10%
    .venv/bin/python benchmarks/knn_remove.py --n 5000 --repeat 1

A source's images are spread over the feature space, so its removal takes random images
from every list. Deep lists (k plus a reserve, knn.plan.list_depth) are made by a full
pass over all n images (not timed); then a random share is removed and knn_update(depth)
is timed against knn_all(depth) of the remaining images (the full recomputation it
replaces), side by side in one process. Today's path (lists of k, knn_update without a
depth) is timed too. The update's first k entries are checked against knn_all(k) of the
remaining images, bit for bit. Like benchmarks/knn.py the script re-executes itself once so
that BLAS settings apply before numpy loads. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

CHILD_FLAG = "LOOKALIKE_KNN_BENCH_CHILD"
REMOVED_FLAG = "LOOKALIKE_KNN_BENCH_REMOVED"
BLAS_OVERRIDES = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line: sizes, share removed, threads, repeats."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000, help="images before the removal")
    parser.add_argument("--d", type=int, default=2048, help="feature dimensions")
    parser.add_argument("--k", type=int, default=100, help="neighbours per image")
    parser.add_argument("--remove-share", type=float, default=0.1, help="share of images removed")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--block-rows", type=int, default=None)
    parser.add_argument(
        "--backend",
        choices=("numba", "numpy"),
        default=None,
        help="tile backend (default: the engine's choice, numba where installed)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="alternate runs, keep each one's best time (the machine may be busy in bursts)",
    )
    parser.add_argument(
        "--no-today", action="store_true", help="skip today's path (lists of k, no reserve)"
    )
    parser.add_argument("--keep-blas-env", action="store_true", help="keep OPENBLAS_CORETYPE etc.")
    return parser.parse_args(argv)


def reexec_with_blas_env(args: argparse.Namespace) -> None:
    """Run this script again with the thread count and BLAS variables set before numpy loads."""
    if os.environ.get(CHILD_FLAG):
        return
    env = dict(os.environ)
    env[CHILD_FLAG] = "1"
    removed = []
    if not args.keep_blas_env:
        removed = [f"{name}={env.pop(name)}" for name in BLAS_OVERRIDES if name in env]
    env[REMOVED_FLAG] = ",".join(removed)
    for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[name] = str(args.threads)
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, __file__, *sys.argv[1:]], env)


if __name__ == "__main__":
    reexec_with_blas_env(parse_args(sys.argv[1:]))

import numpy as np  # noqa: E402  (must load after the BLAS environment is set)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.knn import default_backend, describe_blas, peak_rss_mb, split_timings  # noqa: E402
from lookalike.tasks.knn import NeighbourLists, knn_all, knn_update  # noqa: E402
from lookalike.tasks.knn.passes import list_depths, prefix_lists  # noqa: E402
from lookalike.tasks.knn.plan import list_depth, list_length  # noqa: E402


def random_features(n: int, d: int, seed: int) -> np.ndarray:
    """Seeded float32 features of about unit length, no structure (a source is everywhere)."""
    rng = np.random.default_rng(seed)
    features = np.empty((n, d), dtype=np.float32)
    for start in range(0, n, 4096):  # in chunks: no float64 or full-size temporaries
        rows = features[start : start + 4096]
        rows[:] = rng.standard_normal(rows.shape, dtype=np.float32)
        rows *= np.float32(1 / np.sqrt(d))
    return features


def warm_up(x: np.ndarray, args: argparse.Namespace) -> float:
    """Compile (or load from numba's cache) the kernels on a small slice; its seconds."""
    start = time.perf_counter()
    ids = np.arange(512, dtype=np.int64)
    deep = knn_all(x[:512], ids, 24, backend=args.backend)
    kept = np.arange(512) % 10 != 0
    change = dict(changed_ids=ids[:0], deleted_ids=ids[~kept], k=16, depth=24)
    knn_update(deep, x[:512][kept], ids[kept], backend=args.backend, **change)
    seconds = time.perf_counter() - start
    print(f"kernels compiled or loaded in {seconds:.2f} s (not in the times below)")
    return seconds


class Removal:
    """The collection before and after removing a random share of its images."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.x = random_features(args.n, args.d, args.seed)
        self.ids = np.arange(args.n, dtype=np.int64)
        rng = np.random.default_rng(args.seed + 1)
        gone = np.sort(rng.choice(args.n, round(args.n * args.remove_share), replace=False))
        keep = np.ones(args.n, dtype=bool)
        keep[gone] = False
        self.gone = self.ids[gone]
        self.remaining = np.ascontiguousarray(self.x[keep])  # what the database would load
        self.remaining_ids = self.ids[keep]


def timed_update(
    previous: NeighbourLists,
    removal: Removal,
    args: argparse.Namespace,
    depth: int | None,
    backend: str | None,
) -> tuple[NeighbourLists, float, dict[str, float]]:
    """knn_update after the removal: its lists, seconds and time split."""
    run_timings: dict[str, float] = {}
    start = time.perf_counter()
    lists = knn_update(
        previous,
        removal.remaining,
        removal.remaining_ids,
        changed_ids=removal.remaining_ids[:0],
        deleted_ids=removal.gone,
        k=args.k,
        depth=depth,
        block_rows=args.block_rows,
        backend=backend,
        timings=run_timings,
    )
    return lists, time.perf_counter() - start, run_timings


def timed_full(removal: Removal, args: argparse.Namespace, k: int) -> tuple[NeighbourLists, float]:
    """knn_all of the remaining images: its lists and seconds."""
    start = time.perf_counter()
    lists = knn_all(
        removal.remaining,
        removal.remaining_ids,
        k,
        block_rows=args.block_rows,
        backend=args.backend,
    )
    return lists, time.perf_counter() - start


def identical(one: NeighbourLists, other: NeighbourLists) -> bool:
    """Same rows, neighbours and bit-identical distances."""
    return bool(
        np.array_equal(one.image_ids, other.image_ids)
        and np.array_equal(one.neighbour_ids, other.neighbour_ids)
        and np.array_equal(one.distances, other.distances)
    )


def same_prefixes(deep: NeighbourLists, full: NeighbourLists) -> bool:
    """Whether each row of ragged deep lists equals the full lists up to its own depth."""
    width = deep.neighbour_ids.shape[1]
    inside = np.arange(width)[None, :] < list_depths(deep)[:, None]
    return bool(
        np.array_equal(deep.image_ids, full.image_ids)
        and np.array_equal(deep.neighbour_ids[inside], full.neighbour_ids[:, :width][inside])
        and np.array_equal(deep.distances[inside], full.distances[:, :width][inside])
    )


def make_previous(removal: Removal, args: argparse.Namespace, k: int) -> NeighbourLists:
    """Lists of all n images before the removal (not timed in the comparison)."""
    start = time.perf_counter()
    lists = knn_all(removal.x, removal.ids, k, block_rows=args.block_rows, backend=args.backend)
    print(f"lists of {k} for all {args.n} images made in {time.perf_counter() - start:.2f} s")
    return lists


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Time the deep update, the full pass it replaces and today's path; check the lists."""
    removal = Removal(args)
    depth = list_depth(args.k, args.n)
    remaining = len(removal.remaining_ids)
    print(
        f"features: {args.n} x {args.d} float32, k = {args.k}, depth = {depth}; "
        f"removing {len(removal.gone)} ({args.remove_share:.0%}) leaves {remaining}"
    )
    warm = warm_up(removal.x, args)
    deep = make_previous(removal, args, depth)
    shallow = None if args.no_today else make_previous(removal, args, args.k)
    best = {"update": np.inf, "full": np.inf, "full_k": np.inf, "today": np.inf}
    for _ in range(max(1, args.repeat)):  # alternating, so a busy spell hits all of them
        updated, seconds, run_timings = timed_update(deep, removal, args, depth, args.backend)
        if seconds < best["update"]:
            best["update"], timings = seconds, run_timings
        full, seconds = timed_full(removal, args, depth)
        best["full"] = min(best["full"], seconds)
        full_k, seconds = timed_full(removal, args, args.k)
        best["full_k"] = min(best["full_k"], seconds)
        if shallow is not None:
            today, seconds, today_timings = timed_update(shallow, removal, args, None, args.backend)
            best["today"] = min(best["today"], seconds)
    checks = check_lists(updated, full, full_k, args, remaining)
    if shallow is not None:
        checks["today_exact"] = identical(today, full_k)
        checks["today_counts"] = split_timings(today_timings)[1]
    checks["numpy_identical"] = numpy_identical(deep, removal, args, depth, updated)
    return report(args, removal, depth, best, timings, checks, warm)


def check_lists(
    updated: NeighbourLists,
    full: NeighbourLists,
    full_k: NeighbourLists,
    args: argparse.Namespace,
    remaining: int,
) -> dict[str, Any]:
    """Exactness of the update: its first k against knn_all(k), every row against the full."""
    kk = list_length(args.k, remaining)
    depths = list_depths(updated)
    return {
        "exact": identical(prefix_lists(updated, kk), full_k),
        "prefixes_exact": same_prefixes(updated, full),
        "depth_min": int(depths.min()),
        "depth_mean": round(float(depths.mean()), 2),
    }


def numpy_identical(
    deep: NeighbourLists,
    removal: Removal,
    args: argparse.Namespace,
    depth: int,
    updated: NeighbourLists,
) -> bool | None:
    """Whether the numpy backend's update gives the same lists (None when it was numpy)."""
    if (args.backend or default_backend()) == "numpy":
        return None
    plain, seconds, _ = timed_update(deep, removal, args, depth, "numpy")
    print(f"numpy path update : {seconds:8.3f} s")
    return identical(plain, updated)


def report(
    args: argparse.Namespace,
    removal: Removal,
    depth: int,
    best: dict[str, float],
    timings: dict[str, float],
    checks: dict[str, Any],
    warm: float,
) -> dict[str, Any]:
    """Print the figures, one per line, and return the JSON result."""
    split, counts = split_timings(timings)
    ratio = best["update"] / best["full"]
    today = None if args.no_today else best["today"]
    print_figures(best, ratio, split, counts, checks)
    return {
        "benchmark": "knn_remove",
        "n": args.n,
        "d": args.d,
        "k": args.k,
        "depth": depth,
        "removed": len(removal.gone),
        "threads": args.threads,
        "backend": args.backend or default_backend(),
        "update_s": round(best["update"], 3),
        "full_s": round(best["full"], 3),
        "ratio": round(ratio, 4),
        "refilled_rows": counts.get("refilled_rows", 0),
        "full_k_s": round(best["full_k"], 3),
        "without_reserve_s": None if today is None else round(today, 3),
        "without_reserve_ratio": None if today is None else round(today / best["full_k"], 4),
        "without_reserve_exact": checks.get("today_exact"),
        "exact": checks["exact"] and checks["prefixes_exact"],
        "depth_min": checks["depth_min"],
        "depth_mean": checks["depth_mean"],
        "numpy_identical": checks["numpy_identical"],
        "split": split,
        "counts": counts,
        "compile_or_load_seconds": round(warm, 3),
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }


def print_figures(
    best: dict[str, float],
    ratio: float,
    split: dict[str, float],
    counts: dict[str, int],
    checks: dict[str, Any],
) -> None:
    """The figures, one per line."""
    print(f"knn_update(depth) : {best['update']:8.3f} s   time split {split}  counts {counts}")
    print("  (matmul, selection and merge run on worker threads: their seconds are summed)")
    print(f"knn_all(depth)    : {best['full']:8.3f} s   (the full recomputation replaced)")
    print(f"knn_all(k)        : {best['full_k']:8.3f} s")
    print(f"ratio update/full : {ratio:8.4f}")
    if "today_counts" in checks:
        print(f"today (no reserve): {best['today']:8.3f} s   counts {checks['today_counts']}")
        print(f"ratio today/full k: {best['today'] / best['full_k']:8.4f}")
    print(
        f"exact             : first k {checks['exact']}, every row to its depth "
        f"{checks['prefixes_exact']}; depth min {checks['depth_min']} mean {checks['depth_mean']}"
    )
    print(f"numpy identical   : {checks['numpy_identical']}")


def main() -> None:
    """Run the comparison and print its figures, then the JSON line."""
    args = parse_args(sys.argv[1:])
    removed = os.environ.get(REMOVED_FLAG, "")
    print(f"BLAS environment unset for this run: {removed or 'none was set'}")
    for line in describe_blas():
        print(f"BLAS: {line}")
    result = run(args)
    result["blas_env_removed"] = removed
    print(json.dumps(result))


if __name__ == "__main__":
    main()
