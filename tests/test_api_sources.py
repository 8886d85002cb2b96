"""Several image folders (sources) in one archive, through the API, on SQLite and MariaDB.

The database is written here by hand into the tables of sql/schema.py: two sources that both
hold a/1.jpg (two images, two different files), a third without images, neighbour lists that
mix the sources, a duplicate group and a map across them. The pipeline's own tests cover how
a run writes such rows; these cover what the API makes of them.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy
from httpx import Response
from litestar.testing import TestClient
from PIL import Image

from lookalike.api.app import create_app
from lookalike.api.schema_check import MIGRATE_FIRST
from lookalike.sql.migrations import migrate
from lookalike.sql.schema import (
    RUN_COMPLETED,
    STATUS_FAILED,
    STATUS_OK,
    STATUS_PENDING,
    collection,
    duplicate_groups,
    duplicate_state,
    image_map,
    image_names,
    image_neighbours,
    judgements,
    map_state,
    metadata,
    runs,
    sources,
    users,
)
from lookalike.tasks.catalog import DEFAULT_MODEL_NAME as MODEL_NAME
from tests.legacy_schema import legacy_metadata
from tests.pipeline_catalog import app_settings

MUSEUM, ARCHIVE, EMPTY = "museum", "archive", "empty"
SHARED = "a/1.jpg"  # in both sources: two images
WHEN = datetime(2024, 5, 1, 12, 0, 0)
FINISHED = datetime(2024, 5, 1, 12, 5, 0)
# (source, file name, status, colour), inserted in this order: the ids alternate sources.
IMAGES = [
    (MUSEUM, SHARED, STATUS_OK, (200, 30, 30)),
    (ARCHIVE, SHARED, STATUS_OK, (30, 30, 200)),
    (MUSEUM, "a/2.jpg", STATUS_OK, (30, 200, 30)),
    (ARCHIVE, "c/4.jpg", STATUS_OK, (200, 200, 30)),
    (MUSEUM, "b/3.jpg", STATUS_OK, (30, 200, 200)),
    (MUSEUM, "broken.jpg", STATUS_FAILED, None),
    (ARCHIVE, "c/5.jpg", STATUS_PENDING, (120, 120, 120)),
]
SHORT = "x-neighbours-short"


@dataclass
class Archive:
    """A database of three sources, and what the tests expect of it."""

    url: str
    roots: dict[str, Path]
    ids: dict[tuple[str, str], int] = field(default_factory=dict)  # (source, name) -> id
    neighbours: dict[int, list[int]] = field(default_factory=dict)  # stored, closest first
    run_id: int = 0

    def id(self, source: str, name: str) -> int:
        return self.ids[(source, name)]

    def source_of(self, image_id: int) -> str:
        return next(source for (source, _), i in self.ids.items() if i == image_id)

    def name_of(self, image_id: int) -> str:
        return next(name for (_, name), i in self.ids.items() if i == image_id)


def jpeg(colour: tuple[int, int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (40, 30), colour).save(out, "JPEG", quality=90)
    return out.getvalue()


def write_files(base: Path) -> dict[str, Path]:
    """The three root folders, with a file for every image that has a colour."""
    roots = {name: base / name for name in (MUSEUM, ARCHIVE, EMPTY)}
    for root in roots.values():
        root.mkdir(parents=True)
    for source, name, _, colour in IMAGES:
        path = roots[source] / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(jpeg(colour) if colour else b"not an image")
    return roots


def build_archive(url: str, base: Path) -> Archive:
    """Sources, images, neighbour lists, a duplicate group, a map and one judgement."""
    archive = Archive(url, write_files(base))
    engine = sqlalchemy.create_engine(url)
    metadata.create_all(engine)
    with engine.begin() as conn:
        insert_sources(conn, archive)
        for source, name, status, _ in IMAGES:
            archive.ids[(source, name)] = insert_image(conn, archive, source, name, status)
        insert_neighbours(conn, archive)
        insert_groups_and_map(conn, archive)
        insert_not_similar(conn, archive.id(MUSEUM, SHARED), archive.id(ARCHIVE, SHARED))
    engine.dispose()
    return archive


def insert_sources(conn: sqlalchemy.Connection, archive: Archive) -> None:
    conn.execute(
        collection.insert().values(id=1, model=MODEL_NAME, weights="none", created_at=WHEN)
    )
    run = conn.execute(
        runs.insert().values(
            started_at=WHEN, finished_at=FINISHED, status=RUN_COMPLETED, weights="none"
        )
    )
    archive.run_id = int(run.inserted_primary_key[0])  # type: ignore[index]
    last_runs = {MUSEUM: archive.run_id, ARCHIVE: None, EMPTY: None}
    for name, root in archive.roots.items():
        conn.execute(
            sources.insert().values(
                name=name, root=str(root), created_at=WHEN, last_run_id=last_runs[name]
            )
        )


def insert_image(
    conn: sqlalchemy.Connection, archive: Archive, source: str, name: str, status: str
) -> int:
    source_id = conn.execute(
        sqlalchemy.select(sources.c.id).where(sources.c.name == source)
    ).scalar_one()
    path = archive.roots[source] / name
    result = conn.execute(
        image_names.insert().values(
            source_id=source_id,
            file_name=name,
            content_hash=f"{hash((source, name)) & 0xFFFFFFFF:032x}",
            size=path.stat().st_size,
            mtime_ns=path.stat().st_mtime_ns,
            width=40 if status == STATUS_OK else None,
            height=30 if status == STATUS_OK else None,
            status=status,
            error="not an image" if status == STATUS_FAILED else None,
            indexed=status == STATUS_OK,
        )
    )
    return int(result.inserted_primary_key[0])  # type: ignore[index]


def insert_neighbours(conn: sqlalchemy.Connection, archive: Archive) -> None:
    """Every ok image's list holds the other four, by distance along their insertion order."""
    ok = [archive.ids[(s, n)] for s, n, status, _ in IMAGES if status == STATUS_OK]
    for at, image_id in enumerate(ok):
        others = sorted((abs(at - j), other) for j, other in enumerate(ok) if other != image_id)
        archive.neighbours[image_id] = [other for _, other in others]
        conn.execute(
            image_neighbours.insert(),
            [
                {"image_id": image_id, "rank": rank, "neighbour_id": other, "distance": gap + 0.5}
                for rank, (gap, other) in enumerate(others, 1)
            ],
        )


