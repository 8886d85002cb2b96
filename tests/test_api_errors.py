"""Error answers: Litestar's exceptions and ours, as JSON {"status_code", "detail"}."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from httpx import Response
from litestar import Litestar, get
from litestar.exceptions import InternalServerException, NotFoundException
from litestar.testing import TestClient

from lookalike.api.app import create_app
from lookalike.api.errors import EXCEPTION_HANDLERS, CorruptFeaturesError, UploadTooLargeError
from lookalike.tasks.settings import Settings


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient[Litestar]]:
    """The real app on an empty database (no tables: every query fails)."""
    data_dir = tmp_path_factory.mktemp("data")
    with TestClient(app=create_app(Settings(data_dir=data_dir))) as test_client:
        yield test_client


class Recorded(logging.Handler):
    """The records of one logger, whatever the logging configuration does with propagation."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def json_error(response: Response, status: int) -> dict[str, object]:
    """The answer is a JSON error with this status and a detail."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["status_code"] == status and body["detail"]
    return dict(body)


def test_our_exceptions_answer_with_their_status_and_detail(client: TestClient[Litestar]) -> None:
    body = json_error(client.get("/api/images/1/thumbnail", params={"size": 7}), 400)
    assert body == {"status_code": 400, "detail": "size must be one of 64, 128, 256, 512, 1024"}
    body = json_error(client.get("/api/images/1/neighbours", params={"k": 0}), 400)
    assert body["detail"] == "k must be at least 1, got 0"


def test_litestar_errors_keep_their_answer(client: TestClient[Litestar]) -> None:
    invalid = json_error(client.get("/api/images", params={"limit": 0}), 400)
    assert invalid["detail"] == "Validation failed for GET /api/images?limit=0"
    assert invalid["extra"] == [
        {"message": "Expected `int` >= 1", "key": "limit", "source": "query"}
    ]
    assert json_error(client.get("/no/such/route"), 404)["detail"] == "Not Found"
    not_allowed = client.delete("/api/stats")
    assert json_error(not_allowed, 405)["detail"] == "Method Not Allowed"
    assert not_allowed.headers["allow"] == "GET, OPTIONS"
    assert json_error(client.get("/static/a%00b"), 404)["detail"] == "Not Found"


def test_an_svg_route_answers_its_errors_in_json(client: TestClient[Litestar]) -> None:
    body = json_error(client.get("/api/images/1/fingerprint.svg"), 503)
    assert body == {"status_code": 503, "detail": "database unavailable"}


@get("/corrupt", sync_to_thread=False)
def corrupt() -> None:
    raise CorruptFeaturesError("stored features of image 3 have 10 bytes, expected 8192")


@get("/too-large", sync_to_thread=False)
def too_large() -> None:
    raise UploadTooLargeError("the upload is larger than 20 MB")


@get("/litestar-500", sync_to_thread=False)
def litestar_500() -> None:
    raise InternalServerException("secret internals of Litestar")


@get("/bug", sync_to_thread=False)
def bug() -> None:
    raise RuntimeError("secret internals of ours")


@get("/missing", sync_to_thread=False, media_type="image/png")
def missing() -> None:
    raise NotFoundException("no image with id 5")


def test_server_errors_show_their_detail_only_when_meant_for_the_client() -> None:
    app = Litestar(
        route_handlers=[corrupt, too_large, litestar_500, bug, missing],
        exception_handlers=EXCEPTION_HANDLERS,
    )
    logger, recorded = logging.getLogger("lookalike.api.errors"), Recorded()
    logger.addHandler(recorded)
    try:
        with TestClient(app) as client:
            assert json_error(client.get("/corrupt"), 500)["detail"] == (
                "stored features of image 3 have 10 bytes, expected 8192"
            )
            assert json_error(client.get("/too-large"), 413)["detail"] == (
                "the upload is larger than 20 MB"
            )
            assert json_error(client.get("/missing"), 404)["detail"] == "no image with id 5"
            for route in ("/litestar-500", "/bug"):
                response = client.get(route)
                assert json_error(response, 500)["detail"] == "internal server error"
                assert "secret" not in response.text
    finally:
        logger.removeHandler(recorded)
    logged = [record for record in recorded.records if record.exc_info]
    assert [record.getMessage() for record in logged] == [
        "unexpected error on GET /litestar-500",
        "unexpected error on GET /bug",
    ]
