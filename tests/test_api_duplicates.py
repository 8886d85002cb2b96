"""/api/duplicates and /api/images/{id}/duplicates on a collection indexed by the pipeline."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from litestar.testing import TestClient

from lookalike.api.app import create_app
from lookalike.flows.cli import main
from lookalike.tasks.database import connect_checked
from lookalike.tasks.duplicates import find_duplicates
from tests.pipeline_catalog import app_settings, index_duplicate_set

THRESHOLD = 0.06


@pytest.fixture
def indexed(database_url: str, tmp_path: Path) -> str:
    """Eight photos, an exact copy of the second and a re-encoded copy of the first."""
    index_duplicate_set(database_url, tmp_path / "images", THRESHOLD)
    return database_url


@pytest.fixture
def client(indexed: str, tmp_path: Path) -> Iterator[TestClient]:
    with TestClient(app=create_app(app_settings(indexed, tmp_path))) as test_client:
        yield test_client


def names_of(group: dict) -> list[str]:
    return [image["file_name"] for image in group["images"]]


def test_groups_come_largest_first_with_their_representative_first(client: TestClient) -> None:
    body = client.get("/api/duplicates").json()
    assert body["threshold"] == pytest.approx(THRESHOLD) and body["scale"] > 0
    assert body["distance"] == pytest.approx(THRESHOLD * body["scale"])
    groups = body["groups"]
    assert body["total_groups"] == len(groups) >= 2
    assert body["images_in_groups"] == sum(g["size"] for g in groups)
    assert [g["size"] for g in groups] == sorted((g["size"] for g in groups), reverse=True)
    for group in groups:
        first = group["images"][0]
        assert first["id"] == group["id"] and first["distance"] == 0
        assert all(image["distance"] <= body["distance"] * 1.0001 for image in group["images"])
    by_name = {name: g for g in groups for name in names_of(g)}
    assert by_name["exact_copy.jpg"] is by_name["photo_000_00001.jpg"]
    assert by_name["reencoded.jpg"] is by_name["photo_000_00000.jpg"]
    kinds = {i["file_name"]: i["kind"] for g in groups for i in g["images"]}
    assert kinds["exact_copy.jpg"] == kinds["photo_000_00001.jpg"] == "exact"
    assert sum(body["histogram"]["counts"]) == 10
    assert len(body["histogram"]["edges"]) == len(body["histogram"]["counts"]) + 1


def test_pages_and_other_thresholds(client: TestClient) -> None:
    everything = client.get("/api/duplicates").json()
    second = client.get("/api/duplicates", params={"offset": 1, "limit": 1}).json()
    assert second["groups"] == everything["groups"][1:2]
    assert (second["offset"], second["limit"]) == (1, 1)
    wide = client.get("/api/duplicates", params={"threshold": 0.25}).json()
    assert wide["images_in_groups"] >= everything["images_in_groups"]
    assert wide["threshold"] == 0.25


def test_one_images_group(client: TestClient) -> None:
    groups = client.get("/api/duplicates").json()["groups"]
    copy = next(i for g in groups for i in g["images"] if i["file_name"] == "exact_copy.jpg")
    body = client.get(f"/api/images/{copy['id']}/duplicates").json()
    assert len(body["groups"]) == 1 and copy["id"] in [i["id"] for i in body["groups"][0]["images"]]


@pytest.mark.parametrize(
    "params",
    [
        {"threshold": 0},
        {"threshold": 0.3},
        {"threshold": "x"},
        {"limit": 0},
        {"limit": 1000},
        {"offset": -1},
    ],
)
def test_bad_parameters_are_400(client: TestClient, params: dict) -> None:
    response = client.get("/api/duplicates", params=params)
    assert response.status_code == 400, response.text
    assert "Traceback" not in response.text


def test_unknown_image_is_404_and_openapi_lists_the_routes(client: TestClient) -> None:
    assert client.get("/api/images/999999/duplicates").status_code == 404
    paths = client.get("/schema/openapi.json").json()["paths"]
    assert "/api/duplicates" in paths and "/api/images/{image_id}/duplicates" in paths


def test_the_cli_lists_groups_as_table_csv_and_json(
    indexed: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["duplicates", "--db", indexed, "--format", "json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["threshold"] == pytest.approx(THRESHOLD) and listed["groups"] >= 2
    assert main(["duplicates", "--db", indexed, "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["file_name"] for r in rows] == [r["file_name"] for r in listed["images"]]
    assert {"group", "size", "width", "height", "distance", "kind"} <= set(rows[0])
    assert main(["duplicates", "--db", indexed]) == 0
    assert "exact_copy.jpg" in capsys.readouterr().out
    assert main(["duplicates", "--db", indexed, "--threshold", "0.7"]) == 2
    assert "at most 0.25" in capsys.readouterr().err


def test_the_cli_says_when_nothing_was_computed(
    sqlite_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["duplicates", "--db", sqlite_url]) == 2
    assert "run `lookalike process` first" in capsys.readouterr().err


def test_answers_follow_a_new_computation(indexed: str, client: TestClient) -> None:
    """The service keeps group indexes between requests, until the stored groups change."""
    assert client.get("/api/duplicates").json()["threshold"] == pytest.approx(THRESHOLD)
    engine = connect_checked(indexed)
    find_duplicates(engine, 0.2)  # as a run with LOOKALIKE_DUPLICATE_THRESHOLD=0.2
    engine.dispose()
    assert client.get("/api/duplicates").json()["threshold"] == pytest.approx(0.2)
