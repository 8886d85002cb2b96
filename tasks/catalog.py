"""Catalog: the collection, its runs and its image rows; each source in step with its folder."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from sqlalchemy import Connection, Engine, Row, delete, func, insert, select, update

from lookalike.sql.schema import (
    RUN_COMPLETED,
    RUN_FAILED,
    RUN_INTERRUPTED,
    RUN_RUNNING,
    STATUS_FAILED,
    STATUS_OK,
    STATUS_PENDING,
    collection,
    image_features,
    image_names,
    image_neighbours,
    runs,
    sources,
)
from lookalike.tasks.database import DATABASE_RETRIES, engine_for, utcnow
from lookalike.tasks.decode import IMAGE_SUFFIXES
from lookalike.tasks.discover import (
    Changes,
    HashedFile,
    KnownImage,
    find_changes,
    unstorable_reason,
    walk_files,
)
from lookalike.tasks.errors import LookalikeError
from lookalike.tasks.models import INCEPTION_V3, feature_dim_of

log = logging.getLogger(__name__)

# The model the collection row of a database made before --model names (tasks.models
# feature_model_name of InceptionV3 in float32); callers that name no model mean it.
DEFAULT_MODEL_NAME = INCEPTION_V3.name
CHUNK = 5000  # ids per IN (...) list, well under every driver's parameter limit


class NoImagesError(LookalikeError, RuntimeError):
    """The folder holds no image files; nothing is changed in the database."""


class CollectionMismatchError(LookalikeError, RuntimeError):
    """The database's features come from another model or weights; one line for the user."""


@dataclass(frozen=True)
class PendingImage:
    """An image waiting for extraction."""

    image_id: int
    file_name: str
    content_hash: str


@dataclass(frozen=True)
class ChangeCounts:
    """What a catalog sync found, for the run summary."""

    found: int
    new: int
    changed: int
    deleted: int
    unchanged: int
    unreadable: int


def check_collection(
    engine: Engine,
    weights_id: str,
    *,
    recompute: bool = False,
    model: str = DEFAULT_MODEL_NAME,
) -> Row[Any] | None:
    """The collection row, after refusing, unless recompute, another model (a stored model
    name: network and precision) or other weights: one model per database, for every source."""
    with engine.connect() as conn:
        row = conn.execute(select(collection).where(collection.c.id == 1)).first()
        # Weights that never produced a feature (a first run that could not fetch them)
        # bind nothing: another run may use other weights without --recompute.
        has_features = conn.execute(select(image_features.c.image_id).limit(1)).first()
    if row is None:
        return None
    if (row.model, row.weights) != (model, weights_id) and has_features and not recompute:
        raise CollectionMismatchError(
            f"this database's features come from {row.model} with weights {row.weights!r}, "
            f"this run would use {model} with {weights_id!r}; pass --recompute "
            "(flow parameter: -p recompute=true) to re-extract everything"
        )
    return row


def open_collection(
    engine: Engine,
    weights_id: str,
    *,
    recompute: bool = False,
    model: str = DEFAULT_MODEL_NAME,
) -> bool:
    """Bind the database to model and weights; True when another model or other weights
    reset the features."""
    row = check_collection(engine, weights_id, recompute=recompute, model=model)
    with engine.begin() as conn:
        if row is None:
            conn.execute(
                insert(collection).values(
                    id=1, model=model, weights=weights_id, created_at=utcnow()
                )
            )
            return False
        if (row.model, row.weights) == (model, weights_id):
            return False
        _reset_features(conn, model, weights_id)
        return True


def _reset_features(conn: Connection, model: str, weights_id: str) -> None:
    """Forget every feature and neighbour so the next extraction starts over."""
    conn.execute(delete(image_neighbours))
    conn.execute(delete(image_features))
    conn.execute(
        update(image_names).values(
            status=STATUS_PENDING, error=None, width=None, height=None, indexed=False
        )
    )
    conn.execute(
        update(collection).where(collection.c.id == 1).values(model=model, weights=weights_id)
    )


