"""Tests for tasks.image_files: magic-byte sniffing and opening only regular files."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from lookalike.tasks.image_files import (
    HEAD_BYTES,
    NotARegularFileError,
    open_regular_file,
    read_head,
    sniff_image_type,
)
from tests.test_discover import within


def encode(fmt: str, **options: object) -> bytes:
    """A 4x4 image in this format."""
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (200, 30, 40)).save(buffer, fmt, **options)
    return buffer.getvalue()


def open_descriptors() -> int:
    """How many file descriptors this process has open."""
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize(
    ("fmt", "options", "kind"),
    [
        ("JPEG", {}, "jpeg"),
        ("PNG", {}, "png"),
        ("WEBP", {}, "webp"),
        ("GIF", {}, "gif"),
        ("BMP", {}, "bmp"),
        ("TIFF", {}, "tiff"),
        ("TIFF", {"big_tiff": True}, "tiff"),
    ],
)
def test_sniff_image_type_reads_each_magic(fmt: str, options: dict[str, object], kind: str) -> None:
    assert sniff_image_type(encode(fmt, **options)[:HEAD_BYTES]) == kind


@pytest.mark.parametrize(
    "head",
    [b"", b"\xff\xd8", b"hello world12345", b"\x00\x00\x00\x18ftypheic", b"RIFF\0\0\0\0WAVE"],
)
def test_sniff_image_type_rejects_other_content(head: bytes) -> None:
    assert sniff_image_type(head) is None


def test_read_head_gives_the_first_bytes_of_a_regular_file(tmp_path: Path) -> None:
    png = tmp_path / "named.jpg"  # the content decides, never the suffix
    png.write_bytes(encode("PNG"))
    assert read_head(png) == png.read_bytes()[:HEAD_BYTES]
    assert sniff_image_type(read_head(png)) == "png"
    (tmp_path / "short").write_bytes(b"BM")
    assert read_head(tmp_path / "short") == b"BM"


def test_a_fifo_is_refused_without_blocking_and_without_a_leak(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    before = open_descriptors()
    with pytest.raises(NotARegularFileError, match="not a regular file"):
        within(10, lambda: open_regular_file(fifo))
    with pytest.raises(NotARegularFileError):
        within(10, lambda: read_head(fifo))
    assert open_descriptors() == before


def test_a_device_and_a_folder_are_refused(tmp_path: Path) -> None:
    with pytest.raises(NotARegularFileError):
        open_regular_file("/dev/zero")  # a read would never end
    with pytest.raises(IsADirectoryError):
        open_regular_file(tmp_path)
    with pytest.raises(FileNotFoundError):
        open_regular_file(tmp_path / "missing.jpg")


def test_a_regular_file_reads_to_its_end_in_blocking_mode(tmp_path: Path) -> None:
    path = tmp_path / "data.bin"
    path.write_bytes(bytes(range(256)) * 1000)
    with open_regular_file(path) as handle:
        assert os.get_blocking(handle.fileno())
        assert handle.read() == path.read_bytes()


def test_the_module_imports_neither_prefect_nor_pillow() -> None:
    script = (
        "import sys\n"
        "import lookalike.tasks.image_files\n"
        "print('prefect' in sys.modules, 'PIL' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    assert done.stdout.split() == ["False", "False"]
