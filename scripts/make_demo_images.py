"""Write a license-clean demo set: scikit-image's bundled photographs plus transformed copies."""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

SEED = 20240611
DEFAULT_COUNT = 60
CREDITS_FILE = "CREDITS.txt"

# Only photographs that ship inside the scikit-image wheel (no download) and whose
# docstring in skimage.data states public domain or CC0; "moon", "page" and others
# without a stated licence are left out on purpose.
SOURCES: dict[str, str] = {
    "astronaut": "Eileen Collins, NASA Great Images database; public domain.",
    "brick": "Brick wall, CC0Textures (Bricks25); CC0.",
    "camera": "Photographer with camera, Lav Varshney; CC0.",
    "chelsea": "Chelsea the cat, Stefan van der Walt; CC0.",
    "clock": "Motion-blurred wall clock, Stefan van der Walt; public domain.",
    "coffee": "Coffee cup, Rachel Michetti (Pikolo Espresso Bar); CC0.",
    "grass": "Grass, linolafett on DeviantArt; CC0.",
    "gravel": "Gravel, CC0Textures (Gravel04); CC0.",
    "hubble_deep_field": "Hubble eXtreme Deep Field, NASA; public domain.",
    "retina": "Fundus photograph, Mikael Haggstrom, Wikimedia Commons; CC0.",
    "rocket": "DSCOVR launch on Falcon 9, SpaceX; public domain.",
}

# Variant name -> file suffix.
VARIANTS: dict[str, str] = {
    "flip": ".jpg",
    "crop": ".jpg",
    "rescale": ".jpg",
    "jitter": ".jpg",
    "rotate": ".jpg",
    "quality": ".jpg",
    "copy": ".png",
    "blur": ".jpg",
}
MAX_COUNT = len(SOURCES) * (1 + len(VARIANTS))


class DemoImagesError(RuntimeError):
    """The demo set cannot be written; the message is one line for the user."""


@dataclass(frozen=True)
class DemoImage:
    """One file of the demo set: a source photograph, optionally transformed."""

    source: str
    variant: str | None  # None: the original

    @property
    def relative_path(self) -> str:
        if self.variant is None:
            return f"originals/{self.source}.jpg"
        return f"variants/{self.source}/{self.variant}{VARIANTS[self.variant]}"


def plan_images(count: int) -> list[DemoImage]:
    """The first `count` images: every original, then rounds of one variant per source.

    Round r gives source i the variant kind (i + r) mod len(VARIANTS), so even a small
    count holds near-duplicates of every source and every kind of variant.
    """
    if not 1 <= count <= MAX_COUNT:
        raise DemoImagesError(f"count must be between 1 and {MAX_COUNT}, got {count}")
    kinds = list(VARIANTS)
    plan = [DemoImage(source, None) for source in SOURCES]
    for round_number in range(len(kinds)):
        plan += [
            DemoImage(source, kinds[(index + round_number) % len(kinds)])
            for index, source in enumerate(SOURCES)
        ]
    return plan[:count]


@cache
def load_source(name: str) -> Image.Image:
    """A bundled scikit-image photograph as a Pillow image (grey ones stay mode L)."""
    import skimage.data  # imported here: only this script needs scikit-image

    try:
        pixels = np.asarray(getattr(skimage.data, name)())
    except (OSError, ValueError) as exc:
        raise DemoImagesError(f"scikit-image sample {name!r} cannot be loaded: {exc}") from exc
    return Image.fromarray(pixels.astype(np.uint8))


def variant_rng(image: DemoImage) -> np.random.Generator:
    """A generator seeded by the image's name, so each file is the same whatever the count."""
    return np.random.default_rng([SEED, zlib.crc32(image.relative_path.encode())])


def crop(picture: Image.Image, rng: np.random.Generator) -> Image.Image:
    width, height = picture.size
    crop_w, crop_h = (int(side * rng.uniform(0.6, 0.85)) for side in (width, height))
    left = int(rng.integers(0, width - crop_w + 1))
    top = int(rng.integers(0, height - crop_h + 1))
    return picture.crop((left, top, left + crop_w, top + crop_h))


