"""Decode image files of any common format into fixed-size RGB arrays for feature extraction."""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import IO

import numpy as np
from PIL import ExifTags, Image, ImageFile

from lookalike.tasks.image_files import (
    HEAD_BYTES,
    NotARegularFileError,
    open_regular_file,
    sniff_image_type,
)

log = logging.getLogger(__name__)

INPUT_SIZE = 299
_DEFAULT_MAX_PIXELS = 100_000_000

# Part of the feature cache key: bump whenever decoding or resizing changes output pixels.
# v1: first frame/page, Pillow mode -> RGB, alpha composited on white, 16-bit scaled by 1/257,
#     LANCZOS squash to size x size (reducing_gap 3), EXIF orientation applied after resizing.
PREPROCESS_VERSION = "pillow-lanczos-squash-v1"

IMAGE_SUFFIXES: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
    # Not decodable (except AVIF where Pillow has it), but listed so that such files are
    # recorded with a clear failure reason instead of being silently skipped by discovery.
    | {".heic", ".heif", ".avif", ".jxl"}
)

_RESAMPLE = Image.Resampling.LANCZOS
# Box-reduce by an integer factor first when shrinking more than 3x: much faster, same quality.
_REDUCING_GAP = 3.0
_WHITE = (255, 255, 255, 255)
# EXIF orientation -> the transpose that shows the image upright (as ImageOps.exif_transpose).
_ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SWAPS_WIDTH_AND_HEIGHT = frozenset({5, 6, 7, 8})
_HEIF_BRANDS = {
    b"heic": "HEIC", b"heix": "HEIC", b"hevc": "HEIC", b"hevx": "HEIC", b"heim": "HEIC",
    b"heis": "HEIC", b"mif1": "HEIF", b"msf1": "HEIF", b"avif": "AVIF", b"avis": "AVIF",
}  # fmt: skip

_ImageOpener = Callable[[IO[bytes]], ImageFile.ImageFile]


class ImageDecodeError(Exception):
    """An image could not be decoded; str(exc) is a short reason stored as image_names.error."""


@dataclass(frozen=True, eq=False)  # eq=False: numpy arrays have no single truth value
class DecodedImage:
    """Pixels ready for the model plus the upright size of the original image."""

    pixels: np.ndarray  # uint8, shape (size, size, 3), RGB
    width: int  # original width after EXIF orientation is applied
    height: int


def decode_image(
    path: Path,
    *,
    size: int = INPUT_SIZE,
    max_pixels: int = _DEFAULT_MAX_PIXELS,
    reduced_scale: bool = False,
) -> DecodedImage:
    """Decode an image file into a size x size RGB array; raise ImageDecodeError on any failure.

    The format is taken from the content, never from the suffix. Truncated files fail with
    "truncated image data" rather than being padded with grey: a half-downloaded photo would
    otherwise produce features that match nothing real. reduced_scale lets libjpeg decode big
    JPEGs at 1/2, 1/4 or 1/8 scale (much faster, slightly different pixels).
    """
    try:
        with open_regular_file(path) as stream:
            return _decode_stream(
                stream, size=size, max_pixels=max_pixels, reduced_scale=reduced_scale
            )
    # Only opening can raise these: _decode_stream turns every later failure into ImageDecodeError.
    except NotARegularFileError as exc:
        raise ImageDecodeError("not a regular file (a pipe, socket or device)") from exc
    except FileNotFoundError as exc:
        raise ImageDecodeError("file disappeared before extraction") from exc
    except IsADirectoryError as exc:
        raise ImageDecodeError("not a file (it is a directory)") from exc
    except PermissionError as exc:
        raise ImageDecodeError("cannot read file: permission denied") from exc
    except OSError as exc:
        raise ImageDecodeError(f"cannot read file: {exc.strerror or exc}") from exc


def decode_image_bytes(
    data: bytes,
    *,
    size: int = INPUT_SIZE,
    max_pixels: int = _DEFAULT_MAX_PIXELS,
    reduced_scale: bool = False,
) -> DecodedImage:
    """Decode an in-memory image (an upload) exactly as decode_image decodes a file."""
    return _decode_stream(
        io.BytesIO(data), size=size, max_pixels=max_pixels, reduced_scale=reduced_scale
    )


