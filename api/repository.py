"""The API's reads: SQLAlchemy Core SELECTs over the tables of sql/schema.py (SELECT only)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
from sqlalchemy import Connection, Engine, bindparam, func, select, text

from lookalike.api.errors import BadRequestError, CorruptFeaturesError, ImageNotFoundError
from lookalike.api.schemas import (
    ImageDetail,
    ImagePage,
    ImageSummary,
    Neighbour,
    Source,
    SourceRun,
    Stats,
)
from lookalike.sql.schema import (
    RUN_COMPLETED,
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
from lookalike.tasks.database import is_mariadb
from lookalike.tasks.lock import mariadb_lock_name
from lookalike.tasks.models import UnknownModelError, feature_dim_of, parse_model_name

log = logging.getLogger(__name__)

DEFAULT_NEIGHBOURS = 20
MATRIX_FETCH_ROWS = 2000
MAX_RANK = 32767  # rank is a SMALLINT
MAX_SOURCES_NAMED = 100  # ?source= values one request may give
SOURCES_LISTED = 10  # known names an "unknown source" answer lists
STATS_TTL_S = 30.0

# What identifies a state of the tables: runs count, last run id and end, neighbour table birth.
RunMarker = tuple[int, int | None, datetime | None, datetime | None]


@dataclass(frozen=True)
class CollectionInfo:
    """The collection row: which model (and weights) described the images."""

    model: str
    weights: str


@dataclass(frozen=True)
class ImageFile:
    """What is needed to serve an image's file: its source's root folder, its name relative
    to that root, and its content hash."""

    file_name: str
    content_hash: str
    root: str


@dataclass(frozen=True)
class SourceFilter:
    """Which sources a neighbour list keeps: those named, or (exclude) all but those."""

    names: frozenset[str]
    exclude: bool = False

    def keeps(self, source: str) -> bool:
        """Whether a neighbour in this source stays in the list."""
        return (source in self.names) != self.exclude


@dataclass(frozen=True)
class FeatureMatrix:
    """Every stored feature vector of one model, row i belonging to image ids[i]."""

    ids: np.ndarray  # int64 (n,)
    vectors: np.ndarray  # float32 (n, the model's dimension)


class ImageRepository:
    """Reads images, neighbours, features and statistics; one short connection per call."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def ping(self) -> None:
        """Read the collection table; SQLAlchemyError when the database or tables don't answer."""
        with self.engine.connect() as conn:
            conn.execute(select(collection.c.id).limit(1)).all()

    def count_all_images(self) -> int:
        """How many images the collection knows, whatever their status."""
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(image_names)).scalar_one())

    def list_images(
        self, offset: int, limit: int, query: str | None, source_ids: Sequence[int] = ()
    ) -> ImagePage:
        """A page of images in id order, optionally those whose path contains ``query`` and
        those in the given sources (ids; empty: every source)."""
        conditions = []
        if query and "\x00" in query:
            # No stored name holds a NUL, and SQLite's LIKE would stop matching at one.
            return ImagePage(total=0, offset=offset, limit=limit, items=[])
        if query:
            # Case-insensitive substring; autoescape makes % and _ in the query literal.
            lowered = func.lower(image_names.c.file_name)
            conditions.append(lowered.contains(query.lower(), autoescape=True))
        if source_ids:
            conditions.append(image_names.c.source_id.in_(source_ids))
        count = select(func.count()).select_from(image_names).where(*conditions)
        rows = (
            select(
                image_names.c.id,
                image_names.c.file_name,
                sources.c.name,
                image_names.c.width,
                image_names.c.height,
                image_names.c.status,
            )
            .join_from(image_names, sources, _IN_SOURCE)
            .where(*conditions)
            .order_by(image_names.c.id)
            .offset(offset)
            .limit(limit)
        )
        with self.engine.connect() as conn:
            total = int(conn.execute(count).scalar_one())
            items = [ImageSummary(*row) for row in conn.execute(rows)]
        return ImagePage(total=total, offset=offset, limit=limit, items=items)

    def get_image(self, image_id: int, source_ids: Sequence[int] = ()) -> ImageDetail:
        """One image with its metadata; ImageNotFoundError when the id is unknown. The ids
        before and after it are those of the given sources (empty: any source)."""
        names = image_names.c
        within = [names.source_id.in_(source_ids)] if source_ids else []
        with self.engine.connect() as conn:
            row = conn.execute(
                select(
                    names.id,
                    names.file_name,
                    sources.c.name,
                    names.content_hash,
                    names.size,
                    names.mtime_ns,
                    names.width,
                    names.height,
                    names.status,
                    names.error,
                )
                .join_from(image_names, sources, _IN_SOURCE)
                .where(names.id == image_id)
            ).first()
            if row is None:
                raise ImageNotFoundError(f"no image with id {image_id}")
            neighbour_count = conn.execute(
                select(func.count())
                .select_from(image_neighbours)
                .where(image_neighbours.c.image_id == image_id)
            ).scalar_one()
            previous_id = conn.execute(
                select(func.max(names.id)).where(names.id < image_id, *within)
            )
            next_id = conn.execute(select(func.min(names.id)).where(names.id > image_id, *within))
            # The row's columns are ImageDetail's first fields, in order.
            stored = dict(zip(ImageDetail.__struct_fields__, row, strict=False))
            return ImageDetail(
                **stored,
                neighbour_count=int(neighbour_count),
                previous_id=previous_id.scalar_one(),
                next_id=next_id.scalar_one(),
            )

    def get_image_file(self, image_id: int) -> ImageFile:
        """The stored relative file name, content hash and source root of an image."""
        with self.engine.connect() as conn:
            row = conn.execute(
                select(image_names.c.file_name, image_names.c.content_hash, sources.c.root)
                .join_from(image_names, sources, _IN_SOURCE)
                .where(image_names.c.id == image_id)
            ).first()
        if row is None:
            raise ImageNotFoundError(f"no image with id {image_id}")
        return ImageFile(file_name=row.file_name, content_hash=row.content_hash, root=row.root)

    def get_neighbours(self, image_id: int, k: int | None) -> list[Neighbour]:
        """The k nearest stored neighbours (default: up to 20).

        An explicit k larger than what is stored for the image is a BadRequestError, so a client
        never silently gets fewer than it asked for. The happy path is one indexed query.
        """
        wanted = DEFAULT_NEIGHBOURS if k is None else k
        with self.engine.connect() as conn:
            neighbours = _select_neighbours(conn, image_id, wanted)
            if len(neighbours) == wanted or (k is None and neighbours):
                return neighbours
            if not neighbours and not _image_exists(conn, image_id):
                raise ImageNotFoundError(f"no image with id {image_id}")
        return neighbours[: wanted_neighbours(image_id, k, len(neighbours))]

    def get_all_neighbours(self, image_id: int) -> list[Neighbour]:
        """Every stored neighbour of an image, closest first (empty if not indexed yet)."""
        with self.engine.connect() as conn:
            return _select_neighbours(conn, image_id, MAX_RANK)

    def get_stored_neighbours(self, image_id: int) -> list[Neighbour]:
        """Every stored neighbour of an image; ImageNotFoundError for an unknown id."""
        with self.engine.connect() as conn:
            neighbours = _select_neighbours(conn, image_id, MAX_RANK)
            if not neighbours and not _image_exists(conn, image_id):
                raise ImageNotFoundError(f"no image with id {image_id}")
        return neighbours

    def source_ids(self, names: Sequence[str]) -> list[int]:
        """The ids of the named sources; BadRequestError naming any that does not exist."""
        if len(names) > MAX_SOURCES_NAMED:
            raise BadRequestError(f"at most {MAX_SOURCES_NAMED} sources may be named at once")
        with self.engine.connect() as conn:
            rows = conn.execute(select(sources.c.name, sources.c.id)).tuples()
            known: dict[str, int] = {name: int(source_id) for name, source_id in rows}
        unknown = sorted(set(names) - known.keys())
        if unknown:
            raise BadRequestError(unknown_sources_detail(unknown, sorted(known)))
        return sorted({known[name] for name in names})

    def list_sources(self) -> list[Source]:
        """Every source, by name, with its images counted by status and its last run."""
        with self.engine.connect() as conn:
            counted = conn.execute(
                select(image_names.c.source_id, image_names.c.status, func.count()).group_by(
                    image_names.c.source_id, image_names.c.status
                )
            ).tuples()
            counts: dict[int, dict[str, int]] = {}
            for source_id, status, count in counted:
                counts.setdefault(int(source_id), {})[status] = int(count)
            rows = conn.execute(_SOURCES_WITH_RUNS).all()
        return [_source_answer(row, counts.get(int(row.id), {})) for row in rows]

    def get_features(self, image_id: int) -> tuple[str, np.ndarray]:
        """The model name and float32 features (the model's dimension) of an image."""
        with self.engine.connect() as conn:
            row = conn.execute(
                select(image_features.c.model, image_features.c.features).where(
                    image_features.c.image_id == image_id
                )
            ).first()
            if row is None:
                if _image_exists(conn, image_id):
                    raise ImageNotFoundError(f"image {image_id} has no features (not indexed yet)")
                raise ImageNotFoundError(f"no image with id {image_id}")
        return row.model, decode_features(image_id, row.features, row.model)

    def get_collection(self) -> CollectionInfo | None:
        """The collection row, or None before the first indexing run."""
        with self.engine.connect() as conn:
            row = conn.execute(
                select(collection.c.model, collection.c.weights).where(collection.c.id == 1)
            ).first()
        return None if row is None else CollectionInfo(row.model, row.weights)

    def latest_completed_run(self) -> datetime | None:
        """When the last completed run finished (cheap: the runs table is tiny)."""
        with self.engine.connect() as conn:
            return conn.execute(
                select(func.max(runs.c.finished_at)).where(runs.c.status == RUN_COMPLETED)
            ).scalar_one()

    def latest_run_marker(self) -> RunMarker:
        """Changes whenever a run starts or ends, or the neighbour table is swapped (MariaDB).

        The runs part catches every run's in-place changes; the table's creation time catches
        a swap by a run that was killed before it could record its end.
        """
        with self.engine.connect() as conn:
            count, last_id, last_finished = conn.execute(
                select(func.count(), func.max(runs.c.id), func.max(runs.c.finished_at))
            ).one()
            created = conn.execute(_NEIGHBOUR_TABLE_CREATED).scalar()
        return (int(count), last_id, last_finished, created)

    def run_in_progress(self) -> bool:
        """Whether a run holds the database's run lock now (MariaDB; False on SQLite).

        The lock goes with the run's connection, so a run that was killed holds it no more.
        """
        if not is_mariadb(self.engine):
            return False
        name = mariadb_lock_name(self.engine.url)
        with self.engine.connect() as conn:
            holder = conn.execute(text("SELECT IS_USED_LOCK(:name)"), {"name": name}).scalar()
        return holder is not None

    def get_stats(self) -> Stats:
        """Counts by status, neighbour rows, model, weights and the last completed run."""
        with self.engine.connect() as conn:
            by_status: dict[str, int] = dict(
                conn.execute(
                    select(image_names.c.status, func.count()).group_by(image_names.c.status)
                ).all()
            )
            neighbours = conn.execute(select(func.count()).select_from(image_neighbours))
            neighbour_total = int(neighbours.scalar_one())
            per_image = _neighbours_per_image(conn)
            source_count = conn.execute(select(func.count()).select_from(sources)).scalar_one()
            info = conn.execute(
                select(collection.c.model, collection.c.weights).where(collection.c.id == 1)
            ).first()
        finished = self.latest_completed_run()
        return Stats(
            images=int(sum(by_status.values())),
            ok=int(by_status.get(STATUS_OK, 0)),
            failed=int(by_status.get(STATUS_FAILED, 0)),
            pending=int(by_status.get(STATUS_PENDING, 0)),
            neighbours=neighbour_total,
            neighbours_per_image=per_image,
            model=None if info is None else info.model,
            weights=None if info is None else info.weights,
            last_completed_run=None if finished is None else finished.isoformat(),
            text_search=None if info is None else has_text_tower(info.model),
            sources=int(source_count),
        )

    def file_names(self, image_ids: Sequence[int]) -> dict[int, tuple[str, str]]:
        """The file name and source name of the given ids (those that exist)."""
        if not image_ids:
            return {}
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(image_names.c.id, image_names.c.file_name, sources.c.name)
                .join_from(image_names, sources, _IN_SOURCE)
                .where(image_names.c.id.in_(list(image_ids)))
            ).tuples()
            return {int(image_id): (name, source) for image_id, name, source in rows}

    def load_feature_matrix(self, model: str) -> FeatureMatrix:
        """Every ok image's features for ``model``, streamed into one preallocated array."""
        joined = image_features.join(image_names, image_names.c.id == image_features.c.image_id)
        condition = (image_features.c.model == model) & (image_names.c.status == STATUS_OK)
        with self.engine.connect() as conn:
            count = conn.execute(select(func.count()).select_from(joined).where(condition))
            capacity = int(count.scalar_one())
            ids = np.empty(capacity, dtype=np.int64)
            vectors = np.empty((capacity, model_dim(model)), dtype=np.float32)
            rows = conn.execution_options(stream_results=True, yield_per=MATRIX_FETCH_ROWS).execute(
                select(image_features.c.image_id, image_features.c.features)
                .select_from(joined)
                .where(condition)
                .order_by(image_features.c.image_id)
            )
            filled = 0
            for image_id, blob in rows:
                if filled == capacity:  # rows were added since the count: take them next refresh
                    break
                ids[filled] = image_id
                vectors[filled] = decode_features(image_id, blob, model)
                filled += 1
        return FeatureMatrix(ids=ids[:filled], vectors=vectors[:filled])