def insert_groups_and_map(conn: sqlalchemy.Connection, archive: Archive) -> None:
    """A duplicate group of the two a/1.jpg (one per source); every ok image on the map."""
    first, second = archive.id(MUSEUM, SHARED), archive.id(ARCHIVE, SHARED)
    conn.execute(
        duplicate_state.insert().values(
            id=1,
            fingerprint="f" * 64,
            basis="test",
            scale=10.0,
            threshold=0.06,
            histogram=json.dumps({"edges": [0.0, 5.0, 10.0], "counts": [2, 3]}),
            computed_at=WHEN,
        )
    )
    conn.execute(
        duplicate_groups.insert(),
        [
            {"image_id": first, "group_id": first, "distance": 0.0, "kind": "exact"},
            {"image_id": second, "group_id": first, "distance": 0.5, "kind": "near"},
        ],
    )
    conn.execute(
        map_state.insert().values(
            id=1,
            fingerprint="m" * 64,
            basis="test",
            fitted_images=5,
            placed_images=0,
            computed_at=WHEN,
        )
    )
    ok = [archive.ids[(s, n)] for s, n, status, _ in IMAGES if status == STATUS_OK]
    conn.execute(
        image_map.insert(),
        [{"image_id": i, "x": float(at), "y": 0.0, "content_hash": "0"} for at, i in enumerate(ok)],
    )


def insert_not_similar(conn: sqlalchemy.Connection, image_id: int, other_id: int) -> None:
    """One curator's "not similar" on a pair: anonymous callers' hide drops it."""
    user = conn.execute(
        users.insert().values(name="ann", role="curator", credential_version=1, created_at=WHEN)
    )
    conn.execute(
        judgements.insert().values(
            image_id=min(image_id, other_id),
            other_id=max(image_id, other_id),
            user_id=int(user.inserted_primary_key[0]),  # type: ignore[index]
            verdict="not_similar",
            updated_at=WHEN,
        )
    )


