"""Image files as bytes: opened safely and named by their magic numbers.

Shared by the pipeline (discovery, decoding) and the API (served media types), so it must stay
free of Prefect, which the API never imports, and of Pillow.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import BinaryIO

# How many leading bytes sniff_image_type needs (RIFF....WEBP is the longest check, 12 bytes).
HEAD_BYTES = 16

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF


class NotARegularFileError(OSError):
    """The path is a pipe, socket or device: never read, since a read could block for ever."""


def sniff_image_type(head: bytes) -> str | None:
    """Name the decodable image format from a file's first bytes, or None when unknown."""
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "webp"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "gif"
    if head.startswith(b"BM"):
        return "bmp"
    if head.startswith(_TIFF_MAGIC):
        return "tiff"
    return None


def open_regular_file(path: Path | str) -> BinaryIO:
    """The file opened for binary reading; refused at once unless it is a regular file.

    O_NONBLOCK keeps the open itself from hanging on a FIFO (one may be swapped in after the
    folder was walked); reads then block as usual. Raises IsADirectoryError for a folder and
    NotARegularFileError for a pipe, socket or device.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, "is a directory", str(path))
        if not stat.S_ISREG(mode):
            raise NotARegularFileError(errno.EINVAL, "not a regular file", str(path))
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_head(path: Path | str) -> bytes:
    """The first HEAD_BYTES bytes of a regular file, enough for sniff_image_type."""
    with open_regular_file(path) as handle:
        return handle.read(HEAD_BYTES)
