"""Benchmark what --precision bfloat16 changes against float32: neighbours and images/s.

    .venv/bin/python benchmarks/precision.py                       # InceptionV3, weights none
    .venv/bin/python benchmarks/precision.py --model dinov2_small  # another registered model
    .venv/bin/python benchmarks/precision.py --weights imagenet    # where the weights can load

Two sets of images: the demo set (scripts/make_demo_images.py, photos and variants) and the
extraction benchmark's synthetic photos (benchmarks/extract.py). Each set is decoded once;
the float32 and the bfloat16 model embed the same pixels, and the exact kNN engine
(tasks/knn) lists every image's neighbours in each space. Overlap at k: the share of an
image's k nearest neighbours under float32 that bfloat16 also puts among its k nearest,
averaged over the images (1.0: the same lists, order aside); null where the set has no k
other images (the demo set has at most 99 images, so no top-100). Speed: model only, pixels
in memory, float32 and bfloat16 alternating for --rounds rounds on the benchmark's photos,
best round each; ratio = bfloat16 images/s over float32 images/s. With --weights none the
network is random, so the overlap shows how much rounding moves a ranking of such features, a
proxy for trained ones. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from benchmarks.extract import write_photos  # noqa: E402
from lookalike.tasks.decode import decode_image  # noqa: E402
from lookalike.tasks.image_files import sniff_image_type  # noqa: E402
from lookalike.tasks.knn import knn_all  # noqa: E402
from lookalike.tasks.models import (  # noqa: E402
    MODELS,
    FeatureModel,
    PrecisionError,
    load_feature_model,
)

OVERLAP_AT = (20, 100)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="inception_v3", choices=list(MODELS))
    parser.add_argument("--weights", default="none", help="none | imagenet | a file or preset")
    parser.add_argument("--images", type=int, default=400, help="benchmark photos")
    parser.add_argument("--size", default="640x480", help="benchmark photo width x height")
    parser.add_argument("--demo", type=Path, help="demo set folder (default: made afresh)")
    parser.add_argument("--demo-count", type=int, default=99, help="images of a new demo set")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="alternating timed rounds")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def image_files(folder: Path) -> list[Path]:
    """The images under folder, by path (what lookalike process would index)."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and is_image(p))


def is_image(path: Path) -> bool:
    with path.open("rb") as handle:
        return sniff_image_type(handle.read(32)) is not None


def demo_set(folder: Path | None, count: int, work: Path) -> Path:
    """The demo set: the given folder, or one written by scripts/make_demo_images.py."""
    if folder is not None:
        return folder
    target = work / "demo-images"
    script = REPO / "scripts" / "make_demo_images.py"
    subprocess.run(
        [sys.executable, str(script), str(target), "--count", str(count)],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return target


def overlap(first: np.ndarray, second: np.ndarray, k: int) -> float:
    """Mean share of each row's first k neighbours (ids) found among the other's first k."""
    shared = [len(set(a[:k]) & set(b[:k])) for a, b in zip(first, second, strict=True)]
    return float(np.mean(shared)) / k


def compare_neighbours(
    pixels: np.ndarray, single: FeatureModel, half: FeatureModel
) -> dict[str, Any]:
    """Overlap at each k of OVERLAP_AT between the float32 and bfloat16 neighbour lists."""
    ids = np.arange(len(pixels), dtype=np.int64)
    a, b = single.embed(pixels), half.embed(pixels)
    cosine = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    lists = [knn_all(v, ids, max(OVERLAP_AT)).neighbour_ids for v in (a, b)]
    others = lists[0].shape[1]  # the images but one, at most max(OVERLAP_AT)
    figures: dict[str, Any] = {"images": len(pixels)}
    for k in OVERLAP_AT:
        figures[f"overlap_at_{k}"] = round(overlap(*lists, k), 4) if k <= others else None
    figures["first_neighbour_same"] = round(float(np.mean(lists[0][:, 0] == lists[1][:, 0])), 4)
    figures["vector_cosine_min"] = round(float(cosine.min()), 6)
    return figures


def speeds(
    pixels: np.ndarray, single: FeatureModel, half: FeatureModel, rounds: int
) -> tuple[float, float]:
    """Best images/s of each model over the same pixels, alternating round by round."""
    best = {"float32": float("inf"), "bfloat16": float("inf")}
    for round_ in range(rounds):
        for name, model in (("float32", single), ("bfloat16", half)):
            started = time.perf_counter()
            model.embed(pixels)
            best[name] = min(best[name], time.perf_counter() - started)
        print(
            f"round {round_ + 1}: float32 {len(pixels) / best['float32']:7.2f} images/s, "
            f"bfloat16 {len(pixels) / best['bfloat16']:7.2f} images/s (best so far)",
            flush=True,
        )
    return len(pixels) / best["float32"], len(pixels) / best["bfloat16"]


def main(argv: list[str]) -> dict[str, Any]:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="lookalike-bench-precision-"))
    try:
        return run(args, work)
    finally:
        shutil.rmtree(work)


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    spec = MODELS[args.model]
    single = load_feature_model(args.weights, args.batch_size, spec, "float32")
    try:
        half = load_feature_model(args.weights, args.batch_size, spec, "bfloat16")
    except PrecisionError as exc:
        raise SystemExit(f"benchmarks/precision.py: {exc}") from None
    size = spec.input_size
    width, height = (int(v) for v in args.size.lower().split("x"))
    sets = {
        "demo": image_files(demo_set(args.demo, args.demo_count, work)),
        "photos": write_photos(work / "photos", args.images, width, height, args.seed),
    }
    print(f"{spec.name}, weights {args.weights}, {os.cpu_count()} cores, batch {args.batch_size}")
    results: dict[str, Any] = {}
    for name, paths in sets.items():
        pixels = np.stack([decode_image(p, size=size).pixels for p in paths])
        results[name] = compare_neighbours(pixels, single, half)
        print(f"{name}: {results[name]}", flush=True)
        if name == "photos":
            single.embed(pixels[: args.batch_size])  # both compiled before timing
            half.embed(pixels[: args.batch_size])
            float32_rate, bfloat16_rate = speeds(pixels, single, half, args.rounds)
    ratio = bfloat16_rate / float32_rate
    print(
        f"\nmodel only: float32 {float32_rate:.2f} images/s, bfloat16 {bfloat16_rate:.2f} "
        f"images/s, ratio {ratio:.3f}"
    )
    if args.weights == "none":
        print("  (random weights: the overlap is a proxy for what rounding does to trained ones)")
    return {
        "benchmark": "precision",
        "model": spec.name,
        "weights": args.weights,
        "ratio": round(ratio, 3),
        "float32_images_per_s": round(float32_rate, 2),
        "bfloat16_images_per_s": round(bfloat16_rate, 2),
        "demo": results["demo"],
        "photos": results["photos"],
        "load_average": round(os.getloadavg()[0], 2),
    }


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])))
