"""The web page in a real headless Chromium: load, browse by clicking, search by path and upload."""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from playwright.sync_api import expect

from lookalike.api.app import create_app
from tests.test_api import Catalog, app_settings, build_catalog, model_vectors

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
TIMEOUT_MS = 20_000

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium (apt)"
    ),
]


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Catalog]]:
    """The app on uvicorn in a thread, over a SQLite catalog whose features come from the model."""
    from lookalike.tasks.extract import load_feature_model

    base = tmp_path_factory.mktemp("browser")
    catalog = build_catalog(
        f"sqlite:///{base / 'db.sqlite'}", base, embed=model_vectors(load_feature_model("none", 1))
    )
    port = free_port()
    config = uvicorn.Config(
        create_app(app_settings(catalog.url, base)),
        host="127.0.0.1",
        port=port,
        log_level="warning",
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}", catalog
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    context.close()
    assert errors == [], f"JavaScript errors on the page: {errors}"


def wait_for_neighbours(page: Any, count: int) -> None:
    """Wait until count neighbour thumbnails have really loaded (naturalWidth > 0)."""
    page.wait_for_function(
        """count => {
            const images = [...document.querySelectorAll('#neighbours img')];
            return images.length === count && images.every(i => i.complete && i.naturalWidth > 0);
        }""",
        arg=count,
    )


def current_name(page: Any) -> str:
    return str(page.locator("#current-name").inner_text())


def test_page_shows_an_image_its_fingerprint_and_neighbours(
    served: tuple[str, Catalog], page: Any
) -> None:
    url, catalog = served
    first = catalog.ok_ids[0]
    page.goto(f"{url}/?id={first}")
    wait_for_neighbours(page, len(catalog.neighbours[first]))
    assert current_name(page) == "photos/photo_000_00000.jpg"
    page.wait_for_function(
        "['current-image', 'current-fingerprint'].every(id => document.getElementById(id)"
        ".naturalWidth > 0)"
    )
    shown = page.locator("#neighbours .distance").all_inner_texts()
    assert [text.split(".")[0] for text in shown] == ["1", "2", "3", "4"]
    distances = [float(text.split(" distance ")[1]) for text in shown]
    assert distances == pytest.approx([d for _, d in catalog.neighbours[first]], rel=5e-3)
    expect(page.locator("#stats")).to_contain_text("11 images (5 indexed)", timeout=TIMEOUT_MS)


def test_clicking_a_neighbour_makes_it_current_and_the_url_follows(
    served: tuple[str, Catalog], page: Any
) -> None:
    url, catalog = served
    first = catalog.ok_ids[0]
    page.goto(f"{url}/#{first}")  # the hash form works too
    wait_for_neighbours(page, 4)
    closest = catalog.neighbours[first][0][0]
    page.locator("#neighbours button").first.click()
    page.wait_for_url(re.compile(rf"\?id={closest}$"))
    names = {image_id: name for name, image_id in catalog.ids.items()}
    page.wait_for_function(
        "name => document.getElementById('current-name').textContent === name",
        arg=names[closest],
    )
    wait_for_neighbours(page, 4)
    page.go_back()
    page.wait_for_function(
        "name => document.getElementById('current-name').textContent === name",
        arg=names[first],
    )
    page.locator("#next").click()
    page.wait_for_url(re.compile(rf"\?id={first + 1}$"))


def test_search_by_path_lists_matches_and_opens_one(served: tuple[str, Catalog], page: Any) -> None:
    url, catalog = served
    page.goto(url)
    page.wait_for_url(re.compile(r"\?id=\d+$"))  # the first image is chosen and put in the URL
    page.fill("#path-query", "100%_real")
    page.press("#path-query", "Enter")
    matches = page.locator("#path-results-list button")
    matches.first.wait_for()
    assert matches.all_inner_texts() == ["odd/100%_real.jpg"]
    matches.first.click()
    page.wait_for_url(re.compile(rf"\?id={catalog.ids['odd/100%_real.jpg']}$"))
    # The URL changes before the page has fetched the image: wait for the page to catch up.
    expect(page.locator("#current-meta")).to_contain_text("pending", timeout=TIMEOUT_MS)
    expect(page.locator("#neighbours-title")).to_have_text(
        "No similar images stored yet", timeout=TIMEOUT_MS
    )


def test_upload_shows_the_most_similar_images(served: tuple[str, Catalog], page: Any) -> None:
    url, catalog = served
    page.goto(f"{url}/?id={catalog.ok_ids[1]}")
    wait_for_neighbours(page, 4)
    page.set_input_files("#upload", str(catalog.root / "photos/photo_000_00003.jpg"))
    page.wait_for_function(
        "document.getElementById('neighbours-title').textContent.includes('your upload')"
    )
    wait_for_neighbours(page, 5)
    assert current_name(page) == "Your upload: photo_000_00003.jpg"
    first_result = page.locator("#neighbours .name").first.inner_text()
    assert first_result == "photos/photo_000_00003.jpg"
    assert "?id=" not in page.url
