"""/api/images: the list, one image, its neighbours, features, file, thumbnail and fingerprint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, cast

import msgspec
from litestar import Controller, MediaType, Request, Response, get
from litestar.concurrency import sync_to_thread
from litestar.datastructures import ResponseHeader
from litestar.params import Parameter
from litestar.response import File

from lookalike.api.admission import Admission, client_key, limit_renders, refused_slowly
from lookalike.api.controllers.params import ImageId
from lookalike.api.errors import BadRequestError
from lookalike.api.fingerprint import render_png, render_svg
from lookalike.api.media import (
    THUMBNAIL_SIZES,
    ensure_thumbnail,
    read_media_type,
    resolve_image_path,
    thumbnail_path,
)
from lookalike.api.neighbour_cache import NeighbourLookup
from lookalike.api.openapi import REFUSALS, RefusableOperation
from lookalike.api.repository import MAX_RANK, ImageFile, ImageRepository, SourceFilter
from lookalike.api.schemas import Features, ImageDetail, ImagePage, Neighbour
from lookalike.api.security import current_identity
from lookalike.tasks.settings import Settings

_JSON = msgspec.json.Encoder()
MAX_PAGE = 500
MAX_OFFSET = 2**31 - 1
FILE_CACHE = "private, max-age=300"
SVG_MEDIA_TYPE = "image/svg+xml"
# Routes that render on every request: the client's render allowance, and its 429 documented.
RENDER_LIMITED: dict[str, Any] = {
    "guards": [limit_renders],
    "responses": {429: REFUSALS[429]},
    "operation_class": RefusableOperation,
}
# Sent when a filter (sources, hidden pairs) left fewer neighbours than the request asked for:
# how many there are. A bare list stays the answer, so default requests are unchanged.
SHORT_HEADER = "X-Neighbours-Short"
SHORT_DOCUMENTED = ResponseHeader(
    name=SHORT_HEADER,
    documentation_only=True,
    required=False,
    description="How many neighbours the answer holds, when a filter left fewer than asked for",
)
SourceNames = Annotated[
    list[str] | None,
    Parameter(description="A source's name (repeatable); unknown names are refused with 400"),
]
ExcludedNames = Annotated[
    list[str] | None,
    Parameter(description="Leave out neighbours in this source (repeatable; not with source)"),
]


class ImageController(Controller):
    """Everything about images, addressed by id only (never by a filesystem path)."""

    path = "/api/images"
    tags = ["images"]

    @get("/", sync_to_thread=True)
    def list_images(
        self,
        repository: ImageRepository,
        offset: Annotated[int, Parameter(ge=0, le=MAX_OFFSET)] = 0,
        limit: Annotated[int, Parameter(ge=1, le=MAX_PAGE)] = 50,
        q: Annotated[str | None, Parameter(max_length=768, description="Path substring")] = None,
        source: SourceNames = None,
    ) -> ImagePage:
        """Images in id order; ``q`` keeps those whose path contains it (case-insensitive),
        ``source`` those in the named sources."""
        source_ids = repository.source_ids(source) if source else ()
        return repository.list_images(offset, limit, q, source_ids)

    @get("/{image_id:int}", sync_to_thread=True)
    def get_image(
        self, repository: ImageRepository, image_id: ImageId, source: SourceNames = None
    ) -> ImageDetail:
        """One image with its metadata; with ``source``, previous_id and next_id are those of
        the named sources (the image itself may be in any)."""
        source_ids = repository.source_ids(source) if source else ()
        return repository.get_image(image_id, source_ids)

    @get("/{image_id:int}/neighbours", response_headers=[SHORT_DOCUMENTED])
    async def get_neighbours(
        self,
        request: Request[Any, Any, Any],
        neighbours: NeighbourLookup,
        image_id: ImageId,
        k: Annotated[
            int | None, Parameter(le=MAX_RANK, description="1..stored k; default up to 20")
        ] = None,
        hide: Annotated[
            Literal["not_similar"] | None,
            Parameter(description="not_similar: leave out pairs judged not similar"),
        ] = None,
        source: SourceNames = None,
        exclude_source: ExcludedNames = None,
    ) -> Response[list[Neighbour]]:
        """The most similar images, closest first, with the verdicts curators gave.

        With ``hide=not_similar`` the pairs the caller marked "not similar" are left out (for
        anonymous callers: those where "not similar" outnumbers the other verdicts), and
        further stored neighbours take their places. ``source`` keeps only the stored
        neighbours in those sources, ``exclude_source`` leaves those out; the stored list is
        filtered, then cut to k. When that leaves fewer than asked for, the header
        X-Neighbours-Short says how many there are.
        """
        if k is not None and k < 1:
            raise BadRequestError(f"k must be at least 1, got {k}")
        only = await source_filter(neighbours, source, exclude_source)
        found = await neighbours.fetch(image_id, k, only)
        identity = current_identity(request)
        user_id = identity.id if identity else None
        shown = await neighbours.judged(image_id, found, user_id, hide is not None, only)
        # Encoded here: Litestar passes bytes through instead of inspecting the list. The
        # annotation stays list[Neighbour], which is what the schema documents.
        encoded = cast("list[Neighbour]", _JSON.encode(shown))
        short = {SHORT_HEADER: str(len(shown))} if len(shown) < found.wanted else None
        return Response(encoded, media_type=MediaType.JSON, headers=short)

    @get("/{image_id:int}/features", sync_to_thread=True)
    def get_features(self, repository: ImageRepository, image_id: ImageId) -> Features:
        """The float32 features of the image (as many as its model gives: 2048 for InceptionV3)."""
        model, vector = repository.get_features(image_id)
        return Features(id=image_id, model=model, features=vector.tolist())

    @get("/{image_id:int}/file", sync_to_thread=True)
    def get_file(self, repository: ImageRepository, image_id: ImageId) -> File:
        """The original file, inline, with the media type its content shows."""
        path = image_path(repository, image_id)
        return File(
            path,
            content_disposition_type="inline",
            filename=path.name,
            media_type=read_media_type(path),
            headers={"Cache-Control": FILE_CACHE},
        )

    @get("/{image_id:int}/thumbnail", responses=REFUSALS, operation_class=RefusableOperation)
    async def get_thumbnail(
        self,
        request: Request[Any, Any, Any],
        repository: ImageRepository,
        settings: Settings,
        admission: Admission,
        image_id: ImageId,
        size: Annotated[int, Parameter(description=f"One of {THUMBNAIL_SIZES}")] = 256,
    ) -> File:
        """A JPEG no larger than size x size, cached on disk by id, content hash and size.

        Making one that is not cached yet counts against the client's render allowance and
        runs on the render lane (429 or 503 with Retry-After when either is spent).
        """
        if size not in THUMBNAIL_SIZES:
            raise BadRequestError(f"size must be one of {', '.join(map(str, THUMBNAIL_SIZES))}")
        stored = await sync_to_thread(repository.get_image_file, image_id)
        cached = thumbnail_path(
            settings.resolved_thumbnail_dir, image_id, stored.content_hash, size
        )
        if not cached.is_file():
            client = client_key(request)
            await refused_slowly(
                lambda: admission.render_limit.take(client), admission.render.check
            )
            source = await sync_to_thread(image_path, repository, image_id, stored)
            with admission.render.held():
                await admission.render.run(
                    ensure_thumbnail, source, cached, size, settings.max_image_pixels
                )
        return File(
            cached,
            content_disposition_type="inline",
            media_type="image/jpeg",
            headers={"Cache-Control": FILE_CACHE},
        )

    @get("/{image_id:int}/fingerprint.svg", sync_to_thread=True, **RENDER_LIMITED)
    def get_fingerprint_svg(self, repository: ImageRepository, image_id: ImageId) -> Response[str]:
        """The features as a square plasma heatmap (46x46 for 2048 values), SVG."""
        return fingerprint_svg_response(repository, image_id)

    @get("/{image_id:int}/fingerprint.png", sync_to_thread=True, **RENDER_LIMITED)
    def get_fingerprint_png(
        self, repository: ImageRepository, image_id: ImageId
    ) -> Response[bytes]:
        """The features as a square plasma heatmap (46x46 for 2048 values), PNG."""
        _, vector = repository.get_features(image_id)
        return Response(render_png(vector), media_type="image/png")


def fingerprint_svg_response(repository: ImageRepository, image_id: int) -> Response[str]:
    """The SVG fingerprint answer (also served by the old /data route)."""
    _, vector = repository.get_features(image_id)
    return Response(render_svg(vector), media_type=SVG_MEDIA_TYPE)


def image_path(repository: ImageRepository, image_id: int, stored: ImageFile | None = None) -> Path:
    """The checked real path of an image's file under its source's root folder."""
    stored = stored or repository.get_image_file(image_id)
    return resolve_image_path(Path(stored.root), stored.file_name)


async def source_filter(
    neighbours: NeighbourLookup, source: list[str] | None, exclude_source: list[str] | None
) -> SourceFilter | None:
    """The neighbour filter of a request (None: none); 400 for both kinds or an unknown name."""
    if source and exclude_source:
        raise BadRequestError("give either source or exclude_source, not both")
    names = source or exclude_source
    if not names:
        return None
    await sync_to_thread(neighbours.repository.source_ids, names)  # 400 for an unknown name
    return SourceFilter(frozenset(names), exclude=not source)
