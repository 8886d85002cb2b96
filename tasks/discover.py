"""Discovery: walk a folder safely, find images, tell new, changed and deleted ones apart."""

from __future__ import annotations

import hashlib
import logging
import os
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from lookalike.sql.schema import MAX_FILE_NAME_CHARS
from lookalike.tasks.decode import IMAGE_SUFFIXES
from lookalike.tasks.errors import LookalikeError
from lookalike.tasks.image_files import open_regular_file, read_head, sniff_image_type

log = logging.getLogger(__name__)

HASH_CHUNK = 1 << 20


class DiscoveryError(LookalikeError, RuntimeError):
    """The root folder cannot be scanned; the message is one line for the user."""


@dataclass(frozen=True)
class FoundFile:
    """A regular file under the root, identified by its relative POSIX path."""

    file_name: str
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class KnownImage:
    """What the database remembers of an image file."""

    image_id: int
    size: int
    mtime_ns: int
    content_hash: str


@dataclass(frozen=True)
class HashedFile:
    """A new or changed image file with its content hash."""

    file_name: str
    size: int
    mtime_ns: int
    content_hash: str


@dataclass
class Changes:
    """How the folder differs from the database."""

    new: list[HashedFile] = field(default_factory=list)
    changed: list[tuple[int, HashedFile]] = field(default_factory=list)
    touched: list[tuple[int, HashedFile]] = field(default_factory=list)  # new stat, same bytes
    deleted_ids: list[int] = field(default_factory=list)
    unchanged: int = 0
    unreadable: dict[str, str] = field(default_factory=dict)  # file name -> reason
    # Image files whose names the database cannot hold (file name as walked -> reason);
    # they are left out of the collection, not counted as found, and logged.
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def found(self) -> int:
        """Image files present in the folder now."""
        return (
            len(self.new)
            + len(self.changed)
            + len(self.touched)
            + self.unchanged
            + len(self.unreadable)
        )


def check_root(root: Path) -> Path:
    """The resolved root; DiscoveryError if missing, not a folder, unreadable or not UTF-8."""
    if not root.exists():
        raise DiscoveryError(f"folder not found: {root}")
    if not root.is_dir():
        raise DiscoveryError(f"not a folder: {root}")
    if not os.access(root, os.R_OK | os.X_OK):
        raise DiscoveryError(f"folder not readable: {root}")
    resolved = root.resolve()
    if not _is_utf8(str(resolved)):
        # collection.root stores the path as text; a byte-name would fail deep inside the run.
        raise DiscoveryError(f"folder path is not valid UTF-8: {_printable(str(resolved))}")
    return resolved


def walk_files(root: Path) -> Iterator[FoundFile]:
    """Every regular file under root, following symlinks only while they stay inside it."""
    root = root.resolve()
    seen_dirs: set[tuple[int, int]] = set()
    stack: list[tuple[Path, str]] = [(root, "")]
    while stack:
        directory, prefix = stack.pop()
        try:
            info = directory.stat()
        except OSError as exc:  # removed during the walk, or a path beyond PATH_MAX
            log.warning("skipping folder %s: %s", directory, exc.strerror or exc)
            continue
        if (info.st_dev, info.st_ino) in seen_dirs:
            continue  # a symlink cycle or a second link to a folder already walked
        seen_dirs.add((info.st_dev, info.st_ino))
        for entry in _sorted_entries(directory):
            rel = f"{prefix}{entry.name}"
            kind = _classify_entry(entry, root)
            if kind == "dir":
                stack.append((Path(entry.path), rel + "/"))
            elif kind == "file":
                st = entry.stat(follow_symlinks=True)
                yield FoundFile(rel, st.st_size, st.st_mtime_ns)


def _sorted_entries(directory: Path) -> list[os.DirEntry[str]]:
    """The folder's entries by name; an unreadable folder is logged and skipped."""
    try:
        with os.scandir(directory) as it:
            return sorted(it, key=lambda e: e.name)
    except OSError as exc:
        log.warning("skipping unreadable folder %s: %s", directory, exc.strerror)
        return []


