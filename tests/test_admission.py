"""Admission control: slots and queues of expensive work, per-client rate limits, refusals."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
import sqlalchemy
from httpx import Response
from litestar.testing import TestClient

from lookalike.api.admission import (
    Admission,
    ClientRateLimit,
    WorkLane,
    compute_threads,
    default_slots,
)
from lookalike.api.app import create_app
from lookalike.api.errors import ServerBusyError, TooManyRequestsError
from lookalike.api.repository import ImageRepository, StatsCache
from lookalike.sql.schema import STATUS_FAILED, image_names
from lookalike.tasks.settings import Settings, SettingsError, parse_rate
from tests.pipeline_catalog import Catalog, app_settings, build_catalog


@pytest.fixture
def catalog(sqlite_url: str, tmp_path: Path) -> Catalog:
    return build_catalog(sqlite_url, tmp_path)


def upload(client: TestClient, data: bytes) -> Response:
    return client.post("/api/search", files={"file": ("photo.jpg", data, "image/jpeg")})


def retry_after(response: Response) -> int:
    """The Retry-After of a refusal, checked to be whole seconds, at least 1."""
    value = int(response.headers["retry-after"])
    assert value >= 1
    return value


# --- the parts ---------------------------------------------------------------------------


def test_slots_leave_a_core_to_the_cheap_routes() -> None:
    assert [default_slots(cores) for cores in (1, 2, 3, 4, 8, 16)] == [1, 1, 1, 1, 3, 7]
    assert [compute_threads(cores) for cores in (1, 2, 8)] == [1, 1, 7]
    settings = Settings(search_slots=0, search_queue=3, render_queue=10)
    admission = Admission.from_settings(settings, cores=8)
    assert (admission.search.slots, admission.search.capacity) == (3, 6)
    assert (admission.render.slots, admission.render.capacity) == (3, 13)
    assert admission.compute_threads == 7
    admission.close()


def test_a_full_lane_refuses_at_once_and_admits_again_when_a_place_frees() -> None:
    lane = WorkLane("search", slots=1, queue=1)
    with lane.held(), lane.held():
        started = time.perf_counter()
        with pytest.raises(ServerBusyError) as refused, lane.held():
            pass
        assert time.perf_counter() - started < 0.1
        assert int(refused.value.headers["Retry-After"]) >= 1  # type: ignore[index]
        assert refused.value.status_code == 503
        with pytest.raises(ServerBusyError):
            lane.check()
    lane.check()
    with lane.held():
        assert lane.admitted == 1
    assert lane.admitted == 0
    lane.close()


def test_a_lane_runs_at_most_its_slots_at_once_on_its_own_threads() -> None:
    import asyncio

    lane = WorkLane("render", slots=2, queue=4)
    running, most, names = 0, 0, set()
    lock = threading.Lock()

    def work() -> None:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
            names.add(threading.current_thread().name)
        time.sleep(0.05)
        with lock:
            running -= 1

    async def flood() -> None:
        await asyncio.gather(*(lane.run(work) for _ in range(6)))

    asyncio.run(flood())
    lane.close()
    assert most == 2
    assert names and all(name.startswith("lookalike-render") for name in names)


def test_rate_limit_is_a_bucket_per_client_that_refills() -> None:
    limit = ClientRateLimit("search", parse_rate("3/second"))
    for _ in range(3):
        limit.take("a")
    with pytest.raises(TooManyRequestsError) as refused:
        limit.take("a")
    assert refused.value.status_code == 429
    assert refused.value.headers == {"Retry-After": "1"}
    limit.take("b")  # another client has its own allowance
    time.sleep(0.4)  # a third of a second refills one token
    limit.take("a")
    unlimited = ClientRateLimit("search", parse_rate("off"))
    for _ in range(1000):
        unlimited.take("a")


@pytest.mark.parametrize("rate", ["30", "30/day", "0/minute", "-1/second", "x/minute", ""])
def test_bad_rates_are_refused_with_the_setting_named(rate: str) -> None:
    with pytest.raises(SettingsError, match="LOOKALIKE_SEARCH_RATE must be COUNT/second"):
        Settings(search_rate=rate or " ")


def test_rates_and_slots_read() -> None:
    assert parse_rate(" 30/minute ") == (30, 60.0)
    assert parse_rate("OFF") is None
    for name in ("search_slots", "search_queue", "render_queue"):
        with pytest.raises(SettingsError, match="search slots, search queue and render queue"):
            Settings(**{name: -1})


# --- through the API -----------------------------------------------------------------------


@pytest.fixture
def client(catalog: Catalog, tmp_path: Path) -> Iterator[TestClient]:
    settings = app_settings(catalog.url, tmp_path, search_slots=1, search_queue=1, render_queue=2)
    with TestClient(app=create_app(settings)) as test_client:
        yield test_client


def test_search_is_refused_with_retry_after_while_every_slot_is_held(
    client: TestClient, catalog: Catalog
) -> None:
    lane: WorkLane = client.app.state.admission.search
    with ExitStack() as holding:
        for _ in range(lane.capacity):
            holding.enter_context(lane.held())
        started = time.perf_counter()
        refused = upload(client, b"not even read")
        assert time.perf_counter() - started < 1.0
        assert refused.status_code == 503, refused.text
        assert refused.json()["detail"] == "the server is busy with other search requests"
        retry_after(refused)
    # The places are free again: the same upload now gets as far as decoding.
    assert upload(client, b"not even read").status_code == 422
    assert lane.admitted == 0


def test_search_rate_limit_answers_429_per_client(catalog: Catalog, tmp_path: Path) -> None:
    settings = app_settings(catalog.url, tmp_path, search_rate="2/minute")
    with TestClient(app=create_app(settings)) as client:
        assert [upload(client, b"text").status_code for _ in range(2)] == [422, 422]
        refused = upload(client, b"text")
        assert refused.status_code == 429
        assert "too many search requests" in refused.json()["detail"]
        assert 1 <= retry_after(refused) <= 30
        assert client.get("/api/stats").status_code == 200  # cheap routes are not limited


def test_only_thumbnails_made_on_request_spend_the_render_allowance(
    catalog: Catalog, tmp_path: Path
) -> None:
    settings = app_settings(catalog.url, tmp_path, render_rate="2/minute")
    first, second = catalog.ok_ids[:2]
    with TestClient(app=create_app(settings)) as client:
        assert client.get(f"/api/images/{first}/thumbnail?size=64").status_code == 200
        assert client.get(f"/api/images/{second}/thumbnail?size=64").status_code == 200
        for _ in range(5):  # cached now: free
            assert client.get(f"/api/images/{first}/thumbnail?size=64").status_code == 200
        refused = client.get(f"/api/images/{first}/thumbnail?size=128")
        assert refused.status_code == 429, refused.text
        retry_after(refused)
        assert client.get(f"/api/images/{first}/fingerprint.svg").status_code == 429
        assert client.get(f"/data/image_fingerprint/{first}").status_code == 429
        assert client.get(f"/api/images/{first}").status_code == 200


def test_thumbnails_are_refused_while_the_render_lane_is_full(
    client: TestClient, catalog: Catalog
) -> None:
    lane: WorkLane = client.app.state.admission.render
    image_id = catalog.ok_ids[0]
    with ExitStack() as holding:
        for _ in range(lane.capacity):
            holding.enter_context(lane.held())
        refused = client.get(f"/api/images/{image_id}/thumbnail?size=512")
        assert refused.status_code == 503
        retry_after(refused)
    assert client.get(f"/api/images/{image_id}/thumbnail?size=512").status_code == 200


def test_openapi_documents_the_refusals_and_their_retry_after(client: TestClient) -> None:
    schema = client.get("/schema/openapi.json").json()
    search = schema["paths"]["/api/search"]["post"]["responses"]
    thumbnail = schema["paths"]["/api/images/{image_id}/thumbnail"]["get"]["responses"]
    for responses in (search, thumbnail):
        for code in ("429", "503"):
            assert responses[code]["headers"]["Retry-After"]["schema"]["type"] == "integer"
    fingerprint = schema["paths"]["/api/images/{image_id}/fingerprint.png"]["get"]["responses"]
    assert "Retry-After" in fingerprint["429"]["headers"]


# --- statistics off the request path --------------------------------------------------------


def eventually(check: object, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return True
        time.sleep(0.02)
    return False


def test_stats_are_recounted_in_the_background_after_their_time_to_live(
    catalog: Catalog,
) -> None:
    engine = sqlalchemy.create_engine(catalog.url)
    repository = ImageRepository(engine)
    cached, fresh = StatsCache(repository, ttl_s=3600), StatsCache(repository, ttl_s=0)
    assert cached.get().failed == fresh.get().failed == 1  # the first count is waited for
    with engine.begin() as conn:
        conn.execute(image_names.update().values(status=STATUS_FAILED))
    assert cached.get().failed == 1  # within its time to live
    # Past it, a get answers with what it has and starts a recount, which shows in time.
    assert eventually(lambda: fresh.get().failed == len(catalog.ids))
    assert cached.get().failed == 1
    engine.dispose()


def test_the_app_counts_its_stats_at_start_up(catalog: Catalog, tmp_path: Path) -> None:
    with TestClient(app=create_app(app_settings(catalog.url, tmp_path))) as client:
        stats: StatsCache = client.app.state.stats
        assert eventually(lambda: stats.ready)  # before any request asked
        assert client.get("/api/stats").json()["images"] == len(catalog.ids)
