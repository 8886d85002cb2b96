"""Who may write judgements: tokens, roles, sessions and CSRF, hostile notes, limits, load."""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from litestar.testing import TestClient
from sqlalchemy import func, select

from lookalike.api.app import create_app
from lookalike.sql.schema import judgement_audit, judgements
from lookalike.tasks.accounts import add_user, issue_token, remove_user, set_password
from lookalike.tasks.database import connect_checked
from lookalike.tasks.judgements import VERDICTS
from tests.pipeline_catalog import Catalog, app_settings, build_catalog
from tests.test_api_browser import serving

HTTPS = "https://testserver.local"
PASSWORD = "correct horse battery"
CSRF = "x-csrf-token"


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> Catalog:
    """One SQLite catalog with users ann (curator, token and password) and root (admin)."""
    base = tmp_path_factory.mktemp("security")
    built = build_catalog(f"sqlite:///{base / 'db.sqlite'}", base)
    engine = connect_checked(built.url)
    add_user(engine, "ann", "curator")
    set_password(engine, "ann", PASSWORD)
    add_user(engine, "root", "admin")
    engine.dispose()
    return built


def client_for(catalog: Catalog, tmp_path: Path, **settings: Any) -> TestClient[Any]:
    values = {"writer_database_url": catalog.url, "write_rate": "off", **settings}
    return TestClient(app=create_app(app_settings(catalog.url, tmp_path, **values)), base_url=HTTPS)


@pytest.fixture
def client(catalog: Catalog, tmp_path: Path) -> Iterator[TestClient[Any]]:
    with client_for(catalog, tmp_path) as test_client:
        yield test_client


def token_of(catalog: Catalog, name: str) -> str:
    engine = connect_checked(catalog.url)
    try:
        return issue_token(engine, name)
    finally:
        engine.dispose()


def two_images(catalog: Catalog) -> tuple[int, int]:
    first, second = sorted(catalog.ids.values())[:2]
    return first, second


def judgement_path(catalog: Catalog) -> str:
    image, other = two_images(catalog)
    return f"/api/images/{image}/neighbours/{other}/judgement"


def assert_refused(answer: httpx.Response, status: int, words: str) -> None:
    assert answer.status_code == status, answer.text
    assert words in answer.json()["detail"]


def test_writing_without_a_valid_token_is_401(catalog: Catalog, client: TestClient[Any]) -> None:
    path, body = judgement_path(catalog), {"verdict": "similar"}
    answer = client.put(path, json=body)
    assert_refused(answer, 401, "sign in")
    assert answer.headers["www-authenticate"].startswith("Bearer")
    for header in ("Bearer lka_000000000000_" + "x" * 43, "Bearer nonsense", "Basic YW5uOng="):
        assert client.put(path, json=body, headers={"Authorization": header}).status_code == 401
    replaced = token_of(catalog, "ann")
    current = token_of(catalog, "ann")
    assert_refused(
        client.put(path, json=body, headers={"Authorization": f"Bearer {replaced}"}),
        401,
        "not valid",
    )
    assert (
        client.put(path, json=body, headers={"Authorization": f"Bearer {current}"}).status_code
        == 200
    )


def test_a_removed_users_token_and_session_stop_working(tmp_path: Path) -> None:
    catalog = build_catalog(f"sqlite:///{tmp_path / 'db.sqlite'}", tmp_path)
    engine = connect_checked(catalog.url)
    add_user(engine, "eve", "curator")
    set_password(engine, "eve", PASSWORD)
    token = issue_token(engine, "eve")
    path = judgement_path(catalog)
    with client_for(catalog, tmp_path) as client:
        signed_in = sign_in(client, {"name": "eve", "password": PASSWORD})
        assert signed_in.status_code == 200, signed_in.text
        remove_user(engine, "eve")
        by_token = client.put(path, json={"verdict": "similar"}, headers=bearer(token))
        assert by_token.status_code == 401
        by_session = client.put(path, json={"verdict": "similar"}, headers=csrf_header(client))
        assert_refused(by_session, 401, "sign in")
        assert client.get("/api/session").json()["signed_in"] is False
    engine.dispose()


