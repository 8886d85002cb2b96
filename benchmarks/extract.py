"""Benchmark feature extraction end to end against the model alone and one image per call.

    .venv/bin/python benchmarks/extract.py                      # 128 JPEGs 1280x960, batch 64
    .venv/bin/python benchmarks/extract.py --workers 1          # other decoder thread count
    .venv/bin/python benchmarks/extract.py --weights imagenet   # where the weights can load
    .venv/bin/python benchmarks/extract.py --model all --precision float32,bfloat16 --images 64

--model and --precision take one name, a comma-separated list, or "all"; with more than one
combination, each gets the alternating end-to-end and model-only rounds and one row of a
table, and the detailed report of a single run (one per call, time split, reduced-scale
decode) is left out. The ratio of the JSON line is then the lowest end-to-end / model-only
ratio of the table.

Three ways through the same photos and the same FeatureModel, on whatever device TensorFlow
finds (CPU here; a GPU machine runs it unchanged):
  end to end   lookalike's extract_batches: decoder threads feed the model, features staged
  model only   FeatureModel.embed on the same images already decoded into memory
  one per call the old scripts' way: decode one image, call the model with a batch of 1
End to end and model only alternate for --rounds rounds and the best round of each counts,
so that other load on the machine hurts both alike. Then the time split (read, decode,
model, write; each timed alone, per image) and the reduced-scale JPEG decode: how much
faster it decodes and how close its features stay (cosine similarity to the full decode;
with --weights none the model is random, a weak proxy for trained features). The last line
printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lookalike.tasks.catalog import PendingImage  # noqa: E402
from lookalike.tasks.decode import decode_image, decode_image_bytes  # noqa: E402
from lookalike.tasks.extract import (  # noqa: E402
    ExtractTimings,
    default_decode_workers,
    extract_batches,
    plan_batches,
)
from lookalike.tasks.models import (  # noqa: E402
    MODELS,
    PRECISIONS,
    FeatureModel,
    ModelSpec,
    feature_model_name,
    load_feature_model,
    model_spec,
    weights_identity,
)
from lookalike.tasks.settings import Settings  # noqa: E402
from lookalike.tasks.stage import feature_batch_path, write_feature_batch  # noqa: E402


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default="none", help="none | imagenet | a file or preset")
    parser.add_argument("--model", default="inception_v3", help=f"{', '.join(MODELS)} or all")
    parser.add_argument("--precision", default="float32", help=f"{', '.join(PRECISIONS)} or all")
    parser.add_argument("--images", type=int, default=128, help="photos end to end")
    parser.add_argument("--batch-size", type=int, default=Settings().batch_size)
    parser.add_argument("--workers", type=int, default=0, help="decoder threads; 0: default")
    parser.add_argument("--size", default="1280x960", help="photo width x height")
    parser.add_argument("--rounds", type=int, default=3, help="alternating timed rounds")
    parser.add_argument("--old-images", type=int, default=32, help="photos one per call")
    parser.add_argument("--compare-images", type=int, default=64, help="reduced-scale check")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def write_photos(folder: Path, count: int, width: int, height: int, seed: int) -> list[Path]:
    """Photo-like JPEGs: smooth colour fields, shapes and sensor noise, each one different."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        coarse = rng.integers(0, 256, (height // 64 + 2, width // 64 + 2, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
        draw = ImageDraw.Draw(image)
        for _ in range(12):
            x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
            r = int(rng.integers(width // 40, width // 6))
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)
        noisy = np.asarray(image, dtype=np.int16) + rng.integers(-12, 13, (height, width, 3))
        path = folder / f"photo{i:05d}.jpg"
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def pending_images(paths: list[Path], tag: str) -> list[PendingImage]:
    """Catalog rows for the photos; tag makes the batch keys new so nothing is cached."""
    return [
        PendingImage(i + 1, p.name, f"{tag}{i:016x}".ljust(32, "0")) for i, p in enumerate(paths)
    ]


def choices(text: str, known: Any) -> list[str]:
    """A comma-separated list of names (or "all") as a list, in the known order."""
    names = list(known) if text == "all" else [name.strip() for name in text.split(",")]
    unknown = [name for name in names if name not in known]
    if unknown:
        raise SystemExit(f"unknown {unknown}: choose from {', '.join(known)} or all")
    return names


def decode_all(
    paths: list[Path], reduced_scale: bool = False, size: int = 299
) -> tuple[np.ndarray, float]:
    """Every photo decoded in this thread at the model's input size, and seconds per image."""
    started = time.perf_counter()
    pixels = np.stack(
        [decode_image(p, size=size, reduced_scale=reduced_scale).pixels for p in paths]
    )
    return pixels, (time.perf_counter() - started) / len(paths)


class Stopwatch:
    """Wall seconds and this process's CPU seconds (all threads) of a block."""

    def __enter__(self) -> Stopwatch:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.wall
        self.cpu = time.process_time() - self.cpu


def model_only(model: FeatureModel, pixels: np.ndarray) -> Stopwatch:
    """The model over pixels already in memory, batch by batch, as extraction calls it."""
    with Stopwatch() as watch:
        for start in range(0, len(pixels), model.batch_size):
            model.embed(pixels[start : start + model.batch_size])
    return watch


def end_to_end(
    paths: list[Path], args: argparse.Namespace, staging: Path, tag: str, model: FeatureModel
) -> tuple[Stopwatch, ExtractTimings]:
    """lookalike's extraction of the photos into a fresh staging folder."""
    batches = plan_batches(
        pending_images(paths, tag),
        args.batch_size,
        weights_identity(args.weights, model.spec),
        model=model.model_name,
    )
    timings = ExtractTimings()
    with Stopwatch() as watch:
        extract_batches(
            batches,
            paths[0].parent,
            staging,
            weights=args.weights,
            batch_size=args.batch_size,
            workers=args.workers,
            timings=timings,
        )
    return watch, timings


def one_per_call_seconds(paths: list[Path], weights: str, batched: FeatureModel) -> float:
    """Decode an image, run the model on it alone, next image: no batching, no overlap."""
    model = load_feature_model(weights, 1, batched.spec, batched.precision)
    size = model.spec.input_size
    model.embed(decode_image(paths[0], size=size).pixels[None])  # compiled before timing
    started = time.perf_counter()
    for path in paths:
        model.embed(decode_image(path, size=size).pixels[None])
    return time.perf_counter() - started


def serial_split(paths: list[Path], model: FeatureModel, staging: Path) -> dict[str, float]:
    """Milliseconds per image of each stage run alone: read, decode, model, write."""
    started = time.perf_counter()
    blobs = [p.read_bytes() for p in paths]  # from the page cache: the photos were just written
    read = time.perf_counter() - started
    started = time.perf_counter()
    decoded = [decode_image_bytes(blob, size=model.spec.input_size) for blob in blobs]
    decode = time.perf_counter() - started
    pixels = np.stack([d.pixels for d in decoded])
    started = time.perf_counter()
    features = model.embed(pixels)
    model_seconds = time.perf_counter() - started
    started = time.perf_counter()
    write_feature_batch(
        feature_batch_path(staging, "split"),
        [p.name for p in paths],
        ["0" * 32] * len(paths),
        [(d.width, d.height) for d in decoded],
        [None] * len(paths),
        features,
    )
    write = time.perf_counter() - started
    per_image = 1000 / len(paths)
    return {
        "read": round(read * per_image, 2),
        "decode": round(decode * per_image, 2),
        "model": round(model_seconds * per_image, 2),
        "write": round(write * per_image, 2),
    }


def rowwise_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def reduced_scale_report(paths: list[Path], model: FeatureModel) -> dict[str, float]:
    """Decode time and feature agreement of reduced-scale against full JPEG decoding.

    Random-weight features share one large common direction, so the plain cosine is close to
    1 for any two photos; the centred cosine (the set's mean vector removed) and the same
    figure between different photos show how much of what tells photos apart survives.
    """
    size = model.spec.input_size
    full, full_seconds = decode_all(paths, size=size)
    reduced, reduced_seconds = decode_all(paths, reduced_scale=True, size=size)
    a, b = model.embed(full).astype(np.float64), model.embed(reduced).astype(np.float64)
    centre = a.mean(axis=0)
    cosine, centred = rowwise_cosine(a, b), rowwise_cosine(a - centre, b - centre)
    other = np.roll(a, 1, axis=0)  # each photo against a different one, both full decodes
    pixel_diff = np.abs(full.astype(np.int16) - reduced.astype(np.int16)).mean()
    return {
        "decode_ms_full": round(full_seconds * 1000, 2),
        "decode_ms_reduced": round(reduced_seconds * 1000, 2),
        "decode_speedup": round(full_seconds / reduced_seconds, 2),
        "cosine_mean": round(float(cosine.mean()), 6),
        "cosine_min": round(float(cosine.min()), 6),
        "centred_cosine_mean": round(float(centred.mean()), 4),
        "centred_cosine_min": round(float(centred.min()), 4),
        "other_photo_cosine_mean": round(float(rowwise_cosine(a, other).mean()), 6),
        "other_photo_centred_cosine_mean": round(
            float(rowwise_cosine(a - centre, other - centre).mean()), 4
        ),
        "mean_abs_pixel_difference": round(float(pixel_diff), 2),
    }


def main(argv: list[str]) -> dict[str, Any]:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="lookalike-bench-extract-"))
    try:
        return run(args, work)
    finally:
        shutil.rmtree(work)


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    width, height = (int(v) for v in args.size.lower().split("x"))
    load_before = os.getloadavg()[0]
    paths = write_photos(work / "photos", args.images, width, height, args.seed)
    megabytes = sum(p.stat().st_size for p in paths) / 1e6
    print(f"{args.images} JPEGs {width}x{height}, {megabytes:.1f} MB, in {work}")
    combinations = [
        (model_spec(key), precision)
        for key in choices(args.model, MODELS)
        for precision in choices(args.precision, PRECISIONS)
    ]
    if len(combinations) > 1:
        return compare(args, work, paths, combinations, load_before)
    spec, precision = combinations[0]
    model = load_feature_model(args.weights, args.batch_size, spec, precision)
    workers = args.workers or default_decode_workers()
    device = "GPU" if model.on_gpu else "CPU"
    print(
        f"{model.model_name} on {device}, {os.cpu_count()} cores, batch {args.batch_size}, "
        f"{workers} decoder threads"
    )
    best = timed_rounds(args, work, paths, model)
    best_e2e, best_timings = best["e2e"], best["timings"]
    best_model, model_cpu, e2e_cpu = best["model"], best["model_cpu"], best["e2e_cpu"]

    old_paths = paths[: args.old_images]
    old_s = one_per_call_seconds(old_paths, args.weights, model)
    split = serial_split(paths[: args.batch_size], model, work / "split")
    reduced = reduced_scale_report(paths[: args.compare_images], model)

    e2e_rate, model_rate = args.images / best_e2e, args.images / best_model
    old_rate = len(old_paths) / old_s
    print(f"\nmodel only   {model_rate:8.2f} images/s  (FeatureModel.embed, pixels in memory)")
    print(f"end to end   {e2e_rate:8.2f} images/s  ratio {e2e_rate / model_rate:.3f} (target 0.9)")
    print(
        f"CPU seconds per image: model only {model_cpu / args.images:.3f}, end to end "
        f"{e2e_cpu / args.images:.3f}, ratio {model_cpu / e2e_cpu:.3f} (insensitive to other load)"
    )
    print(
        f"one per call {old_rate:8.2f} images/s  ({len(old_paths)} images, serial decode + "
        f"batch of 1); end to end is {e2e_rate / old_rate:.2f}x faster"
    )
    pipeline = {
        "seconds": round(best_e2e, 2),
        "decode_cpu": round(best_timings.decode_cpu, 2),
        "model_waited_for_decode": round(best_timings.wait, 2),
        "model": round(best_timings.model, 2),
        "write": round(best_timings.write, 2),
    }
    print(f"end to end split (s): {pipeline}")
    print(f"stages alone (ms per image): {split}")
    print(f"reduced-scale decode: {reduced}")
    if args.weights == "none":
        print("  (random weights: feature agreement is only a weak proxy for trained features)")
    load_after = os.getloadavg()[0]
    print(
        f"load average before/after: {load_before:.2f}/{load_after:.2f} on {os.cpu_count()} cores"
    )
    return {
        "benchmark": "extract",
        "device": device,
        "model": model.model_name,
        "weights": args.weights,
        "images": args.images,
        "image_size": f"{width}x{height}",
        "batch_size": args.batch_size,
        "decode_workers": workers,
        "ratio": round(e2e_rate / model_rate, 3),
        "end_to_end_images_per_s": round(e2e_rate, 2),
        "model_only_images_per_s": round(model_rate, 2),
        "cpu_ratio": round(model_cpu / e2e_cpu, 3),
        "one_per_call_images_per_s": round(old_rate, 2),
        "speedup_vs_one_per_call": round(e2e_rate / old_rate, 2),
        "pipeline_seconds": pipeline,
        "split_ms_per_image": split,
        "reduced_scale": reduced,
        "load_average": [round(load_before, 2), round(load_after, 2)],
    }


