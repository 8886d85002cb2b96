"""Fault suite, API: fuzzing from the service's own OpenAPI schema, and hostile requests.

Every answer must be a 2xx or a 4xx JSON error (never a 5xx), and no answer may carry a file
from outside the collection folder or the page's static folder.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
import schemathesis
from httpx import Response
from hypothesis import HealthCheck, given, settings
from litestar import Litestar
from litestar.testing import TestClient

from lookalike.api.app import create_app
from lookalike.tasks.accounts import add_user, issue_token
from lookalike.tasks.database import connect_checked
from lookalike.tasks.duplicates import find_duplicates
from lookalike.tasks.settings import MAX_DUPLICATE_THRESHOLD
from tests.odd_images import HOSTILE_NAMES, small_jpeg
from tests.pipeline_catalog import (
    Catalog,
    app_settings,
    build_catalog,
    index_folder,
    read_catalog,
    tamper_file_names,
)

pytestmark = pytest.mark.faults

REPO = Path(__file__).resolve().parent.parent
# Text that would only appear in an answer if a file outside the allowed folders leaked.
LEAK_MARKERS = ("[build-system]", "root:x:0:0", "def create_app", "import sqlalchemy")
ID_ROUTES = (
    "/api/images/{id}",
    "/api/images/{id}/neighbours",
    "/api/images/{id}/features",
    "/api/images/{id}/file",
    "/api/images/{id}/thumbnail",
    "/api/images/{id}/fingerprint.svg",
    "/api/images/{id}/fingerprint.png",
    "/data/image_name/{id}",
    "/data/image_name_and_neighbours/{id}",
    "/data/image_fingerprint/{id}",
)
OPERATIONS = (
    ("GET", "/api/images"),
    ("GET", "/api/images/{image_id}"),
    ("GET", "/api/images/{image_id}/neighbours"),
    ("GET", "/api/images/{image_id}/features"),
    ("GET", "/api/images/{image_id}/file"),
    ("GET", "/api/images/{image_id}/thumbnail"),
    ("GET", "/api/images/{image_id}/fingerprint.svg"),
    ("GET", "/api/images/{image_id}/fingerprint.png"),
    ("GET", "/data/image_count"),
    ("GET", "/data/image_name/{image_id}"),
    ("GET", "/data/image_name_and_neighbours/{image_id}"),
    ("GET", "/data/image_fingerprint/{image_id}"),
    ("POST", "/api/search"),
    ("GET", "/api/search"),
    ("GET", "/api/stats"),
    ("GET", "/api/sources"),
    ("GET", "/health"),
    ("GET", "/api/duplicates"),
    ("GET", "/api/images/{image_id}/duplicates"),
    ("GET", "/api/map"),
    ("GET", "/api/map/near"),
    ("GET", "/api/map/folders"),
    ("PUT", "/api/images/{image_id}/neighbours/{neighbour_id}/judgement"),
    ("DELETE", "/api/images/{image_id}/neighbours/{neighbour_id}/judgement"),
    ("GET", "/api/judgements"),
    ("GET", "/api/judgements/history"),
    ("GET", "/api/session"),
    ("POST", "/api/session"),
    ("DELETE", "/api/session"),
)


SEARCH = ("POST", "/api/search")


def assert_json_error(response: Response, *statuses: int) -> dict[str, Any]:
    """A 4xx JSON error with one of these statuses, no trace and no leaked file."""
    assert response.status_code in statuses, (response.request.url, response.text[:300])
    body = response.json()
    assert body["status_code"] == response.status_code and body["detail"]
    assert "Traceback" not in response.text
    assert not any(marker in response.text for marker in LEAK_MARKERS)
    return body


def raw_get(app: Litestar, raw_path: bytes) -> tuple[int, bytes]:
    """GET a path exactly as sent on the wire (httpx would resolve the "..")."""
    path, _, query = raw_path.partition(b"?")
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": unquote(path.decode("ascii")),  # as uvicorn decodes it: "%2F" becomes "/"
        "raw_path": path,
        "root_path": "",
        "query_string": query,
        "headers": [(b"host", b"testserver")],
        "client": ("127.0.0.1", 40000),
        "server": ("testserver", 80),
    }
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))  # type: ignore[arg-type]
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


@pytest.fixture(scope="module")
def shared(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Catalog, Litestar, TestClient]]:
    """One SQLite catalog and app for the tests that only read (built once: photos take time)."""
    base = tmp_path_factory.mktemp("shared")
    catalog = build_catalog(f"sqlite:///{base / 'lookalike.sqlite'}", base)
    engine = connect_checked(catalog.url)
    find_duplicates(engine, MAX_DUPLICATE_THRESHOLD)  # groups to read (the pipeline's step)
    add_user(engine, "admin", "admin")
    catalog.token = issue_token(engine, "admin")  # type: ignore[attr-defined]
    engine.dispose()
    settings = app_settings(catalog.url, base, writer_database_url=catalog.url, write_rate="off")
    app = create_app(settings)
    with TestClient(app=app) as client:
        yield catalog, app, client


@pytest.fixture
def served(database_url: str, tmp_path: Path) -> Iterator[tuple[Catalog, Litestar, TestClient]]:
    """A catalog of this test's own, on SQLite and on MariaDB, for tests that write or compare."""
    catalog = build_catalog(database_url, tmp_path)
    app = create_app(app_settings(catalog.url, tmp_path))
    with TestClient(app=app) as client:
        yield catalog, app, client


