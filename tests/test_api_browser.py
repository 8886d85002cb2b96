"""The web page in real headless Chromium: browsing, search, upload, focus, races, announcements."""

from __future__ import annotations

import contextlib
import re
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlparse

import pytest
import sqlalchemy
import uvicorn
from litestar import Litestar
from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import expect

from lookalike.api.app import create_app
from lookalike.sql.schema import metadata
from lookalike.tasks.settings import Settings
from scripts.chromium_args import CHROMIUM, launch_chromium
from tests.pipeline_catalog import Catalog, app_settings, build_catalog
from tests.test_api_sources import ARCHIVE, MUSEUM, SHARED, Archive, build_archive

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


@contextmanager
def serving(settings: Settings | Litestar) -> Iterator[str]:
    """The app (or the app of these settings) on uvicorn in a thread; yields its base URL."""
    port = free_port()
    app = settings if isinstance(settings, Litestar) else create_app(settings)
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Catalog]]:
    """A SQLite catalog whose features come from the model, served."""

    base = tmp_path_factory.mktemp("browser")
    catalog = build_catalog(f"sqlite:///{base / 'db.sqlite'}", base)
    with serving(app_settings(catalog.url, base)) as url:
        yield url, catalog


@pytest.fixture(scope="module")
def served_empty(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A database with the tables and no images yet (as Docker Compose starts), served."""
    base = tmp_path_factory.mktemp("browser-empty")
    url = f"sqlite:///{base / 'db.sqlite'}"
    engine = sqlalchemy.create_engine(url)
    metadata.create_all(engine)
    engine.dispose()
    with serving(app_settings(url, base)) as served_url:
        yield served_url


@pytest.fixture(scope="module")
def served_sources(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Archive]]:
    """Three sources, two of them sharing a relative path (tests/test_api_sources.py), served."""
    base = tmp_path_factory.mktemp("browser-sources")
    archive = build_archive(f"sqlite:///{base / 'db.sqlite'}", base / "images")
    with serving(app_settings(archive.url, base)) as url:
        yield url, archive


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = launch_chromium(playwright)
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
    # The catalog's features come from --weights none: the page says what that means.
    expect(page.locator("#random-weights")).to_be_visible(timeout=TIMEOUT_MS)
    expect(page.locator("#random-weights")).to_contain_text("similarities are not meaningful")


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


def test_a_refused_upload_says_the_server_is_busy_and_when_to_retry(
    served: tuple[str, Catalog], page: Any, tmp_path_factory: pytest.TempPathFactory
) -> None:
    _, catalog = served
    app = create_app(app_settings(catalog.url, tmp_path_factory.mktemp("busy"), search_queue=0))
    lane = app.state.admission.search
    with serving(app) as url, contextlib.ExitStack() as holding:
        page.goto(f"{url}/?id={catalog.ok_ids[1]}")
        wait_for_neighbours(page, 4)
        for _ in range(lane.capacity):
            holding.enter_context(lane.held())
        page.set_input_files("#upload", str(catalog.root / "photos/photo_000_00003.jpg"))
        message = page.locator("#message")
        expect(message).to_contain_text("busy with other search requests")
        expect(message).to_contain_text(re.compile(r"please try again in \d+ seconds?"))
        expect(message).to_contain_text("HTTP 503")


# --- keyboard, races, screen readers, an empty collection ---------------------------------

# The focused element, or the nearest ancestor a user can see when it is itself invisible
# (the file input is transparent inside its label), and whether a focus ring is drawn on it.
FOCUS_RING = """() => {
    const focused = document.activeElement;
    let shown = focused;
    while (shown && (getComputedStyle(shown).opacity === "0"
                     || shown.getBoundingClientRect().width < 2)) {
        shown = shown.parentElement;
    }
    const style = getComputedStyle(shown);
    const colour = style.outlineColor.match(/[\\d.]+/g).map(Number);
    const outline = style.outlineStyle !== "none" && parseFloat(style.outlineWidth) >= 2
        && (colour.length < 4 || colour[3] > 0);
    return {
        id: focused.id,
        what: `${focused.tagName.toLowerCase()}#${focused.id}.${focused.className}`,
        shown: `${shown.tagName.toLowerCase()}#${shown.id}.${shown.className}`,
        ring: outline || style.boxShadow !== "none",
        body: focused === document.body,
    };
}"""


def test_keyboard_focus_is_visible_on_every_control(served: tuple[str, Catalog], page: Any) -> None:
    url, catalog = served
    page.goto(f"{url}/?id={catalog.ok_ids[0]}")
    wait_for_neighbours(page, 4)
    stops: list[dict[str, Any]] = []
    for _ in range(30):
        page.keyboard.press("Tab")
        stop = page.evaluate(FOCUS_RING)
        if stop["body"] or (stops and stop["what"] == stops[0]["what"]):
            break
        stops.append(stop)
    reached = [stop["what"] for stop in stops]
    assert "input#upload." in reached, reached
    assert sum(".neighbour" in what for what in reached) == 4, reached
    assert [stop["what"] for stop in stops if not stop["ring"]] == [], stops

    # The upload control: the ring is drawn on its label, and only while the input has focus.
    page.focus("#upload")
    page.keyboard.press("Shift+Tab")
    page.keyboard.press("Tab")
    upload = page.evaluate(FOCUS_RING)
    assert upload["id"] == "upload" and upload["shown"].startswith("label") and upload["ring"]
    page.keyboard.press("Tab")
    label_style = page.evaluate(
        "() => getComputedStyle(document.querySelector('label.upload')).outlineStyle"
    )
    assert label_style == "none"


def test_a_newer_click_cancels_a_slow_older_request(served: tuple[str, Catalog], page: Any) -> None:
    url, catalog = served
    first = catalog.ok_ids[0]
    names = {image_id: name for name, image_id in catalog.ids.items()}
    slow, fast = (image_id for image_id, _ in catalog.neighbours[first][:2])
    page.goto(f"{url}/?id={first}")
    wait_for_neighbours(page, 4)

    held: list[Any] = []  # the slow image's request, answered only after the fast one
    page.route(
        lambda address: urlparse(address).path == f"/api/images/{slow}",
        lambda route: held.append(route),
    )
    failed: list[tuple[str, str | None]] = []
    page.on("requestfailed", lambda request: failed.append((request.url, request.failure)))

    with page.expect_request(lambda request: request.url.endswith(f"/api/images/{slow}")):
        page.locator("#neighbours button").nth(0).click()
    page.locator("#neighbours button").nth(1).click()
    expect(page.locator("#current-name")).to_have_text(names[fast], timeout=TIMEOUT_MS)
    fast_first = catalog.neighbours[fast][0][0]
    expect(page.locator("#neighbours button").first).to_have_attribute(
        "data-id", str(fast_first), timeout=TIMEOUT_MS
    )

    assert len(held) == 1
    # The page has aborted it, so Playwright may refuse; either way, let it through.
    with contextlib.suppress(PlaywrightError):
        held[0].continue_()
    page.wait_for_timeout(1_000)  # time for a late answer to (wrongly) be drawn
    assert current_name(page) == names[fast]
    assert page.url.endswith(f"?id={fast}")
    assert page.locator("#neighbours button").first.get_attribute("data-id") == str(fast_first)

    def slow_failures() -> list[str | None]:
        return [failure for address, failure in failed if address.endswith(f"/api/images/{slow}")]

    deadline = time.monotonic() + TIMEOUT_MS / 1000
    while not slow_failures() and time.monotonic() < deadline:
        page.wait_for_timeout(100)  # lets Playwright deliver the request's events
    assert slow_failures() == ["net::ERR_ABORTED"], failed
    assert page.locator("#message").inner_text() == ""


def test_each_neighbour_is_announced_once(served: tuple[str, Catalog], page: Any) -> None:
    url, catalog = served
    first = catalog.ok_ids[0]
    names = {image_id: name for name, image_id in catalog.ids.items()}
    page.goto(f"{url}/?id={first}")
    wait_for_neighbours(page, 4)

    # In the accessibility tree the list is named by its heading and each neighbour is one
    # button whose name holds its file name once (no repeated alt text or tooltip).
    tree = page.locator("#neighbours").aria_snapshot()
    assert tree.startswith('- list "The 4 most similar"'), tree
    for neighbour, _ in catalog.neighbours[first]:
        assert tree.count(names[neighbour]) == 1, tree
        button = page.get_by_role("button", name=names[neighbour], exact=False)
        assert button.count() == 1
    # The list is not itself live (which re-reads it whole); one polite sentence is.
    live_ancestor = page.evaluate(
        "() => !!document.getElementById('neighbours')"
        ".closest('[aria-live], [role=status], [role=log], [role=alert]')"
    )
    assert live_ancestor is False
    expect(page.locator("#announcement")).to_have_text(
        f"{names[first]}. The 4 most similar.", timeout=TIMEOUT_MS
    )
    assert page.locator("#announcement").get_attribute("role") == "status"

    # Going to a neighbour changes the live region once, with one sentence.
    page.evaluate(
        """() => {
            window.announced = [];
            new MutationObserver(() => window.announced.push(
                document.getElementById('announcement').textContent))
                .observe(document.getElementById('announcement'),
                         {childList: true, characterData: true, subtree: true});
        }"""
    )
    closest = catalog.neighbours[first][0][0]
    page.locator("#neighbours button").first.click()
    expect(page.locator("#announcement")).to_have_text(
        f"{names[closest]}. The 4 most similar.", timeout=TIMEOUT_MS
    )
    page.wait_for_timeout(300)
    assert page.evaluate("window.announced") == [f"{names[closest]}. The 4 most similar."]


def test_an_empty_collection_says_how_to_fill_it(served_empty: str, page: Any) -> None:
    page.goto(served_empty)
    message = page.locator("#message")
    expect(message).to_have_text(
        "No images indexed yet: run `lookalike process FOLDER` first.", timeout=TIMEOUT_MS
    )
    expect(page.locator("#stats")).to_contain_text("0 images (0 indexed)", timeout=TIMEOUT_MS)
    assert page.locator("#random-weights").is_hidden()  # no weights recorded: nothing to say
    page.evaluate("document.getElementById('message').textContent = ''")
    page.locator("#random").click()
    expect(message).to_contain_text("lookalike process FOLDER", timeout=TIMEOUT_MS)
    assert page.locator("#current").is_hidden()


def test_the_source_filter_keeps_to_one_source(
    served_sources: tuple[str, Archive], page: Any
) -> None:
    url, archive = served_sources
    image_id = archive.id(MUSEUM, "a/2.jpg")
    page.goto(f"{url}/?id={image_id}")
    expect(page.locator("#neighbours-title")).to_have_text("The 4 most similar", timeout=TIMEOUT_MS)
    expect(page.locator("#current-meta")).to_contain_text(f"source {MUSEUM}")
    cards = page.locator("#neighbours .source")
    expected = [f"source {archive.source_of(i)}" for i in archive.neighbours[image_id]]
    assert cards.all_text_contents() == expected  # each card names its source
    choice = page.get_by_label("Source")
    expect(choice).to_be_visible()
    assert page.locator("#source-filter option").all_inner_texts() == [
        "all sources", "archive (3)", "empty (0)", "museum (4)",
    ]  # fmt: skip
    assert page.locator("#neighbours-short").is_hidden()

    choice.select_option(ARCHIVE)
    title = f"The 2 most similar in \u201c{ARCHIVE}\u201d"
    expect(page.locator("#neighbours-title")).to_have_text(title, timeout=TIMEOUT_MS)
    assert cards.all_text_contents() == [f"source {ARCHIVE}"] * 2
    expect(page.locator("#neighbours-short")).to_have_text(
        f"Only 2 of the 4 stored similar images are in \u201c{ARCHIVE}\u201d."
    )
    # Previous and Next stay within the source; so does the path search.
    page.locator("#next").click()
    page.wait_for_url(re.compile(rf"\?id={archive.id(ARCHIVE, 'c/4.jpg')}$"))
    page.fill("#path-query", SHARED)
    page.press("#path-query", "Enter")
    expect(page.locator("#path-results-title")).to_have_text(
        f"1 paths contain \u201c{SHARED}\u201d in \u201c{ARCHIVE}\u201d", timeout=TIMEOUT_MS
    )
    choice.select_option("")  # all sources again: both a/1.jpg, each with its source
    expect(page.locator("#path-results-list li")).to_have_count(2, timeout=TIMEOUT_MS)
    assert page.locator("#path-results-list li").all_text_contents() == [
        f"{SHARED} source {MUSEUM}",
        f"{SHARED} source {ARCHIVE}",
    ]
    expect(page.locator("#neighbours-title")).to_have_text("The 4 most similar", timeout=TIMEOUT_MS)
    assert page.locator("#neighbours-short").is_hidden()
