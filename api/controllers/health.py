"""/health: 200 when the database answers, 503 when it does not."""

from __future__ import annotations

import logging

from litestar import Response, get
from sqlalchemy.exc import SQLAlchemyError

from lookalike.api.neighbour_cache import NeighbourCache
from lookalike.api.repository import ImageRepository
from lookalike.api.schemas import Health

log = logging.getLogger(__name__)


@get("/health", sync_to_thread=True, tags=["service"])
def health(repository: ImageRepository, neighbour_cache: NeighbourCache | None) -> Response[Health]:
    """Whether the service can read its database."""
    try:
        repository.ping()
    except SQLAlchemyError as exc:
        log.warning("health check failed: %s", exc)
        unavailable = Health(status="unavailable", detail="database unavailable")
        return Response(unavailable, status_code=503)
    cache = None if neighbour_cache is None else neighbour_cache.describe()
    return Response(Health(status="ok", neighbour_cache=cache), status_code=200)