def read_collection(engine: Engine) -> dict[str, Any] | None:
    """The collection row as a dict, or None for an empty database."""
    with engine.connect() as conn:
        row = conn.execute(select(collection).where(collection.c.id == 1)).first()
    return dict(row._mapping) if row else None


def collection_model(engine: Engine) -> str:
    """The stored name of the collection's model (the default one before any run bound it)."""
    row = read_collection(engine)
    return str(row["model"]) if row else DEFAULT_MODEL_NAME


def stored_feature_dim(engine: Engine) -> int:
    """The length of the collection's stored vectors: its model's dimension."""
    return feature_dim_of(collection_model(engine))


def read_known(engine: Engine, source_id: int) -> dict[str, KnownImage]:
    """Every image row of the source by file name, for comparing with its folder."""
    query = select(
        image_names.c.id,
        image_names.c.file_name,
        image_names.c.size,
        image_names.c.mtime_ns,
        image_names.c.content_hash,
    ).where(image_names.c.source_id == source_id)
    with engine.connect() as conn:
        return {
            r.file_name: KnownImage(r.id, r.size, r.mtime_ns, r.content_hash)
            for r in conn.execute(query)
        }


def apply_changes(engine: Engine, source_id: int, changes: Changes) -> ChangeCounts:
    """Write the changes of the source's folder to image_names in one transaction."""
    with engine.begin() as conn:
        _insert_new(conn, source_id, changes.new)
        _mark_changed(conn, changes.changed)
        _refresh_stat(conn, changes.touched)
        _delete_images(conn, changes.deleted_ids)
        _record_unreadable(conn, source_id, changes.unreadable)
    return ChangeCounts(
        found=changes.found,
        new=len(changes.new),
        changed=len(changes.changed),
        deleted=len(changes.deleted_ids),
        unchanged=changes.unchanged + len(changes.touched),
        unreadable=len(changes.unreadable),
    )


def _insert_new(conn: Connection, source_id: int, files: Sequence[HashedFile]) -> None:
    """New files start as pending rows."""
    rows = [
        dict(
            source_id=source_id,
            file_name=f.file_name,
            content_hash=f.content_hash,
            size=f.size,
            mtime_ns=f.mtime_ns,
            status=STATUS_PENDING,
            indexed=False,
        )
        for f in files
    ]
    for start in range(0, len(rows), CHUNK):
        conn.execute(insert(image_names), rows[start : start + CHUNK])


def _mark_changed(conn: Connection, changed: Sequence[tuple[int, HashedFile]]) -> None:
    """Changed content: new hash, pending again, old features and own list gone."""
    for image_id, f in changed:
        conn.execute(
            update(image_names)
            .where(image_names.c.id == image_id)
            .values(
                content_hash=f.content_hash,
                size=f.size,
                mtime_ns=f.mtime_ns,
                status=STATUS_PENDING,
                error=None,
                width=None,
                height=None,
                indexed=False,
            )
        )
    _delete_features(conn, [image_id for image_id, _ in changed])


def _refresh_stat(conn: Connection, touched: Sequence[tuple[int, HashedFile]]) -> None:
    """Same bytes under a new stat: remember the stat so the file is not hashed again."""
    for image_id, f in touched:
        conn.execute(
            update(image_names)
            .where(image_names.c.id == image_id)
            .values(size=f.size, mtime_ns=f.mtime_ns)
        )


def _delete_features(conn: Connection, ids: Sequence[int]) -> None:
    """Drop the stored vectors of these images.

    Their neighbour rows stay until the neighbour step swaps in a new table: the incremental
    update needs the old lists to know which rows lost a neighbour.
    """
    for chunk in _chunks(ids):
        conn.execute(delete(image_features).where(image_features.c.image_id.in_(chunk)))


def _delete_images(conn: Connection, ids: Sequence[int]) -> None:
    """Remove deleted files from all tables; lists that held them are refilled later."""
    _delete_features(conn, ids)
    for chunk in _chunks(ids):
        conn.execute(delete(image_names).where(image_names.c.id.in_(chunk)))