@contextmanager
def serving(archive: Archive, tmp_path: Path, **overrides: object) -> Iterator[TestClient]:
    """A test client of the API on the archive (on MariaDB with its lists in memory, if on)."""
    app = create_app(app_settings(archive.url, tmp_path, **overrides))
    with TestClient(app=app) as client:
        cache = app.state.neighbour_cache
        if cache is not None:
            assert cache.wait_until_loaded(20), "the neighbour lists did not load"
        yield client


@pytest.fixture
def archive(database_url: str, tmp_path: Path) -> Archive:
    return build_archive(database_url, tmp_path / "images")


@pytest.fixture
def client(archive: Archive, tmp_path: Path) -> Iterator[TestClient]:
    with serving(archive, tmp_path) as test_client:
        yield test_client


def assert_error(response: Response, status: int) -> str:
    """The response is a JSON error with this status; its one-line detail."""
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail
    return detail


# --- every answer names the source -----------------------------------------------------------


def test_list_detail_and_neighbours_name_each_images_source(
    client: TestClient, archive: Archive
) -> None:
    items = client.get("/api/images").json()["items"]
    assert [(i["source"], i["file_name"]) for i in items] == [(s, n) for s, n, _, _ in IMAGES]
    assert list(items[0]) == ["id", "file_name", "source", "width", "height", "status"]
    for (source, name), image_id in archive.ids.items():
        detail = client.get(f"/api/images/{image_id}").json()
        assert (detail["source"], detail["file_name"]) == (source, name)
    first = archive.id(MUSEUM, SHARED)
    found = client.get(f"/api/images/{first}/neighbours").json()
    assert [n["id"] for n in found] == archive.neighbours[first]
    assert [n["source"] for n in found] == [archive.source_of(n["id"]) for n in found]
    assert [n["file_name"] for n in found] == [archive.name_of(n["id"]) for n in found]


def test_duplicates_map_and_search_name_the_source(client: TestClient, archive: Archive) -> None:
    shared = {archive.id(MUSEUM, SHARED): MUSEUM, archive.id(ARCHIVE, SHARED): ARCHIVE}
    (group,) = client.get("/api/duplicates").json()["groups"]
    assert {m["id"]: m["source"] for m in group["images"]} == shared
    assert {m["file_name"] for m in group["images"]} == {SHARED}
    mine = client.get(f"/api/images/{archive.id(ARCHIVE, SHARED)}/duplicates").json()
    assert {m["id"]: m["source"] for m in mine["groups"][0]["images"]} == shared
    near = client.get("/api/map/near", params={"x": 0, "y": 0, "r": 1.5}).json()
    assert [(p["source"], p["file_name"]) for p in near] == [(MUSEUM, SHARED), (ARCHIVE, SHARED)]
    # Search answers are built like this from the ranked ids (the ranking is tested elsewhere).
    search = client.app.state.search
    ids = np.array([archive.id(ARCHIVE, SHARED), archive.id(MUSEUM, SHARED)])
    ranked = search.neighbours(ids, np.array([0.0, 1.0]))
    assert [(n.source, n.file_name, n.rank) for n in ranked] == [
        (ARCHIVE, SHARED, 1),
        (MUSEUM, SHARED, 2),
    ]


# --- /api/sources and /api/stats ---------------------------------------------------------------


def test_sources_are_listed_with_counts_and_last_run(client: TestClient, archive: Archive) -> None:
    answer = client.get("/api/sources")
    assert answer.status_code == 200
    assert answer.json() == [
        {
            "name": ARCHIVE,
            "root": str(archive.roots[ARCHIVE]),
            "images": 3,
            "ok": 2,
            "failed": 0,
            "pending": 1,
            "last_run": None,
        },
        {
            "name": EMPTY,
            "root": str(archive.roots[EMPTY]),
            "images": 0,
            "ok": 0,
            "failed": 0,
            "pending": 0,
            "last_run": None,
        },
        {
            "name": MUSEUM,
            "root": str(archive.roots[MUSEUM]),
            "images": 4,
            "ok": 3,
            "failed": 1,
            "pending": 0,
            "last_run": {
                "id": archive.run_id,
                "status": RUN_COMPLETED,
                "finished_at": FINISHED.isoformat(),
            },
        },
    ]
    stats = client.get("/api/stats").json()
    assert (stats["sources"], stats["images"], stats["ok"]) == (3, 7, 5)


