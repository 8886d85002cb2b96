"""The in-memory neighbour lists answer exactly as the database does, and never go stale."""

from __future__ import annotations

from pathlib import Path

import pytest
from litestar.testing import TestClient

from lookalike.api.app import create_app
from lookalike.api.errors import BadRequestError
from lookalike.api.neighbour_cache import NeighbourCache
from lookalike.api.repository import ImageRepository
from lookalike.tasks.database import create_reader_engine
from lookalike.tasks.lock import hold_run_lock
from tests.odd_images import write_photos
from tests.pipeline_catalog import PENDING, Catalog, app_settings, build_catalog, index_folder

pytestmark = pytest.mark.mariadb


@pytest.fixture
def catalog(mariadb_url: str, tmp_path: Path) -> Catalog:
    return build_catalog(mariadb_url, tmp_path)


@pytest.fixture
def repository(catalog: Catalog) -> ImageRepository:
    return ImageRepository(create_reader_engine(catalog.url))


def test_lists_in_memory_equal_the_database_for_every_image_and_k(
    catalog: Catalog, repository: ImageRepository
) -> None:
    cache = NeighbourCache(repository)
    cache.refresh()
    for image_id in catalog.ok_ids:
        stored = len(catalog.neighbours[image_id])
        for k in (None, 1, stored):
            assert cache.lookup(image_id, k) == repository.get_neighbours(image_id, k)
        with pytest.raises(BadRequestError, match=f"k must be between 1 and {stored}"):
            cache.lookup(image_id, stored + 1)
    # Ids without lists (pending, failed, unknown) are left to the database's answers.
    pending = catalog.ids[PENDING]
    assert pending not in catalog.neighbours
    assert cache.lookup(pending, None) is None
    assert cache.lookup(10**6, None) is None


def test_a_completed_run_sends_requests_to_the_database_until_reloaded(
    catalog: Catalog, repository: ImageRepository
) -> None:
    cache = NeighbourCache(repository)
    cache.refresh()
    first = catalog.photo_ids[0]
    before = cache.lookup(first, None)
    assert before is not None and len(before) == catalog.stored_k
    write_photos(catalog.root / "later", 1, seed=9)
    # A run: the new photo joins every list, the two files changed on disk leave them.
    index_folder(catalog.url, catalog.root)
    # Before the next poll the old list is still served, as the API's reader saw it.
    assert cache.lookup(first, None) == before
    cache.refresh()
    after = cache.lookup(first, None)
    assert after is not None and after != before
    assert after == repository.get_neighbours(first, None)
    assert "later/photo_009_00000.jpg" in {neighbour.file_name for neighbour in after}


def test_while_a_run_holds_the_lock_the_database_answers_and_then_one_reload(
    catalog: Catalog, repository: ImageRepository
) -> None:
    cache = NeighbourCache(repository)
    cache.refresh()
    first = catalog.photo_ids[0]
    loaded = cache._lists
    assert cache.lookup(first, None) is not None
    with hold_run_lock(catalog.url, timeout=0):
        assert repository.run_in_progress()
        cache.refresh()
        assert cache.lookup(first, None) is None  # the database answers during the run
        assert cache.describe() == "loading"
    assert not repository.run_in_progress()
    cache.refresh()  # nothing changed: the same lists again, read once more
    assert cache.lookup(first, None) == repository.get_neighbours(first, None)
    reloaded = cache._lists
    assert reloaded is not None and reloaded is not loaded
    cache.refresh()
    assert cache._lists is reloaded  # no further reload while nothing changes


def test_the_service_answers_from_memory_once_loaded(catalog: Catalog, tmp_path: Path) -> None:
    app = create_app(app_settings(catalog.url, tmp_path))
    with TestClient(app=app) as client:
        cache = app.state.neighbour_cache
        assert isinstance(cache, NeighbourCache)
        assert cache.wait_until_loaded(timeout=30)
        first = catalog.photo_ids[0]
        body = client.get(f"/api/images/{first}/neighbours", params={"k": 3}).json()
        assert [(n["id"], n["rank"]) for n in body] == [
            (neighbour, rank)
            for rank, (neighbour, _) in enumerate(catalog.neighbours[first][:3], 1)
        ]
        assert [n["distance"] for n in body] == pytest.approx(
            [d for _, d in catalog.neighbours[first][:3]], rel=1e-5
        )
        assert client.get(f"/api/images/{first}/neighbours", params={"k": 999}).status_code == 400


def test_the_cache_can_be_turned_off(catalog: Catalog, tmp_path: Path) -> None:
    app = create_app(app_settings(catalog.url, tmp_path, neighbour_cache=False))
    assert app.state.neighbour_cache is None


def test_the_neighbours_route_resolves_a_single_dependency(
    catalog: Catalog, tmp_path: Path
) -> None:
    """Two or more dependencies make Litestar spawn an anyio task group on every request."""
    from litestar.routes import HTTPRoute

    app = create_app(app_settings(catalog.url, tmp_path))
    route = next(
        r
        for r in app.routes
        if isinstance(r, HTTPRoute) and r.path == "/api/images/{image_id:int}/neighbours"
    )
    _, kwargs_model = route.route_handler_map["GET"]
    batches = [sorted(d.key for d in batch) for batch in kwargs_model.dependency_batches]
    assert batches == [["neighbours"]]
