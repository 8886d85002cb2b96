"""Every dependency the route handlers receive, provided in one place from the app's state."""

from __future__ import annotations

from litestar.datastructures import State
from litestar.di import Provide

from api.repository import ImageRepository, StatsCache
from api.search_index import SimilaritySearch
from tasks.settings import Settings


def provide_settings(state: State) -> Settings:
    """The settings the app was created with."""
    settings: Settings = state.settings
    return settings


def provide_repository(state: State) -> ImageRepository:
    """The one repository (and engine) of the app."""
    repository: ImageRepository = state.repository
    return repository


def provide_stats(state: State) -> StatsCache:
    """The shared statistics cache."""
    stats: StatsCache = state.stats
    return stats


def provide_search(state: State) -> SimilaritySearch:
    """The search-by-upload index, shared by all requests so it loads once."""
    search: SimilaritySearch = state.search
    return search


# These only read app state, so they run inline rather than in a thread.
DEPENDENCIES = {
    "settings": Provide(provide_settings, sync_to_thread=False),
    "repository": Provide(provide_repository, sync_to_thread=False),
    "search": Provide(provide_search, sync_to_thread=False),
    "stats": Provide(provide_stats, sync_to_thread=False),
}
