"""How many pairs an exact kNN could skip by projected lower bounds, on the benchmark's data.

    .venv/bin/python benchmarks/knn_pruning.py            # n=20000, d=2048, k=100

Exact search may skip a pair (a, b) when a lower bound of its distance already exceeds both
rows' k-th distance. The projection of a - b onto orthonormal directions is such a bound.
This measures the best case: the final k-th distances (from knn_all) as limits and the
leading principal directions of the centred data, for several projection sizes p. The
"ratio" in the last line is the share of pairs that would still need multiplying at the
largest p (1.0: nothing could be skipped). Float64 throughout; no error margin is taken,
which only flatters the bound.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from knn import clustered_features  # noqa: E402  (benchmarks/knn.py: the same data)

from lookalike.tasks.knn.passes import knn_all  # noqa: E402

_ROWS_PER_CHUNK = 2000


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line: sizes and projection sizes."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000, help="images")
    parser.add_argument("--d", type=int, default=2048, help="feature dimensions")
    parser.add_argument("--k", type=int, default=100, help="neighbours per image")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sample", type=int, default=4000, help="rows for the principal axes")
    parser.add_argument("--dims", type=int, nargs="+", default=[32, 64, 128, 256])
    return parser.parse_args(argv)


def principal_axes(centred: np.ndarray, sample: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Leading right singular vectors of a row sample, and each one's share of variance."""
    rng = np.random.default_rng(seed + 1)
    rows = rng.choice(len(centred), min(sample, len(centred)), replace=False)
    _, values, axes = np.linalg.svd(centred[rows].astype(np.float64), full_matrices=False)
    return axes, values**2 / np.sum(values**2)


def needed_share(centred: np.ndarray, axes: np.ndarray, kth_sq: np.ndarray) -> float:
    """Share of pairs whose projected squared distance is within either row's k-th."""
    z = centred.astype(np.float64) @ axes.T
    norms = np.einsum("ij,ij->i", z, z)
    needed = 0
    for start in range(0, len(z), _ROWS_PER_CHUNK):
        part = slice(start, start + _ROWS_PER_CHUNK)
        bound = norms[part, None] + norms[None, :] - 2.0 * (z[part] @ z.T)
        limit = np.maximum(kth_sq[part, None], kth_sq[None, :])
        needed += int(np.count_nonzero(bound <= limit))
    return needed / float(len(z)) ** 2


def main() -> None:
    args = parse_args(sys.argv[1:])
    x = clustered_features(args.n, args.d, args.seed)
    start = time.perf_counter()
    lists = knn_all(x, np.arange(args.n, dtype=np.int64), args.k)
    print(f"exact lists (knn_all): {time.perf_counter() - start:.2f} s")
    kth_sq = lists.distances[:, -1].astype(np.float64) ** 2
    centred = x - x.mean(axis=0)
    axes, variance = principal_axes(centred, args.sample, args.seed)
    shares = {}
    for p in args.dims:
        shares[p] = needed_share(centred, axes[:p], kth_sq)
        kept = variance[:p].sum()
        print(f"p = {p:4d}: {kept:.3f} of the variance, pairs still to multiply {shares[p]:.4f}")
    largest = max(args.dims)
    print(
        json.dumps(
            {
                "benchmark": "knn_pruning",
                "n": args.n,
                "d": args.d,
                "k": args.k,
                "ratio": round(shares[largest], 4),
                "needed_share_by_dims": {str(p): round(s, 4) for p, s in shares.items()},
            }
        )
    )


if __name__ == "__main__":
    main()
