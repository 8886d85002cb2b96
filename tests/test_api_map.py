"""/api/map and /api/map/near on a real indexed and laid-out folder."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from litestar.testing import TestClient

from lookalike.api.app import create_app
from lookalike.tasks.database import connect_checked
from lookalike.tasks.map import layout_map
from lookalike.tasks.map_reader import POINT_FORMAT
from tests.odd_images import write_photos
from tests.pipeline_catalog import app_settings, index_and_lay_out, index_folder
from tests.test_map import ok_ids, stored_map

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def laid_out(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    base = tmp_path_factory.mktemp("map")
    url = f"sqlite:///{base / 'db.sqlite'}"
    write_photos(base / "images" / "a", 14, seed=11)
    write_photos(base / "images" / "b", 10, seed=13)
    index_and_lay_out(url, base / "images")
    return url, base


@pytest.fixture
def client(laid_out: tuple[str, Path], tmp_path: Path) -> Iterator[TestClient]:
    with TestClient(app=create_app(app_settings(laid_out[0], tmp_path))) as test_client:
        yield test_client


def test_the_map_is_every_point_packed_with_an_etag(
    client: TestClient, laid_out: tuple[str, Path]
) -> None:
    answer = client.get("/api/map")
    assert answer.status_code == 200
    assert answer.headers["content-type"] == "application/octet-stream"
    points = np.frombuffer(answer.content, dtype=POINT_FORMAT)
    stored = stored_map(laid_out[0])
    assert points["id"].tolist() == sorted(ok_ids(laid_out[0])) == sorted(stored)
    assert int(answer.headers["x-map-points"]) == len(points) == 24
    for record in points:
        x, y = stored[int(record["id"])]
        assert (record["x"], record["y"]) == (np.float32(x), np.float32(y))
    again = client.get("/api/map", headers={"If-None-Match": answer.headers["etag"]})
    assert again.status_code == 304 and again.content == b""


def test_the_etag_changes_with_the_layout(laid_out: tuple[str, Path], tmp_path: Path) -> None:
    url, _ = laid_out
    with TestClient(app=create_app(app_settings(url, tmp_path))) as client:
        before = client.get("/api/map").headers["etag"]
        engine = connect_checked(url)
        layout_map(engine, refit=True)
        engine.dispose()
        after = client.get("/api/map", headers={"If-None-Match": before})
        assert after.status_code == 200 and after.headers["etag"] != before


def test_near_lists_the_images_around_a_place_closest_first(
    client: TestClient, laid_out: tuple[str, Path]
) -> None:
    stored = stored_map(laid_out[0])
    image_id, (x, y) = next(iter(stored.items()))
    found = client.get("/api/map/near", params={"x": x, "y": y, "r": 1e9, "limit": 5}).json()
    assert len(found) == 5 and found[0]["id"] == image_id and found[0]["distance"] < 1e-3
    distances = [point["distance"] for point in found]
    assert distances == sorted(distances)
    assert all(point["file_name"].endswith(".jpg") for point in found)
    nothing = client.get("/api/map/near", params={"x": 1e6, "y": 1e6, "r": 0.001}).json()
    assert nothing == []
    for bad in ({"x": x, "y": y, "r": 0}, {"x": x, "y": y}, {"x": "a", "y": y, "r": 1},
                {"x": "nan", "y": y, "r": 1}, {"x": x, "y": y, "r": 1, "limit": 501}):  # fmt: skip
        assert client.get("/api/map/near", params=bad).status_code == 400, bad


def test_without_a_map_the_routes_answer_404(sqlite_url: str, tmp_path: Path) -> None:
    write_photos(tmp_path / "images", 3, seed=12)
    index_folder(sqlite_url, tmp_path / "images")
    with TestClient(app=create_app(app_settings(sqlite_url, tmp_path))) as client:
        for path in ("/api/map", "/api/map/near?x=0&y=0&r=1"):
            answer = client.get(path)
            assert answer.status_code == 404
            assert "lookalike process" in answer.json()["detail"]


def test_folders_name_each_points_top_folder_in_the_maps_order(client: TestClient) -> None:
    points = np.frombuffer(client.get("/api/map").content, dtype=POINT_FORMAT)
    answer = client.get("/api/map/folders").json()
    assert answer["folders"] == ["a", "b"]
    names = {
        row["id"]: row["file_name"] for row in client.get("/api/images?limit=50").json()["items"]
    }
    tops = [answer["folders"][f] for f in answer["points"]]
    assert tops == [names[int(i)].split("/")[0] for i in points["id"]]
    assert tops.count("a") == 14 and tops.count("b") == 10