class StatsCache:
    """The statistics, recounted in the background at most every ttl_s seconds.

    Counting neighbour rows scans millions of them (100 per image; 2 s at 100,000 images), so
    no request waits for a count except the very first after start-up: start() begins one at
    once, and a request that finds the figures stale gets them as they are while one
    background thread counts again.
    """

    def __init__(self, repository: ImageRepository, ttl_s: float = STATS_TTL_S) -> None:
        self.repository = repository
        self.ttl_s = ttl_s
        self._lock = threading.Lock()
        self._first = threading.Event()
        self._stats: Stats | None = None
        self._error: Exception | None = None
        self._counted_at = -float("inf")
        self._counting = False

    @property
    def ready(self) -> bool:
        """Whether a count has finished, so that get() answers at once."""
        return self._stats is not None

    def start(self) -> None:
        """Begin the first count in the background (the app's start-up hook)."""
        self._count_if_stale()

    def get(self) -> Stats:
        """The latest figures; only before the first count ends does this wait for it."""
        self._count_if_stale()
        stats = self._stats
        if stats is not None:
            return stats
        self._first.wait()
        if self._stats is None:  # the counts so far failed: say why (a database error: 503)
            raise self._error or RuntimeError("statistics unavailable")
        return self._stats

    def _count_if_stale(self) -> None:
        """Start one background count when the figures are older than ttl_s."""
        with self._lock:
            if self._counting or time.monotonic() - self._counted_at < self.ttl_s:
                return
            self._counting = True
        threading.Thread(target=self._count, name="lookalike-stats", daemon=True).start()

    def _count(self) -> None:
        try:
            stats, error = self.repository.get_stats(), None
        except Exception as exc:  # kept for get(); the next request tries again
            log.warning("counting the statistics failed: %s", exc)
            stats, error = None, exc
        with self._lock:
            if stats is not None:
                self._stats, self._counted_at = stats, time.monotonic()
            self._error = error
            self._counting = False
        self._first.set()  # a failed first count too: waiters raise its error


