"""Image files on disk: safe resolution under the collection root, media types, thumbnails."""

from __future__ import annotations

import logging
import os
import re
import tempfile
from pathlib import Path

from PIL import Image, ImageOps

from lookalike.api.errors import ImageNotFoundError, PathOutsideRootError, UnreadableImageError
from lookalike.tasks.image_files import read_head, sniff_image_type

log = logging.getLogger(__name__)

THUMBNAIL_SIZES = (64, 128, 256, 512, 1024)

# The formats a browser shows, by tasks.image_files.sniff_image_type's names; anything else is
# served as octet-stream so a stored file can never be interpreted as HTML or SVG by the browser.
_MEDIA_TYPES = {
    "jpeg": "image/jpeg",
    "png": "image/png",
    "webp": "image/webp",
    "gif": "image/gif",
    "bmp": "image/bmp",
    "tiff": "image/tiff",
}
OCTET_STREAM = "application/octet-stream"
_MISSING = "the image file is missing from the collection folder"


def sniff_media_type(head: bytes) -> str:
    """The media type told by the first bytes of a file; application/octet-stream if unknown."""
    return _MEDIA_TYPES.get(sniff_image_type(head) or "", OCTET_STREAM)


def resolve_image_path(root: Path, file_name: str) -> Path:
    """The real path of a stored file name, refused if it leaves the root or is not a file."""
    real_root = root.resolve()
    if "\x00" in file_name:
        raise ImageNotFoundError("the stored path of this image is not a valid file name")
    if Path(file_name).is_absolute():
        raise PathOutsideRootError("the stored path of this image is outside the collection")
    try:
        candidate = (real_root / file_name).resolve()  # follows symlinks and "..", then we check
    except (RuntimeError, OSError):  # a symlink loop (RuntimeError before Python 3.13)
        raise ImageNotFoundError(_MISSING) from None
    if not candidate.is_relative_to(real_root):
        raise PathOutsideRootError("the stored path of this image is outside the collection")
    if not _is_file(candidate):
        raise ImageNotFoundError(_MISSING)
    return candidate


def _is_file(path: Path) -> bool:
    """True for a regular file (after symlinks); False also when the system refuses the name."""
    try:
        return path.is_file()
    except OSError:  # e.g. a component longer than the file system allows
        return False


def read_media_type(path: Path) -> str:
    """Sniff the media type of a file from its content (a FIFO swapped in is never waited on)."""
    return sniff_media_type(read_head(path))


def thumbnail_path(cache_dir: Path, image_id: int, content_hash: str, size: int) -> Path:
    """The cache file of one thumbnail; a changed image has a new hash, hence a new file."""
    safe_hash = re.sub(r"[^0-9A-Za-z]", "", content_hash)[:64] or "nohash"
    return cache_dir / f"{image_id}-{safe_hash}-{size}.jpg"


def ensure_thumbnail(source: Path, destination: Path, size: int, max_pixels: int) -> Path:
    """Write the JPEG thumbnail of source to destination unless it is already there."""
    if destination.is_file():
        return destination
    destination.parent.mkdir(parents=True, exist_ok=True)
    image = open_image_for_thumbnail(source, size, max_pixels)
    # Write beside the target and rename: concurrent requests never see a half-written file.
    handle, temporary = tempfile.mkstemp(dir=destination.parent, suffix=".part")
    try:
        with os.fdopen(handle, "wb") as out:
            image.save(out, format="JPEG", quality=85, optimize=True)
        os.replace(temporary, destination)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return destination


def fitted_size(width: int, height: int, size: int) -> tuple[int, int]:
    """The size of a width x height image shrunk to fit size x size, aspect kept."""
    scale = min(1.0, size / max(width, height, 1))
    return max(1, round(width * scale)), max(1, round(height * scale))


def open_image_for_thumbnail(source: Path, size: int, max_pixels: int) -> Image.Image:
    """Decode source shrunk to fit size x size, upright, in RGB; UnreadableImageError if not."""
    try:
        with Image.open(source) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise UnreadableImageError(
                    f"image has {width * height} pixels, more than the limit of {max_pixels}"
                )
            # JPEG: decode at the smallest of 1/2, 1/4, 1/8 scale still covering the thumbnail
            # (a 24-megapixel photo: 37 ms for 256 px instead of 800 ms in full).
            image.draft("RGB", fitted_size(width, height, size))
            upright = ImageOps.exif_transpose(image) or image
            thumbnail = upright.convert("RGB")
            thumbnail.thumbnail((size, size), Image.Resampling.LANCZOS)
            return thumbnail
    except UnreadableImageError:
        raise
    except Exception as exc:  # Pillow raises many types for broken files; all mean "unreadable"
        log.info("cannot make a thumbnail of %s: %s", source, exc)
        raise UnreadableImageError(f"cannot decode the image file: {exc}") from None
