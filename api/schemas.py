"""The JSON shapes of the API, as msgspec Structs (kept apart from the database code)."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

Verdict = Literal["same_object", "similar", "not_similar"]
MAX_NOTE_CHARS = 500  # the same bound as tasks.judgements.MAX_NOTE_CHARS


class ImageSummary(msgspec.Struct):
    """One row of the image list."""

    id: int
    file_name: str  # relative to its source's root folder
    source: str  # the name of the source (folder) it belongs to
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
    source: str
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


class VerdictCounts(msgspec.Struct):
    """How many people gave each verdict on a pair."""

    same_object: int = 0
    similar: int = 0
    not_similar: int = 0


class Neighbour(msgspec.Struct):
    """A similar image: its rank (1 is the closest), euclidean distance, and the verdicts
    curators gave on the pair (``my_verdict``: the caller's own, when signed in)."""

    id: int
    file_name: str
    source: str
    rank: int
    distance: float
    verdicts: VerdictCounts = msgspec.field(default_factory=VerdictCounts)
    my_verdict: Verdict | None = None
    my_note: str | None = None  # the note the caller gave with my_verdict


class JudgementInput(msgspec.Struct, forbid_unknown_fields=True):
    """A verdict on a pair, with an optional short note."""

    verdict: Verdict
    note: Annotated[str, msgspec.Meta(max_length=MAX_NOTE_CHARS)] | None = None


class Judgement(msgspec.Struct):
    """One user's current verdict on a pair (the pair as it was judged: image, neighbour)."""

    image_id: int
    neighbour_id: int
    user: str
    verdict: Verdict
    note: str | None
    updated_at: str  # ISO 8601, UTC


class JudgementPage(msgspec.Struct):
    """Current judgements, newest first; ``total`` counts every one that matches."""

    total: int
    offset: int
    limit: int
    items: list[Judgement]


class AuditEntry(msgspec.Struct):
    """One change to a judgement: who, when, from where, from what to what (null: none)."""

    id: int
    image_id: int
    neighbour_id: int
    user: str
    old_verdict: Verdict | None
    new_verdict: Verdict | None
    note: str | None
    changed_at: str
    address: str | None


class AuditPage(msgspec.Struct):
    """Every change to judgements, newest first."""

    total: int
    offset: int
    limit: int
    items: list[AuditEntry]


class SignIn(msgspec.Struct, forbid_unknown_fields=True):
    """Sign in with an API token, or with a user name and password."""

    token: Annotated[str, msgspec.Meta(max_length=200)] | None = None
    name: Annotated[str, msgspec.Meta(max_length=64)] | None = None
    password: Annotated[str, msgspec.Meta(max_length=1024)] | None = None


class SessionInfo(msgspec.Struct):
    """Who the caller is, and what the service offers them."""

    signed_in: bool
    name: str | None
    role: str | None
    writable: bool  # the service has a writer account: judgements can be saved
    sign_in_offered: bool  # users exist who could sign in
    read_requires_login: bool


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
    text_search: bool | None = None  # the model has a text tower: GET /api/search?text= works
    sources: int = 0  # how many sources (image folders) the archive has


class SourceRun(msgspec.Struct):
    """The last run that brought a source up to date."""

    id: int
    status: str  # running | completed | failed | interrupted
    finished_at: str | None  # ISO 8601, UTC as stored; null while running


class Source(msgspec.Struct):
    """One image folder of the archive, with its images counted by status."""

    name: str
    root: str  # the folder, as the pipeline was given it
    images: int
    ok: int
    failed: int
    pending: int
    last_run: SourceRun | None  # null until a run brought the source up to date


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
    source: str
    size: int
    width: int | None
    height: int | None
    distance: float | None  # null for images a curator judged the same object
    # exact (same content hash as the representative), near, or judged ("same object")
    kind: str


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
    source: str
    x: float
    y: float
    distance: float  # from the place asked about, in map units


class MapFolders(msgspec.Struct):
    """The map's points by top-level folder, in the order of /api/map's records."""

    folders: list[str]  # sorted; "" for files at the collection's root
    points: list[int]  # for each point, its folder's index in folders