def decode_features(image_id: int, blob: bytes, model: str) -> np.ndarray:
    """The model's dimension of little-endian float32 values from a BLOB, refusing one of any
    other length (model: the stored model name)."""
    expected = model_dim(model) * 4
    if len(blob) != expected:
        raise CorruptFeaturesError(
            f"stored features of image {image_id} have {len(blob)} bytes, expected {expected}"
        )
    return np.frombuffer(blob, dtype="<f4").astype(np.float32, copy=False)


def model_dim(model: str) -> int:
    """The vector length of a stored model name; CorruptFeaturesError for a name this
    version does not know (its vectors cannot be read)."""
    try:
        return feature_dim_of(model)
    except UnknownModelError as exc:
        raise CorruptFeaturesError(str(exc)) from None


def wanted_neighbours(image_id: int, k: int | None, stored: int) -> int:
    """How many neighbours a request asks for: k, checked against the stored count (so that a
    client never silently gets fewer than it asked for), or by default up to 20."""
    if k is None:
        return min(DEFAULT_NEIGHBOURS, stored)
    if stored == 0:
        raise BadRequestError(f"image {image_id} has no neighbours stored (not indexed yet)")
    if k > stored:
        raise BadRequestError(f"k must be between 1 and {stored} for image {image_id}")
    return k