# --- path traversal ---------------------------------------------------------------------------

TRAVERSALS = (
    b"/api/images/..%2F..%2Fetc%2Fpasswd/file",
    b"/api/images/..%2f..%2f..%2fpyproject.toml/file",
    b"/api/images/%2e%2e%2f%2e%2e%2fetc%2fpasswd/file",
    b"/api/images/1%2F..%2F..%2F..%2Fpyproject.toml/file",
    b"/api/images/1/file/../../../pyproject.toml",
    b"/api/images/1/../../../etc/passwd",
    b"/api/images/../../etc/passwd",
    b"/data/image_name/..%2F..%2Fetc%2Fpasswd",
    b"/static/../pyproject.toml",
    b"/static/../../pyproject.toml",
    b"/static/../app.py",
    b"/static/../../../../../../../../etc/passwd",
    b"/static/..%2Fapp.py",
    b"/static/..%2F..%2Fpyproject.toml",
    b"/static/%2e%2e/%2e%2e/pyproject.toml",
    b"/static/%2e%2e%2f%2e%2e%2fpyproject.toml",
    b"/static/%252e%252e%252f%252e%252e%252fpyproject.toml",
    b"/static/..%5c..%5cpyproject.toml",
    b"/static/..\\..\\pyproject.toml",
    b"/static/%c0%ae%c0%ae/%c0%ae%c0%ae/pyproject.toml",
    b"/static/....//....//pyproject.toml",
    b"/static/..;/..;/pyproject.toml",
    b"/static/app.js/../../app.py",
    b"/static//etc/passwd",
    b"/static/%2Fetc%2Fpasswd",
    b"/static/../controllers/pages.py",
    b"/schema/..%2F..%2Fpyproject.toml",
    b"/%2e%2e/pyproject.toml",
)


def test_path_traversal_never_leaves_the_allowed_folders(
    shared: tuple[Catalog, Litestar, TestClient],
) -> None:
    _, app, _ = shared
    answers = {raw: raw_get(app, raw) for raw in TRAVERSALS}
    assert {raw: status for raw, (status, _) in answers.items()} == dict.fromkeys(TRAVERSALS, 404)
    for raw, (_, body) in answers.items():
        assert body.startswith(b'{"status_code":404,'), raw
        assert not any(marker.encode() in body for marker in LEAK_MARKERS), raw
    # The same folder reached the normal way still works, so the 404s are not a dead route.
    assert raw_get(app, b"/static/app.js")[0] == 200
    assert raw_get(app, b"/static/./app.js")[0] == 200


@pytest.mark.parametrize(
    "raw", [b"/static/%00", b"/static/app.js%00.html", b"/static/a%00/../app.js"]
)
def test_a_nul_byte_in_a_static_path_is_a_4xx(tmp_path: Path, raw: bytes) -> None:
    app = create_app(app_settings(f"sqlite:///{tmp_path / 'unused.sqlite'}", tmp_path))
    status, body = raw_get(app, raw)
    assert 400 <= status < 500 and body.startswith(b'{"status_code":4')