def rescale(picture: Image.Image, rng: np.random.Generator) -> Image.Image:
    factor = rng.uniform(0.4, 0.7)
    size = (max(1, round(picture.width * factor)), max(1, round(picture.height * factor)))
    return picture.resize(size, Image.Resampling.LANCZOS)


def jitter_colours(picture: Image.Image, rng: np.random.Generator) -> Image.Image:
    picture = ImageEnhance.Brightness(picture).enhance(rng.uniform(0.7, 1.3))
    picture = ImageEnhance.Contrast(picture).enhance(rng.uniform(0.7, 1.3))
    return ImageEnhance.Color(picture).enhance(rng.uniform(0.6, 1.4))


def rotate(picture: Image.Image, rng: np.random.Generator) -> Image.Image:
    angle = rng.uniform(4.0, 12.0) * rng.choice([-1.0, 1.0])
    return picture.rotate(angle, resample=Image.Resampling.BICUBIC)


def blur(picture: Image.Image, rng: np.random.Generator) -> Image.Image:
    return picture.filter(ImageFilter.GaussianBlur(radius=rng.uniform(1.5, 3.0)))


TRANSFORMS: dict[str, Callable[[Image.Image, np.random.Generator], Image.Image]] = {
    "flip": lambda picture, _rng: ImageOps.mirror(picture),
    "crop": crop,
    "rescale": rescale,
    "jitter": jitter_colours,
    "rotate": rotate,
    "quality": lambda picture, _rng: picture,  # same pixels, re-encoded below at low quality
    "copy": lambda picture, _rng: picture,  # same pixels, lossless PNG
    "blur": blur,
}


def render_image(image: DemoImage) -> bytes:
    """The encoded bytes of one demo file; identical on every run with the same Pillow."""
    picture = load_source(image.source)
    if image.variant is not None:
        picture = TRANSFORMS[image.variant](picture, variant_rng(image))
    buffer = io.BytesIO()
    if image.relative_path.endswith(".png"):
        picture.save(buffer, format="PNG")
    else:
        quality = 35 if image.variant == "quality" else 90
        picture.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def write_if_changed(path: Path, data: bytes) -> bool:
    """Write atomically, but only when the bytes differ, so unchanged files keep their mtime."""
    if path.is_file() and path.read_bytes() == data:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return True


def credits_text() -> str:
    """The licence note written beside the images."""
    lines = [
        "lookalike demo images",
        "",
        "Generated by scripts/make_demo_images.py from sample photographs bundled with",
        "scikit-image (skimage.data). Each source below is public domain or CC0, as stated",
        "in the docstring of its skimage.data function. Files under variants/ are crops,",
        "flips, rescaled, rotated, colour-jittered, blurred or re-encoded copies of them.",
        "",
        "Sources (originals/<name>.jpg):",
    ]
    lines += [f"  {name}: {credit}" for name, credit in SOURCES.items()]
    return "\n".join(lines) + "\n"


def remove_unselected(out_dir: Path, selected: Sequence[DemoImage]) -> int:
    """Delete demo files of a larger earlier run that this count leaves out; nothing else."""
    keep = {image.relative_path for image in selected}
    removed = 0
    for image in plan_images(MAX_COUNT):
        path = out_dir / image.relative_path
        if image.relative_path not in keep and path.is_file():
            path.unlink()
            removed += 1
    return removed


def make_demo_images(out_dir: Path, count: int = DEFAULT_COUNT) -> tuple[int, int]:
    """Write the demo set into out_dir; returns (files written, files already up to date)."""
    selected = plan_images(count)
    written = 0
    for image in selected:
        written += write_if_changed(out_dir / image.relative_path, render_image(image))
    write_if_changed(out_dir / CREDITS_FILE, credits_text().encode())
    remove_unselected(out_dir, selected)
    return written, len(selected) - written


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out_dir", type=Path, help="folder to write the images into")
    parser.add_argument(
        "--count",
        type=int,
        default=DEFAULT_COUNT,
        help=f"number of images, 1 to {MAX_COUNT} (default {DEFAULT_COUNT})",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        written, unchanged = make_demo_images(args.out_dir, args.count)
    except (DemoImagesError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{args.out_dir}: {written} images written, {unchanged} already up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
