"""Test helpers that write tiny images: odd-but-valid files, broken files and natural photos."""

from __future__ import annotations

import io
import random
import struct
import zlib
from collections.abc import Callable
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image

# Colours the odd images are drawn with, so tests can assert exact decoded pixels.
RED = (255, 0, 0)
BLUE = (0, 0, 255)
WHITE = (255, 255, 255)
OPAQUE_COLOUR = (200, 30, 40)  # rgba.png left third, fully opaque
PALETTE_COLOUR = (10, 20, 200)  # palette_transparent.png right half
TINY_COLOUR = (12, 34, 56)  # tiny_1x1.png
GREY_LEVEL = 100  # gray.jpg
GRAY16_LEVELS = (4096, 60000)  # gray16.png left/right half; 8-bit: 16 and 233
BOMB_SIZE = (40000, 40000)  # bomb.png header

_PLAIN_SIZE = (48, 32)

# Names a user's camera, script or colleague may produce; every one must survive unchanged.
HOSTILE_NAMES = (
    "with space.jpg",
    "  leading spaces.jpg",
    "trailing space.jpg ",
    "trailing space.jpg",  # a different file from the one above (MariaDB: a NO PAD collation)
    "case.jpg",
    "CASE.jpg",  # and a different one from this
    "it's.jpg",
    'say "cheese".jpg',
    "back\\slash.jpg",
    "new\nline.jpg",
    "tab\there.jpg",
    "carriage\rreturn.jpg",
    "x'; DROP TABLE image_names; --.jpg",
    "1' OR '1'='1.jpg",
    "100%_off.jpg",
    "semi;colon`tick`$(id).jpg",
    "-starts-with-dash.jpg",
    ".hidden.jpg",
    "..double-dot.jpg",
    "ünïcödé ñame.jpg",
    "日本語の写真.jpg",
    "emoji 😀📷.jpg",
    "UPPER.JPEG",
    "no_suffix_jpeg",  # found by its magic bytes
)


def write_odd_images(folder: Path) -> dict[str, str]:
    """Write every odd case into folder; return {relative POSIX name: "ok" | "failed"}.

    "failed" files must be refused by the decoder with an ImageDecodeError; truncated.jpg is
    one of them (tasks/decode.py refuses truncated data rather than padding it).
    """
    folder.mkdir(parents=True, exist_ok=True)
    expected: dict[str, str] = {}
    for name, (write, outcome) in _ODD_CASES.items():
        (folder / name).write_bytes(write())
        expected[name] = outcome
    return expected


def write_photos(
    folder: Path, count: int, *, seed: int = 0, size: tuple[int, int] = (160, 120)
) -> list[Path]:
    """Write count distinct natural-looking JPEGs (crops, flips and colour shifts of photos)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sources = _sample_photos()
    paths = []
    for index in range(count):
        photo = sources[int(rng.integers(len(sources)))]
        path = folder / f"photo_{seed:03d}_{index:05d}.jpg"
        _vary_photo(photo, rng, size).save(path, "JPEG", quality=88)
        paths.append(path)
    return paths


def small_jpeg(colour: tuple[int, int, int] = (200, 30, 40)) -> bytes:
    """A 24x16 JPEG of one colour."""
    return _encode(Image.new("RGB", (24, 16), colour), "JPEG", quality=90)


@cache
def _sample_photos() -> tuple[Image.Image, ...]:
    """scikit-image's bundled sample photographs (no download needed)."""
    from skimage import data

    loaders = [
        data.astronaut, data.coffee, data.chelsea, data.rocket,
        data.hubble_deep_field, data.immunohistochemistry,
    ]  # fmt: skip
    return tuple(Image.fromarray(load()).convert("RGB") for load in loaders)


