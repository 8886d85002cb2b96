"""Benchmark the exact all-pairs kNN engine against FAISS, a bare GEMM and an incremental add.

    .venv/bin/python benchmarks/knn.py                      # n=20000, d=2048, k=100
    .venv/bin/python benchmarks/knn.py --mode incremental   # 1% new images vs a full run

The script re-executes itself once so that BLAS settings apply before numpy loads: it sets
OPENBLAS_NUM_THREADS/OMP_NUM_THREADS to --threads and drops OPENBLAS_CORETYPE and
OPENBLAS_L2_SIZE (which can force slow kernels) unless --keep-blas-env is given. Our engine
and FAISS then run in the same process under the same settings, and FAISS's bundled OpenBLAS
is given the kernel numpy's OpenBLAS picked (its older copy misreads recent Intel CPUs). The
last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

CHILD_FLAG = "LOOKALIKE_KNN_BENCH_CHILD"
REMOVED_FLAG = "LOOKALIKE_KNN_BENCH_REMOVED"
BLAS_OVERRIDES = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line: sizes, threads, mode."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000, help="images")
    parser.add_argument("--d", type=int, default=2048, help="feature dimensions")
    parser.add_argument("--k", type=int, default=100, help="neighbours per image")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--mode", choices=("full", "incremental"), default="full")
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
        "--no-faiss", action="store_true", help="skip FAISS (e.g. at --n 100000: minutes)"
    )
    parser.add_argument(
        "--no-numpy-path",
        action="store_true",
        help="skip the numpy backend run that checks the compiled lists and gives its split",
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
from threadpoolctl import threadpool_info  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lookalike.tasks.knn.incremental import knn_update  # noqa: E402
from lookalike.tasks.knn.passes import knn_all  # noqa: E402


def clustered_features(n: int, d: int, seed: int) -> np.ndarray:
    """Seeded float32 features: ~100 images per cluster, clusters in random order."""
    rng = np.random.default_rng(seed)
    clusters = max(1, n // 100)
    centres = rng.standard_normal((clusters, d), dtype=np.float32)
    spread = rng.uniform(0.3, 0.8, clusters).astype(np.float32)
    labels = rng.integers(0, clusters, n)
    features = np.empty((n, d), dtype=np.float32)
    for start in range(0, n, 4096):  # in chunks: no float64 or full-size temporaries
        part = labels[start : start + 4096]
        noise = rng.standard_normal((len(part), d), dtype=np.float32)
        features[start : start + len(part)] = centres[part] + spread[part, None] * noise
    return features


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def describe_blas() -> list[str]:
    """One line per BLAS/OpenMP library loaded, with its kernel and thread count."""
    lines = []
    for pool in threadpool_info():
        lines.append(
            f"{pool['internal_api']} {pool.get('version')} arch={pool.get('architecture', '-')} "
            f"threads={pool['num_threads']} ({Path(pool['filepath']).name})"
        )
    return lines


def bare_matmul_seconds(x: np.ndarray, block: int = 1024) -> float:
    """Time n^2 * d / 2 multiply-adds: the first half of the rows against all rows."""
    half = len(x) // 2
    out = np.empty((block, len(x)), dtype=np.float32)
    start = time.perf_counter()
    for r0 in range(0, half, block):
        rows = x[r0 : min(r0 + block, half)]
        np.matmul(rows, x.T, out=out[: len(rows)])
    return time.perf_counter() - start


def numpy_blas_core() -> str | None:
    """The OpenBLAS kernel numpy's BLAS picked for this CPU (None when unknown)."""
    for pool in threadpool_info():
        if pool["internal_api"] == "openblas" and "numpy" in pool["filepath"]:
            return pool.get("architecture")
    return None