def _record_unreadable(conn: Connection, source_id: int, unreadable: dict[str, str]) -> None:
    """Files that could not even be read become failed rows with the reason."""
    for name, reason in unreadable.items():
        existing = conn.execute(
            select(image_names.c.id).where(
                image_names.c.source_id == source_id, image_names.c.file_name == name
            )
        ).scalar()
        # No hash, no stat: the next successful read counts as changed, so it is pending again.
        values = dict(
            status=STATUS_FAILED, error=reason, indexed=False, content_hash="", size=0, mtime_ns=0
        )
        if existing is None:
            conn.execute(insert(image_names).values(source_id=source_id, file_name=name, **values))
        else:
            conn.execute(update(image_names).where(image_names.c.id == existing).values(**values))
            _delete_features(conn, [existing])


def _chunks(ids: Sequence[int]) -> Iterable[list[int]]:
    """Slices of ids small enough for one IN (...) list."""
    for start in range(0, len(ids), CHUNK):
        yield list(ids[start : start + CHUNK])


def list_pending(engine: Engine, source_id: int | None = None) -> list[PendingImage]:
    """Images waiting for extraction (of one source, or all), by file name (stable batches
    across re-runs)."""
    query = (
        select(image_names.c.id, image_names.c.file_name, image_names.c.content_hash)
        .where(image_names.c.status == STATUS_PENDING)
        .order_by(image_names.c.file_name, image_names.c.source_id)
    )
    if source_id is not None:
        query = query.where(image_names.c.source_id == source_id)
    with engine.connect() as conn:
        return [PendingImage(r.id, r.file_name, r.content_hash) for r in conn.execute(query)]


def count_by_status(engine: Engine) -> dict[str, int]:
    """Rows per status, plus neighbour rows."""
    with engine.connect() as conn:
        by_status: dict[str, int] = dict(
            conn.execute(  # type: ignore[arg-type]
                select(image_names.c.status, func.count()).group_by(image_names.c.status)
            ).all()
        )
        neighbours = conn.execute(select(func.count()).select_from(image_neighbours)).scalar()
    return {
        "ok": by_status.get(STATUS_OK, 0),
        "failed": by_status.get(STATUS_FAILED, 0),
        "pending": by_status.get(STATUS_PENDING, 0),
        "neighbours": int(neighbours or 0),
    }


def list_failed(engine: Engine) -> list[tuple[str, str]]:
    """("source/file name", reason) of every failed image."""
    query = (
        select(sources.c.name, image_names.c.file_name, image_names.c.error)
        .join(sources, sources.c.id == image_names.c.source_id)
        .where(image_names.c.status == STATUS_FAILED)
        .order_by(sources.c.name, image_names.c.file_name)
    )
    with engine.connect() as conn:
        return [(f"{r.name}/{r.file_name}", r.error or "") for r in conn.execute(query)]


def start_run(engine: Engine, weights_id: str) -> int:
    """Record a run as running; its id."""
    with engine.begin() as conn:
        result = conn.execute(
            insert(runs).values(started_at=utcnow(), status=RUN_RUNNING, weights=weights_id)
        )
        return int(result.inserted_primary_key[0])  # type: ignore[index]


def close_interrupted_runs(engine: Engine) -> int:
    """Mark runs still 'running' as 'interrupted'; call only while holding the run lock.

    The lock admits one run at a time, so a 'running' row left when the next run takes it is
    a run whose process died (killed, crashed, power lost) before it could record its end.
    """
    with engine.begin() as conn:
        result = conn.execute(
            update(runs).where(runs.c.status == RUN_RUNNING).values(status=RUN_INTERRUPTED)
        )
    return int(result.rowcount)