# --- SQL injection ----------------------------------------------------------------------------

INJECTIONS = (
    "' OR 1=1 --",
    "' OR '1'='1",
    "'; DROP TABLE image_names; --",
    '" OR ""="',
    "%' OR '%'='",
    "') UNION SELECT id, file_name, width, height, status FROM image_names --",
    "1; SELECT SLEEP(5)",
    "photos/' --",
    "\\",
    "\\%",
    "/",
    "%",
    "_",
    "%%",
    "[a-z]*",
    "*",
    "ESCAPE '/'",
    "😀",
    "PHOTO_000",
)


def test_sql_in_q_is_a_literal_substring(
    served: tuple[Catalog, Litestar, TestClient],
) -> None:
    catalog, _, client = served
    names = sorted(catalog.ids, key=catalog.ids.__getitem__)
    for q in INJECTIONS:
        page = client.get("/api/images", params={"q": q, "limit": 500})
        assert page.status_code == 200, (q, page.text)
        expected = [name for name in names if q.lower() in name.lower()]
        assert [item["file_name"] for item in page.json()["items"]] == expected, q
        assert page.json()["total"] == len(expected)
    # Nothing was dropped or changed by any of them.
    assert client.get("/api/stats").json()["images"] == len(catalog.ids) == 11
    assert client.get("/api/images", params={"q": "%"}).json()["total"] == 1  # odd/100%_real.jpg
    assert client.get("/api/images", params={"q": "_"}).json()["total"] == 6  # and 5 photo_*


def test_a_nul_in_q_matches_no_name(
    served: tuple[Catalog, Litestar, TestClient],
) -> None:
    _, _, client = served
    for q in ("\x00", "jpg\x00", "\x00photos"):
        assert client.get("/api/images", params={"q": q}).json()["total"] == 0, repr(q)


SQL_IDS = (
    "1 OR 1=1",
    "1' OR '1'='1",
    "1;DROP TABLE image_names",
    "1--",
    "1)",
    "(SELECT 1)",
    "1 UNION SELECT 1",
    "0x01",
)


def test_sql_in_ids_is_not_a_route(shared: tuple[Catalog, Litestar, TestClient]) -> None:
    catalog, _, client = shared
    for image_id in SQL_IDS:
        for route in ID_ROUTES:
            assert_json_error(client.get(route.format(id=image_id)), 404)
    assert client.get("/api/stats").json()["images"] == len(catalog.ids)


# --- oversized and malformed parameters -------------------------------------------------------

BAD_IDS = (
    "0",
    "-1",
    "-0",
    "2147483648",
    "99999999999999999999",
    "9223372036854775808",
    "-9223372036854775809",
    "1" * 4000,
    "1.5",
    "1e3",
    "1e400",
    "NaN",
    "inf",
    "abc",
    "%00",
    "%ff",
    "%F0%9F%98%80",
    "",
)
BAD_NUMBERS = (
    "-1",
    "1.5",
    "1e400",
    "-1e400",
    "NaN",
    "inf",
    "-inf",
    "99999999999999999999",
    "9223372036854775808",
    "-9223372036854775809",
    "",
    "ten",
    "0x10",
    "1_000",
    "\x00",
    "1" * 5000,
)


def test_malformed_ids_on_every_route(shared: tuple[Catalog, Litestar, TestClient]) -> None:
    _, _, client = shared
    for route in ID_ROUTES:
        for image_id in BAD_IDS:
            # "" makes "/api/images/" the list route (200); 1e3 is no route; the rest 400/404.
            if route == "/api/images/{id}" and image_id == "":
                continue
            assert_json_error(client.get(route.format(id=image_id)), 400, 404)
        assert_json_error(client.get(route.format(id=999_999)), 404)
        assert_json_error(client.delete(route.format(id=1)), 405)


