"""Curators' verdicts on pairs of images: record, clear, count, page through and export them."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine, and_, func, or_, select, update
from sqlalchemy.exc import DBAPIError, IntegrityError

from lookalike.sql.schema import image_names, judgement_audit, judgements, sources, users
from lookalike.tasks.database import is_transient, utcnow

log = logging.getLogger(__name__)

SAME_OBJECT = "same_object"
SIMILAR = "similar"
NOT_SIMILAR = "not_similar"
VERDICTS = (SAME_OBJECT, SIMILAR, NOT_SIMILAR)
MAX_NOTE_CHARS = 500
WRITE_ATTEMPTS = 5


@dataclass(frozen=True)
class Judgement:
    """One user's current verdict on a pair, as given from image_id's side."""

    image_id: int
    neighbour_id: int
    user: str
    verdict: str
    note: str | None
    updated_at: datetime


@dataclass
class PairVerdicts:
    """The verdicts on one pair: how many of each, and the asking user's own (or None)."""

    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(VERDICTS, 0))
    mine: str | None = None
    my_note: str | None = None


@dataclass(frozen=True)
class AuditEntry:
    """One change to a judgement."""

    id: int
    image_id: int
    neighbour_id: int
    user: str
    old_verdict: str | None
    new_verdict: str | None
    note: str | None
    changed_at: datetime
    address: str | None


def ordered_pair(image_id: int, other_id: int) -> tuple[int, int]:
    """The stored form of a pair: a verdict holds whichever side it was given from."""
    return (image_id, other_id) if image_id < other_id else (other_id, image_id)


def record_judgement(
    engine: Engine,
    image_id: int,
    other_id: int,
    user_id: int,
    verdict: str | None,
    note: str | None = None,
    address: str | None = None,
) -> datetime:
    """Set (or, with verdict None, clear) the user's verdict on the pair, with an audit row.

    Concurrent writes of one pair by one user can collide on the insert (or, on MariaDB,
    deadlock); the loser starts again and then updates the winner's row.
    """
    low, high = ordered_pair(image_id, other_id)
    for attempt in range(1, WRITE_ATTEMPTS + 1):
        try:
            with engine.begin() as conn:
                return _write_verdict(conn, (low, high, user_id), verdict, note, address)
        except (IntegrityError, DBAPIError) as exc:
            retryable = isinstance(exc, IntegrityError) or is_transient(exc)
            if not retryable or attempt == WRITE_ATTEMPTS:
                raise
            log.debug("judgement write collided (attempt %d); again", attempt)
            time.sleep(0.01 * attempt)
    raise AssertionError("unreachable")


def _write_verdict(
    conn: Connection,
    key: tuple[int, int, int],
    verdict: str | None,
    note: str | None,
    address: str | None,
) -> datetime:
    """Insert or update the current row and append the change to the audit table."""
    low, high, user_id = key
    where = and_(
        judgements.c.image_id == low, judgements.c.other_id == high, judgements.c.user_id == user_id
    )
    current = conn.execute(select(judgements.c.verdict).where(where).with_for_update()).first()
    now = utcnow()
    values = {"verdict": verdict, "note": note if verdict else None, "updated_at": now}
    old = current.verdict if current is not None else None
    if old is None and verdict is None:
        return now  # nothing to clear: no change, no audit row
    if current is None:
        conn.execute(
            judgements.insert().values(image_id=low, other_id=high, user_id=user_id, **values)
        )
    else:
        conn.execute(update(judgements).where(where).values(**values))
    conn.execute(
        judgement_audit.insert().values(
            image_id=low,
            other_id=high,
            user_id=user_id,
            old_verdict=old,
            new_verdict=verdict,
            note=values["note"],
            changed_at=now,
            address=address,
        )
    )
    return now


def pair_verdicts(
    conn: Connection, image_id: int, other_ids: Sequence[int], user_id: int | None
) -> dict[int, PairVerdicts]:
    """The verdicts on the pairs (image_id, other) for the given others; absent: none given."""
    if not other_ids:
        return {}
    wanted = set(other_ids)
    rows = conn.execute(
        select(
            judgements.c.image_id,
            judgements.c.other_id,
            judgements.c.user_id,
            judgements.c.verdict,
            judgements.c.note,
        )
        .where(judgements.c.verdict.is_not(None))
        .where(or_(judgements.c.image_id == image_id, judgements.c.other_id == image_id))
    ).all()
    found: dict[int, PairVerdicts] = {}
    for low, high, judge, verdict, note in rows:
        other = high if low == image_id else low
        if other not in wanted:
            continue
        pair = found.setdefault(other, PairVerdicts())
        pair.counts[verdict] += 1
        if judge == user_id:
            pair.mine, pair.my_note = verdict, note
    return found


def any_judgements(conn: Connection) -> bool:
    """Whether anyone ever judged a pair (cleared marks count: their rows stay)."""
    return conn.execute(select(judgements.c.user_id).limit(1)).first() is not None


