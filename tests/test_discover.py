"""Tests for tasks.discover: a safe recursive walk, image sniffing, hashing and change detection."""

from __future__ import annotations

import hashlib
import io
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
from PIL import Image

from lookalike.tasks.discover import (
    Changes,
    DiscoveryError,
    KnownImage,
    check_root,
    find_changes,
    hash_file,
    looks_like_image,
    walk_files,
)

T = TypeVar("T")
RUNS_AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def jpeg_bytes(colour: tuple[int, int, int] = (200, 30, 40)) -> bytes:
    """A tiny valid JPEG."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 6), colour).save(buffer, "JPEG")
    return buffer.getvalue()


def write(path: Path, data: bytes) -> Path:
    """Write bytes, creating parent folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def within(seconds: float, call: Callable[[], T]) -> T:
    """call() in a daemon thread; fail the test instead of hanging when it blocks."""
    outcome: dict[str, object] = {}

    def target() -> None:
        try:
            outcome["value"] = call()
        except BaseException as exc:  # handed to the test thread below
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds}s (blocked on a FIFO?)"
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]  # type: ignore[return-value]


def names(root: Path) -> list[str]:
    """The relative names walk_files yields, in the order it yields them, within 10 s."""
    return within(10, lambda: [found.file_name for found in walk_files(root)])


def known_from(root: Path, name: str, image_id: int) -> KnownImage:
    """What the database would remember of root/name right now."""
    st = (root / name).stat()
    return KnownImage(image_id, st.st_size, st.st_mtime_ns, hash_file(root / name))


# --- walk_files -------------------------------------------------------------------------------


def test_walk_lists_nested_files_with_relative_posix_names(tmp_path: Path) -> None:
    write(tmp_path / "top.jpg", b"1")
    write(tmp_path / "a" / "same.jpg", b"2")
    write(tmp_path / "b" / "same.jpg", b"3")
    write(tmp_path / "b" / "deep" / "er" / "x.png", b"4")

    found = {f.file_name: f for f in within(10, lambda: list(walk_files(tmp_path)))}

    assert sorted(found) == ["a/same.jpg", "b/deep/er/x.png", "b/same.jpg", "top.jpg"]
    assert found["b/same.jpg"].size == 1
    assert found["b/same.jpg"].mtime_ns == (tmp_path / "b" / "same.jpg").stat().st_mtime_ns


def test_walk_of_empty_folder_yields_nothing(tmp_path: Path) -> None:
    (tmp_path / "empty" / "nested").mkdir(parents=True)
    assert names(tmp_path) == []


def test_fifo_is_never_opened(tmp_path: Path) -> None:
    write(tmp_path / "real.jpg", b"x")
    os.mkfifo(tmp_path / "pipe.jpg")  # an image suffix: a naive walker would hash it
    os.mkfifo(tmp_path / "pipe")  # no suffix: a naive walker would sniff it

    assert names(tmp_path) == ["real.jpg"]
    changes = within(10, lambda: find_changes(tmp_path, {}))
    assert [f.file_name for f in changes.new] == ["real.jpg"]
    assert changes.unreadable == {}


def test_hash_refuses_a_fifo_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    with pytest.raises(OSError, match="not a regular file"):
        within(10, lambda: hash_file(fifo))
    os.mkfifo(tmp_path / "pipe")
    assert within(10, lambda: looks_like_image(tmp_path / "pipe")) is False


def test_socket_is_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path / "real.jpg", b"x")
    monkeypatch.chdir(tmp_path)  # a relative bind keeps the path under the 108-byte limit
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind("sock.jpg")
        assert (tmp_path / "sock.jpg").is_socket()
        assert names(tmp_path) == ["real.jpg"]


