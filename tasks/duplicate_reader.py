"""Read the stored duplicate groups, at the stored threshold or regrouped at another one.

Free of Prefect: the CLI's `lookalike duplicates` and the API's /api/duplicates read here.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sqlalchemy import Connection, Engine, select

from lookalike.sql.schema import (
    duplicate_groups,
    duplicate_pairs,
    duplicate_state,
    image_names,
    sources,
)
from lookalike.tasks.duplicate_groups import Groups, Pairs, group_pairs, largest_first
from lookalike.tasks.errors import LookalikeError
from lookalike.tasks.settings import check_duplicate_threshold

CHUNK = 5000  # ids per IN (...) list


class DuplicatesNotFoundError(LookalikeError):
    """No run has computed duplicate groups in this database yet."""


@dataclass(frozen=True)
class Member:
    """One image of a group; the representative first, at distance 0."""

    id: int
    file_name: str  # relative to its source's root
    source: str  # the source's name
    size: int
    width: int | None
    height: int | None
    distance: float | None  # None: joined by a curator's "same object" judgement
    kind: str  # exact | near | judged


JUDGED = "judged"


@dataclass(frozen=True)
class Group:
    id: int  # the representative's image id
    members: list[Member] = field(default_factory=list)


@dataclass(frozen=True)
class GroupIndex:
    """Every group at one threshold, largest first, without image metadata yet."""

    threshold: float  # fraction of the scale
    distance: float  # the threshold as a distance
    scale: float
    histogram: dict[str, Any]
    order: list[int]  # group ids, largest first
    rows: dict[int, list[tuple[int, float, str]]]  # group id -> (image id, distance, kind)

    @property
    def images(self) -> int:
        return sum(len(r) for r in self.rows.values())


def read_group_index(engine: Engine, threshold: float | None = None) -> GroupIndex:
    """Groups at threshold (None: the stored one); another threshold regroups stored pairs."""
    with engine.connect() as conn:
        state = conn.execute(select(duplicate_state)).first()
        if state is None:
            raise DuplicatesNotFoundError(
                "no duplicate groups in this database yet: run `lookalike process` first"
            )
        if threshold is None or abs(threshold - state.threshold) < 1e-9:
            threshold, groups = float(state.threshold), _stored_groups(conn)
        else:
            check_duplicate_threshold(threshold)
            groups = _regrouped(conn, threshold * state.scale)
    rows: dict[int, list[tuple[int, float, str]]] = {}
    for g, i, d, k in groups.rows():
        rows.setdefault(g, []).append((i, d, k))
    for group_id, members in rows.items():  # the representative first, then the closest
        members.sort(key=lambda m, g=group_id: (m[0] != g, m[1], m[0]))  # type: ignore[misc]
    return GroupIndex(
        threshold=threshold,
        distance=threshold * float(state.scale),
        scale=float(state.scale),
        histogram=json.loads(state.histogram),
        order=largest_first(groups),
        rows=rows,
    )


def _stored_groups(conn: Connection) -> Groups:
    rows = conn.execute(
        select(
            duplicate_groups.c.group_id,
            duplicate_groups.c.image_id,
            duplicate_groups.c.distance,
            duplicate_groups.c.kind,
        )
    ).all()
    return Groups(
        group_id=np.array([r[0] for r in rows], dtype=np.int64),
        image_id=np.array([r[1] for r in rows], dtype=np.int64),
        distance=np.array([r[2] for r in rows], dtype=np.float32),
        exact=np.array([r[3] == "exact" for r in rows], dtype=bool),
    )


def _regrouped(conn: Connection, distance: float) -> Groups:
    rows = conn.execute(
        select(duplicate_pairs.c.image_id, duplicate_pairs.c.other_id, duplicate_pairs.c.distance)
    ).all()
    pairs = Pairs.of([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows])
    ids = np.unique(np.concatenate([pairs.a, pairs.b])).tolist()
    hashes = dict(_select_in(conn, [image_names.c.content_hash], ids))
    return group_pairs(pairs, distance, hashes)


def _select_in(conn: Connection, columns: list[Any], ids: list[int]) -> list[Any]:
    """(id, *columns) of the images with these ids, in chunks (columns of image_names and
    of their sources)."""
    found: list[Any] = []
    joined = image_names.join(sources, sources.c.id == image_names.c.source_id)
    for start in range(0, len(ids), CHUNK):
        chunk = ids[start : start + CHUNK]
        found += conn.execute(
            select(image_names.c.id, *columns)
            .select_from(joined)
            .where(image_names.c.id.in_(chunk))
        ).all()
    return found


# What a member shows: its path, source, size and dimensions.
MEMBER_COLUMNS = [
    image_names.c.file_name,
    sources.c.name,
    image_names.c.size,
    image_names.c.width,
    image_names.c.height,
]


def with_members(engine: Engine, index: GroupIndex, group_ids: list[int]) -> list[Group]:
    """The groups with these ids, each image with its path, size and dimensions."""
    ids = [i for g in group_ids for i, _, _ in index.rows[g]]
    with engine.connect() as conn:
        meta = {row[0]: row for row in _select_in(conn, MEMBER_COLUMNS, ids)}
    return [
        Group(
            g,
            [
                Member(i, meta[i][1], meta[i][2], int(meta[i][3]), meta[i][4], meta[i][5], d, k)
                for i, d, k in index.rows[g]
                if i in meta  # an image deleted since the groups were computed is left out
            ],
        )
        for g in group_ids
    ]


def judged_members(engine: Engine, ids: set[int]) -> list[Member]:
    """Images joined to a group by "same object" judgements, by id (those that still exist)."""
    with engine.connect() as conn:
        rows = sorted(_select_in(conn, MEMBER_COLUMNS, sorted(ids)))
    return [Member(r[0], r[1], r[2], int(r[3]), r[4], r[5], None, JUDGED) for r in rows]


def group_containing(index: GroupIndex, image_id: int) -> int | None:
    """The id of the group the image belongs to, or None."""
    for group_id, members in index.rows.items():
        if any(member[0] == image_id for member in members):
            return group_id
    return None


class GroupIndexCache:
    """The last few group indexes by threshold, kept until the stored groups change.

    A page of groups then costs one look at the state row and the page's metadata; a slider
    moving back and forth regroups each threshold once.
    """

    def __init__(self, engine: Engine, size: int = 8) -> None:
        self.engine = engine
        self.size = size
        self._indexes: dict[tuple[Any, float | None], GroupIndex] = {}
        self._lock = threading.Lock()

    def get(self, threshold: float | None) -> GroupIndex:
        """read_group_index(engine, threshold), from the cache while the groups are current."""
        with self.engine.connect() as conn:
            version = conn.execute(
                select(duplicate_state.c.fingerprint, duplicate_state.c.computed_at)
            ).first()
        key = (tuple(version) if version else None, threshold)
        with self._lock:
            if key in self._indexes:
                return self._indexes[key]
        index = read_group_index(self.engine, threshold)
        with self._lock:
            if len(self._indexes) >= self.size:
                self._indexes.pop(next(iter(self._indexes)))
            self._indexes[key] = index
        return index