def finish_run(engine: Engine, run_id: int, status: str, summary: Any) -> None:
    """Record how a run ended (RUN_COMPLETED or RUN_FAILED), with its summary as JSON."""
    if status not in (RUN_COMPLETED, RUN_FAILED):
        raise ValueError(f"a run ends {RUN_COMPLETED!r} or {RUN_FAILED!r}, not {status!r}")
    body = json.dumps(asdict(summary) if hasattr(summary, "__dataclass_fields__") else summary)
    with engine.begin() as conn:
        conn.execute(
            update(runs)
            .where(runs.c.id == run_id)
            .values(finished_at=utcnow(), status=status, summary=body)
        )


def unindexed_ids(engine: Engine) -> list[int]:
    """Ok images whose lists are missing or out of date (new or re-extracted), sorted."""
    query = select(image_names.c.id).where(
        image_names.c.status == STATUS_OK, image_names.c.indexed.is_(False)
    )
    with engine.connect() as conn:
        return sorted(conn.execute(query).scalars().all())


def stale_neighbour_ids(engine: Engine) -> tuple[list[int], list[int]]:
    """(ok images whose lists are out of date, ids that left the ok set but still appear)."""
    changed = unindexed_ids(engine)
    with engine.connect() as conn:
        ok_ids = select(image_names.c.id).where(image_names.c.status == STATUS_OK)
        gone_rows = (
            conn.execute(
                select(image_neighbours.c.image_id)
                .where(image_neighbours.c.image_id.not_in(ok_ids))
                .distinct()
            )
            .scalars()
            .all()
        )
        gone_refs = (
            conn.execute(
                select(image_neighbours.c.neighbour_id)
                .where(image_neighbours.c.neighbour_id.not_in(ok_ids))
                .distinct()
            )
            .scalars()
            .all()
        )
    return sorted(changed), sorted(set(gone_rows) | set(gone_refs))


def mark_indexed(engine: Engine, image_ids: Sequence[int]) -> None:
    """These images' current features are now reflected in the neighbour table."""
    with engine.begin() as conn:
        for chunk in _chunks(image_ids):
            conn.execute(
                update(image_names).where(image_names.c.id.in_(chunk)).values(indexed=True)
            )


@task(
    name="open-collection",
    **DATABASE_RETRIES,
    cache_policy=NO_CACHE,
)
def open_collection_task(
    database_url: str,
    weights_id: str,
    recompute: bool,
    model: str = DEFAULT_MODEL_NAME,
) -> int:
    """Bind the database to the model and weights, and record a new run; its id."""
    engine = engine_for(database_url)
    interrupted = close_interrupted_runs(engine)  # the flow holds the run lock here
    if interrupted:
        get_run_logger().warning("%d earlier run(s) never finished: now interrupted", interrupted)
    if open_collection(engine, weights_id, recompute=recompute, model=model):
        get_run_logger().warning(
            "model or weights changed to %s, %s: every image is extracted again", model, weights_id
        )
    run_id = start_run(engine, weights_id)
    get_run_logger().info("run %d with %s, weights %s", run_id, model, weights_id)
    return run_id


@task(name="start-run", **DATABASE_RETRIES, cache_policy=NO_CACHE)
def start_run_task(database_url: str) -> int:
    """Record a run that changes no features (e.g. removing a source) as running; its id."""
    engine = engine_for(database_url)
    close_interrupted_runs(engine)  # the flow holds the run lock here
    row = read_collection(engine)
    return start_run(engine, str(row["weights"]) if row else "")


@task(
    name="sync-catalog",
    **DATABASE_RETRIES,
    cache_policy=NO_CACHE,
)
def sync_catalog_task(database_url: str, source_id: int, root: str) -> ChangeCounts:
    """Walk the source's folder and write its new, changed and deleted images to the database."""
    engine = engine_for(database_url)
    changes = find_changes(Path(root), read_known(engine, source_id))
    if changes.found == 0:
        # An empty (or unmounted) folder must not wipe a collection: refuse instead.
        raise NoImagesError(f"no image files found in {root}")
    counts = apply_changes(engine, source_id, changes)
    get_run_logger().info(
        "found %d images: %d new, %d changed, %d deleted, %d unchanged, %d unreadable",
        counts.found,
        counts.new,
        counts.changed,
        counts.deleted,
        counts.unchanged,
        counts.unreadable,
    )
    return counts