def hidden_by_verdict(verdicts: PairVerdicts | None, signed_in: bool) -> bool:
    """Whether "hide not similar" hides this pair: the user's own verdict when signed in;
    for anonymous readers, when "not similar" outnumbers the other verdicts together."""
    if verdicts is None:
        return False
    if signed_in:
        return verdicts.mine == NOT_SIMILAR
    others = verdicts.counts[SAME_OBJECT] + verdicts.counts[SIMILAR]
    return verdicts.counts[NOT_SIMILAR] > others


def same_object_partners(conn: Connection, image_ids: Sequence[int]) -> set[int]:
    """Images that someone marked "same object" with any of the given images."""
    ids = list(image_ids)
    rows = conn.execute(
        select(judgements.c.image_id, judgements.c.other_id)
        .where(judgements.c.verdict == SAME_OBJECT)
        .where(or_(judgements.c.image_id.in_(ids), judgements.c.other_id.in_(ids)))
    ).all()
    return {other for pair in rows for other in pair} - set(ids)


def count_judgements(conn: Connection, user: str | None = None, verdict: str | None = None) -> int:
    """How many current (not cleared) judgements match the filters."""
    query = _filtered(select(func.count()).select_from(_with_users()), user, verdict)
    return int(conn.execute(query).scalar_one())


def list_judgements(
    conn: Connection,
    offset: int,
    limit: int,
    user: str | None = None,
    verdict: str | None = None,
) -> list[Judgement]:
    """Current judgements, newest first."""
    query = _filtered(_judgement_columns(), user, verdict)
    ordered = query.order_by(
        judgements.c.updated_at.desc(),
        judgements.c.image_id,
        judgements.c.other_id,
        judgements.c.user_id,
    )
    return [_judgement(row) for row in conn.execute(ordered.offset(offset).limit(limit))]


def list_audit(conn: Connection, offset: int, limit: int) -> tuple[int, list[AuditEntry]]:
    """Every change, newest first, and how many there are."""
    total = int(conn.execute(select(func.count()).select_from(judgement_audit)).scalar_one())
    query = (
        select(judgement_audit, users.c.name.label("user"))
        .join(users, users.c.id == judgement_audit.c.user_id)
        .order_by(judgement_audit.c.id.desc())
        .offset(offset)
        .limit(limit)
    )
    entries = [
        AuditEntry(
            id=row.id,
            image_id=row.image_id,
            neighbour_id=row.other_id,
            user=row.user,
            old_verdict=row.old_verdict,
            new_verdict=row.new_verdict,
            note=row.note,
            changed_at=row.changed_at,
            address=row.address,
        )
        for row in conn.execute(query)
    ]
    return total, entries


EXPORT_FIELDS = (
    "image_id",
    "image_source",
    "image_file",
    "neighbour_id",
    "neighbour_source",
    "neighbour_file",
    "user",
    "verdict",
    "note",
    "updated_at",
)


def export_judgements(engine: Engine) -> Iterator[dict[str, Any]]:
    """Every current judgement with both images' files (None where an image is gone)."""
    first = image_names.alias("first_image")
    second = image_names.alias("second_image")
    first_source = sources.alias("first_source")
    second_source = sources.alias("second_source")
    query = (
        _judgement_columns()
        .add_columns(
            first.c.file_name.label("image_file"),
            second.c.file_name.label("other_file"),
            first_source.c.name.label("image_source"),
            second_source.c.name.label("other_source"),
        )
        .outerjoin(first, first.c.id == judgements.c.image_id)
        .outerjoin(second, second.c.id == judgements.c.other_id)
        .outerjoin(first_source, first_source.c.id == first.c.source_id)
        .outerjoin(second_source, second_source.c.id == second.c.source_id)
        .where(judgements.c.verdict.is_not(None))
        .order_by(judgements.c.image_id, judgements.c.other_id, judgements.c.user_id)
    )
    with engine.connect() as conn:
        for row in conn.execute(query):
            yield {
                "image_id": row.image_id,
                "image_source": row.image_source,
                "image_file": row.image_file,
                "neighbour_id": row.other_id,
                "neighbour_source": row.other_source,
                "neighbour_file": row.other_file,
                "user": row.user,
                "verdict": row.verdict,
                "note": row.note,
                "updated_at": row.updated_at.isoformat(),
            }


def _with_users() -> Any:
    return judgements.join(users, users.c.id == judgements.c.user_id)


def _judgement_columns() -> Any:
    return select(
        judgements.c.image_id,
        judgements.c.other_id,
        users.c.name.label("user"),
        judgements.c.verdict,
        judgements.c.note,
        judgements.c.updated_at,
    ).select_from(_with_users())


def _filtered(query: Any, user: str | None, verdict: str | None) -> Any:
    query = query.where(judgements.c.verdict.is_not(None))
    if user is not None:
        query = query.where(users.c.name == user)
    if verdict is not None:
        query = query.where(judgements.c.verdict == verdict)
    return query


def _judgement(row: Any) -> Judgement:
    return Judgement(
        image_id=row.image_id,
        neighbour_id=row.other_id,
        user=row.user,
        verdict=row.verdict,
        note=row.note,
        updated_at=row.updated_at,
    )
