"""Every stored neighbour list in memory (MariaDB), reloaded in the background after each run.

The neighbour table only changes inside a run, and every run holds the database's run lock
and ends by marking itself completed. So the service loads all lists once, answers
/neighbours from memory, and watches the lock and the runs table: while a run holds the
lock, requests go to the database; once it has ended (or the table was swapped), the lists
are loaded again, once. A request never sees lists older than the database's.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import numpy as np
from litestar.concurrency import sync_to_thread
from sqlalchemy import Connection, Engine, text

from lookalike.api.judgement_store import JudgementStore, with_verdicts
from lookalike.api.repository import (
    ImageRepository,
    RunMarker,
    SourceFilter,
    wanted_neighbours,
)
from lookalike.api.schemas import Neighbour

log = logging.getLogger(__name__)

POLL_SECONDS = 2.0
# One row per image: its neighbour ids and distances in rank order, as text. The distances
# come back as the same text a plain SELECT gives, so both paths answer the same floats.
_ALL_LISTS = text(
    "SELECT image_id, GROUP_CONCAT(neighbour_id ORDER BY `rank` SEPARATOR ','), "
    "GROUP_CONCAT(distance ORDER BY `rank` SEPARATOR ',') "
    "FROM image_neighbours GROUP BY image_id"
)
GROUP_CONCAT_LIMIT = 1 << 24  # bytes per list; 32767 ranks of ~20 characters fit
_ALL_NAMES = text(
    "SELECT image_names.id, image_names.file_name, sources.name "
    "FROM image_names JOIN sources ON sources.id = image_names.source_id"
)


@dataclass(frozen=True)
class CachedNeighbourLists:
    """All lists of one completed state: image id -> slice of the flat arrays."""

    marker: RunMarker
    spans: dict[int, tuple[int, int]]
    neighbour_ids: np.ndarray  # int32, every list one after the other
    distances: np.ndarray  # float64: the exact values the database path returns
    names: dict[int, str]
    sources: dict[int, str]  # image id -> its source's name (one string object per source)


@dataclass(frozen=True)
class NeighbourAnswer:
    """The neighbours to show, and how many the request asked for (more: a filter left fewer)."""

    neighbours: list[Neighbour]
    wanted: int


class NeighbourCache:
    """Answers neighbour requests from memory while its lists match the last completed run."""

    def __init__(self, repository: ImageRepository, poll_seconds: float = POLL_SECONDS) -> None:
        self.repository = repository
        self.poll_seconds = poll_seconds
        self._lists: CachedNeighbourLists | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def lookup(self, image_id: int, k: int | None) -> list[Neighbour] | None:
        """The k nearest neighbours from memory; None when the database must answer."""
        lists = self._lists
        span = None if lists is None else lists.spans.get(image_id)
        if lists is None or span is None:
            return None  # not loaded, being reloaded, or no lists for this id: ask the database
        start, stop = span
        return _ranked(lists, start, wanted_neighbours(image_id, k, stop - start))

    def lookup_all(self, image_id: int) -> list[Neighbour] | None:
        """Every stored neighbour from memory; None when the database must answer."""
        lists = self._lists
        span = None if lists is None else lists.spans.get(image_id)
        if lists is None or span is None:
            return None
        return _ranked(lists, span[0], span[1] - span[0])

    def describe(self) -> str:
        """'N lists' when answering from memory, else 'loading'."""
        lists = self._lists
        return "loading" if lists is None else f"{len(lists.spans)} lists"

    def start(self) -> None:
        """Load the lists and keep them current, in a background thread."""
        self._stop.clear()
        self._thread = threading.Thread(target=self._watch, name="neighbour-cache", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop watching (the app is shutting down)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def wait_until_loaded(self, timeout: float) -> bool:
        """True once lists are loaded, False after timeout seconds (for tests and benchmarks)."""
        deadline = time.monotonic() + timeout
        while self._lists is None and time.monotonic() < deadline:
            time.sleep(0.05)
        return self._lists is not None

    def _watch(self) -> None:
        """Poll the runs table; reload the lists whenever a newer run has completed."""
        while not self._stop.is_set():
            try:
                self.refresh()
            except Exception:  # the database may be down: the request path reports that
                log.warning("neighbour cache refresh failed; answering from the database")
                log.debug("neighbour cache refresh failure", exc_info=True)
                self._lists = None
            self._stop.wait(self.poll_seconds)

    def refresh(self) -> None:
        """Drop the lists while a run is in progress; load them when they are not current."""
        if self.repository.run_in_progress():
            if self._lists is not None:
                log.info("neighbour cache: a run is in progress; the database answers")
            self._lists = None
            return
        marker = self.repository.latest_run_marker()
        if self._lists is not None and self._lists.marker == marker:
            return
        self._lists = None  # from now until the reload ends, the database answers
        lists = read_all_lists(self.repository.engine, marker)
        if self.repository.latest_run_marker() == marker:  # no run started or ended meanwhile
            self._lists = lists
            log.info("neighbour cache: %d lists in memory", len(lists.spans))


class NeighbourLookup:
    """The one place handlers get neighbour lists: from memory when current, else the database.

    A single dependency on purpose: Litestar resolves two or more dependencies of a handler
    in an anyio task group per request, a quarter of the server's time on this route.
    """

    def __init__(
        self,
        repository: ImageRepository,
        cache: NeighbourCache | None,
        judgements: JudgementStore,
    ) -> None:
        self.repository = repository
        self.cache = cache
        self.judgements = judgements

    async def fetch(
        self, image_id: int, k: int | None, only: SourceFilter | None = None
    ) -> NeighbourAnswer:
        """The k nearest neighbours of an image (default up to 20), closest first; with a
        source filter, the stored list is filtered first, then cut to k (possibly fewer)."""
        if only is not None:
            return await self._fetch_filtered(image_id, k, only)
        cached = None if self.cache is None else self.cache.lookup(image_id, k)
        if cached is not None:
            return NeighbourAnswer(cached, len(cached))  # no thread hop, no query
        found = await sync_to_thread(self.repository.get_neighbours, image_id, k)
        return NeighbourAnswer(found, len(found))

    async def _fetch_filtered(
        self, image_id: int, k: int | None, only: SourceFilter
    ) -> NeighbourAnswer:
        """The stored list, filtered by source, then cut to what the request asks for."""
        stored = await self.everything(image_id)
        wanted = wanted_neighbours(image_id, k, len(stored))  # k checked against the stored k
        kept = [neighbour for neighbour in stored if only.keeps(neighbour.source)]
        return NeighbourAnswer(kept[:wanted], wanted)

    async def everything(self, image_id: int) -> list[Neighbour]:
        """Every stored neighbour of an image (404 for an unknown id), closest first."""
        cached = None if self.cache is None else self.cache.lookup_all(image_id)
        if cached is not None:
            return cached
        return await sync_to_thread(self.repository.get_stored_neighbours, image_id)

    async def judged(
        self,
        image_id: int,
        found: NeighbourAnswer,
        user_id: int | None,
        hide: bool,
        only: SourceFilter | None = None,
    ) -> list[Neighbour]:
        """The neighbours with curators' verdicts; with hide, the caller's "not similar"
        pairs (anonymous: where that verdict outnumbers the others) are replaced by further
        stored neighbours (of the filter's sources). No thread hop or query while the
        database holds no verdicts."""
        shown = found.neighbours
        if not shown or not self.judgements.may_have_verdicts():
            return shown
        signed_in = user_id is not None
        verdicts = await sync_to_thread(self.judgements.annotate, image_id, shown, user_id)
        kept = with_verdicts(shown, verdicts, hide, signed_in)
        if len(kept) == len(shown):
            return kept
        everything = await self.everything(image_id)
        if only is not None:
            everything = [n for n in everything if only.keeps(n.source)]
        verdicts = await sync_to_thread(self.judgements.annotate, image_id, everything, user_id)
        return with_verdicts(everything, verdicts, True, signed_in)[: found.wanted]


def _ranked(lists: CachedNeighbourLists, start: int, count: int) -> list[Neighbour]:
    """count neighbours of the list that starts at start, with their names and ranks."""
    ids = lists.neighbour_ids[start : start + count].tolist()
    distances = lists.distances[start : start + count].tolist()
    names, sources = lists.names, lists.sources
    # Positional arguments: measurably faster than keywords on the hottest route.
    return [
        Neighbour(neighbour, names[neighbour], sources[neighbour], rank, distance)
        for rank, (neighbour, distance) in enumerate(zip(ids, distances, strict=True), 1)
    ]


def read_all_lists(engine: Engine, marker: RunMarker) -> CachedNeighbourLists:
    """Every image's neighbour list and every file name, read in two queries."""
    spans: dict[int, tuple[int, int]] = {}
    id_parts: list[np.ndarray] = []
    distance_parts: list[np.ndarray] = []
    filled = 0
    with engine.connect() as conn:
        conn.exec_driver_sql(f"SET SESSION group_concat_max_len = {GROUP_CONCAT_LIMIT}")
        for image_id, ids_text, distances_text in conn.execute(_ALL_LISTS):
            id_parts.append(np.array(ids_text.split(","), dtype=np.int32))
            distance_parts.append(np.array(distances_text.split(","), dtype=np.float64))
            spans[int(image_id)] = (filled, filled + len(id_parts[-1]))
            filled += len(id_parts[-1])
        names, sources = _read_names(conn)
    return CachedNeighbourLists(
        marker,
        spans,
        np.concatenate(id_parts) if id_parts else np.empty(0, np.int32),
        np.concatenate(distance_parts) if distance_parts else np.empty(0, np.float64),
        names,
        sources,
    )


def _read_names(conn: Connection) -> tuple[dict[int, str], dict[int, str]]:
    """Every image's file name and source name; each source name is one shared string."""
    rows = conn.execute(_ALL_NAMES).tuples()
    names: dict[int, str] = {}
    sources: dict[int, str] = {}
    shared: dict[str, str] = {}
    for image_id, name, source in rows:
        names[int(image_id)] = name
        sources[int(image_id)] = shared.setdefault(source, source)
    return names, sources
