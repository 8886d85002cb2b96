"""Whether the database has this version's tables; an older one waits for the pipeline.

The API's account may only read, so it never migrates: a database made before sources
(image folders) existed answers 503 until a pipeline command (which migrates it) has run.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from litestar import Request
from litestar.concurrency import sync_to_thread
from sqlalchemy import Engine

from lookalike.api.errors import ServiceUnavailableError
from lookalike.sql.migrations import needs_sources_migration

log = logging.getLogger(__name__)

MIGRATE_FIRST = (
    "the database predates sources (image folders): run `lookalike process` "
    "(or any pipeline command) once to migrate it"
)
RECHECK_S = 1.0  # an old database is looked at again at most this often
# Routes that read the images' tables. /health says the same in its own shape; the pages, the
# static files and the session (users only) answer regardless.
GATED_PREFIXES = ("/api/", "/data/")
UNGATED = ("/api/session",)


class SchemaGate:
    """Looks at the database's layout until it is current; from then on costs nothing.

    Migrations only go forward, so once current it stays current.
    """

    def __init__(self, engine: Engine, recheck_s: float = RECHECK_S) -> None:
        self.engine = engine
        self.recheck_s = recheck_s
        self.known_current = False
        self._lock = threading.Lock()
        self._checked_at = -float("inf")
        self._warned = False

    def is_current(self) -> bool:
        """Whether the tables are current (SQLAlchemyError when the database does not answer)."""
        if self.known_current:
            return True
        with self._lock:
            if self.known_current or time.monotonic() - self._checked_at < self.recheck_s:
                return self.known_current
            old = needs_sources_migration(self.engine)
            self._checked_at = time.monotonic()
            self.known_current = not old
        if old and not self._warned:
            log.warning("%s; until then the API answers 503", MIGRATE_FIRST)
            self._warned = True
        return not old

    def require_current(self) -> None:
        """ServiceUnavailableError (503) with MIGRATE_FIRST for an old database."""
        if not self.is_current():
            raise ServiceUnavailableError(MIGRATE_FIRST)

    def before_request(self) -> Any:
        """A before_request hook: 503 on the gated routes while the database is old.

        Async on purpose: Litestar runs a sync hook in a worker thread, and once the tables
        are current this returns without one.
        """

        async def check(request: Request[Any, Any, Any]) -> None:
            if self.known_current:
                return
            path = request.scope["path"]
            if path.startswith(GATED_PREFIXES) and not path.startswith(UNGATED):
                await sync_to_thread(self.require_current)

        return check
