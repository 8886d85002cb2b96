"""The Litestar application: create_app() wires settings, database, routes and errors together."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from litestar import Litestar
from litestar.config.cors import CORSConfig
from litestar.datastructures import ResponseHeader, State
from litestar.openapi import OpenAPIConfig
from litestar.openapi.spec import Components, Reference, SecurityScheme
from sqlalchemy import Engine
from sqlalchemy.pool import QueuePool

from lookalike.api.admission import Admission
from lookalike.api.controllers.duplicates import get_image_duplicates, list_duplicates
from lookalike.api.controllers.health import health
from lookalike.api.controllers.images import SHORT_HEADER, ImageController
from lookalike.api.controllers.judgements import (
    delete_judgement,
    list_judgement_history,
    list_judgements,
    put_judgement,
)
from lookalike.api.controllers.legacy import LegacyController
from lookalike.api.controllers.map import get_map, get_map_folders, get_map_near
from lookalike.api.controllers.pages import (
    duplicates_page,
    index_page,
    map_page,
    static_files,
)
from lookalike.api.controllers.search import search_by_text, search_by_upload
from lookalike.api.controllers.session import SessionController
from lookalike.api.controllers.sources import list_sources
from lookalike.api.controllers.stats import get_stats
from lookalike.api.dependencies import Services, build_dependencies
from lookalike.api.errors import EXCEPTION_HANDLERS
from lookalike.api.judgement_store import JudgementStore
from lookalike.api.neighbour_cache import NeighbourCache, NeighbourLookup
from lookalike.api.repository import ImageRepository, StatsCache
from lookalike.api.schema_check import SchemaGate
from lookalike.api.search_index import SimilaritySearch
from lookalike.api.security import Accounts, security_middleware
from lookalike.tasks.database import create_db_engine, create_reader_engine, is_mariadb
from lookalike.tasks.duplicate_reader import GroupIndexCache
from lookalike.tasks.map_reader import MapCache
from lookalike.tasks.settings import Settings

log = logging.getLogger(__name__)

MULTIPART_OVERHEAD_BYTES = 64 * 1024  # boundaries and part headers around the uploaded file
API_VERSION = "1.0.0"
DEFAULT_WORKER_THREADS = 5
SECURITY_SCHEMES: dict[str, SecurityScheme | Reference] = {
    "bearerToken": SecurityScheme(
        type="http", scheme="bearer", description="A token from `lookalike users token NAME`."
    ),
    "sessionCookie": SecurityScheme(
        type="apiKey",
        name="lookalike_session",
        security_scheme_in="cookie",
        description="The page's session (POST /api/session); needs the X-CSRF-Token header.",
    ),
}


def create_app(settings: Settings | None = None) -> Litestar:
    """The web service for the database named by settings (None: read LOOKALIKE_* variables)."""
    settings = settings or Settings.from_env()
    engine = create_reader_engine(settings.resolved_database_url)
    repository = ImageRepository(engine)
    neighbours = NeighbourCache(repository) if uses_neighbour_cache(settings, engine) else None
    admission = Admission.from_settings(settings)
    writer = (
        create_db_engine(settings.writer_database_url) if settings.writer_database_url else None
    )
    judgements = JudgementStore(engine, writer)
    services = Services(
        settings=settings,
        repository=repository,
        search=SimilaritySearch(repository, settings, compute_threads=admission.compute_threads),
        stats=StatsCache(repository),
        neighbour_cache=neighbours,
        neighbours=NeighbourLookup(repository, neighbours, judgements),
        duplicates=GroupIndexCache(engine),
        admission=admission,
        maps=MapCache(engine),
        accounts=Accounts(engine),
        judgement_store=judgements,
        schema_gate=SchemaGate(engine),
    )
    return Litestar(
        route_handlers=[
            ImageController,
            LegacyController,
            list_duplicates,
            get_image_duplicates,
            get_map,
            get_map_folders,
            get_map_near,
            put_judgement,
            delete_judgement,
            list_judgements,
            list_judgement_history,
            SessionController,
            search_by_upload,
            search_by_text,
            get_stats,
            list_sources,
            health,
            index_page,
            duplicates_page,
            map_page,
            static_files,
        ],
        dependencies=build_dependencies(services),
        exception_handlers=EXCEPTION_HANDLERS,
        # 503 on /api and /data while the tables predate sources. A layer's own before_request
        # replaces this one (the static files' does, and need not wait for a migration).
        before_request=services.schema_gate.before_request(),
        state=State(vars(services)),  # the same objects, for tests and tools
        cors_config=cors_config(settings.cors_origins),
        middleware=[security_middleware(settings)],
        openapi_config=OpenAPIConfig(
            title="lookalike",
            version=API_VERSION,
            path="/schema",
            components=Components(security_schemes=SECURITY_SCHEMES),
        ),
        request_max_body_size=settings.upload_limit_mb * 1024 * 1024 + MULTIPART_OVERHEAD_BYTES,
        response_headers=[ResponseHeader(name="X-Content-Type-Options", value="nosniff")],
        on_startup=[
            run_handlers_on(worker_threads_for(engine)),
            services.stats.start,
            services.maps.start,
            *cache_hooks(neighbours, "start"),
        ],
        on_shutdown=[
            *cache_hooks(neighbours, "stop"),
            admission.close,
            lambda: engine.dispose(),
            *([writer.dispose] if writer is not None else []),
        ],
        debug=False,
    )


def uses_neighbour_cache(settings: Settings, engine: Engine) -> bool:
    """Lists in memory on MariaDB when enabled; SQLite answers in-process fast enough."""
    return settings.neighbour_cache and is_mariadb(engine)


def cache_hooks(cache: NeighbourCache | None, action: str) -> list[Callable[[], None]]:
    """The cache's start or stop as a startup/shutdown hook (none without a cache)."""
    return [] if cache is None else [getattr(cache, action)]


def worker_threads_for(engine: Engine) -> int:
    """As many handler threads as pooled connections.

    One thread more and, whenever all are busy, SQLAlchemy opens an overflow connection and
    closes it again after the request: a TCP and TLS handshake per request, which profiling
    showed to be a fifth of the server's time under 8 concurrent clients.
    """
    pool = engine.pool
    return max(1, pool.size()) if isinstance(pool, QueuePool) else DEFAULT_WORKER_THREADS


def run_handlers_on(threads: int) -> Callable[[], None]:
    """A startup hook giving the event loop an executor of this many threads.

    Litestar runs sync_to_thread handlers on the running loop's default executor.
    """

    def use_executor() -> None:
        executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="lookalike-api")
        asyncio.get_running_loop().set_default_executor(executor)

    return use_executor


def cors_config(origins: str) -> CORSConfig | None:
    """CORS for the listed origins (comma separated); None keeps it closed."""
    allowed = [origin.strip() for origin in origins.split(",") if origin.strip()]
    if not allowed:
        return None
    return CORSConfig(
        allow_origins=allowed,
        allow_methods=["GET", "POST"],
        allow_credentials=False,
        expose_headers=[SHORT_HEADER],  # the neighbours' "fewer than asked for"
    )


def run_server(settings: Settings) -> None:
    """Serve the API and the page with uvicorn on settings.host:settings.port until stopped."""
    import uvicorn

    app = create_app(settings)
    log.info("serving lookalike on http://%s:%d", settings.host, settings.port)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info")
