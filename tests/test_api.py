"""Tests for the Litestar service: every route, good and bad input, on SQLite and MariaDB."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy
from httpx import Response
from litestar.testing import TestClient
from PIL import Image

from lookalike.api.app import create_app
from lookalike.api.fingerprint import grid_side, plasma_table
from lookalike.sql.schema import image_features, runs
from lookalike.tasks.catalog import DEFAULT_MODEL_NAME as MODEL_NAME
from tests.odd_images import bomb_png, write_photos
from tests.pipeline_catalog import (
    BROKEN,
    BROKEN_REASON,
    ESCAPE,
    MISSING,
    OUTSIDE,
    PENDING,
    PNG_NAMED_JPG,
    Catalog,
    app_settings,
    build_catalog,
    complete_run,
    database,
    extract_and_load,
    read_catalog,
    refresh_neighbours,
    start_run_and_sync,
)

REPO = Path(__file__).resolve().parent.parent
SOURCE = "images"  # the catalog's folder's own name, the name a run gives its source


@pytest.fixture
def catalog(database_url: str, tmp_path: Path) -> Catalog:
    return build_catalog(database_url, tmp_path)


@pytest.fixture
def client(catalog: Catalog, tmp_path: Path) -> Iterator[TestClient]:
    with TestClient(app=create_app(app_settings(catalog.url, tmp_path))) as test_client:
        yield test_client


def assert_error(response: Response, status: int) -> dict[str, object]:
    """The response is a JSON error with this status, a one-line detail and no stack trace."""
    assert response.status_code == status, response.text
    body = response.json()
    assert body["status_code"] == status
    assert "Traceback" not in response.text and 'File "' not in response.text
    return body


# --- /api/images ------------------------------------------------------------------------


def test_list_pages_in_id_order_and_filters_by_path(client: TestClient, catalog: Catalog) -> None:
    all_ids = sorted(catalog.ids.values())
    page = client.get("/api/images").json()
    assert page["total"] == len(all_ids) == 11 and page["offset"] == 0 and page["limit"] == 50
    assert [item["id"] for item in page["items"]] == all_ids
    photo = catalog.photo_ids[0]
    assert page["items"][all_ids.index(photo)] == {
        "id": photo,
        "file_name": "photos/photo_000_00000.jpg",
        "source": SOURCE,
        "width": 160,
        "height": 120,
        "status": "ok",
    }

    window = client.get("/api/images", params={"offset": 2, "limit": 3}).json()
    assert [item["id"] for item in window["items"]] == all_ids[2:5]
    assert window["total"] == 11

    photos = client.get("/api/images", params={"q": "PHOTOS/"}).json()  # case-insensitive
    assert photos["total"] == 7 and len(photos["items"]) == 7  # 5 photos, Broken, missing

    # % and _ are literal: "100%_real" must not match "100xyreal".
    literal = client.get("/api/images", params={"q": "100%_real"}).json()
    assert [item["file_name"] for item in literal["items"]] == ["odd/100%_real.jpg"]
    assert client.get("/api/images", params={"q": "nothing-like-this"}).json()["total"] == 0


def test_list_refuses_bad_paging(client: TestClient) -> None:
    bad: list[dict[str, str | int]] = [
        {"limit": 0},
        {"limit": 501},
        {"offset": -1},
        {"limit": "ten"},
        {"q": "x" * 769},
    ]
    for params in bad:
        assert_error(client.get("/api/images", params=params), 400)


def test_one_image_has_metadata_and_browsing_ids(client: TestClient, catalog: Catalog) -> None:
    ids = sorted(catalog.ids.values())
    name = "photos/photo_000_00001.jpg"
    image_id = catalog.ids[name]
    body = client.get(f"/api/images/{image_id}").json()
    assert body["id"] == image_id and body["file_name"] == name
    assert (body["width"], body["height"], body["status"], body["error"]) == (160, 120, "ok", None)
    assert body["neighbour_count"] == catalog.stored_k
    at = ids.index(image_id)
    assert (body["previous_id"], body["next_id"]) == (ids[at - 1], ids[at + 1])
    assert len(body["content_hash"]) == 32
    assert body["size"] == (catalog.root / name).stat().st_size
    assert client.get(f"/api/images/{ids[0]}").json()["previous_id"] is None
    assert client.get(f"/api/images/{ids[-1]}").json()["next_id"] is None
    failed = client.get(f"/api/images/{catalog.ids[BROKEN]}").json()
    assert (failed["status"], failed["error"], failed["neighbour_count"]) == (
        "failed",
        BROKEN_REASON,
        0,
    )


def test_unknown_and_malformed_ids(client: TestClient) -> None:
    suffixes = [
        "",
        "/neighbours",
        "/features",
        "/file",
        "/thumbnail",
        "/fingerprint.svg",
        "/fingerprint.png",
    ]
    for suffix in suffixes:
        unknown = assert_error(client.get(f"/api/images/999999{suffix}"), 404)
        assert unknown["detail"] == "no image with id 999999"
        assert_error(client.get(f"/api/images/abc{suffix}"), 404)  # not a route at all
        assert_error(client.get(f"/api/images/0{suffix}"), 400)
        assert_error(client.get(f"/api/images/-3{suffix}"), 400)
        assert_error(client.get(f"/api/images/99999999999999999999{suffix}"), 400)


# --- neighbours and features ---------------------------------------------------------------


def test_neighbours_are_ranked_with_names_and_distances(
    client: TestClient, catalog: Catalog
) -> None:
    image_id = catalog.ok_ids[2]
    names = {v: k for k, v in catalog.ids.items()}
    expected = catalog.neighbours[image_id]
    default = client.get(f"/api/images/{image_id}/neighbours").json()
    assert [n["id"] for n in default] == [other for other, _ in expected]
    assert [n["rank"] for n in default] == list(range(1, catalog.stored_k + 1))
    assert [n["file_name"] for n in default] == [names[other] for other, _ in expected]
    # MariaDB's FLOAT column keeps single precision.
    assert [n["distance"] for n in default] == pytest.approx([d for _, d in expected], rel=1e-5)
    assert len(client.get(f"/api/images/{image_id}/neighbours?k=2").json()) == 2
    stored_k = catalog.stored_k
    assert len(client.get(f"/api/images/{image_id}/neighbours?k={stored_k}").json()) == stored_k


def test_neighbours_refuse_k_outside_what_is_stored(client: TestClient, catalog: Catalog) -> None:
    image_id, stored_k = catalog.ok_ids[0], catalog.stored_k
    body = assert_error(client.get(f"/api/images/{image_id}/neighbours?k={stored_k + 1}"), 400)
    assert body["detail"] == f"k must be between 1 and {stored_k} for image {image_id}"
    assert_error(client.get(f"/api/images/{image_id}/neighbours?k=0"), 400)
    assert_error(client.get(f"/api/images/{image_id}/neighbours?k=-1"), 400)
    assert_error(client.get(f"/api/images/{image_id}/neighbours?k=many"), 400)
    failed = catalog.ids[BROKEN]
    assert client.get(f"/api/images/{failed}/neighbours").json() == []
    assert "no neighbours stored" in str(
        assert_error(client.get(f"/api/images/{failed}/neighbours?k=1"), 400)["detail"]
    )


def test_features_are_the_stored_floats(client: TestClient, catalog: Catalog) -> None:
    image_id = catalog.ok_ids[1]
    body = client.get(f"/api/images/{image_id}/features").json()
    assert body["id"] == image_id and body["model"] == MODEL_NAME
    assert np.array_equal(np.array(body["features"], dtype=np.float32), catalog.vectors[image_id])
    failed = catalog.ids[BROKEN]
    assert "no features" in str(
        assert_error(client.get(f"/api/images/{failed}/features"), 404)["detail"]
    )


def test_corrupt_features_are_a_clear_500_without_trace(catalog: Catalog, tmp_path: Path) -> None:
    pending = catalog.ids[PENDING]
    with database(catalog.url) as engine, engine.begin() as conn:  # damaged by hand
        conn.execute(
            image_features.insert().values(image_id=pending, model=MODEL_NAME, features=b"x" * 10)
        )
    with TestClient(app=create_app(app_settings(catalog.url, tmp_path))) as client:
        body = assert_error(client.get(f"/api/images/{pending}/features"), 500)
    assert body["detail"] == f"stored features of image {pending} have 10 bytes, expected 8192"


# --- files and thumbnails ------------------------------------------------------------------


def test_file_is_served_inline_with_the_sniffed_type(client: TestClient, catalog: Catalog) -> None:
    photo_id = catalog.photo_ids[0]
    response = client.get(f"/api/images/{photo_id}/file")
    assert response.status_code == 200
    assert response.content == (catalog.root / "photos/photo_000_00000.jpg").read_bytes()
    assert response.headers["content-type"] == "image/jpeg"
    assert response.headers["content-disposition"].startswith("inline")
    assert response.headers["x-content-type-options"] == "nosniff"
    png_named_jpg = client.get(f"/api/images/{catalog.ids[PNG_NAMED_JPG]}/file")
    assert png_named_jpg.headers["content-type"] == "image/png"  # from content, not suffix
    broken = client.get(f"/api/images/{catalog.ids[BROKEN]}/file")
    assert broken.headers["content-type"] == "application/octet-stream"


def test_paths_outside_the_root_are_refused(client: TestClient, catalog: Catalog) -> None:
    for route in ("file", "thumbnail"):
        for name in (ESCAPE, OUTSIDE):
            body = assert_error(client.get(f"/api/images/{catalog.ids[name]}/{route}"), 403)
            assert body["detail"] == "the stored path of this image is outside the collection"
        missing_id = catalog.ids[MISSING]
        missing = assert_error(client.get(f"/api/images/{missing_id}/{route}"), 404)
        assert missing["detail"] == "the image file is missing from the collection folder"


def test_thumbnail_is_a_cached_jpeg(client: TestClient, catalog: Catalog, tmp_path: Path) -> None:
    photo_id = catalog.photo_ids[0]
    response = client.get(f"/api/images/{photo_id}/thumbnail?size=64")
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    thumbnail = Image.open(io.BytesIO(response.content))
    assert thumbnail.format == "JPEG" and thumbnail.size == (64, 48)  # 160x120 kept in shape
    cached = list((tmp_path / "thumbnails").iterdir())
    assert (
        len(cached) == 1
        and cached[0].name.startswith(f"{photo_id}-")
        and cached[0].name.endswith("-64.jpg")
    )
    stamp = cached[0].stat().st_mtime_ns
    again = client.get(f"/api/images/{photo_id}/thumbnail?size=64")
    assert again.content == response.content and cached[0].stat().st_mtime_ns == stamp
    default = Image.open(io.BytesIO(client.get(f"/api/images/{photo_id}/thumbnail").content))
    assert default.size == (160, 120)  # never enlarged beyond the original
    assert len(list((tmp_path / "thumbnails").iterdir())) == 2


def test_thumbnail_refuses_bad_sizes_and_unreadable_files(
    client: TestClient, catalog: Catalog
) -> None:
    photo_id = catalog.photo_ids[0]
    for size in ("100", "0", "99999", "big"):
        assert_error(client.get(f"/api/images/{photo_id}/thumbnail?size={size}"), 400)
    broken = assert_error(client.get(f"/api/images/{catalog.ids[BROKEN]}/thumbnail"), 422)
    assert str(broken["detail"]).startswith("cannot decode the image file")


# --- fingerprints --------------------------------------------------------------------------


def test_fingerprints_draw_every_cell_in_plasma(client: TestClient, catalog: Catalog) -> None:
    image_id = catalog.photo_ids[3]
    grid = grid_side(len(catalog.vectors[image_id]))  # 46 for InceptionV3's 2048 values
    svg = client.get(f"/api/images/{image_id}/fingerprint.svg")
    assert svg.status_code == 200 and svg.headers["content-type"].startswith("image/svg+xml")
    assert svg.text.startswith("<svg") and svg.text.count("h1v1h-1z") == grid * grid
    png = client.get(f"/api/images/{image_id}/fingerprint.png")
    assert png.headers["content-type"] == "image/png"
    pixels = np.asarray(Image.open(io.BytesIO(png.content)).convert("RGB"))
    assert pixels.shape == (276, 276, 3)
    table = plasma_table()
    vector = catalog.vectors[image_id]
    brightest = int(np.argmax(vector))
    row, col = divmod(brightest, grid)
    assert tuple(pixels[row * 6 + 3, col * 6 + 3]) == tuple(table[255])
    assert tuple(pixels[-1, -1]) == tuple(table[0])  # padding cell 2115 is 0, the minimum
    failed = catalog.ids[BROKEN]
    assert_error(client.get(f"/api/images/{failed}/fingerprint.svg"), 404)


# --- stats, health, old routes, page, schema, CORS ---------------------------------------


def test_stats_count_the_collection(client: TestClient, catalog: Catalog) -> None:
    assert catalog.last_completed_run is not None
    assert client.get("/api/stats").json() == {
        "images": 11,
        "ok": 5,
        "failed": 1,
        "pending": 5,
        "neighbours": 5 * 4,
        "neighbours_per_image": 4,
        "model": MODEL_NAME,
        "weights": "none (random init, seed 0, numpy he-uniform)",  # as the run stored it
        "last_completed_run": catalog.last_completed_run.isoformat(),
        "text_search": False,  # InceptionV3 has no text tower
        "sources": 1,
    }


def test_health_is_200_with_a_database(client: TestClient, catalog: Catalog) -> None:
    response = client.get("/health")
    assert response.status_code == 200
    body = response.json()
    if catalog.url.startswith("sqlite"):
        assert body == {"status": "ok"}  # no neighbour cache on SQLite
    else:  # MariaDB: the cache says whether it answers from memory yet
        assert body["status"] == "ok"
        assert body["neighbour_cache"] in ("loading", f"{len(catalog.neighbours)} lists")


def test_health_and_routes_are_503_without_a_database(tmp_path: Path, mariadb_url: str) -> None:
    down = sqlalchemy.engine.make_url(mariadb_url).set(port=1).render_as_string(hide_password=False)
    urls = [f"sqlite:///{tmp_path}", down, mariadb_url]  # a directory; a closed port; no tables
    for url in urls:
        with TestClient(app=create_app(app_settings(url, tmp_path))) as client:
            health = client.get("/health")
            assert health.status_code == 503
            assert health.json() == {"status": "unavailable", "detail": "database unavailable"}
            assert (
                assert_error(client.get("/api/images/1"), 503)["detail"] == "database unavailable"
            )


def test_old_routes_keep_their_shapes(client: TestClient, catalog: Catalog) -> None:
    image_id = catalog.photo_ids[0]
    assert client.get("/data/image_count").json() == 11
    assert client.get(f"/data/image_name/{image_id}").json() == ["photos/photo_000_00000.jpg"]
    name, neighbours = client.get(f"/data/image_name_and_neighbours/{image_id}").json()
    assert name == "photos/photo_000_00000.jpg"
    assert [n["id"] for n in neighbours] == [other for other, _ in catalog.neighbours[image_id]]
    assert set(neighbours[0]) == {"id", "distance"}
    svg = client.get(f"/data/image_fingerprint/{image_id}")
    assert svg.headers["content-type"].startswith("image/svg+xml") and svg.text.startswith("<svg")
    for route in ("image_name", "image_name_and_neighbours", "image_fingerprint"):
        assert_error(client.get(f"/data/{route}/999999"), 404)
        assert_error(client.get(f"/data/{route}/x1"), 404)


def test_page_static_files_and_openapi(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<script src="/static/app.js"' in page.text
    assert client.get("/static/app.js").status_code == 200
    assert client.get("/static/style.css").headers["content-type"].startswith("text/css")
    assert_error(client.get("/static/../app.py"), 404)
    schema = client.get("/schema/openapi.json").json()
    assert "/api/images/{image_id}/neighbours" in schema["paths"]
    assert "/api/search" in schema["paths"]


def test_cors_is_closed_by_default_and_opens_per_origin(catalog: Catalog, tmp_path: Path) -> None:
    preflight = {"Origin": "https://friend.example", "Access-Control-Request-Method": "GET"}
    with TestClient(app=create_app(app_settings(catalog.url, tmp_path))) as client:
        response = client.get("/api/stats", headers={"Origin": "https://friend.example"})
        assert "access-control-allow-origin" not in response.headers
        assert (
            "access-control-allow-origin"
            not in client.options("/api/stats", headers=preflight).headers
        )
    settings = app_settings(
        catalog.url, tmp_path, cors_origins="https://friend.example, https://b.example"
    )
    with TestClient(app=create_app(settings)) as client:
        allowed = client.get("/api/stats", headers={"Origin": "https://friend.example"})
        assert allowed.headers["access-control-allow-origin"] == "https://friend.example"
        other = client.get("/api/stats", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers


@pytest.mark.mariadb
def test_works_with_a_select_only_mariadb_user(mariadb_url: str, tmp_path: Path) -> None:
    catalog = build_catalog(mariadb_url, tmp_path)
    admin_url = sqlalchemy.engine.make_url(mariadb_url)
    user, password = f"ro_{uuid.uuid4().hex[:10]}", uuid.uuid4().hex
    admin = sqlalchemy.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        # %% because the driver formats the statement with Python's % operator.
        conn.exec_driver_sql(f"CREATE USER '{user}'@'%%' IDENTIFIED BY '{password}'")
        conn.exec_driver_sql(f"GRANT SELECT ON `{admin_url.database}`.* TO '{user}'@'%%'")
    try:
        reader = admin_url.set(username=user, password=password).render_as_string(
            hide_password=False
        )
        with TestClient(app=create_app(app_settings(reader, tmp_path))) as client:
            image_id = catalog.photo_ids[0]
            for route in (
                "/health",
                "/api/stats",
                "/api/images?q=photo",
                f"/api/images/{image_id}",
                f"/api/images/{image_id}/neighbours",
                f"/api/images/{image_id}/features",
                f"/api/images/{image_id}/thumbnail",
                f"/data/image_name_and_neighbours/{image_id}",
            ):
                assert client.get(route).status_code == 200, route
        writer = sqlalchemy.create_engine(reader)
        with (
            pytest.raises(sqlalchemy.exc.OperationalError, match="command denied"),
            writer.begin() as conn,
        ):
            conn.execute(runs.delete())
        writer.dispose()
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP USER IF EXISTS '{user}'@'%%'")
        admin.dispose()


def test_importing_and_creating_the_app_leaves_tensorflow_unloaded(tmp_path: Path) -> None:
    script = (
        "import sys\n"
        "from api.app import create_app\n"
        "from tasks.settings import Settings\n"
        f"create_app(Settings(data_dir=__import__('pathlib').Path({str(tmp_path)!r})))\n"
        "print('tensorflow' in sys.modules, 'keras' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=REPO
    )
    assert done.stdout.split() == ["False", "False"]


# --- search by upload ----------------------------------------------------------------------


def upload(client: TestClient, data: bytes, name: str = "photo.jpg", **params: int) -> Response:
    """POST data as the multipart field "file" to /api/search."""
    return client.post("/api/search", params=params, files={"file": (name, data, "image/jpeg")})


def test_search_refuses_what_is_not_an_image(client: TestClient, catalog: Catalog) -> None:
    photo = (catalog.root / "photos/photo_000_00000.jpg").read_bytes()
    refused = [
        (b"", "the uploaded file is empty"),
        (b"hello, I am text", "not a readable image"),
        (photo[: len(photo) // 2], "not a readable image"),  # truncated
        (bomb_png(), "not a readable image"),  # 40000 x 40000 claimed by a tiny file
    ]
    for data, reason in refused:
        assert str(assert_error(upload(client, data), 422)["detail"]).startswith(reason)


def test_search_refuses_bad_requests(client: TestClient, catalog: Catalog) -> None:
    photo = (catalog.root / "photos/photo_000_00000.jpg").read_bytes()
    assert_error(upload(client, photo, k=0), 400)
    assert_error(upload(client, photo, k=101), 400)
    assert_error(client.post("/api/search", files={"other": ("a.jpg", photo, "image/jpeg")}), 400)
    assert_error(
        client.post(
            "/api/search",
            content=json.dumps({"file": "x"}),
            headers={"content-type": "application/json"},
        ),
        400,
    )
    assert_error(client.get("/api/search"), 400)  # search in words without words


def test_search_refuses_uploads_over_the_limit(catalog: Catalog, tmp_path: Path) -> None:
    settings = app_settings(catalog.url, tmp_path, upload_limit_mb=1)
    with TestClient(app=create_app(settings)) as client:
        just_over = assert_error(upload(client, b"\xff\xd8\xff" + b"0" * (1024 * 1024)), 413)
        assert just_over["detail"] == "the upload is larger than 1 MB"
        assert_error(upload(client, b"0" * (3 * 1024 * 1024)), 413)


@pytest.mark.slow
def test_search_finds_the_uploaded_photo_first(database_url: str, tmp_path: Path) -> None:
    catalog = build_catalog(database_url, tmp_path)
    with TestClient(app=create_app(app_settings(catalog.url, tmp_path))) as client:
        for index in (0, 3):
            name = f"photos/photo_000_0000{index}.jpg"
            results = upload(client, (catalog.root / name).read_bytes(), k=3).json()
            assert [r["rank"] for r in results] == [1, 2, 3]
            assert results[0]["id"] == catalog.ids[name] and results[0]["file_name"] == name
            assert results[0]["distance"] < 1e-2 * max(results[1]["distance"], 1e-6)
            assert results[1]["distance"] <= results[2]["distance"]
        everything = upload(client, (catalog.root / "photos/photo_000_00001.jpg").read_bytes())
        assert len(everything.json()) == len(catalog.ok_ids) == 5  # k=20 default, 5 indexed


@pytest.mark.slow
def test_search_reloads_only_after_a_newer_completed_run(sqlite_url: str, tmp_path: Path) -> None:
    catalog = build_catalog(sqlite_url, tmp_path)
    newcomer = write_photos(tmp_path / "new", 1, seed=9)[0]
    app = create_app(app_settings(catalog.url, tmp_path))
    with TestClient(app=app) as client:
        assert upload(client, newcomer.read_bytes(), k=1).status_code == 200
        loaded = app.state.search.current_snapshot()
        assert app.state.search.current_snapshot() is loaded  # nothing new: no reload
        (catalog.root / "later").mkdir()
        shutil.copyfile(newcomer, catalog.root / "later/new.jpg")
        run_id = start_run_and_sync(catalog.url, catalog.root)  # a run, until it completes
        extract_and_load(catalog.url, catalog.root)
        refresh_neighbours(catalog.url)
        added = read_catalog(catalog.url, catalog.root)
        new_id = added.ids["later/new.jpg"]
        assert new_id in added.ok_ids  # stored, but its run has not completed yet
        assert upload(client, newcomer.read_bytes(), k=1).json()[0]["id"] != new_id
        assert app.state.search.current_snapshot() is loaded
        complete_run(catalog.url, run_id)
        found = upload(client, newcomer.read_bytes(), k=1).json()
        assert [(r["id"], r["file_name"]) for r in found] == [(new_id, "later/new.jpg")]
        assert app.state.search.current_snapshot() is not loaded
        assert sorted(app.state.search.current_snapshot().ids) == added.ok_ids


def test_search_of_an_empty_collection_is_empty(database_url: str, tmp_path: Path) -> None:
    with database(database_url):
        pass  # the tables a first run creates, and nothing in them
    photo = write_photos(tmp_path / "upload", 1)[0].read_bytes()
    with TestClient(app=create_app(app_settings(database_url, tmp_path))) as client:
        response = upload(client, photo)
        assert response.status_code == 200 and response.json() == []
        assert client.get("/api/images").json() == {
            "total": 0,
            "offset": 0,
            "limit": 50,
            "items": [],
        }