def _classify_entry(entry: os.DirEntry[str], root: Path) -> str:
    """'dir', 'file' or 'skip': FIFOs, sockets, devices and links leading outside are skipped."""
    try:
        if entry.is_symlink() and not _inside(Path(os.path.realpath(entry.path)), root):
            log.info("skipping symlink leading outside the root: %s", entry.path)
            return "skip"
        st = entry.stat(follow_symlinks=True)
    except OSError:
        return "skip"  # dangling symlink or vanished entry
    if stat.S_ISDIR(st.st_mode):
        # A link to a folder inside the root: the folder is walked under its real name.
        return "skip" if entry.is_symlink() else "dir"
    return "file" if stat.S_ISREG(st.st_mode) else "skip"


def unstorable_reason(file_name: str) -> str | None:
    """Why a relative path cannot be stored as image_names.file_name; None when it can."""
    if not _is_utf8(file_name):
        return "file name is not valid UTF-8"
    if len(file_name) > MAX_FILE_NAME_CHARS:
        return f"path longer than {MAX_FILE_NAME_CHARS} characters"
    return None


def _is_utf8(name: str) -> bool:
    """False for names holding undecodable bytes (os.fsdecode keeps them as surrogates)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _printable(name: str) -> str:
    """The name with undecodable bytes shown as \\xNN, safe to print and to store."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _inside(path: Path, root: Path) -> bool:
    """True when path is root or below it."""
    return path == root or root in path.parents


def hash_file(path: Path) -> str:
    """BLAKE2b-128 of the file's bytes, as 32 hex digits."""
    digest = hashlib.blake2b(digest_size=16)
    with open_regular_file(path) as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def looks_like_image(path: Path) -> bool:
    """An image suffix, or image magic bytes in a file without one."""
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return True
    try:
        return sniff_image_type(read_head(path)) is not None
    except OSError:
        return False


def any_image(root: Path) -> bool:
    """True as soon as one storable image file is found under root (stops at the first)."""
    return any(
        unstorable_reason(found.file_name) is None and looks_like_image(root / found.file_name)
        for found in walk_files(root)
    )


def find_changes(root: Path, known: Mapping[str, KnownImage]) -> Changes:
    """Compare the folder with the database; only new or re-stat'ed files are read and hashed."""
    changes = Changes()
    present: set[str] = set()
    for found in walk_files(root):
        previous = known.get(found.file_name)
        if previous and (previous.size, previous.mtime_ns) == (found.size, found.mtime_ns):
            present.add(found.file_name)
            changes.unchanged += 1
            continue
        path = root / found.file_name
        if previous is None and not looks_like_image(path):
            continue
        if previous is None and _skip_unstorable(changes, found.file_name):
            continue
        present.add(found.file_name)
        _add_hashed(changes, found, path, previous)
    changes.deleted_ids = sorted(k.image_id for name, k in known.items() if name not in present)
    return changes


def _skip_unstorable(changes: Changes, file_name: str) -> bool:
    """Record and log a new image whose name the database cannot hold; True if skipped."""
    reason = unstorable_reason(file_name)
    if reason is None:
        return False
    changes.skipped[file_name] = reason
    log.warning("skipping image %s: %s", _printable(file_name), reason)
    return True


def _add_hashed(
    changes: Changes, found: FoundFile, path: Path, previous: KnownImage | None
) -> None:
    """Hash a new or re-stat'ed file and file it under new, changed or unchanged."""
    try:
        hashed = HashedFile(found.file_name, found.size, found.mtime_ns, hash_file(path))
    except OSError as exc:
        changes.unreadable[found.file_name] = f"unreadable: {exc.strerror or exc}"
        return
    if previous is None:
        changes.new.append(hashed)
    elif previous.content_hash != hashed.content_hash:
        changes.changed.append((previous.image_id, hashed))
    else:
        changes.touched.append((previous.image_id, hashed))