# --- ?source= on the image list and the image ------------------------------------------------


def listed(client: TestClient, **params: object) -> list[tuple[str, str]]:
    page = client.get("/api/images", params=params)  # type: ignore[arg-type]
    assert page.status_code == 200, page.text
    body = page.json()
    assert body["total"] == len(body["items"])
    return [(item["source"], item["file_name"]) for item in body["items"]]


def test_the_list_keeps_the_named_sources(client: TestClient) -> None:
    in_archive = [(s, n) for s, n, _, _ in IMAGES if s == ARCHIVE]
    assert listed(client, source=ARCHIVE) == in_archive
    assert listed(client, source=[ARCHIVE, EMPTY]) == in_archive
    assert listed(client, source=EMPTY) == []
    assert listed(client, source=[MUSEUM, ARCHIVE]) == [(s, n) for s, n, _, _ in IMAGES]
    # Together with q: both must hold.
    assert listed(client, source=MUSEUM, q="A/") == [(MUSEUM, SHARED), (MUSEUM, "a/2.jpg")]
    assert listed(client, q=SHARED) == [(MUSEUM, SHARED), (ARCHIVE, SHARED)]
    assert listed(client, source=ARCHIVE, q="1.jpg", limit=1, offset=0) == [(ARCHIVE, SHARED)]


def test_an_unknown_source_is_a_400_naming_it(client: TestClient, archive: Archive) -> None:
    detail = assert_error(client.get("/api/images", params={"source": ["museum", "nope"]}), 400)
    assert detail == "unknown source 'nope' (the sources are: archive, empty, museum)"
    assert_error(client.get("/api/images", params={"source": ""}), 400)
    image_id = archive.id(MUSEUM, SHARED)
    assert "'nope'" in assert_error(client.get(f"/api/images/{image_id}?source=nope"), 400)
    for param in ("source", "exclude_source"):
        url = f"/api/images/{image_id}/neighbours"
        assert "'nope'" in assert_error(client.get(url, params={param: "nope"}), 400)


def test_browsing_ids_stay_within_the_named_sources(client: TestClient, archive: Archive) -> None:
    image_id = archive.id(ARCHIVE, SHARED)
    anywhere = client.get(f"/api/images/{image_id}").json()
    assert (anywhere["previous_id"], anywhere["next_id"]) == (image_id - 1, image_id + 1)
    archived = client.get(f"/api/images/{image_id}", params={"source": ARCHIVE}).json()
    assert (archived["previous_id"], archived["next_id"]) == (None, archive.id(ARCHIVE, "c/4.jpg"))
    # The image itself may be outside the sources named: only its neighbours in id order move.
    museum = client.get(f"/api/images/{image_id}", params={"source": MUSEUM}).json()
    assert museum["source"] == ARCHIVE
    assert (museum["previous_id"], museum["next_id"]) == (
        archive.id(MUSEUM, SHARED),
        archive.id(MUSEUM, "a/2.jpg"),
    )


# --- neighbours filtered by source -------------------------------------------------------------


def neighbours(client: TestClient, image_id: int, **params: object) -> tuple[list[int], str | None]:
    """The ids answered, and the X-Neighbours-Short header (None when absent)."""
    answer = client.get(f"/api/images/{image_id}/neighbours", params=params)  # type: ignore[arg-type]
    assert answer.status_code == 200, answer.text
    return [n["id"] for n in answer.json()], answer.headers.get(SHORT)


