"""/api/map: every image's place on the map, packed, and the images near a place."""

from __future__ import annotations

import math
from typing import Annotated

from litestar import Request, Response, get
from litestar.exceptions import NotFoundException
from litestar.params import Parameter

from lookalike.api.errors import BadRequestError
from lookalike.api.repository import ImageRepository
from lookalike.api.schemas import MapFolders, MapPoint
from lookalike.tasks.map_reader import MapCache, MapNotFoundError, MapPoints

MAX_NEAR = 500
POINTS_MEDIA_TYPE = "application/octet-stream"


@get("/api/map", sync_to_thread=True, tags=["map"], media_type=POINTS_MEDIA_TYPE)
def get_map(request: Request, maps: MapCache) -> Response[bytes]:
    """Every point as 12-byte little-endian records (uint32 image id, float32 x, float32 y) in
    id order; the ETag changes with the layout, and If-None-Match gets 304 while it holds."""
    points = _points(maps)
    headers = {
        "ETag": points.etag,
        "Cache-Control": "no-cache",
        "X-Map-Points": str(len(points.ids)),
    }
    if request.headers.get("if-none-match") == points.etag:
        return Response(b"", status_code=304, headers=headers, media_type=POINTS_MEDIA_TYPE)
    return Response(points.packed, headers=headers, media_type=POINTS_MEDIA_TYPE)


@get("/api/map/folders", sync_to_thread=True, tags=["map"])
def get_map_folders(maps: MapCache) -> Response[MapFolders]:
    """Each point's top-level folder, for colouring the map by folder (same ETag as /api/map)."""
    points = _points(maps)
    folders = MapFolders(folders=points.folders, points=points.folder_of.tolist())
    return Response(folders, headers={"ETag": points.etag, "Cache-Control": "no-cache"})


@get("/api/map/near", sync_to_thread=True, tags=["map"])
def get_map_near(
    repository: ImageRepository,
    maps: MapCache,
    x: float,
    y: float,
    r: Annotated[float, Parameter(gt=0, description="Radius, in map units")],
    limit: Annotated[int, Parameter(ge=1, le=MAX_NEAR)] = 50,
) -> list[MapPoint]:
    """The images within r of (x, y) on the map, closest first."""
    if not all(math.isfinite(v) for v in (x, y, r)):
        raise BadRequestError("x, y and r must be finite numbers")
    found = _points(maps).near(x, y, r, limit)
    names = repository.file_names([point[0] for point in found])
    return [
        MapPoint(image_id, *names[image_id], px, py, distance)
        for image_id, px, py, distance in found
        if image_id in names
    ]


def _points(maps: MapCache) -> MapPoints:
    try:
        return maps.get()
    except MapNotFoundError as exc:
        raise NotFoundException(str(exc)) from None
