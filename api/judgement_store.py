"""Judgements for the API: reads through the reader account, writes through the writer's."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any, TypeVar

import msgspec
from sqlalchemy import Engine

from lookalike.api.errors import WritesDisabledError
from lookalike.api.schemas import AuditEntry, Judgement, JudgementPage, Neighbour, VerdictCounts
from lookalike.tasks import judgements
from lookalike.tasks.judgements import PairVerdicts, hidden_by_verdict

# While the judgement table is empty, neighbour answers skip it; another API process's first
# judgement shows here within this many seconds (this process's own at once).
RECHECK_EMPTY_S = 2.0
T = TypeVar("T")


class JudgementStore:
    """The judgement tables; writer None when LOOKALIKE_WRITER_DATABASE_URL is not set."""

    def __init__(self, reader: Engine, writer: Engine | None) -> None:
        self.reader = reader
        self.writer = writer
        self._some_exist = False  # rows are never deleted: once true, true for good
        self._checked_at = -RECHECK_EMPTY_S

    def may_have_verdicts(self) -> bool:
        """False while a look at the table no older than RECHECK_EMPTY_S found it empty.

        Most archives have no judgements for a long time, and the neighbours route then
        answers from memory without a thread hop or a query.
        """
        if self._some_exist:
            return True
        now = time.monotonic()
        if now - self._checked_at < RECHECK_EMPTY_S:
            return False
        self._checked_at = now
        return True  # annotate() looks

    def record(
        self,
        image_id: int,
        other_id: int,
        user_id: int,
        verdict: str | None,
        note: str | None,
        address: str | None,
    ) -> str:
        """Set or clear a verdict; the time it took effect, ISO 8601."""
        if self.writer is None:
            raise WritesDisabledError(
                "judgements cannot be saved: this service has no writer database account "
                "(set LOOKALIKE_WRITER_DATABASE_URL)"
            )
        when = judgements.record_judgement(
            self.writer, image_id, other_id, user_id, verdict, note, address
        )
        self._some_exist = True
        return when.isoformat()

    def annotate(
        self, image_id: int, found: Sequence[Neighbour], user_id: int | None
    ) -> dict[int, PairVerdicts]:
        """The verdicts on the pairs (image, neighbour) of a neighbour list."""
        with self.reader.connect() as conn:
            if not self._some_exist:
                self._some_exist = judgements.any_judgements(conn)
                if not self._some_exist:
                    return {}
            return judgements.pair_verdicts(conn, image_id, [n.id for n in found], user_id)

    def page(self, offset: int, limit: int, user: str | None, verdict: str | None) -> JudgementPage:
        with self.reader.connect() as conn:
            total = judgements.count_judgements(conn, user, verdict)
            rows = judgements.list_judgements(conn, offset, limit, user, verdict)
        items = [as_answer(row, Judgement, "updated_at") for row in rows]
        return JudgementPage(total=total, offset=offset, limit=limit, items=items)

    def audit(self, offset: int, limit: int) -> tuple[int, list[AuditEntry]]:
        with self.reader.connect() as conn:
            total, rows = judgements.list_audit(conn, offset, limit)
        entries = [as_answer(row, AuditEntry, "changed_at") for row in rows]
        return total, entries

    def same_object_partners(self, image_ids: Sequence[int]) -> set[int]:
        with self.reader.connect() as conn:
            return judgements.same_object_partners(conn, image_ids)


def as_answer(row: Any, answer: type[T], time_field: str) -> T:
    """A tasks.judgements row as its API struct (same field names), its time in ISO 8601."""
    fields = asdict(row)
    fields[time_field] = fields[time_field].isoformat()
    return msgspec.convert(fields, answer)


def with_verdicts(
    found: Sequence[Neighbour], verdicts: dict[int, PairVerdicts], hide: bool, signed_in: bool
) -> list[Neighbour]:
    """The neighbours with their verdicts, less the hidden ones when asked."""
    shown = []
    for neighbour in found:
        pair = verdicts.get(neighbour.id)
        if hide and hidden_by_verdict(pair, signed_in):
            continue
        if pair is not None:
            neighbour = msgspec.structs.replace(
                neighbour,
                verdicts=VerdictCounts(**pair.counts),
                my_verdict=pair.mine,
                my_note=pair.my_note,
            )
        shown.append(neighbour)
    return shown
