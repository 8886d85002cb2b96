"""Search in words end to end: a CLIP collection (seeded weights, a tokenizer the test writes)
searched through the CLI, the API and the page, each ranking as a brute force over the stored
vectors does."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sqlalchemy
from litestar.testing import TestClient
from playwright.sync_api import expect

from lookalike.api.app import create_app
from lookalike.api.repository import ImageRepository
from lookalike.tasks.models import load_text_encoder, model_spec
from scripts.chromium_args import CHROMIUM
from tests.odd_images import write_photos
from tests.pipeline_catalog import app_settings
from tests.test_api_browser import TIMEOUT_MS, browser, page, serving  # noqa: F401 - fixtures
from tests.test_cli import lookalike
from tests.test_model_runs import run_env, summary_of
from tests.test_text_tower import write_vocabulary

PHOTOS = 5
WORDS = "a red dog"

pytestmark = pytest.mark.slow


class Collection:
    """An indexed CLIP collection: its folder, database URL, tokenizer folder and env."""

    def __init__(self, base: Path, prefect_api_env: dict[str, str]) -> None:
        self.base = base
        self.url = f"sqlite:///{base / 'data' / 'lookalike.sqlite'}"
        self.tokenizer = write_vocabulary(base / "vocabulary")
        self.env = run_env(base, LOOKALIKE_TOKENIZER=str(self.tokenizer), **prefect_api_env)

    def settings(self, **overrides: Any) -> Any:
        values = {"tokenizer": str(self.tokenizer), "search_rate": "off", **overrides}
        return app_settings(self.url, self.base, **values)

    def expected(self, k: int) -> list[int]:
        """Image ids by euclidean distance of the words' vector to every stored vector."""
        engine = sqlalchemy.create_engine(self.url)
        matrix = ImageRepository(engine).load_feature_matrix(model_spec("clip_vit_b32").name)
        engine.dispose()
        words = load_text_encoder("clip_vit_b32", "none", str(self.tokenizer)).embed([WORDS])
        order = np.argsort(np.linalg.norm(matrix.vectors - words, axis=1), kind="stable")
        return [int(i) for i in matrix.ids[order[:k]]]


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory, prefect_api_env: dict[str, str]) -> Collection:
    collection = Collection(tmp_path_factory.mktemp("text-search"), prefect_api_env)
    write_photos(collection.base / "images", PHOTOS)
    summary = summary_of(
        lookalike(
            "process",
            str(collection.base / "images"),
            "--model",
            "clip_vit_b32",
            "--weights",
            "none",
            "--json",
            env=collection.env,
        )  # fmt: skip
    )
    assert summary["extracted"] == PHOTOS
    return collection


def test_the_command_ranks_words_as_a_brute_force_does(clip: Collection) -> None:
    result = lookalike("search", "--text", WORDS, "--k", "3", "--json", env=clip.env)
    assert result.returncode == 0, result.stderr
    assert [n["id"] for n in json.loads(result.stdout)] == clip.expected(3)
    assert "similarities are not meaningful" in result.stderr  # weights none, said so
    table = lookalike("search", "--text", WORDS, "--k", "2", env=clip.env)
    assert len(table.stdout.splitlines()) == 2 and table.stdout.startswith("   1  ")


def test_the_api_ranks_words_and_says_when_it_cannot(clip: Collection, tmp_path: Path) -> None:
    with TestClient(create_app(clip.settings())) as client:
        assert client.get("/api/stats").json()["text_search"] is True
        answer = client.get("/api/search", params={"text": WORDS, "k": 4})
        assert answer.status_code == 200, answer.text
        assert [n["id"] for n in answer.json()] == clip.expected(4)
        assert client.get("/api/search", params={"text": "x" * 501}).status_code == 400
    with TestClient(create_app(clip.settings(tokenizer=""))) as client:
        refused = client.get("/api/search", params={"text": WORDS})
        assert refused.status_code == 503
        assert refused.json()["detail"].startswith(
            "search in words is unavailable: weights 'none' bring no tokenizer"
        )
    env = {k: v for k, v in clip.env.items() if k != "LOOKALIKE_TOKENIZER"}
    failed = lookalike("search", "--text", WORDS, env=env)
    assert failed.returncode == 2
    assert failed.stderr.strip().splitlines() == [failed.stderr.strip()], failed.stderr
    assert failed.stderr.startswith("lookalike: error: search in words is unavailable")


@pytest.mark.browser
@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium")
def test_the_page_searches_in_words(clip: Collection, page: Any) -> None:  # noqa: F811
    names = {int(i): name for i, name in rows(clip.url)}
    with serving(clip.settings()) as url:
        page.goto(url)
        box = page.locator("#text-query")
        expect(box).to_be_visible(timeout=TIMEOUT_MS)
        box.fill(WORDS)
        page.locator("#text-search button").click()
        expect(page.locator("#current-name")).to_have_text(f"Your words: \u201c{WORDS}\u201d")
        shown = page.locator("#neighbours li .name")
        expect(shown).to_have_count(PHOTOS, timeout=TIMEOUT_MS)
        assert shown.all_inner_texts() == [names[i] for i in clip.expected(PHOTOS)]


def rows(url: str) -> Iterator[tuple[int, str]]:
    engine = sqlalchemy.create_engine(url)
    with engine.connect() as conn:
        yield from conn.execute(sqlalchemy.text("SELECT id, file_name FROM image_names"))
    engine.dispose()
