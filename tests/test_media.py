"""Tests for api.media, called directly: path-escape defence, media types, thumbnails."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from PIL import Image

from lookalike.api.errors import ImageNotFoundError, PathOutsideRootError, UnreadableImageError
from lookalike.api.media import (
    ensure_thumbnail,
    open_image_for_thumbnail,
    read_media_type,
    resolve_image_path,
    sniff_media_type,
    thumbnail_path,
)
from lookalike.tasks.image_files import NotARegularFileError
from tests.odd_images import bomb_png, small_jpeg
from tests.test_discover import within

OUTSIDE = "the stored path of this image is outside the collection"
MISSING = "the image file is missing from the collection folder"


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, Path]:
    """A collection root with one photo, and a secret file beside the root."""
    root = tmp_path / "images"
    (root / "photos").mkdir(parents=True)
    (root / "photos" / "a.jpg").write_bytes(small_jpeg())
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.jpg").write_bytes(small_jpeg())
    return root, outside


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


# --- resolve_image_path: nothing outside the root is ever served ------------------------------


def test_a_file_under_the_root_resolves_to_its_real_path(tree: tuple[Path, Path]) -> None:
    root, _ = tree
    assert resolve_image_path(root, "photos/a.jpg") == (root / "photos/a.jpg").resolve()
    # ".." that stays inside the root is harmless: the check is on the resolved path.
    assert resolve_image_path(root, "photos/../photos/a.jpg") == (root / "photos/a.jpg").resolve()


@pytest.mark.parametrize(
    "name", ["../outside/secret.jpg", "photos/../../outside/secret.jpg", "..", "../images-x/b.jpg"]
)
def test_dot_dot_out_of_the_root_is_refused(tree: tuple[Path, Path], name: str) -> None:
    root, _ = tree
    sibling = root.parent / "images-x"  # shares the root's name as a prefix: not inside it
    sibling.mkdir()
    (sibling / "b.jpg").write_bytes(small_jpeg())
    with pytest.raises(PathOutsideRootError, match=OUTSIDE):
        resolve_image_path(root, name)


@pytest.mark.parametrize("absolute", ["/etc/passwd", "//etc/passwd", "INSIDE"])
def test_absolute_paths_are_refused_even_inside_the_root(
    tree: tuple[Path, Path], absolute: str
) -> None:
    root, _ = tree
    name = str(root / "photos/a.jpg") if absolute == "INSIDE" else absolute
    with pytest.raises(PathOutsideRootError, match=OUTSIDE):
        resolve_image_path(root, name)


def test_symlinks_out_of_the_root_are_refused(tree: tuple[Path, Path]) -> None:
    root, outside = tree
    (root / "escape.jpg").symlink_to(outside / "secret.jpg")
    (root / "linked-folder").symlink_to(outside, target_is_directory=True)
    (root / "relative.jpg").symlink_to(Path("..") / "outside" / "secret.jpg")
    for name in ("escape.jpg", "linked-folder/secret.jpg", "relative.jpg"):
        with pytest.raises(PathOutsideRootError, match=OUTSIDE):
            resolve_image_path(root, name)


def test_symlinks_inside_the_root_and_a_linked_root_are_followed(
    tree: tuple[Path, Path], tmp_path: Path
) -> None:
    root, _ = tree
    (root / "alias.jpg").symlink_to(root / "photos" / "a.jpg")
    real = (root / "photos" / "a.jpg").resolve()
    assert resolve_image_path(root, "alias.jpg") == real
    linked_root = tmp_path / "root-link"
    linked_root.symlink_to(root, target_is_directory=True)
    assert resolve_image_path(linked_root, "photos/a.jpg") == real


def test_what_is_not_a_file_is_not_found(tree: tuple[Path, Path]) -> None:
    root, _ = tree
    os.mkfifo(root / "pipe.jpg")
    (root / "loop-a").symlink_to(root / "loop-b")
    (root / "loop-b").symlink_to(root / "loop-a")
    (root / "dangling.jpg").symlink_to(root / "gone.jpg")
    for name in ("missing.jpg", "photos", "pipe.jpg", "loop-a", "dangling.jpg", "x" * 5000):
        with pytest.raises(ImageNotFoundError, match=MISSING):
            within(10, lambda name=name: resolve_image_path(root, name))  # type: ignore[misc]
    with pytest.raises(ImageNotFoundError, match="not a valid file name"):
        resolve_image_path(root, "photos/a.jpg\x00.txt")


# --- media types ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "media_type"),
    [
        ("JPEG", "image/jpeg"),
        ("PNG", "image/png"),
        ("WEBP", "image/webp"),
        ("GIF", "image/gif"),
        ("BMP", "image/bmp"),
        ("TIFF", "image/tiff"),
    ],
)
def test_media_types_come_from_the_content(fmt: str, media_type: str, tmp_path: Path) -> None:
    path = tmp_path / "named.txt"  # the suffix says nothing
    path.write_bytes(encode(Image.new("RGB", (4, 4)), fmt))
    assert read_media_type(path) == media_type


@pytest.mark.parametrize(
    "head",
    [b"<!DOCTYPE html><script>", b"<svg xmlns='http://www.w3.org/2000/svg'>", b"", b"\xff\xd8"],
)
def test_what_a_browser_could_run_is_an_octet_stream(head: bytes) -> None:
    assert sniff_media_type(head) == "application/octet-stream"


def test_reading_the_media_type_of_a_fifo_does_not_block(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe.jpg")
    with pytest.raises(NotARegularFileError):
        within(10, lambda: read_media_type(tmp_path / "pipe.jpg"))


# --- thumbnails -------------------------------------------------------------------------------


def test_thumbnail_names_keep_only_safe_characters(tmp_path: Path) -> None:
    assert thumbnail_path(tmp_path, 7, "ab12", 64) == tmp_path / "7-ab12-64.jpg"
    hostile = thumbnail_path(tmp_path, 7, "../../etc/passwd", 64)
    assert hostile == tmp_path / "7-etcpasswd-64.jpg" and hostile.parent == tmp_path
    assert thumbnail_path(tmp_path, 7, "", 64).name == "7-nohash-64.jpg"


def test_a_thumbnail_is_written_once_and_fits_the_size(tmp_path: Path) -> None:
    source = tmp_path / "wide.png"
    source.write_bytes(encode(Image.new("RGB", (400, 100), (10, 200, 30)), "PNG"))
    destination = tmp_path / "cache" / "1-hash-128.jpg"
    assert ensure_thumbnail(source, destination, 128, max_pixels=10**6) == destination
    with Image.open(destination) as written:
        assert (written.format, written.size) == ("JPEG", (128, 32))
    stamp = destination.stat().st_mtime_ns
    source.unlink()  # a cached thumbnail is served without reading the source again
    ensure_thumbnail(source, destination, 128, max_pixels=10**6)
    assert destination.stat().st_mtime_ns == stamp
    assert sorted(p.name for p in destination.parent.iterdir()) == [destination.name]


def test_a_thumbnail_is_upright(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees clockwise to show
    source = tmp_path / "sideways.jpg"
    source.write_bytes(encode(Image.new("RGB", (200, 100)), "JPEG", exif=exif))
    assert open_image_for_thumbnail(source, 64, max_pixels=10**6).size == (32, 64)


def test_bombs_and_broken_files_make_no_thumbnail(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(bomb_png(2000, 1000))  # under Pillow's own limit, over ours
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff not really")
    destination = tmp_path / "cache" / "t.jpg"
    with pytest.raises(UnreadableImageError, match="more than the limit"):
        ensure_thumbnail(bomb, destination, 64, max_pixels=10**6)
    with pytest.raises(UnreadableImageError, match="cannot decode the image file"):
        ensure_thumbnail(broken, destination, 64, max_pixels=10**6)
    assert not destination.exists() and list(destination.parent.iterdir()) == []