def _decode_stream(
    stream: IO[bytes], *, size: int, max_pixels: int, reduced_scale: bool
) -> DecodedImage:
    """Identify, size-check and decode one image stream."""
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    try:
        head = stream.read(HEAD_BYTES)
        stream.seek(0)
    except OSError as exc:
        raise ImageDecodeError(f"cannot read file: {exc.strerror or exc}") from exc
    if not head:
        raise ImageDecodeError("empty file")
    opener = _choose_opener(head)
    try:
        with opener(stream) as image:
            return _decode_opened(
                image, size=size, max_pixels=max_pixels, reduced_scale=reduced_scale
            )
    except (ImageDecodeError, MemoryError):
        raise
    except Exception as exc:  # Pillow raises many types on bad data; all mean "cannot decode".
        log.debug("decoding failed", exc_info=True)
        raise ImageDecodeError(_describe_pillow_error(exc)) from exc


def _choose_opener(head: bytes) -> _ImageOpener:
    """Pick the Pillow plugin from the magic bytes, or explain why the content is unsupported."""
    openers = _pillow_openers()
    kind = sniff_image_type(head) or _sniff_heif_family(head)
    if kind in openers:
        return openers[kind]
    if kind is not None:
        raise ImageDecodeError(f"unsupported format: {kind.upper()}")
    if head.startswith((b"\xff\x0a", b"\x00\x00\x00\x0cJXL ")):
        raise ImageDecodeError("unsupported format: JPEG XL")
    raise ImageDecodeError("not an image (unrecognised content)")


def _sniff_heif_family(head: bytes) -> str | None:
    """Name an ISO-BMFF image (HEIC, HEIF, AVIF) from its ftyp major brand."""
    if head[4:8] != b"ftyp":
        return None
    brand = _HEIF_BRANDS.get(head[8:12])
    return brand.lower() if brand else None


@cache
def _pillow_openers() -> dict[str, _ImageOpener]:
    """Plugin constructors for the formats we accept, keyed like sniff_image_type.

    Calling the plugin directly, instead of Image.open, skips Pillow's process-wide
    MAX_IMAGE_PIXELS check (a warning above ~89 Mpx, an error above ~179 Mpx), so that our
    own max_pixels is the one limit that applies and is reported with the real dimensions.
    It also keeps exotic formats (EPS, which runs Ghostscript) out of reach.
    """
    from PIL import (
        AvifImagePlugin,
        BmpImagePlugin,
        GifImagePlugin,
        JpegImagePlugin,
        PngImagePlugin,
        TiffImagePlugin,
        WebPImagePlugin,
    )

    openers: dict[str, _ImageOpener] = {
        "jpeg": JpegImagePlugin.jpeg_factory,  # returns an MPO image for multi-picture JPEGs
        "png": PngImagePlugin.PngImageFile,
        "gif": GifImagePlugin.GifImageFile,
        "bmp": BmpImagePlugin.BmpImageFile,
        "tiff": TiffImagePlugin.TiffImageFile,
    }
    if WebPImagePlugin.SUPPORTED:
        openers["webp"] = WebPImagePlugin.WebPImageFile
    if AvifImagePlugin.SUPPORTED:
        openers["avif"] = AvifImagePlugin.AvifImageFile
    return openers


def _decode_opened(
    image: ImageFile.ImageFile, *, size: int, max_pixels: int, reduced_scale: bool
) -> DecodedImage:
    """Turn an opened (header-only) image into the model's input array."""
    stored_width, stored_height = image.size
    _refuse_oversized(stored_width, stored_height, max_pixels)
    orientation = _read_orientation(image)
    if reduced_scale and image.format in ("JPEG", "MPO"):
        # libjpeg picks the largest 1/2, 1/4 or 1/8 scale that still covers size x size.
        image.draft(None, (size, size))
    square = _apply_orientation(_squash_to_rgb(image, size), orientation)
    if orientation in _SWAPS_WIDTH_AND_HEIGHT:
        stored_width, stored_height = stored_height, stored_width
    return DecodedImage(np.array(square, dtype=np.uint8), stored_width, stored_height)


