"""The JSON shapes of the API, as msgspec Structs (kept apart from the database code)."""

from __future__ import annotations

import msgspec


class ImageSummary(msgspec.Struct):
    """One row of the image list."""

    id: int
    file_name: str
    width: int | None
    height: int | None
    status: str


class ImagePage(msgspec.Struct):
    """A page of the image list; ``total`` counts every image that matches the filter."""

    total: int
    offset: int
    limit: int
    items: list[ImageSummary]


class ImageDetail(msgspec.Struct):
    """One image with its metadata and the ids before and after it (for browsing)."""

    id: int
    file_name: str
    content_hash: str
    size: int
    mtime_ns: int
    width: int | None
    height: int | None
    status: str
    error: str | None
    neighbour_count: int
    previous_id: int | None
    next_id: int | None


class Neighbour(msgspec.Struct):
    """A similar image: its rank (1 is the closest) and euclidean distance."""

    id: int
    file_name: str
    rank: int
    distance: float


class Features(msgspec.Struct):
    """The feature vector of one image."""

    id: int
    model: str
    features: list[float]


class Stats(msgspec.Struct):
    """Counts and provenance of the collection."""

    images: int
    ok: int
    failed: int
    pending: int
    neighbours: int
    neighbours_per_image: int
    model: str | None
    weights: str | None
    last_completed_run: str | None  # ISO 8601, UTC as stored


class Health(msgspec.Struct, omit_defaults=True):
    """Whether the service can answer."""

    status: str
    detail: str | None = None
    neighbour_cache: str | None = None  # "loading" or "N lists", where the cache is on


class LegacyNeighbour(msgspec.Struct):
    """A neighbour in the shape of the old /data routes."""

    id: int
    distance: float


class DuplicateImage(msgspec.Struct):
    """An image of a duplicate group: distance to the group's representative (itself: 0)."""

    id: int
    file_name: str
    size: int
    width: int | None
    height: int | None
    distance: float
    kind: str  # exact (same content hash as the representative) or near


class DuplicateGroup(msgspec.Struct):
    """A representative (first) and the images within the threshold of it."""

    id: int  # the representative's image id
    size: int
    images: list[DuplicateImage]


class DuplicateHistogram(msgspec.Struct):
    """Each image's distance to its nearest neighbour, binned: counts[i] in edges[i]..[i+1]."""

    edges: list[float]
    counts: list[int]


class DuplicatePage(msgspec.Struct):
    """Groups at one threshold, largest first."""

    threshold: float  # fraction of the scale
    distance: float  # the threshold as a distance
    scale: float  # median distance from an image to its k-th neighbour
    total_groups: int
    images_in_groups: int
    offset: int
    limit: int
    groups: list[DuplicateGroup]
    histogram: DuplicateHistogram


class ErrorAnswer(msgspec.Struct):
    """Every error: the HTTP status and one line saying why."""

    status_code: int
    detail: str


class MapPoint(msgspec.Struct):
    """An image near a place on the map."""

    id: int
    file_name: str
    x: float
    y: float
    distance: float  # from the place asked about, in map units


class MapFolders(msgspec.Struct):
    """The map's points by top-level folder, in the order of /api/map's records."""

    folders: list[str]  # sorted; "" for files at the collection's root
    points: list[int]  # for each point, its folder's index in folders