def test_malformed_numbers_in_every_query_parameter(
    shared: tuple[Catalog, Litestar, TestClient],
) -> None:
    catalog, _, client = shared
    image_id = catalog.photo_ids[0]
    photo = (catalog.root / "photos/photo_000_00000.jpg").read_bytes()
    for value in BAD_NUMBERS:
        for name in ("offset", "limit"):
            assert_json_error(client.get("/api/images", params={name: value}), 400)
        assert_json_error(
            client.get(f"/api/images/{image_id}/thumbnail", params={"size": value}), 400
        )
        search = client.post(
            "/api/search", params={"k": value}, files={"file": ("a.jpg", photo, "image/jpeg")}
        )
        assert_json_error(search, 400)
    for params in ({"offset": 2**31}, {"limit": 501}, {"limit": 0}, {"offset": -(2**63)}):
        assert_json_error(client.get("/api/images", params=params), 400)


def test_malformed_k_for_neighbours(shared: tuple[Catalog, Litestar, TestClient]) -> None:
    catalog, _, client = shared
    image_id = catalog.ok_ids[0]
    for value in (
        "-1",
        "0",
        "1.5",
        "NaN",
        "inf",
        "",
        "ten",
        "\x00",
        str(catalog.stored_k + 1),
        "2147483648",
    ):
        assert_json_error(
            client.get(f"/api/images/{image_id}/neighbours", params={"k": value}), 400
        )


@pytest.mark.parametrize(
    "k", ["9223372036854775808", "99999999999999999999", "1" * 400], ids=["2^63", "1e20", "1e400"]
)
def test_a_huge_k_for_neighbours_is_a_400(
    served: tuple[Catalog, Litestar, TestClient],
    k: str,
) -> None:
    catalog, _, client = served
    response = client.get(f"/api/images/{catalog.ok_ids[0]}/neighbours", params={"k": k})
    assert_json_error(response, 400)


def test_very_long_and_odd_q(shared: tuple[Catalog, Litestar, TestClient]) -> None:
    _, _, client = shared
    for q in ("x" * 769, "x" * 30_000, "ü" * 769):
        body = assert_json_error(client.get("/api/images", params={"q": q}), 400)
        assert len(str(body["detail"])) < 40_000
    for q in ("x" * 768, "\ufffd", "\u202egpj.exe", "a\tb", "\x7f"):
        assert client.get("/api/images", params={"q": q}).json()["total"] == 0
    repeated = client.get("/api/images?q=photo&q=odd&limit=1&limit=2&offset=0&offset=1")
    assert repeated.status_code in (200, 400)  # either reading is fine; a 5xx is not


# --- hostile stored names and uploads -------------------------------------------------------

OUTSIDE = "the stored path of this image is outside the collection"
MISSING = "the image file is missing from the collection folder"
# Stored names that must never be served, with the answer they get.
UNSERVABLE = (
    ("/etc/passwd", 403, OUTSIDE),
    ("photos/../../outside/secret.jpg", 403, OUTSIDE),
    ("pipe.jpg", 404, MISSING),  # a FIFO: never opened, so never blocks
    ("folder.jpg", 404, MISSING),
    ("nul\x00.jpg", 404, "the stored path of this image is not a valid file name"),
)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_hostile_stored_names_are_served_safely(
    served: tuple[Catalog, Litestar, TestClient],
) -> None:
    catalog, _, client = served
    for name in (*HOSTILE_NAMES, "pipe.jpg", "folder.jpg"):
        (catalog.root / name).write_bytes(small_jpeg())
    index_folder(catalog.url, catalog.root)  # a run stores the names as it finds them
    ids = read_catalog(catalog.url, catalog.root).ids
    # Then two files stop being regular files; the other unservable names no run would store.
    for name, make in (("pipe.jpg", os.mkfifo), ("folder.jpg", os.mkdir)):
        (catalog.root / name).unlink()
        make(catalog.root / name)
    ids |= tamper_file_names(catalog.url, [name for name, _, _ in UNSERVABLE if name not in ids])

    for name in HOSTILE_NAMES:
        image_id = ids[name]
        served_file = client.get(f"/api/images/{image_id}/file")
        assert served_file.status_code == 200 and served_file.content == small_jpeg(), name
        disposition = served_file.headers["content-disposition"]
        assert not set("\r\n") & set(disposition) and disposition.startswith("inline;"), name
        thumbnail = client.get(f"/api/images/{image_id}/thumbnail?size=64")
        assert thumbnail.status_code == 200 and thumbnail.content[:3] == b"\xff\xd8\xff", name
        detail = client.get(f"/api/images/{image_id}").json()
        assert (detail["file_name"], detail["status"]) == (name, "ok"), name
        assert client.get(f"/data/image_name/{image_id}").json() == [name]
        found = client.get("/api/images", params={"q": name, "limit": 500}).json()["items"]
        assert image_id in [item["id"] for item in found], name
    for name, status, detail in UNSERVABLE:
        for route in ("file", "thumbnail"):
            body = assert_json_error(client.get(f"/api/images/{ids[name]}/{route}"), status)
            assert body["detail"] == detail, (name, route)