def give_faiss_the_same_kernel() -> str:
    """Let FAISS's own (older) OpenBLAS use the kernel numpy's uses, before it loads.

    faiss-cpu wheels bundle OpenBLAS 0.3.15, which does not recognise recent CPUs (Sapphire
    and Emerald Rapids) and falls back to its generic Prescott kernel: 2.6-4x slower GEMM.
    A yardstick on a generic kernel would flatter us, so FAISS gets numpy's kernel (or the
    user's OPENBLAS_CORETYPE, kept with --keep-blas-env). Returns what FAISS was given.
    """
    if os.environ.get("OPENBLAS_CORETYPE"):
        return f"{os.environ['OPENBLAS_CORETYPE']} (from the environment)"
    core = numpy_blas_core()
    if core is None:
        return "its own detection (numpy's kernel unknown)"
    # OpenBLAS reads the variable when the library loads, i.e. at `import faiss` below.
    os.environ["OPENBLAS_CORETYPE"] = core
    return f"{core} (numpy's kernel)"


def faiss_lists(x: np.ndarray, k: int, threads: int) -> tuple[np.ndarray, float]:
    """FAISS exact kNN (k + 1, then the self match dropped) and its seconds."""
    import faiss

    faiss.omp_set_num_threads(threads)
    start = time.perf_counter()
    _, found = faiss.knn(x, x, k + 1)
    seconds = time.perf_counter() - start
    own = found == np.arange(len(x))[:, None]
    # Drop the image itself where FAISS returned it, else the (k+1)-th entry.
    drop = np.where(own.any(axis=1), own.argmax(axis=1), k)
    keep = np.ones(found.shape, dtype=bool)
    keep[np.arange(len(x)), drop] = False
    return found[keep].reshape(len(x), k), seconds


def recall(ours: np.ndarray, reference: np.ndarray) -> float:
    """Share of the reference lists' entries that are also in ours."""
    n = len(ours)
    rows = np.arange(n)[:, None]
    ours_keys = (rows * n + ours).ravel()
    reference_keys = (rows * n + reference).ravel()
    return float(np.isin(reference_keys, ours_keys).mean())


def split_timings(timings: dict[str, float]) -> tuple[dict[str, float], dict[str, int]]:
    """The engine's seconds per phase, and its counts (entries, rows) apart."""
    counted = ("near_tie_entries", "fallback_rows", "refilled_rows")
    split = {key: round(value, 3) for key, value in timings.items() if key not in counted}
    counts = {key: int(value) for key, value in timings.items() if key in counted}
    return split, counts


def run_full(args: argparse.Namespace) -> dict[str, Any]:
    """Time our engine, the numpy path, FAISS and a bare GEMM on one array; compare lists."""
    x = clustered_features(args.n, args.d, args.seed)
    ids = np.arange(args.n, dtype=np.int64)
    feature_mb = x.nbytes / 2**20
    print(f"features: {args.n} x {args.d} float32 = {feature_mb:.0f} MB, k = {args.k}")
    warm = warm_up(x, ids, args)
    best = {"ours": float("inf"), "faiss": float("inf"), "matmul": float("inf")}
    numpy_path: dict[str, Any] = {"seconds": float("inf")}
    rss = 0.0
    reference = None
    round_ratios = []
    for _ in range(max(1, args.repeat)):  # alternating, so a busy spell hits all of them
        lists, elapsed, run_timings = timed_knn_all(x, ids, args, args.backend)
        if elapsed < best["ours"]:
            best["ours"], timings = elapsed, run_timings
        rss = rss or peak_rss_mb()  # before the other runs add their buffers
        if not args.no_faiss:  # right after ours: a load that comes and goes hits both
            reference, faiss_seconds = faiss_lists(x, args.k, args.threads)
            best["faiss"] = min(best["faiss"], faiss_seconds)
            round_ratios.append(round(elapsed / faiss_seconds, 4))
        if compare_with_numpy(args):
            plain, plain_seconds, plain_timings = timed_knn_all(x, ids, args, "numpy")
            if plain_seconds < numpy_path["seconds"]:
                numpy_path = {"seconds": plain_seconds, "timings": plain_timings}
            numpy_path["identical"] = identical(lists, plain) and numpy_path.get("identical", True)
        best["matmul"] = min(best["matmul"], bare_matmul_seconds(x))
    found = recall(lists.neighbour_ids, reference) if reference is not None else float("nan")
    split, counts = split_timings(timings)
    report_full(args, best, found, rss, feature_mb, split, counts)
    if round_ratios:
        print(f"ratio per round   : {round_ratios}  (ours, then FAISS straight after)")
    result = {
        "benchmark": "knn",
        "n": args.n,
        "d": args.d,
        "k": args.k,
        "threads": args.threads,
        "backend": args.backend or default_backend(),
        "seconds": round(best["ours"], 3),
        "faiss_seconds": round(best["faiss"], 3) if reference is not None else None,
        "ratio": round(best["ours"] / best["faiss"], 4) if reference is not None else None,
        "round_ratios": round_ratios,
        "recall": round(found, 6) if reference is not None else None,
        "peak_rss_mb": round(rss, 1),
        "feature_mb": round(feature_mb, 1),
        "matmul_seconds": round(best["matmul"], 3),
        "ratio_to_matmul": round(best["ours"] / best["matmul"], 4),
        "compile_or_load_seconds": round(warm, 3),
        "split": split,
        "counts": counts,
    }
    if "timings" in numpy_path:
        result["numpy_path"] = report_numpy_path(numpy_path, best["ours"])
    return result


