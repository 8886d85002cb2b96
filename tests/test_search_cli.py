"""`lookalike search` and GET /api/search?text=: the API's exact search, from the terminal too."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
from litestar.testing import TestClient

from lookalike.api.app import create_app
from lookalike.flows.cli import main
from tests.pipeline_catalog import Catalog, app_settings, build_catalog


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> Catalog:
    base = tmp_path_factory.mktemp("search")
    return build_catalog(f"sqlite:///{base / 'db.sqlite'}", base)


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(list(argv))
    return status, out.getvalue(), err.getvalue()


def test_search_by_a_photo_prints_the_same_ranking_as_the_api(
    catalog: Catalog, tmp_path: Path
) -> None:
    photo = catalog.root / "photos/photo_000_00000.jpg"
    status, out, _ = run_cli(
        "search", "--image", str(photo), "--k", "3", "--db", catalog.url, "--json"
    )
    assert status == 0
    printed = json.loads(out)
    with TestClient(create_app(app_settings(catalog.url, tmp_path))) as client:
        answer = client.post("/api/search?k=3", files={"file": ("p.jpg", photo.read_bytes())})
    assert [(n["id"], n["rank"]) for n in printed] == [(n["id"], n["rank"]) for n in answer.json()]
    # Itself, at distance ~0, in the catalog's one source (named after its folder).
    assert (printed[0]["source"], printed[0]["file_name"]) == (
        "images",
        "photos/photo_000_00000.jpg",
    )
    status, table, _ = run_cli("search", "--image", str(photo), "--k", "2", "--db", catalog.url)
    assert status == 0 and table.splitlines()[0].split()[-1] == "images/photos/photo_000_00000.jpg"


def test_a_model_without_a_text_tower_says_so_in_one_line(catalog: Catalog, tmp_path: Path) -> None:
    status, _, err = run_cli("search", "--text", "amphora", "--db", catalog.url)
    assert status == 2
    assert err.strip().splitlines() == [
        "lookalike: error: the collection's model InceptionV3 has no text tower: search by a "
        "photo instead, or index the images with a text-capable model"
    ]
    with TestClient(create_app(app_settings(catalog.url, tmp_path))) as client:
        answer = client.get("/api/search", params={"text": "amphora"})
        assert answer.status_code == 400 and "no text tower" in answer.json()["detail"]
        assert client.get("/api/search", params={"text": "   "}).status_code == 400


def test_bad_search_input_is_one_line(catalog: Catalog, tmp_path: Path) -> None:
    status, _, err = run_cli(
        "search", "--image", str(tmp_path / "missing.jpg"), "--db", catalog.url
    )
    assert status == 2 and "cannot read" in err
    status, _, err = run_cli(
        "search", "--image", str(catalog.root / "broken.jpg"), "--db", catalog.url
    )
    assert status == 2 and err.startswith("lookalike: error: ")
    status, _, err = run_cli("search", "--image", "x.jpg", "--k", "0", "--db", catalog.url)
    assert status == 2 and "--k must be between 1 and 100" in err