def test_a_curator_may_not_read_the_audit_trail(catalog: Catalog, client: TestClient[Any]) -> None:
    curator = client.get("/api/judgements/history", headers=bearer(token_of(catalog, "ann")))
    assert_refused(curator, 403, "only admins")
    assert client.get("/api/judgements/history").status_code == 401
    admin = client.get("/api/judgements/history", headers=bearer(token_of(catalog, "root")))
    assert admin.status_code == 200


def test_the_page_session_needs_the_csrf_token_on_every_change(
    catalog: Catalog, client: TestClient[Any]
) -> None:
    assert_refused(sign_in(client, {"name": "ann", "password": PASSWORD}, csrf=False), 403, "CSRF")
    assert_refused(sign_in(client, {"name": "ann", "password": "wrong password!"}), 401, "wrong")
    answer = sign_in(client, {"name": "ann", "password": PASSWORD})
    assert answer.json()["name"] == "ann"
    cookie = next(c for c in client.cookies.jar if c.name == "lookalike_session")
    assert cookie.secure and cookie.has_nonstandard_attr("HttpOnly")
    path, body = judgement_path(catalog), {"verdict": "similar"}
    assert_refused(client.put(path, json=body), 403, "CSRF")
    forged = {CSRF: client.cookies["lookalike_csrf"][:-4] + "0000"}
    assert_refused(client.put(path, json=body, headers=forged), 403, "CSRF")
    assert client.put(path, json=body, headers=csrf_header(client)).json()["user"] == "ann"
    assert_refused(client.delete("/api/session"), 403, "CSRF")
    assert client.delete("/api/session", headers=csrf_header(client)).status_code == 204
    assert client.put(path, json=body, headers=csrf_header(client)).status_code == 401


def test_a_cross_site_form_post_with_the_session_cookie_is_refused(
    catalog: Catalog, client: TestClient[Any]
) -> None:
    sign_in(client, {"name": "ann", "password": PASSWORD})
    evil = {"Origin": "https://evil.example", "Referer": "https://evil.example/form.html"}
    form = client.post("/api/session", data={"token": "x"}, headers=evil)
    assert_refused(form, 403, "CSRF")
    upload = client.post("/api/search", files={"file": ("a.jpg", b"x", "image/jpeg")}, headers=evil)
    assert_refused(upload, 403, "CSRF")
    assert client.get("/api/session").json()["name"] == "ann"  # still signed in, nothing changed


def test_hostile_notes_are_stored_and_answered_as_text(
    catalog: Catalog, client: TestClient[Any]
) -> None:
    note = "'); DROP TABLE judgements; -- <script>alert(1)</script> \" & ü 🏺"
    path = judgement_path(catalog)
    answer = client.put(
        path,
        json={"verdict": "not_similar", "note": note},
        headers=bearer(token_of(catalog, "root")),
    )
    assert answer.status_code == 200 and answer.headers["content-type"].startswith(
        "application/json"
    )
    assert answer.json()["note"] == note
    page = client.get("/api/judgements", params={"user": "root"}).json()
    assert page["items"][0]["note"] == note
    assert client.get("/api/judgements").status_code == 200  # the table is still there


def test_oversized_notes_and_bodies_are_refused(catalog: Catalog, client: TestClient[Any]) -> None:
    path, headers = judgement_path(catalog), bearer(token_of(catalog, "root"))
    long_note = client.put(path, json={"verdict": "similar", "note": "x" * 501}, headers=headers)
    assert long_note.status_code == 400
    huge = b'{"verdict": "similar", "note": "' + b"x" * 40_000 + b'"}'
    headers_json = {**headers, "Content-Type": "application/json"}
    assert client.put(path, content=huge, headers=headers_json).status_code == 413
    extra = client.put(path, json={"verdict": "similar", "user_id": 1}, headers=headers)
    assert extra.status_code == 400
    same = path.replace(
        f"/neighbours/{two_images(catalog)[1]}/", f"/neighbours/{two_images(catalog)[0]}/"
    )
    assert_refused(
        client.put(same, json={"verdict": "similar"}, headers=headers), 400, "two different"
    )
    missing = path.replace(f"/neighbours/{two_images(catalog)[1]}/", "/neighbours/999999/")
    assert client.put(missing, json={"verdict": "similar"}, headers=headers).status_code == 404


