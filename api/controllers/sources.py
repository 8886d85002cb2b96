"""/api/sources: the archive's image folders, their images counted by status, their last run."""

from __future__ import annotations

from litestar import get

from lookalike.api.repository import ImageRepository
from lookalike.api.schemas import Source


@get("/api/sources", sync_to_thread=True, tags=["sources"])
def list_sources(repository: ImageRepository) -> list[Source]:
    """Every source by name: its root folder, its images by status and the last run that
    brought it up to date (null before one did)."""
    return repository.list_sources()