def test_symlink_to_file_outside_root_is_skipped(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    write(root / "in.jpg", b"in")
    write(outside / "secret.jpg", b"out")
    (root / "leak.jpg").symlink_to(outside / "secret.jpg")
    (root / "leak_relative.jpg").symlink_to(Path("..") / "outside" / "secret.jpg")

    assert names(root) == ["in.jpg"]


def test_symlink_to_folder_outside_root_is_not_followed(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    write(root / "in.jpg", b"in")
    write(outside / "a.jpg", b"a")
    write(outside / "sub" / "b.jpg", b"b")
    (root / "elsewhere").symlink_to(outside, target_is_directory=True)
    (root / "filesystem_root").symlink_to("/", target_is_directory=True)

    assert names(root) == ["in.jpg"]


def test_symlink_to_file_inside_root_is_listed_under_its_own_name(tmp_path: Path) -> None:
    write(tmp_path / "photos" / "a.jpg", jpeg_bytes())
    (tmp_path / "alias.jpg").symlink_to(Path("photos") / "a.jpg")

    found = {f.file_name: f for f in within(10, lambda: list(walk_files(tmp_path)))}

    assert sorted(found) == ["alias.jpg", "photos/a.jpg"]
    assert found["alias.jpg"].size == len(jpeg_bytes())  # the target's stat, not the link's


def test_symlink_cycle_terminates_and_walks_each_folder_once(tmp_path: Path) -> None:
    write(tmp_path / "top.jpg", b"1")
    write(tmp_path / "dir" / "inner.jpg", b"2")
    (tmp_path / "dir" / "loop").symlink_to("..", target_is_directory=True)
    (tmp_path / "dir" / "self").symlink_to(".", target_is_directory=True)

    # The root and dir are each walked once; loop and self lead to folders already walked.
    assert sorted(names(tmp_path)) == ["dir/inner.jpg", "top.jpg"]


@pytest.mark.parametrize("link_name", ["aa_link", "zz_link"])
def test_symlink_to_folder_inside_root_keeps_the_real_names(tmp_path: Path, link_name: str) -> None:
    # FAILS for "zz_link" (bug in tasks/discover.py walk_files, see the report): the walk is
    # depth-first from a stack, so a link that sorts after its target is popped first, the
    # files are named "zz_link/..." and the real folder is then skipped as already walked.
    # Adding a convenience link would rename (delete and re-add) every image below it.
    write(tmp_path / "photos" / "a.jpg", b"a")
    write(tmp_path / "photos" / "sub" / "b.jpg", b"b")
    (tmp_path / link_name).symlink_to("photos", target_is_directory=True)

    assert sorted(names(tmp_path)) == ["photos/a.jpg", "photos/sub/b.jpg"]


def test_dangling_symlink_is_skipped(tmp_path: Path) -> None:
    write(tmp_path / "real.jpg", b"x")
    (tmp_path / "gone.jpg").symlink_to(tmp_path / "missing.jpg")
    (tmp_path / "gone_dir").symlink_to(tmp_path / "missing_dir", target_is_directory=True)

    assert names(tmp_path) == ["real.jpg"]
    assert [f.file_name for f in within(10, lambda: find_changes(tmp_path, {})).new] == ["real.jpg"]


@pytest.mark.skipif(RUNS_AS_ROOT, reason="root reads through chmod 000, so nothing is unreadable")
def test_unreadable_subfolder_is_skipped_and_the_rest_listed(tmp_path: Path) -> None:
    write(tmp_path / "ok" / "a.jpg", b"a")
    write(tmp_path / "locked" / "b.jpg", b"b")
    (tmp_path / "locked").chmod(0)
    try:
        assert names(tmp_path) == ["ok/a.jpg"]
    finally:
        (tmp_path / "locked").chmod(0o755)


@pytest.mark.skipif(RUNS_AS_ROOT, reason="root reads through chmod 000, so nothing is unreadable")
def test_unreadable_image_is_reported_with_the_reason(tmp_path: Path) -> None:
    write(tmp_path / "locked.jpg", b"x").chmod(0)
    try:
        changes = find_changes(tmp_path, {})
    finally:
        (tmp_path / "locked.jpg").chmod(0o644)
    assert changes.new == []
    assert changes.unreadable == {"locked.jpg": "unreadable: Permission denied"}
    assert changes.found == 1


def test_walk_through_a_symlinked_root_names_files_relative_to_it(tmp_path: Path) -> None:
    write(tmp_path / "real" / "sub" / "a.jpg", b"a")
    (tmp_path / "mount").symlink_to(tmp_path / "real", target_is_directory=True)

    assert names(tmp_path / "mount") == ["sub/a.jpg"]
    changes = find_changes(tmp_path / "mount", {})
    assert [f.file_name for f in changes.new] == ["sub/a.jpg"]


# --- looks_like_image, hash_file, check_root -----------------------------------------------------


def test_image_without_suffix_is_found_by_magic_bytes_and_text_is_ignored(tmp_path: Path) -> None:
    write(tmp_path / "scan0001", jpeg_bytes())
    write(tmp_path / "README.txt", b"not an image\n")
    write(tmp_path / "Makefile", b"all:\n\ttrue\n")
    write(tmp_path / "UPPER.JPG", jpeg_bytes((1, 2, 3)))

    changes = find_changes(tmp_path, {})

    assert sorted(f.file_name for f in changes.new) == ["UPPER.JPG", "scan0001"]
    assert changes.found == 2
    assert looks_like_image(tmp_path / "scan0001") is True
    assert looks_like_image(tmp_path / "README.txt") is False


def test_image_suffix_with_garbage_is_still_a_candidate(tmp_path: Path) -> None:
    write(tmp_path / "broken.jpg", b"this is no jpeg at all")
    write(tmp_path / "empty.png", b"")

    changes = find_changes(tmp_path, {})

    # The decoder refuses them later, with a reason stored in the database.
    assert sorted(f.file_name for f in changes.new) == ["broken.jpg", "empty.png"]
    assert looks_like_image(tmp_path / "broken.jpg") is True


def test_hash_file_is_blake2b_128_of_the_bytes(tmp_path: Path) -> None:
    data = os.urandom(3 * (1 << 20) + 17)  # more than one read chunk
    path = write(tmp_path / "big.bin", data)

    assert hash_file(path) == hashlib.blake2b(data, digest_size=16).hexdigest()
    assert len(hash_file(path)) == 32
    empty = write(tmp_path / "empty.jpg", b"")
    assert hash_file(empty) == hashlib.blake2b(b"", digest_size=16).hexdigest()


def test_check_root_accepts_a_folder_and_resolves_it(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real", target_is_directory=True)
    assert check_root(tmp_path / "link") == (tmp_path / "real").resolve()


def test_check_root_refuses_a_missing_folder(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DiscoveryError) as info:
        check_root(missing)
    assert str(info.value) == f"folder not found: {missing}"


def test_check_root_refuses_a_file(tmp_path: Path) -> None:
    path = write(tmp_path / "photo.jpg", b"x")
    with pytest.raises(DiscoveryError) as info:
        check_root(path)
    assert str(info.value) == f"not a folder: {path}"


# --- find_changes -------------------------------------------------------------------------------


def test_find_changes_sorts_files_into_new_changed_touched_unchanged_deleted(
    tmp_path: Path,
) -> None:
    for name in ("changed.jpg", "touched.jpg", "unchanged.jpg"):
        write(tmp_path / name, jpeg_bytes())
    known = {
        "changed.jpg": known_from(tmp_path, "changed.jpg", 1),
        "touched.jpg": known_from(tmp_path, "touched.jpg", 2),
        "unchanged.jpg": known_from(tmp_path, "unchanged.jpg", 3),
        "deleted.jpg": KnownImage(4, 10, 1, "0" * 32),
        "also_deleted.jpg": KnownImage(5, 10, 1, "1" * 32),
    }
    write(tmp_path / "changed.jpg", jpeg_bytes((0, 0, 255)))
    st = (tmp_path / "touched.jpg").stat()
    os.utime(tmp_path / "touched.jpg", ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    write(tmp_path / "new.jpg", b"new bytes")

    changes = find_changes(tmp_path, known)

    assert [(f.file_name, f.content_hash) for f in changes.new] == [
        ("new.jpg", hashlib.blake2b(b"new bytes", digest_size=16).hexdigest())
    ]
    assert [(i, f.file_name) for i, f in changes.changed] == [(1, "changed.jpg")]
    assert changes.changed[0][1].content_hash == hash_file(tmp_path / "changed.jpg")
    assert changes.changed[0][1].content_hash != known["changed.jpg"].content_hash
    assert [(i, f.file_name) for i, f in changes.touched] == [(2, "touched.jpg")]
    touched = changes.touched[0][1]
    assert touched.mtime_ns == st.st_mtime_ns + 5_000_000_000
    assert touched.content_hash == known["touched.jpg"].content_hash
    assert changes.unchanged == 1
    assert changes.deleted_ids == [4, 5]
    assert changes.unreadable == {}
    assert changes.found == 4


def test_unchanged_stat_means_the_file_is_not_read(tmp_path: Path) -> None:
    path = write(tmp_path / "a.jpg", jpeg_bytes())
    known = {"a.jpg": known_from(tmp_path, "a.jpg", 7)}
    before = path.stat()
    # Same size, other bytes, old mtime restored: only a reader of the bytes could notice.
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert path.stat().st_size == before.st_size
    assert hash_file(path) != known["a.jpg"].content_hash

    changes = find_changes(tmp_path, known)

    assert changes.unchanged == 1
    assert (changes.new, changes.changed, changes.touched, changes.deleted_ids) == ([], [], [], [])


def test_size_change_alone_is_enough_to_rehash(tmp_path: Path) -> None:
    path = write(tmp_path / "a.jpg", jpeg_bytes())
    known = {"a.jpg": known_from(tmp_path, "a.jpg", 7)}
    before = path.stat()
    path.write_bytes(jpeg_bytes() + b"tail")
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))

    changes = find_changes(tmp_path, known)

    assert [(i, f.size) for i, f in changes.changed] == [(7, before.st_size + 4)]


def test_known_file_that_became_a_non_image_is_rehashed_not_dropped(tmp_path: Path) -> None:
    # Once in the database a file stays tracked by name; the decoder decides what it is.
    write(tmp_path / "scan0001", jpeg_bytes())
    known = {"scan0001": known_from(tmp_path, "scan0001", 3)}
    write(tmp_path / "scan0001", b"plain text now, not an image at all")

    changes = find_changes(tmp_path, known)

    assert [(i, f.file_name) for i, f in changes.changed] == [(3, "scan0001")]
    assert changes.deleted_ids == []


def test_empty_folder_deletes_everything_known(tmp_path: Path) -> None:
    known = {"a.jpg": KnownImage(1, 1, 1, "a" * 32), "b/c.jpg": KnownImage(2, 1, 1, "b" * 32)}
    changes = find_changes(tmp_path, known)
    assert changes.deleted_ids == [1, 2]
    assert changes.found == 0
    assert changes == Changes(deleted_ids=[1, 2])
