"""/health: 200 when the database answers, 503 when it does not or its tables predate sources."""

from __future__ import annotations

import logging

from litestar import Response, get
from sqlalchemy.exc import SQLAlchemyError

from lookalike.api.neighbour_cache import NeighbourCache
from lookalike.api.repository import ImageRepository
from lookalike.api.schema_check import MIGRATE_FIRST, SchemaGate
from lookalike.api.schemas import Health

log = logging.getLogger(__name__)


@get("/health", sync_to_thread=True, tags=["service"])
def health(
    repository: ImageRepository,
    neighbour_cache: NeighbourCache | None,
    schema_gate: SchemaGate,
) -> Response[Health]:
    """Whether the service can read its database (and its tables are this version's)."""
    try:
        repository.ping()
        current = schema_gate.is_current()
    except SQLAlchemyError as exc:
        log.warning("health check failed: %s", exc)
        unavailable = Health(status="unavailable", detail="database unavailable")
        return Response(unavailable, status_code=503)
    if not current:
        return Response(Health(status="unavailable", detail=MIGRATE_FIRST), status_code=503)
    cache = None if neighbour_cache is None else neighbour_cache.describe()
    return Response(Health(status="ok", neighbour_cache=cache), status_code=200)