def unknown_sources_detail(unknown: list[str], known: list[str]) -> str:
    """One line naming the unknown sources and (some of) the known ones."""
    named = ", ".join(repr(name[:80]) for name in unknown[:SOURCES_LISTED])
    listed = ", ".join(known[:SOURCES_LISTED]) + (", ..." if len(known) > SOURCES_LISTED else "")
    noun = "source" if len(unknown) == 1 else "sources"
    return f"unknown {noun} {named} (the sources are: {listed or 'none yet'})"


def _source_answer(row: Any, counts: dict[str, int]) -> Source:
    """A sources row (joined with its last run) and its counts by status, as an answer."""
    last_run = None
    if row.run_id is not None:
        finished = None if row.finished_at is None else row.finished_at.isoformat()
        last_run = SourceRun(id=int(row.run_id), status=row.run_status, finished_at=finished)
    return Source(
        name=row.name,
        root=row.root,
        images=sum(counts.values()),
        ok=counts.get(STATUS_OK, 0),
        failed=counts.get(STATUS_FAILED, 0),
        pending=counts.get(STATUS_PENDING, 0),
        last_run=last_run,
    )


def _image_exists(conn: Connection, image_id: int) -> bool:
    """Whether an image row with this id exists."""
    found = conn.execute(select(image_names.c.id).where(image_names.c.id == image_id)).first()
    return found is not None


