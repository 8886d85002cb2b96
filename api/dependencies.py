"""Every dependency the route handlers receive, provided in one place."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from litestar.di import Provide

from lookalike.api.admission import Admission
from lookalike.api.judgement_store import JudgementStore
from lookalike.api.neighbour_cache import NeighbourCache, NeighbourLookup
from lookalike.api.repository import ImageRepository, StatsCache
from lookalike.api.schema_check import SchemaGate
from lookalike.api.search_index import SimilaritySearch
from lookalike.api.security import Accounts
from lookalike.tasks.duplicate_reader import GroupIndexCache
from lookalike.tasks.map_reader import MapCache
from lookalike.tasks.settings import Settings

SERVICE_NAMES = (
    "settings",
    "repository",
    "search",
    "stats",
    "neighbour_cache",
    "neighbours",
    "duplicates",
    "admission",
    "maps",
    "accounts",
    "judgement_store",
    "schema_gate",
)


@dataclass(frozen=True)
class Services:
    """The app's long-lived objects, made once by create_app()."""

    settings: Settings
    repository: ImageRepository
    search: SimilaritySearch
    stats: StatsCache
    neighbour_cache: NeighbourCache | None
    neighbours: NeighbourLookup
    duplicates: GroupIndexCache
    admission: Admission
    maps: MapCache
    accounts: Accounts
    judgement_store: JudgementStore
    schema_gate: SchemaGate


def build_dependencies(services: Services) -> dict[str, Provide]:
    """One provider per service, returning the object itself.

    Closures rather than reading the app's State: Litestar builds a State object per
    request for every provider that asks for it, a measurable cost on the hottest routes.
    They run inline (sync_to_thread=False) because they do no work.
    """
    return {
        name: Provide(_returning(getattr(services, name)), sync_to_thread=False)
        for name in SERVICE_NAMES
    }


def _returning(value: Any) -> Callable[[], Any]:
    """A provider that hands out value."""

    def provide() -> Any:
        return value

    return provide
