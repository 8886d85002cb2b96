"""Sources: the archive's named root folders, each one kept in step by the catalog."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, Field
from sqlalchemy import Engine, and_, case, delete, func, insert, select, update

from lookalike.sql.migrations import source_name_for
from lookalike.sql.schema import (
    MAX_SOURCE_NAME_CHARS,
    STATUS_FAILED,
    STATUS_OK,
    STATUS_PENDING,
    image_features,
    image_names,
    runs,
    sources,
)
from lookalike.tasks.database import DATABASE_RETRIES, engine_for, utcnow
from lookalike.tasks.errors import LookalikeError

log = logging.getLogger(__name__)

CHUNK = 5000  # ids per IN (...) list


class SourceError(LookalikeError, ValueError):
    """A source name or folder that cannot be used as asked; one line for the user."""


class SourceSpec(BaseModel):
    """A source as a run names it: a root folder and, optionally, its name (default: the
    folder's own name, or the name it already has in the database)."""

    root: str = Field(description="the source's root folder, searched recursively")
    name: str | None = Field(
        default=None, max_length=MAX_SOURCE_NAME_CHARS, description="the source's name"
    )


@dataclass(frozen=True)
class Source:
    """A source row."""

    id: int
    name: str
    root: str


@dataclass(frozen=True)
class SourceStatus:
    """A source with its image counts and its last run, for `lookalike sources` and the API."""

    name: str
    root: str
    images: int
    ok: int
    failed: int
    pending: int
    last_run_id: int | None
    last_run_status: str | None
    last_run_finished: datetime | None


def read_sources(engine: Engine) -> list[Source]:
    """Every source, in the order they were added."""
    with engine.connect() as conn:
        rows = conn.execute(select(sources.c.id, sources.c.name, sources.c.root).order_by("id"))
        return [Source(r.id, r.name, r.root) for r in rows]


def find_source(engine: Engine, name: str) -> Source:
    """The source of this name; SourceError naming the known ones when there is none."""
    known = read_sources(engine)
    for source in known:
        if source.name == name:
            return source
    names = ", ".join(s.name for s in known) or "none yet"
    raise SourceError(f"no source named {name!r} in this database (sources: {names})")


def resolve_source(
    engine: Engine, folder: Path, name: str | None, *, move: bool = False
) -> tuple[str, Source | None]:
    """The name a run on folder uses, and its existing source (None: a new one).

    The one place that decides what a folder and a name mean together: without a name, a
    folder already in the database keeps its source, and a new folder is named after
    itself; a name bound to another folder is refused unless the run moves that source
    (move=True); a folder may belong to one source only.
    """
    known = read_sources(engine)
    by_root = {s.root: s for s in known}
    by_name = {s.name: s for s in known}
    if name is None and str(folder) in by_root:
        return by_root[str(folder)].name, by_root[str(folder)]
    chosen = check_source_name(name if name is not None else source_name_for(str(folder)))
    existing = by_name.get(chosen)
    owner = by_root.get(str(folder))
    if owner is not None and owner.name != chosen:
        raise SourceError(f"{folder} is already the source {owner.name!r}")
    if move:
        if existing is None:
            raise SourceError(f"no source named {chosen!r} to move")
        return chosen, existing
    if existing is not None and existing.root != str(folder):
        hint = (
            f"to move it: lookalike move-source {chosen} {folder}"
            if name is not None
            else "name this one with --source NAME (flow parameter source)"
        )
        raise SourceError(f"the source {chosen!r} is the folder {existing.root}; {hint}")
    return chosen, existing


def check_source_name(name: str) -> str:
    """The name, if usable: 1 to 64 printable characters without slashes."""
    if not name or len(name) > MAX_SOURCE_NAME_CHARS or not name.isprintable() or "/" in name:
        raise SourceError(
            f"bad source name {name!r}: use 1 to {MAX_SOURCE_NAME_CHARS} printable "
            "characters without '/'"
        )
    return name


def open_source(engine: Engine, folder: Path, name: str | None, *, move: bool = False) -> Source:
    """The source a run works on, created or moved as resolve_source decided."""
    chosen, existing = resolve_source(engine, folder, name, move=move)
    with engine.begin() as conn:
        if existing is None:
            result = conn.execute(
                insert(sources).values(name=chosen, root=str(folder), created_at=utcnow())
            )
            log.info("new source %r: %s", chosen, folder)
            return Source(int(result.inserted_primary_key[0]), chosen, str(folder))  # type: ignore[index]
        if existing.root != str(folder):
            moved = update(sources).where(sources.c.id == existing.id).values(root=str(folder))
            conn.execute(moved)
            log.info("source %r moved from %s to %s", chosen, existing.root, folder)
    return Source(existing.id, chosen, str(folder))


def mark_sources_run(engine: Engine, source_ids: Sequence[int], run_id: int) -> None:
    """These sources were brought up to date by this run."""
    with engine.begin() as conn:
        conn.execute(
            update(sources).where(sources.c.id.in_(list(source_ids))).values(last_run_id=run_id)
        )


def delete_source(engine: Engine, source: Source) -> int:
    """Delete a source, its images and their features; the number of images removed.

    Neighbour rows stay until the neighbour step swaps in a new table: the incremental update
    needs the old lists to know which rows lost a neighbour.
    """
    with engine.begin() as conn:
        ids = list(
            conn.execute(select(image_names.c.id).where(image_names.c.source_id == source.id))
            .scalars()
            .all()
        )
        for start in range(0, len(ids), CHUNK):
            chunk = ids[start : start + CHUNK]
            conn.execute(delete(image_features).where(image_features.c.image_id.in_(chunk)))
            conn.execute(delete(image_names).where(image_names.c.id.in_(chunk)))
        conn.execute(delete(sources).where(sources.c.id == source.id))
    return len(ids)


def source_statuses(engine: Engine) -> list[SourceStatus]:
    """Every source with its counts by status and its last run."""
    status = image_names.c.status
    counts = (
        select(
            image_names.c.source_id,
            func.count().label("images"),
            func.sum(case((status == STATUS_OK, 1), else_=0)).label("ok"),
            func.sum(case((status == STATUS_FAILED, 1), else_=0)).label("failed"),
            func.sum(case((status == STATUS_PENDING, 1), else_=0)).label("pending"),
        )
        .group_by(image_names.c.source_id)
        .subquery()
    )
    query = (
        select(sources, counts, runs.c.status.label("run_status"), runs.c.finished_at)
        .outerjoin(counts, counts.c.source_id == sources.c.id)
        .outerjoin(runs, and_(runs.c.id == sources.c.last_run_id))
        .order_by(sources.c.id)
    )
    with engine.connect() as conn:
        return [
            SourceStatus(
                name=r.name,
                root=r.root,
                images=int(r.images or 0),
                ok=int(r.ok or 0),
                failed=int(r.failed or 0),
                pending=int(r.pending or 0),
                last_run_id=r.last_run_id,
                last_run_status=r.run_status,
                last_run_finished=r.finished_at,
            )
            for r in conn.execute(query)
        ]


@task(name="open-source", **DATABASE_RETRIES, cache_policy=NO_CACHE)
def open_source_task(database_url: str, folder: str, name: str, move: bool = False) -> Source:
    """Add the source, or find it (moved to folder when move), under the run lock."""
    source = open_source(engine_for(database_url), Path(folder), name, move=move)
    get_run_logger().info("source %r at %s", source.name, source.root)
    return source


@task(name="mark-sources-run", **DATABASE_RETRIES, cache_policy=NO_CACHE)
def mark_sources_run_task(database_url: str, source_ids: list[int], run_id: int) -> None:
    """Record the run as the sources' last."""
    mark_sources_run(engine_for(database_url), source_ids, run_id)


@task(name="delete-source", **DATABASE_RETRIES, cache_policy=NO_CACHE)
def delete_source_task(database_url: str, name: str) -> int:
    """Delete the source's images and features (lists are updated by the neighbour step)."""
    engine = engine_for(database_url)
    removed = delete_source(engine, find_source(engine, name))
    get_run_logger().info("source %r removed: %d images", name, removed)
    return removed