_NEIGHBOUR_TABLE_CREATED = text(
    "SELECT CREATE_TIME FROM information_schema.TABLES "
    "WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'image_neighbours'"
)

_IN_SOURCE = sources.c.id == image_names.c.source_id

# sources.last_run_id has no foreign key (runs are kept apart): the join is spelled out.
_SOURCES_WITH_RUNS = (
    select(
        sources.c.id,
        sources.c.name,
        sources.c.root,
        runs.c.id.label("run_id"),
        runs.c.status.label("run_status"),
        runs.c.finished_at,
    )
    .select_from(sources.outerjoin(runs, runs.c.id == sources.c.last_run_id))
    .order_by(sources.c.name)
)

# Built once: the hot path then skips statement construction and SQLAlchemy's cache-key walk.
_NEIGHBOURS = (
    select(
        image_neighbours.c.neighbour_id,
        image_names.c.file_name,
        sources.c.name,
        image_neighbours.c.rank,
        image_neighbours.c.distance,
    )
    .join_from(image_neighbours, image_names, image_names.c.id == image_neighbours.c.neighbour_id)
    .join(sources, _IN_SOURCE)
    .where(
        image_neighbours.c.image_id == bindparam("image_id"),
        image_neighbours.c.rank <= bindparam("limit"),
    )
    .order_by(image_neighbours.c.rank)
)


def _select_neighbours(conn: Connection, image_id: int, limit: int) -> list[Neighbour]:
    """Neighbours of rank 1..limit with their file names, closest first."""
    rows = conn.execute(_NEIGHBOURS, {"image_id": image_id, "limit": limit}).tuples()
    return [
        Neighbour(id=neighbour, file_name=name, source=source, rank=rank, distance=distance)
        for neighbour, name, source, rank, distance in rows
    ]


def _neighbours_per_image(conn: Connection) -> int:
    """The stored k: every indexed image has the same number of neighbours, so ask one of them."""
    first = select(func.min(image_neighbours.c.image_id)).scalar_subquery()
    stored = conn.execute(
        select(func.max(image_neighbours.c.rank)).where(image_neighbours.c.image_id == first)
    ).scalar_one()
    return int(stored or 0)


def has_text_tower(stored_model: str) -> bool:
    """Whether the collection's model can embed words (search in words); unknown: no."""
    try:
        return parse_model_name(stored_model)[0].text_tower
    except UnknownModelError:
        return False
