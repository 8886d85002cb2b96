"""The web page at / (plain HTML, JavaScript and CSS from api/static, no build step)."""

from __future__ import annotations

from functools import cache
from pathlib import Path

from litestar import Response, get
from litestar.enums import MediaType
from litestar.static_files import create_static_files_router

from lookalike.api.errors import reject_nul_in_path

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"


@get("/", include_in_schema=False, sync_to_thread=False)
def index_page() -> Response[bytes]:
    """The main page; it reads everything else from /api."""
    return Response(read_page("index.html"), media_type=MediaType.HTML)


@get("/duplicates", include_in_schema=False, sync_to_thread=False)
def duplicates_page() -> Response[bytes]:
    """The duplicates view; it reads /api/duplicates."""
    return Response(read_page("duplicates.html"), media_type=MediaType.HTML)


@get("/map", include_in_schema=False, sync_to_thread=False)
def map_page() -> Response[bytes]:
    """The map view; it reads /api/map."""
    return Response(read_page("map.html"), media_type=MediaType.HTML)


@cache
def read_page(name: str) -> bytes:
    """A page of api/static, read once per process."""
    return (STATIC_DIR / name).read_bytes()


# Only file paths can hold a NUL that reaches the OS; other routes never see the hook.
static_files = create_static_files_router(
    path="/static", directories=[STATIC_DIR], before_request=reject_nul_in_path
)