@task(
    name="finish-run",
    **DATABASE_RETRIES,
    cache_policy=NO_CACHE,
)
def finish_run_task(database_url: str, run_id: int, status: str, summary: dict[str, Any]) -> None:
    """Record how the run ended."""
    finish_run(engine_for(database_url), run_id, status, summary)


def fingerprint_ok_images(
    conn: Connection, *basis_parts: object
) -> tuple[list[tuple[int, str]], str, str]:
    """What a table derived from the lists (duplicates, the map) is computed from: the ok
    images' (id, content hash) in id order, the basis (model and weights, then basis_parts)
    and a fingerprint of both; an equal fingerprint means nothing to redo."""
    rows = [
        (int(image_id), str(content_hash))
        for image_id, content_hash in conn.execute(
            select(image_names.c.id, image_names.c.content_hash)
            .where(image_names.c.status == STATUS_OK)
            .order_by(image_names.c.id)
        )
    ]
    weights = conn.execute(select(collection.c.model, collection.c.weights)).first()
    basis = repr((tuple(weights or ()), *basis_parts))
    digest = hashlib.blake2b(basis.encode(), digest_size=16)
    for image_id, content_hash in rows:
        digest.update(f"{image_id}:{content_hash};".encode())
    return rows, basis, digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Read-only questions for `lookalike process`'s up-to-date check (flows/process.py), asked
# under the run lock before Prefect starts: each is True (or counts) only where the flow's own
# step would write nothing.


def collection_is_current(engine: Engine, weights_id: str, model: str = DEFAULT_MODEL_NAME) -> bool:
    """True when the collection row already binds this model and these weights, so that
    open_collection would change nothing."""
    row = read_collection(engine)
    return row is not None and (row["model"], row["weights"]) == (model, weights_id)


def count_unfinished_runs(engine: Engine) -> int:
    """Runs still recorded as running: a run holding the lock would mark them interrupted."""
    with engine.connect() as conn:
        count = conn.execute(
            select(func.count()).select_from(runs).where(runs.c.status == RUN_RUNNING)
        ).scalar()
    return int(count or 0)


def unchanged_catalog(engine: Engine, source_id: int, root: Path) -> ChangeCounts | None:
    """The counts sync_catalog_task would report for a folder it would write nothing for (no
    file new, changed, re-stat'ed, deleted or unreadable); None when the folder changed.

    The decision is find_changes's, the one the sync makes. Before it, a walk that opens no
    file returns None at the first sure sign of a change (see _surely_changed), so that the
    flow, which then runs, is the only one to read and hash the files that changed.
    """
    known = read_known(engine, source_id)
    if not known or _surely_changed(root, known):
        return None
    changes = find_changes(root, known)
    if changes.found == 0 or any(
        (changes.new, changes.changed, changes.touched, changes.deleted_ids, changes.unreadable)
    ):
        return None
    return ChangeCounts(
        found=changes.found, new=0, changed=0, deleted=0, unchanged=changes.unchanged, unreadable=0
    )


def _surely_changed(root: Path, known: dict[str, KnownImage]) -> bool:
    """True as soon as find_changes would surely hash a file or delete a row: a known file with
    another size or mtime, a new file with an image suffix and a name the database can hold,
    or a known file gone. Opens no file; other new files (is it an image?) are left to it."""
    seen = 0
    for found in walk_files(root):
        previous = known.get(found.file_name)
        if previous is None:
            suffix = Path(found.file_name).suffix.lower()
            if suffix in IMAGE_SUFFIXES and unstorable_reason(found.file_name) is None:
                return True
            continue
        if (previous.size, previous.mtime_ns) != (found.size, found.mtime_ns):
            return True
        seen += 1
    return seen != len(known)
