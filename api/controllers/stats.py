"""/api/stats: counts, model and weights, and the time of the last completed run."""

from __future__ import annotations

from litestar import get

from lookalike.api.repository import StatsCache
from lookalike.api.schemas import Stats


@get("/api/stats", sync_to_thread=True, tags=["service"])
def get_stats(stats: StatsCache) -> Stats:
    """What the collection holds (recounted at most every 30 seconds)."""
    return stats.get()