def check_neighbour_filters(client: TestClient, archive: Archive) -> None:
    image_id = archive.id(MUSEUM, "a/2.jpg")
    stored = archive.neighbours[image_id]
    by_source = {s: [i for i in stored if archive.source_of(i) == s] for s in (MUSEUM, ARCHIVE)}
    assert len(by_source[ARCHIVE]) == 2 and len(by_source[MUSEUM]) == 2
    assert neighbours(client, image_id) == (stored, None)  # the default: unchanged
    assert neighbours(client, image_id, source=ARCHIVE) == (by_source[ARCHIVE], "2")
    assert neighbours(client, image_id, source=ARCHIVE, k=1) == (by_source[ARCHIVE][:1], None)
    assert neighbours(client, image_id, source=ARCHIVE, k=2) == (by_source[ARCHIVE], None)
    assert neighbours(client, image_id, source=ARCHIVE, k=3) == (by_source[ARCHIVE], "2")
    assert neighbours(client, image_id, exclude_source=ARCHIVE) == (by_source[MUSEUM], "2")
    assert neighbours(client, image_id, exclude_source=[ARCHIVE, MUSEUM]) == ([], "0")
    assert neighbours(client, image_id, source=[ARCHIVE, MUSEUM]) == (stored, None)
    assert neighbours(client, image_id, source=EMPTY) == ([], "0")
    assert neighbours(client, image_id, exclude_source=EMPTY, k=3) == (stored[:3], None)
    # Ranks stay the stored ones: the filter leaves gaps, as hiding pairs does.
    filtered = client.get(f"/api/images/{image_id}/neighbours", params={"source": ARCHIVE})
    ranks = [n["rank"] for n in filtered.json()]
    assert ranks == [stored.index(i) + 1 for i in by_source[ARCHIVE]]


def check_neighbour_refusals(client: TestClient, archive: Archive) -> None:
    image_id = archive.id(MUSEUM, "a/2.jpg")
    url = f"/api/images/{image_id}/neighbours"
    both = client.get(url, params={"source": MUSEUM, "exclude_source": ARCHIVE})
    assert assert_error(both, 400) == "give either source or exclude_source, not both"
    # k is checked against what is stored, not against what the filter leaves.
    too_many = assert_error(client.get(url, params={"source": ARCHIVE, "k": 5}), 400)
    assert too_many == f"k must be between 1 and 4 for image {image_id}"
    failed = archive.id(MUSEUM, "broken.jpg")
    assert neighbours(client, failed, source=ARCHIVE) == ([], None)  # nothing asked, none given
    assert "no neighbours stored" in assert_error(
        client.get(f"/api/images/{failed}/neighbours", params={"source": ARCHIVE, "k": 1}), 400
    )
    unknown = client.get("/api/images/999999/neighbours", params={"source": ARCHIVE})
    assert assert_error(unknown, 404) == "no image with id 999999"


def test_neighbours_filtered_by_source_say_when_fewer_are_left(
    client: TestClient, archive: Archive
) -> None:
    check_neighbour_filters(client, archive)
    check_neighbour_refusals(client, archive)


def test_neighbour_filters_read_the_database_alike(archive: Archive, tmp_path: Path) -> None:
    """Without the lists in memory (MariaDB's cache off; SQLite never has it)."""
    with serving(archive, tmp_path, neighbour_cache=False) as client:
        check_neighbour_filters(client, archive)
        check_neighbour_refusals(client, archive)


def test_hidden_pairs_and_the_source_filter_combine(client: TestClient, archive: Archive) -> None:
    image_id, judged = archive.id(MUSEUM, SHARED), archive.id(ARCHIVE, SHARED)
    stored = archive.neighbours[image_id]
    assert stored[0] == judged
    rest = [i for i in stored if i != judged]
    # Hiding fills up from further stored neighbours; none are left here: 3 of 4 asked for.
    assert neighbours(client, image_id, hide="not_similar") == (rest, "3")
    assert neighbours(client, image_id, hide="not_similar", k=2) == (rest[:2], None)
    in_archive = [i for i in rest if archive.source_of(i) == ARCHIVE]
    assert neighbours(client, image_id, hide="not_similar", source=ARCHIVE) == (in_archive, "1")
    assert neighbours(client, image_id, hide="not_similar", source=ARCHIVE, k=1) == (
        in_archive,
        None,
    )


# --- files, and the old routes -----------------------------------------------------------------