def _refuse_oversized(width: int, height: int, max_pixels: int) -> None:
    """Raise before any pixel is decoded when the header announces too many pixels."""
    if width < 1 or height < 1:
        raise ImageDecodeError(f"invalid image dimensions: {width}x{height}")
    if width * height > max_pixels:
        raise ImageDecodeError(
            f"image too large: {width}x{height} pixels exceeds the limit of {max_pixels}"
        )


def _read_orientation(image: Image.Image) -> int:
    """EXIF (or XMP) orientation 1..8; a damaged EXIF block must not cost us the picture."""
    try:
        value = image.getexif().get(ExifTags.Base.Orientation, 1)
    except (SyntaxError, ValueError, TypeError, KeyError, IndexError, OSError) as exc:
        log.debug("ignoring unreadable EXIF orientation: %s", exc)
        return 1
    return value if isinstance(value, int) and value in _ORIENTATION_TRANSPOSE else 1


def _apply_orientation(square: Image.Image, orientation: int) -> Image.Image:
    """Rotate/flip the resized square upright; cheaper than transposing the full-size image.

    Squashing to a square and then transposing gives the same picture as the other way round,
    because scaling along x and y are independent.
    """
    method = _ORIENTATION_TRANSPOSE.get(orientation)
    return square.transpose(method) if method is not None else square


def _squash_to_rgb(image: Image.Image, size: int) -> Image.Image:
    """Resize any Pillow mode to size x size RGB, compositing transparency onto white."""
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        return _squash_high_depth(image, size)
    if image.mode not in ("RGB", "L", "RGBA", "LA") or image.has_transparency_data:
        # Palette, CMYK, YCbCr, bilevel...; RGB/L with a tRNS colour key also lands here.
        image = image.convert("RGBA" if image.has_transparency_data else "RGB")
    # Resizing before compositing is exact (both are linear) and touches far fewer pixels;
    # Pillow resizes RGBA/LA with premultiplied alpha so transparent colours do not bleed.
    square = image.resize((size, size), _RESAMPLE, reducing_gap=_REDUCING_GAP)
    if square.mode in ("RGBA", "LA"):
        rgba = square.convert("RGBA")
        square = Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE), rgba)
    return square.convert("RGB")


def _squash_high_depth(image: Image.Image, size: int) -> Image.Image:
    """Resize a 16/32-bit or float grey image and scale it to 8 bits (Pillow would clip)."""
    high = image.getextrema()[1]
    if not isinstance(high, int | float):  # these modes have one band, so one (low, high) pair
        raise ImageDecodeError(f"unsupported colour mode: {image.mode}")
    full_scale = _full_scale_value(image.mode, float(high))
    # Resample in 32-bit float so the 16-bit detail survives until the final rounding.
    square = image.convert("F").resize((size, size), _RESAMPLE, reducing_gap=_REDUCING_GAP)
    levels = np.asarray(square, dtype=np.float32) * np.float32(255.0 / full_scale)
    grey = np.clip(np.rint(levels), 0, 255).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")


def _full_scale_value(mode: str, high: float) -> float:
    """The sample value that means full white for a high-depth grey image."""
    if mode.startswith("I;16"):
        return 65535.0
    if mode == "F" and high <= 1.0:
        return 1.0  # float images normalised to [0, 1]
    if high <= 65535.0:
        return 65535.0  # 16-bit data held in a 32-bit mode
    return high  # wider data: stretch so the brightest sample is white


def _describe_pillow_error(exc: Exception) -> str:
    """A short, stable, readable reason for a Pillow failure (details go to the debug log)."""
    message = str(exc).strip()
    if isinstance(exc, Image.DecompressionBombError):
        return "image too large: refused by Pillow's decompression bomb limit"
    if isinstance(exc, EOFError) or "truncated" in message.lower():
        return "truncated image data"
    if not message:
        return f"corrupt image data ({type(exc).__name__})"
    return f"corrupt image data: {message[:120]}"