def test_bursts_of_writes_and_sign_ins_are_rate_limited(catalog: Catalog, tmp_path: Path) -> None:
    ann, root = bearer(token_of(catalog, "ann")), bearer(token_of(catalog, "root"))
    path = judgement_path(catalog)
    with client_for(catalog, tmp_path, write_rate="4/minute", signin_rate="3/minute") as client:
        statuses = [
            client.put(path, json={"verdict": "similar"}, headers=ann).status_code for _ in range(5)
        ]
        assert statuses == [200, 200, 200, 200, 429]
        # Another user from the same address: the address's allowance is spent too.
        refused = client.put(path, json={"verdict": "similar"}, headers=root)
        assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
        attempts = [
            sign_in(client, {"name": "ann", "password": "wrong password!"}).status_code
            for _ in range(4)
        ]
        assert attempts == [401, 401, 401, 429]


def test_without_a_writer_account_writes_answer_503(catalog: Catalog, tmp_path: Path) -> None:
    with client_for(catalog, tmp_path, writer_database_url="") as client:
        answer = client.put(
            judgement_path(catalog),
            json={"verdict": "similar"},
            headers=bearer(token_of(catalog, "ann")),
        )
        assert_refused(answer, 503, "LOOKALIKE_WRITER_DATABASE_URL")
        assert client.get("/api/session").json()["writable"] is False


def test_reading_can_require_an_identity(catalog: Catalog, tmp_path: Path) -> None:
    with client_for(catalog, tmp_path, read_requires_login=True) as client:
        assert_refused(client.get("/api/images"), 401, "sign in")
        assert (
            client.get("/api/images", headers=bearer(token_of(catalog, "ann"))).status_code == 200
        )
        for open_path in ("/", "/health", "/api/session", "/static/app.js"):
            assert client.get(open_path).status_code == 200, open_path
        sign_in(client, {"name": "ann", "password": PASSWORD})
        assert client.get("/api/images").status_code == 200


@pytest.mark.parametrize(
    "database_kind", ["sqlite", pytest.param("mariadb", marks=pytest.mark.mariadb)]
)
def test_200_concurrent_judgements_from_20_users_leave_exact_counts(
    database_kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    url = (
        f"sqlite:///{tmp_path / 'db.sqlite'}"
        if database_kind == "sqlite"
        else request.getfixturevalue("mariadb_url")
    )
    catalog = build_catalog(url, tmp_path)
    engine = connect_checked(url)
    users = [f"curator{n:02d}" for n in range(20)]
    tokens = {}
    for name in users:
        add_user(engine, name, "curator")
        tokens[name] = issue_token(engine, name)
    pairs = list(itertools.combinations(sorted(catalog.ids.values())[:5], 2))  # 10 pairs
    wanted = {(u, p): VERDICTS[(u + p) % 3] for u in range(20) for p in range(10)}
    settings = app_settings(url, tmp_path, writer_database_url=url, write_rate="off")

    def judge_all(user: int, base_url: str) -> list[int]:
        with httpx.Client(base_url=base_url, headers=bearer(tokens[users[user]])) as http:
            return [
                http.put(
                    f"/api/images/{pairs[p][0]}/neighbours/{pairs[p][1]}/judgement",
                    json={"verdict": wanted[user, p]},
                ).status_code
                for p in range(10)
            ]

    with serving(settings) as base_url, ThreadPoolExecutor(20) as pool:
        statuses = [s for done in pool.map(judge_all, range(20), [base_url] * 20) for s in done]
    assert statuses == [200] * 200
    expected = Counter((pairs[p], v) for (_, p), v in wanted.items())
    with engine.connect() as conn:
        stored = Counter(
            ((row.image_id, row.other_id), row.verdict)
            for row in conn.execute(
                select(judgements.c.image_id, judgements.c.other_id, judgements.c.verdict)
            )
        )
        audit_rows = conn.execute(select(func.count()).select_from(judgement_audit)).scalar_one()
    engine.dispose()
    assert stored == expected
    assert audit_rows == 200


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def csrf_header(client: TestClient[Any]) -> dict[str, str]:
    """The page's way: the CSRF cookie's value echoed in the header (a GET sets the cookie)."""
    if "lookalike_csrf" not in client.cookies:
        client.get("/api/session")
    return {CSRF: client.cookies["lookalike_csrf"]}


def sign_in(client: TestClient[Any], body: dict[str, str], csrf: bool = True) -> httpx.Response:
    headers = csrf_header(client) if csrf else {}
    return client.post("/api/session", json=body, headers=headers)