def timed_rounds(
    args: argparse.Namespace, work: Path, paths: list[Path], model: FeatureModel
) -> dict[str, Any]:
    """Model only and end to end, alternating for args.rounds rounds; the best of each."""
    pixels, _ = decode_all(paths, size=model.spec.input_size)
    model.embed(pixels[: args.batch_size])  # trace and compile before anything is timed
    best: dict[str, Any] = dict(
        model=float("inf"), e2e=float("inf"), timings=ExtractTimings(),
        model_cpu=float("inf"), e2e_cpu=float("inf"),
    )  # fmt: skip
    tag = model.model_name.replace(" ", "-")
    for round_ in range(args.rounds):
        alone = model_only(model, pixels)
        staging = work / f"staging-{tag}-{round_}"
        whole, timings = end_to_end(paths, args, staging, f"{tag}{round_}", model)
        shutil.rmtree(staging, ignore_errors=True)
        print(
            f"round {round_ + 1}: model only {args.images / alone.wall:7.2f} images/s "
            f"({alone.cpu:6.1f} CPU s), end to end {args.images / whole.wall:7.2f} images/s "
            f"({whole.cpu:6.1f} CPU s), load average {os.getloadavg()[0]:.2f}",
            flush=True,
        )
        best["model"] = min(best["model"], alone.wall)
        best["model_cpu"] = min(best["model_cpu"], alone.cpu)
        best["e2e_cpu"] = min(best["e2e_cpu"], whole.cpu)
        if whole.wall < best["e2e"]:
            best["e2e"], best["timings"] = whole.wall, timings
    return best