def default_backend() -> str:
    """The backend knn_all picks here when none is named."""
    from lookalike.tasks.knn.compiled import numba_installed

    return "numba" if numba_installed() else "numpy"


def compare_with_numpy(args: argparse.Namespace) -> bool:
    """Whether to run the numpy path beside a compiled run."""
    return not args.no_numpy_path and (args.backend or default_backend()) != "numpy"


def warm_up(x: np.ndarray, ids: np.ndarray, args: argparse.Namespace) -> float:
    """Compile (or load from numba's cache) the kernels on a small slice; its seconds.

    Paid once per process; numba keeps the machine code on disk, so later processes only
    load it.
    """
    start = time.perf_counter()
    knn_all(x[:512], ids[:512], min(args.k, 16), backend=args.backend)
    seconds = time.perf_counter() - start
    print(f"kernels compiled or loaded in {seconds:.2f} s (not in the times below)")
    return seconds


def timed_knn_all(
    x: np.ndarray, ids: np.ndarray, args: argparse.Namespace, backend: str | None
) -> tuple[Any, float, dict[str, float]]:
    """knn_all with the given backend: its lists, seconds and time split."""
    run_timings: dict[str, float] = {}
    start = time.perf_counter()
    lists = knn_all(
        x, ids, args.k, block_rows=args.block_rows, backend=backend, timings=run_timings
    )
    return lists, time.perf_counter() - start, run_timings


def identical(one: Any, other: Any) -> bool:
    """Same neighbours and bit-identical distances."""
    return bool(
        np.array_equal(one.neighbour_ids, other.neighbour_ids)
        and np.array_equal(one.distances, other.distances)
    )


def report_numpy_path(numpy_path: dict[str, Any], ours: float) -> dict[str, Any]:
    """Print and return the numpy path's figures beside the compiled run."""
    split, _ = split_timings(numpy_path["timings"])
    print(f"numpy path        : {numpy_path['seconds']:8.2f} s   time split {split}")
    print(f"ratio ours/numpy  : {ours / numpy_path['seconds']:8.3f}")
    print(f"identical lists   : {numpy_path['identical']} (ids and distances, bit for bit)")
    return {
        "seconds": round(numpy_path["seconds"], 3),
        "split": split,
        "identical": numpy_path["identical"],
    }


