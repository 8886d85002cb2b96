"""Benchmark duplicate finding against perceptual hashing (imagehash's pHash) on a labelled set.

    .venv/bin/python benchmarks/duplicates.py                    # --weights none (random init)
    .venv/bin/python benchmarks/duplicates.py --weights imagenet # where the weights can load

Builds a labelled set from scikit-image's license-clean photos (scripts/make_demo_images.py
names them): distinct 256x256 crops as originals, each with eight known copies (JPEG quality
25, resized to 60%, cropped 15%, mirrored, rotated 4 degrees, brighter, watermarked,
grayscale), and crops of other places as distractors. lookalike processes the folder (the real
`lookalike process`), and its groups are scored against the families: precision and recall of
the pairs put in one group, F1, and per kind of copy the share found in its original's group;
at the default threshold and at the best one (regrouped from the stored pairs). pHash is
scored on the same pairs at its best Hamming threshold. The last line printed is one JSON
object with f1, phash_f1 and ratio = f1 / phash_f1.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import imagehash
import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for a checkout without install
from lookalike.tasks.database import connect_checked  # noqa: E402
from lookalike.tasks.duplicate_reader import read_group_index  # noqa: E402
from lookalike.tasks.settings import MAX_DUPLICATE_THRESHOLD, Settings  # noqa: E402

PHOTOS = (
    "astronaut",
    "brick",
    "camera",
    "chelsea",
    "clock",
    "coffee",
    "grass",
    "gravel",
    "hubble_deep_field",
    "retina",
    "rocket",
)
TILE = 256
COPIES = ("jpeg", "resize", "crop", "flip", "rotate", "bright", "watermark", "gray")


def make_copy(image: Image.Image, kind: str) -> Image.Image:
    """One known copy of an original."""
    w, h = image.size
    if kind == "resize":
        return image.resize((int(w * 0.6), int(h * 0.6)), Image.Resampling.LANCZOS)
    if kind == "crop":
        return image.crop((int(w * 0.075), int(h * 0.075), int(w * 0.925), int(h * 0.925)))
    if kind == "flip":
        return ImageOps.mirror(image)
    if kind == "rotate":
        return image.rotate(4, resample=Image.Resampling.BILINEAR, expand=False)
    if kind == "bright":
        return ImageEnhance.Brightness(image).enhance(1.3)
    if kind == "watermark":
        marked = image.copy()
        ImageDraw.Draw(marked).text((10, h - 30), "(c) ARCHIVE 2026", fill=(255, 255, 255))
        return marked
    if kind == "gray":
        return ImageOps.grayscale(image).convert("RGB")
    return image  # jpeg: the same pixels, saved at low quality below


def tiles(per_photo: int, offset: int) -> list[tuple[str, Image.Image]]:
    """per_photo crops of each photo, from places starting at offset along a diagonal walk."""
    import skimage.data

    found = []
    for name in PHOTOS:
        pixels = np.asarray(getattr(skimage.data, name)())
        photo = Image.fromarray(pixels).convert("RGB")
        w, h = photo.size
        for index in range(per_photo):
            step = (offset + index) / (2 * per_photo + 1)
            x, y = int((w - TILE) * step), int((h - TILE) * ((step * 3) % 1))
            found.append((f"{name}_{offset + index}", photo.crop((x, y, x + TILE, y + TILE))))
    return found


def build_set(root: Path, per_photo: int) -> dict[str, tuple[str, str]]:
    """Write the labelled set; file name -> (family, kind) (distractors: own family)."""
    labels: dict[str, tuple[str, str]] = {}
    for family, image in tiles(per_photo, 0):
        image.save(root / f"{family}.jpg", quality=92)
        labels[f"{family}.jpg"] = (family, "original")
        for kind in COPIES:
            name = f"{family}_{kind}.jpg"
            make_copy(image, kind).save(root / name, quality=25 if kind == "jpeg" else 90)
            labels[name] = (family, kind)
    for family, image in tiles(per_photo, per_photo):
        image.save(root / f"distractor_{family}.jpg", quality=92)
        labels[f"distractor_{family}.jpg"] = (f"distractor_{family}", "distractor")
    return labels


def true_pairs(labels: dict[str, tuple[str, str]]) -> set[frozenset[str]]:
    return {
        frozenset((a, b))
        for a, b in itertools.combinations(sorted(labels), 2)
        if labels[a][0] == labels[b][0]
    }


def score(found: set[frozenset[str]], truth: set[frozenset[str]]) -> dict[str, float]:
    hits = len(found & truth)
    precision = hits / len(found) if found else 1.0
    recall = hits / len(truth) if truth else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": round(precision, 3), "recall": round(recall, 3), "f1": round(f1, 3)}


def per_kind_recall(found: set[frozenset[str]], labels: dict[str, tuple[str, str]]) -> dict:
    """Per kind of copy: the share found together with its original."""
    recall = {}
    for kind in COPIES:
        copies = [n for n, (_, k) in labels.items() if k == kind]
        together = sum(frozenset((n, f"{labels[n][0]}.jpg")) in found for n in copies)
        recall[kind] = round(together / len(copies), 3)
    return recall


def lookalike_pairs(url: str, names: dict[int, str], threshold: float) -> set[frozenset[str]]:
    """Pairs of images put in one group at this threshold."""
    engine = connect_checked(url)
    index = read_group_index(engine, threshold)
    engine.dispose()
    return {
        frozenset((names[a], names[b]))
        for members in index.rows.values()
        for (a, _, _), (b, _, _) in itertools.combinations(members, 2)
    }


def chained_pairs(url: str, names: dict[int, str], threshold: float) -> set[frozenset[str]]:
    """Pairs put together by single linkage instead: every connected component of the stored
    pairs within the threshold (what the representative rule guards against)."""
    from sqlalchemy import select

    from lookalike.sql.schema import duplicate_pairs, duplicate_state

    engine = connect_checked(url)
    with engine.connect() as conn:
        scale = conn.execute(select(duplicate_state.c.scale)).scalar_one()
        rows = conn.execute(
            select(duplicate_pairs.c.image_id, duplicate_pairs.c.other_id).where(
                duplicate_pairs.c.distance <= threshold * scale
            )
        ).all()
    engine.dispose()
    parent: dict[int, int] = {}

    def root_of(node: int) -> int:
        while parent.setdefault(node, node) != node:
            node = parent[node]
        return node

    for a, b in rows:
        parent[root_of(a)] = root_of(b)
    components: dict[int, list[int]] = {}
    for node in parent:
        components.setdefault(root_of(node), []).append(node)
    return {
        frozenset((names[a], names[b]))
        for members in components.values()
        for a, b in itertools.combinations(members, 2)
    }


def phash_pairs(root: Path, labels: dict, bits: int) -> set[frozenset[str]]:
    hashes = {n: imagehash.phash(Image.open(root / n)) for n in labels}
    return {
        frozenset((a, b))
        for a, b in itertools.combinations(sorted(hashes), 2)
        if hashes[a] - hashes[b] <= bits
    }


def run_lookalike(root: Path, url: str, args: argparse.Namespace) -> float:
    """`lookalike process` on the set; seconds."""
    start = time.perf_counter()
    command = [
        sys.executable,
        "-m",
        "lookalike.flows.cli",
        "process",
        str(root),
        "--db",
        url,
        "--weights",
        args.weights,
        "--k",
        "100",
        "--json",
    ]
    env = {**os.environ, "LOOKALIKE_DATA_DIR": str(root.parent / "data")}
    subprocess.run(command, check=True, capture_output=True, text=True, env=env)
    return time.perf_counter() - start


def file_names(url: str) -> dict[int, str]:
    from sqlalchemy import select

    from lookalike.sql.schema import image_names

    engine = connect_checked(url)
    with engine.connect() as conn:
        names = dict(conn.execute(select(image_names.c.id, image_names.c.file_name)).all())
    engine.dispose()
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default="none", help="none | imagenet | a weights file")
    parser.add_argument("--per-photo", type=int, default=3, help="originals per source photo")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lookalike-dupbench-"))
    root = work / "images"
    root.mkdir()
    labels = build_set(root, args.per_photo)
    truth = true_pairs(labels)
    print(
        f"{len(labels)} images: {len(truth)} true pairs; weights {args.weights}"
        + (" (random init: similarities are not meaningful)" if args.weights == "none" else "")
    )
    url = f"sqlite:///{work / 'bench.sqlite'}"
    seconds = run_lookalike(root, url, args)
    names = file_names(url)
    default = Settings().duplicate_threshold
    found = lookalike_pairs(url, names, default)
    ours = score(found, truth)
    sweep = {
        t: score(lookalike_pairs(url, names, t), truth)
        for t in np.round(np.linspace(0.01, MAX_DUPLICATE_THRESHOLD, 25), 4).tolist()
    }
    best_t = max(sweep, key=lambda t: sweep[t]["f1"])
    start = time.perf_counter()
    phash = {b: score(phash_pairs(root, labels, b), truth) for b in range(0, 33, 2)}
    phash_seconds = (time.perf_counter() - start) / len(phash)
    best_bits = max(phash, key=lambda b: phash[b]["f1"])
    best_phash = phash_pairs(root, labels, best_bits)
    print(f"lookalike, default threshold {default}: {ours}  ({seconds:.1f} s end to end)")
    print(f"lookalike, best threshold {best_t}: {sweep[best_t]}")
    chained = {t: score(chained_pairs(url, names, t), truth) for t in (default, best_t)}
    for t, figures in chained.items():
        print(f"  single linkage instead of the representative rule, threshold {t}: {figures}")
    print(f"pHash, best Hamming distance {best_bits}: {phash[best_bits]}  ({phash_seconds:.1f} s)")
    print("recall per kind of copy:")
    ours_kind = per_kind_recall(found, labels)
    phash_kind = per_kind_recall(best_phash, labels)
    for kind in COPIES:
        print(f"  {kind:<10} lookalike {ours_kind[kind]:5.2f}   pHash {phash_kind[kind]:5.2f}")
    f1, phash_f1 = ours["f1"], phash[best_bits]["f1"]
    print(
        json.dumps(
            {
                "benchmark": "duplicates",
                "weights": args.weights,
                "images": len(labels),
                "f1": f1,
                "precision": ours["precision"],
                "recall": ours["recall"],
                "best_threshold": best_t,
                "best_f1": sweep[best_t]["f1"],
                "single_linkage": {str(t): f for t, f in chained.items()},
                "phash_f1": phash_f1,
                "phash_bits": best_bits,
                "ratio": round(f1 / phash_f1, 3) if phash_f1 else None,
                "per_transform_recall": ours_kind,
                "phash_per_transform_recall": phash_kind,
                "seconds": round(seconds, 1),
                "phash_seconds": round(phash_seconds, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