def test_a_shared_relative_path_is_served_from_each_images_own_root(
    client: TestClient, archive: Archive
) -> None:
    thumbnails = set()
    for source in (MUSEUM, ARCHIVE):
        image_id = archive.id(source, SHARED)
        served = client.get(f"/api/images/{image_id}/file")
        assert served.status_code == 200
        assert served.content == (archive.roots[source] / SHARED).read_bytes()
        thumbnail = client.get(f"/api/images/{image_id}/thumbnail?size=64")
        assert thumbnail.status_code == 200
        pixel = Image.open(io.BytesIO(thumbnail.content)).convert("RGB").getpixel((5, 5))
        expected = next(c for s, n, _, c in IMAGES if (s, n) == (source, SHARED))
        assert np.allclose(pixel, expected, atol=12), (source, pixel)  # type: ignore[arg-type]
        thumbnails.add(thumbnail.content)
    assert len(thumbnails) == 2


def test_the_old_routes_keep_their_shapes(client: TestClient, archive: Archive) -> None:
    first, second = archive.id(MUSEUM, SHARED), archive.id(ARCHIVE, SHARED)
    assert client.get("/data/image_count").json() == len(IMAGES)
    # Relative paths, the source not named: two images of two sources answer the same name.
    assert client.get(f"/data/image_name/{first}").json() == [SHARED]
    assert client.get(f"/data/image_name/{second}").json() == [SHARED]
    name, listed = client.get(f"/data/image_name_and_neighbours/{second}").json()
    assert name == SHARED
    assert [n["id"] for n in listed] == archive.neighbours[second]
    assert all(sorted(n) == ["distance", "id"] for n in listed)


# --- a database from before sources ------------------------------------------------------------


def test_an_old_database_answers_503_until_the_pipeline_migrated_it(
    database_url: str, tmp_path: Path
) -> None:
    engine = sqlalchemy.create_engine(database_url)
    old = legacy_metadata()
    old.create_all(engine)
    root = tmp_path / "photos"
    (root / "a").mkdir(parents=True)
    (root / SHARED).write_bytes(jpeg((10, 20, 30)))
    with engine.begin() as conn:
        conn.execute(
            old.tables["collection"]
            .insert()
            .values(id=1, root=str(root), model=MODEL_NAME, weights="none", created_at=WHEN)
        )
        conn.execute(
            old.tables["image_names"]
            .insert()
            .values(
                file_name=SHARED,
                content_hash="0" * 32,
                size=1,
                mtime_ns=1,
                status=STATUS_PENDING,
                indexed=False,
            )
        )
    app = create_app(app_settings(database_url, tmp_path))
    with TestClient(app=app) as client:
        check_old_database_refused(client)
        migrate(engine)  # what the next pipeline command does
        app.state.schema_gate.recheck_s = 0.0
        assert client.get("/health").status_code == 200
        (item,) = client.get("/api/images").json()["items"]
        assert (item["file_name"], item["source"]) == (SHARED, "photos")
        assert client.get(f"/api/images/{item['id']}/file").content == (root / SHARED).read_bytes()
    engine.dispose()


def check_old_database_refused(client: TestClient) -> None:
    for path in ("/api/images", "/api/sources", "/api/stats", "/api/images/1", "/data/image_count"):
        assert assert_error(client.get(path), 503) == MIGRATE_FIRST, path
    assert "lookalike process" in MIGRATE_FIRST
    health = client.get("/health")
    assert health.status_code == 503
    assert health.json() == {"status": "unavailable", "detail": MIGRATE_FIRST}
    assert client.get("/").status_code == 200  # the page loads, and shows the API's answer
    assert client.get("/api/session").status_code == 200  # users only: unaffected


def test_the_schema_documents_the_filters_and_the_short_header(client: TestClient) -> None:
    schema = client.get("/schema/openapi.json").json()
    operation = schema["paths"]["/api/images/{image_id}/neighbours"]["get"]
    assert "X-Neighbours-Short" in operation["responses"]["200"]["headers"]
    assert {"source", "exclude_source", "k", "hide"} <= {p["name"] for p in operation["parameters"]}
    listing = schema["paths"]["/api/images"]["get"]
    assert "source" in {p["name"] for p in listing["parameters"]}
    assert "/api/sources" in schema["paths"]