def compare(
    args: argparse.Namespace,
    work: Path,
    paths: list[Path],
    combinations: list[tuple[ModelSpec, str]],
    load_before: float,
) -> dict[str, Any]:
    """End to end and model only for each model and precision, one table row each."""
    rows = []
    for spec, precision in combinations:
        model = load_feature_model(args.weights, args.batch_size, spec, precision)
        print(f"{model.model_name}:", flush=True)
        best = timed_rounds(args, work, paths, model)
        rows.append(
            {
                "model": feature_model_name(spec, precision),
                "dim": spec.feature_dim,
                "input": spec.input_size,
                "end_to_end_images_per_s": round(args.images / best["e2e"], 2),
                "model_only_images_per_s": round(args.images / best["model"], 2),
                "ratio": round(best["model"] / best["e2e"], 3),
            }
        )
        load_feature_model.cache_clear()  # one model in memory at a time
    print(f"\n{'model':<28} {'dim':>5} {'input':>5} {'end to end':>11} {'model only':>11} ratio")
    for row in rows:
        print(
            f"{row['model']:<28} {row['dim']:>5} {row['input']:>5} "
            f"{row['end_to_end_images_per_s']:>11.2f} {row['model_only_images_per_s']:>11.2f} "
            f"{row['ratio']:.3f}"
        )
    print(f"images/s; {args.weights} weights, batch {args.batch_size}, {os.cpu_count()} cores")
    return {
        "benchmark": "extract",
        "weights": args.weights,
        "images": args.images,
        "batch_size": args.batch_size,
        "ratio": min(row["ratio"] for row in rows),
        "models": rows,
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])))