def report_full(
    args: argparse.Namespace,
    best: dict[str, float],
    found: float,
    rss: float,
    feature_mb: float,
    split: dict[str, float],
    counts: dict[str, int],
) -> None:
    """Print the figures of a full run, one per line."""
    flops = args.n * args.n * args.d / best["matmul"] / 1e9  # 2 flops per multiply-add
    print(f"lookalike knn_all : {best['ours']:8.2f} s   time split {split}  counts {counts}")
    print("  (matmul, selection and merge run on worker threads: their seconds are summed)")
    if args.no_faiss:
        print("faiss.knn (k+1)   : not run (--no-faiss)")
    else:
        print(f"faiss.knn (k+1)   : {best['faiss']:8.2f} s")
    print(f"bare GEMM n^2*d/2 : {best['matmul']:8.2f} s   ({flops:.0f} GFLOP/s)")
    if not args.no_faiss:
        print(f"ratio ours/FAISS  : {best['ours'] / best['faiss']:8.3f}")
    print(f"ratio ours/GEMM   : {best['ours'] / best['matmul']:8.3f}")
    if not args.no_faiss:
        print(f"recall@{args.k} vs FAISS: {found:.5f}")
    limit = 1.5 * feature_mb + 1024
    print(f"peak RSS (ours)   : {rss:8.0f} MB  (limit 1.5 x features + 1 GB = {limit:.0f} MB)")


def run_incremental(args: argparse.Namespace) -> dict[str, Any]:
    """Time adding 1% new images with knn_update against a full knn_all of the result."""
    x = clustered_features(args.n, args.d, args.seed)
    ids = np.arange(args.n, dtype=np.int64)
    added = max(1, round(args.n * 0.01))
    old = args.n - added
    print(f"features: {args.n} x {args.d}, k = {args.k}; adding {added} images to {old}")
    warm_up(x, ids, args)
    previous = knn_all(x[:old], ids[:old], args.k, block_rows=args.block_rows, backend=args.backend)
    seconds = full_seconds = float("inf")
    for _ in range(max(1, args.repeat)):  # alternating, so a busy spell hits both
        run_timings: dict[str, float] = {}
        start = time.perf_counter()
        updated = knn_update(
            previous,
            x,
            ids,
            changed_ids=ids[old:],
            deleted_ids=np.empty(0, dtype=np.int64),
            k=args.k,
            block_rows=args.block_rows,
            backend=args.backend,
            timings=run_timings,
        )
        elapsed = time.perf_counter() - start
        if elapsed < seconds:
            seconds, timings = elapsed, run_timings
        start = time.perf_counter()
        full = knn_all(x, ids, args.k, block_rows=args.block_rows, backend=args.backend)
        full_seconds = min(full_seconds, time.perf_counter() - start)
    same_ids = bool(np.array_equal(updated.neighbour_ids, full.neighbour_ids))
    same_distances = bool(np.allclose(updated.distances, full.distances, rtol=1e-6))
    split, counts = split_timings(timings)
    print(f"incremental add  : {seconds:8.2f} s   time split {split}  counts {counts}")
    print(f"full recompute   : {full_seconds:8.2f} s")
    print(f"ratio inc/full   : {seconds / full_seconds:8.4f}")
    print(f"identical lists  : ids {same_ids}, distances {same_distances}")
    return {
        "benchmark": "knn_incremental",
        "n": args.n,
        "d": args.d,
        "k": args.k,
        "added": added,
        "seconds": round(seconds, 3),
        "full_seconds": round(full_seconds, 3),
        "ratio": round(seconds / full_seconds, 4),
        "identical": same_ids and same_distances,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "split": split,
        "counts": counts,
    }


def main() -> None:
    """Run the chosen mode and print its figures, then the JSON line."""
    args = parse_args(sys.argv[1:])
    removed = os.environ.get(REMOVED_FLAG, "")
    print(f"BLAS environment unset for this run: {removed or 'none was set'}")
    for line in describe_blas():
        print(f"BLAS: {line}")
    faiss_kernel = None
    if args.mode == "full" and not args.no_faiss:
        faiss_kernel = give_faiss_the_same_kernel()
    result = run_full(args) if args.mode == "full" else run_incremental(args)
    if faiss_kernel is not None:
        print(f"FAISS's OpenBLAS kernel: {faiss_kernel}")
        for line in describe_blas():  # FAISS brings its own OpenBLAS and OpenMP
            print(f"BLAS after FAISS: {line}")
        result["faiss_blas_kernel"] = faiss_kernel
    result["blas_env_removed"] = removed
    print(json.dumps(result))


if __name__ == "__main__":
    main()
