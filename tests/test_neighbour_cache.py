"""The in-memory neighbour lists answer exactly as the database does, and never go stale."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pytest
from litestar.testing import TestClient
from sqlalchemy import insert, update

from lookalike.api.app import create_app
from lookalike.api.errors import BadRequestError
from lookalike.api.neighbour_cache import NeighbourCache
from lookalike.api.repository import ImageRepository
from lookalike.sql.schema import image_neighbours, runs
from lookalike.tasks.database import create_db_engine, create_reader_engine
from tests.test_api import Catalog, app_settings, build_catalog

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
    pending = max(catalog.ids.values())
    assert pending not in catalog.neighbours
    assert cache.lookup(pending, None) is None
    assert cache.lookup(10**6, None) is None


def test_a_completed_run_sends_requests_to_the_database_until_reloaded(
    catalog: Catalog, repository: ImageRepository
) -> None:
    cache = NeighbourCache(repository)
    cache.refresh()
    first = catalog.ok_ids[0]
    before = cache.lookup(first, 1)
    assert before is not None
    writer = create_db_engine(catalog.url)
    with writer.begin() as conn:  # a run rewrites a distance, then records its end
        conn.execute(
            update(image_neighbours)
            .where(image_neighbours.c.image_id == first, image_neighbours.c.rank == 1)
            .values(distance=0.5)
        )
        conn.execute(
            insert(runs).values(
                started_at=datetime(2030, 1, 1),
                finished_at=datetime(2030, 1, 1, 0, 5),
                status="completed",
                weights="w",
            )
        )
    writer.dispose()
    # Before the next poll the old list is still served, as the API's reader saw it.
    assert cache.lookup(first, 1) == before
    cache.refresh()
    after = cache.lookup(first, 1)
    assert after is not None and after[0].distance == 0.5
    assert after == repository.get_neighbours(first, 1)


def test_the_service_answers_from_memory_once_loaded(catalog: Catalog, tmp_path: Path) -> None:
    app = create_app(app_settings(catalog.url, tmp_path))
    with TestClient(app=app) as client:
        cache = app.state.neighbour_cache
        assert isinstance(cache, NeighbourCache)
        assert cache.wait_until_loaded(timeout=30)
        first = catalog.ok_ids[0]
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