def _vary_photo(photo: Image.Image, rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """A random crop of 35-90% of the photo, maybe mirrored, with a mild colour cast."""
    width, height = photo.size
    scale = rng.uniform(0.35, 0.9)
    crop_w, crop_h = int(width * scale), int(height * scale)
    left = int(rng.integers(0, width - crop_w + 1))
    top = int(rng.integers(0, height - crop_h + 1))
    image = photo.crop((left, top, left + crop_w, top + crop_h))
    image = image.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    gains = rng.uniform(0.8, 1.2, size=3).astype(np.float32)
    shifted = np.asarray(image, dtype=np.float32) * gains
    return Image.fromarray(np.clip(shifted, 0, 255).astype(np.uint8))


def _encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _halves(left: tuple[int, ...], right: tuple[int, ...], mode: str = "RGB") -> Image.Image:
    """A small image, left half one colour and right half another."""
    image = Image.new(mode, _PLAIN_SIZE, left)
    image.paste(right, (_PLAIN_SIZE[0] // 2, 0, *_PLAIN_SIZE))
    return image


def _jpeg(**options: object) -> bytes:
    return _encode(_halves(RED, BLUE), "JPEG", quality=95, **options)


def _png_named_jpg() -> bytes:
    return _encode(_halves(RED, BLUE), "PNG")


def _cmyk_jpg() -> bytes:
    # Cyan | red. Pillow writes Adobe-style inverted CMYK, as Photoshop does.
    return _encode(_halves((255, 0, 0, 0), (0, 255, 255, 0), "CMYK"), "JPEG", quality=95)


def _gray_jpg() -> bytes:
    return _encode(Image.new("L", _PLAIN_SIZE, GREY_LEVEL), "JPEG", quality=95)


def _gray16_png() -> bytes:
    levels = np.full((_PLAIN_SIZE[1], _PLAIN_SIZE[0]), GRAY16_LEVELS[0], dtype=np.uint16)
    levels[:, _PLAIN_SIZE[0] // 2 :] = GRAY16_LEVELS[1]
    return _encode(Image.fromarray(levels), "PNG")  # mode I;16, written as 16-bit grey


def _rgba_png() -> bytes:
    """Thirds: opaque OPAQUE_COLOUR | fully transparent blue | half-transparent black."""
    image = Image.new("RGBA", (60, 20), (*OPAQUE_COLOUR, 255))
    image.paste((0, 0, 255, 0), (20, 0, 40, 20))
    image.paste((0, 0, 0, 128), (40, 0, 60, 20))
    return _encode(image, "PNG")


def _palette_transparent_png() -> bytes:
    """Left half palette index 0 (green, transparent), right half index 1 (PALETTE_COLOUR)."""
    image = _halves((0,), (1,), "P")
    image.putpalette([0, 255, 0, *PALETTE_COLOUR])
    return _encode(image, "PNG", transparency=0)


def _animated_gif() -> bytes:
    frames = [Image.new("RGB", _PLAIN_SIZE, colour) for colour in (RED, (0, 255, 0), BLUE)]
    return _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)


def _exif_rotated_jpg() -> bytes:
    """Stored 80x40, red left half and blue right half; orientation 6 shows it 40x80."""
    image = Image.new("RGB", (80, 40), RED)
    image.paste(BLUE, (40, 0, 80, 40))
    exif = Image.Exif()
    exif[0x0112] = 6
    return _encode(image, "JPEG", quality=95, exif=exif)


def _multipage_tiff() -> bytes:
    first, second = Image.new("RGB", _PLAIN_SIZE, RED), Image.new("RGB", _PLAIN_SIZE, BLUE)
    return _encode(first, "TIFF", save_all=True, append_images=[second])


def _extreme_png() -> bytes:
    """1 pixel wide, 3000 tall, a black-to-white ramp from top to bottom."""
    ramp = (np.arange(3000) * 255 // 2999).astype(np.uint8).reshape(3000, 1)
    return _encode(Image.fromarray(ramp).convert("RGB"), "PNG")


def _truncated_jpg() -> bytes:
    photo = np.random.default_rng(7).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    data = _encode(Image.fromarray(photo), "JPEG", quality=90)
    return data[: len(data) * 6 // 10]  # headers intact, scan data cut off


def bomb_png(width: int = BOMB_SIZE[0], height: int = BOMB_SIZE[1]) -> bytes:
    """A tiny PNG whose header claims width x height RGB pixels."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\x00" * (1 + 3 * min(width, 1024)))  # first row only
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )


def _fake_heic() -> bytes:
    """An ISO-BMFF ftyp box with the HEIC brand, followed by junk."""
    ftyp = struct.pack(">I", 24) + b"ftypheic" + b"\x00\x00\x00\x00" + b"mif1heic"
    return ftyp + random.Random(3).randbytes(512)


_ODD_CASES: dict[str, tuple[Callable[[], bytes], str]] = {
    "png_named.jpg": (_png_named_jpg, "ok"),
    "jpeg_named.png": (_jpeg, "ok"),
    "cmyk.jpg": (_cmyk_jpg, "ok"),
    "gray.jpg": (_gray_jpg, "ok"),
    "gray16.png": (_gray16_png, "ok"),
    "rgba.png": (_rgba_png, "ok"),
    "palette_transparent.png": (_palette_transparent_png, "ok"),
    "animated.gif": (_animated_gif, "ok"),
    "exif_rotated.jpg": (_exif_rotated_jpg, "ok"),
    "progressive.jpg": (lambda: _jpeg(progressive=True), "ok"),
    "image.webp": (lambda: _encode(_halves(RED, BLUE), "WEBP", lossless=True), "ok"),
    "image.bmp": (lambda: _encode(_halves(RED, BLUE), "BMP"), "ok"),
    "image.tiff": (lambda: _encode(_halves(RED, BLUE), "TIFF"), "ok"),
    "multipage.tiff": (_multipage_tiff, "ok"),
    "tiny_1x1.png": (lambda: _encode(Image.new("RGB", (1, 1), TINY_COLOUR), "PNG"), "ok"),
    "extreme_1x3000.png": (_extreme_png, "ok"),
    "empty.jpg": (lambda: b"", "failed"),
    "random.jpg": (lambda: random.Random(1).randbytes(2048), "failed"),
    "truncated.jpg": (_truncated_jpg, "failed"),
    "bomb.png": (bomb_png, "failed"),
    "fake.heic": (_fake_heic, "failed"),
}