def test_upload_names_and_declared_types_are_ignored(
    shared: tuple[Catalog, Litestar, TestClient],
) -> None:
    _, _, client = shared
    for filename, content_type in (
        ("../../../etc/passwd", "text/html"),
        ("a\r\nX-Injected: 1.jpg", "image/jpeg"),
        ("x" * 2000 + ".jpg", "application/x-msdownload"),
    ):
        upload = {"file": (filename, b"not an image at all", content_type)}
        body = assert_json_error(client.post("/api/search", files=upload), 422)
        assert str(body["detail"]).startswith("not a readable image")
    assert_json_error(client.post("/api/search", files={"file": ("a.jpg", b"", "image/jpeg")}), 422)
    as_text_field = client.post("/api/search", data={"file": "just text"})
    assert_json_error(as_text_field, 400)


def test_an_upload_part_without_a_file_name_is_a_4xx(
    shared: tuple[Catalog, Litestar, TestClient],
) -> None:
    catalog, _, client = shared
    photo = (catalog.root / "photos/photo_000_00000.jpg").read_bytes()
    response = client.post("/api/search", files={"file": ("", photo, "image/jpeg")})
    assert_json_error(response, 400, 422)


# --- schema-driven fuzzing --------------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_target(shared: tuple[Catalog, Litestar, TestClient]) -> tuple[Any, Catalog]:
    """The schema as the running app serves it, and the catalog behind the app."""
    catalog, app, _ = shared
    return schemathesis.openapi.from_asgi("/schema/openapi.json", app), catalog


def test_the_fuzzed_operations_are_every_operation(fuzz_target: tuple[Any, Catalog]) -> None:
    schema, _ = fuzz_target
    listed = {(op.ok().method.upper(), op.ok().path) for op in schema.get_all_operations()}
    assert listed == set(OPERATIONS)


@pytest.mark.parametrize("with_token", [False, True], ids=["anonymous", "admin-token"])
@pytest.mark.parametrize(
    ("method", "path"),
    # The upload route builds the feature model on its first valid image: seconds, once.
    [pytest.param(*op, marks=pytest.mark.slow) if op == SEARCH else op for op in OPERATIONS],
)
def test_schema_fuzzing_never_gets_a_server_error(
    fuzz_target: tuple[Any, Catalog], method: str, path: str, with_token: bool
) -> None:
    schema, catalog = fuzz_target
    names = {image_id: name for name, image_id in catalog.ids.items()}
    seen: dict[int, int] = {}
    token = catalog.token  # type: ignore[attr-defined]
    headers = {"Authorization": f"Bearer {token}"} if with_token else {}

    @settings(
        max_examples=(12 if method == "POST" else 25) if not with_token else 12,
        deadline=None,
        derandomize=True,  # the same cases every run: a red run can be replayed
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=schema[path][method].as_strategy())
    def check(case: Any) -> None:
        response = case.call(timeout=120, headers=headers)
        seen[response.status_code] = seen.get(response.status_code, 0) + 1
        assert response.status_code < 500, (case.as_curl_command(), response.text[:300])
        if response.status_code >= 400:
            body = response.json()
            assert body["status_code"] == response.status_code and body["detail"]
        elif path.endswith("/file"):
            image_id = case.path_parameters["image_id"]
            assert response.content == (catalog.root / names[image_id]).read_bytes()

    check()
    assert sum(seen.values()) >= 1
