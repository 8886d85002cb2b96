"""Curators' judgements on the main page, in real headless Chromium: sign in, judge, hide, clear."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from playwright.sync_api import expect

from lookalike.tasks.accounts import add_user, issue_token, set_password
from lookalike.tasks.database import connect_checked
from scripts.chromium_args import CHROMIUM
from tests.pipeline_catalog import Catalog, app_settings, build_catalog
from tests.test_api_browser import TIMEOUT_MS, browser, page, serving, wait_for_neighbours

__all__ = ["browser", "page"]  # the fixtures, shared with the other page tests

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium (apt)"
    ),
]

PASSWORD = "a-long-password-1"
# Would run if the page ever put a note into the document as HTML.
NOTE = "<script>alert(1)</script> <img src=x onerror=alert(2)> same shelf, other box"


@pytest.fixture(autouse=True)
def patient_expect() -> Iterator[None]:
    """expect() waits as long as the page fixture does (2 slow cores), then as it did."""
    expect.set_options(timeout=TIMEOUT_MS)
    yield
    expect.set_options(timeout=None)


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> tuple[Catalog, str]:
    """The test collection in SQLite with a curator, ann; her token."""
    base = tmp_path_factory.mktemp("judgements")
    catalog = build_catalog(f"sqlite:///{base / 'db.sqlite'}", base)
    engine = connect_checked(catalog.url)
    add_user(engine, "ann", "curator")
    token = issue_token(engine, "ann")
    set_password(engine, "ann", PASSWORD)
    engine.dispose()
    return catalog, token


@pytest.fixture(scope="module")
def served(archive: tuple[Catalog, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The archive served with a writer account (the same SQLite file): judgements are saved."""
    catalog, _ = archive
    settings = app_settings(
        catalog.url, tmp_path_factory.mktemp("writable"), writer_database_url=catalog.url
    )
    with serving(settings) as url:
        yield url


def open_first_image(page: Any, url: str, catalog: Catalog) -> int:
    """Shows the first indexed image with its four neighbours; its id."""
    first = catalog.ok_ids[0]
    page.goto(f"{url}/?id={first}")
    wait_for_neighbours(page, len(catalog.neighbours[first]))
    return first


def sign_in(page: Any, *, token: str = "", name: str = "", password: str = "") -> None:
    """Opens the form from the header and sends it, as a person would."""
    page.get_by_role("button", name="Sign in", exact=True).click()
    if token:
        page.get_by_label("Token").fill(token)
    else:
        page.get_by_label("Name", exact=True).fill(name)
        page.get_by_label("Password").fill(password)
    page.locator("#sign-in button[type=submit]").click()


def judgements(page: Any, url: str) -> dict[str, Any]:
    """GET /api/judgements with the page's own cookies."""
    response = page.request.get(f"{url}/api/judgements")
    assert response.ok, response.text()
    return dict(response.json())


def card(page: Any, neighbour: int) -> Any:
    return page.locator(f'#neighbours li[data-neighbour="{neighbour}"]')


def test_a_curator_signs_in_with_a_password_marks_hides_and_clears_a_pair(
    archive: tuple[Catalog, str], served: str, page: Any
) -> None:
    catalog, _ = archive
    dialogs: list[str] = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    first = open_first_image(page, served, catalog)
    assert page.locator("#neighbours .judge").count() == 0  # nobody signed in yet
    assert page.locator("#judging").is_hidden()

    sign_in(page, name="ann", password=PASSWORD)
    expect(page.locator("#signed-in-as")).to_have_text("Signed in as ann (curator)")
    expect(page.locator("#sign-in")).to_be_hidden()
    closest = catalog.neighbours[first][0][0]
    pair = card(page, closest)
    not_similar = pair.get_by_role("button", name="Not similar", exact=True)
    expect(not_similar).to_have_attribute("aria-pressed", "false")
    expect(pair.locator(".verdicts")).to_be_hidden()  # no verdicts yet: no counts
    expect(pair.get_by_role("button", name="Clear")).to_be_hidden()

    pair.get_by_label("Note with your verdict (optional)").fill(NOTE)
    not_similar.click()
    expect(not_similar).to_have_attribute("aria-pressed", "true")
    expect(pair.locator(".verdicts")).to_have_text(
        "same object 0 \u00b7 similar 0 \u00b7 not similar 1"
    )
    for other in ("Same object", "Similar"):
        expect(pair.get_by_role("button", name=other, exact=True)).to_have_attribute(
            "aria-pressed", "false"
        )
    saved = judgements(page, served)
    assert saved["total"] == 1
    assert {k: saved["items"][0][k] for k in ("image_id", "neighbour_id", "user", "verdict")} == {
        "image_id": first,
        "neighbour_id": closest,
        "user": "ann",
        "verdict": "not_similar",
    }
    assert saved["items"][0]["note"] == NOTE
    assert page.locator("#neighbours script, #neighbours img[src=x]").count() == 0
    assert dialogs == []

    # Hidden: the pair leaves the list (the other three stay); shown again when unticked.
    page.get_by_label("Hide pairs I marked not similar").check()
    expect(pair).to_have_count(0)
    expect(page.locator("#neighbours li")).to_have_count(len(catalog.neighbours[first]) - 1)
    page.get_by_label("Hide pairs I marked not similar").uncheck()
    expect(pair).to_have_count(1)
    expect(not_similar).to_have_attribute("aria-pressed", "true")

    pair.get_by_role("button", name="Clear").click()
    expect(not_similar).to_have_attribute("aria-pressed", "false")
    expect(pair.locator(".verdicts")).to_be_hidden()
    expect(pair.get_by_role("button", name="Clear")).to_be_hidden()
    assert judgements(page, served)["total"] == 0

    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_role("button", name="Sign in", exact=True)).to_be_visible()
    expect(page.locator("#neighbours .judge")).to_have_count(0)
    expect(page.locator("#judging")).to_be_hidden()
    wait_for_neighbours(page, len(catalog.neighbours[first]))
    assert dialogs == []


def test_a_token_signs_in_the_toggles_follow_and_an_upload_still_works(
    archive: tuple[Catalog, str], served: str, page: Any
) -> None:
    catalog, token = archive
    first = open_first_image(page, served, catalog)
    sign_in(page, token="lookalike_wrong_token")
    expect(page.locator("#account-message")).to_contain_text("Sign-in failed")
    expect(page.locator("#account-message")).to_contain_text("HTTP 401")
    assert page.locator("#account-message").get_attribute("role") == "status"
    page.get_by_label("Token").fill(token)
    page.locator("#sign-in button[type=submit]").click()
    expect(page.locator("#signed-in-as")).to_have_text("Signed in as ann (curator)")
    expect(page.locator("#account-message")).to_have_text("")

    pair = card(page, catalog.neighbours[first][1][0])
    same, similar = (
        pair.get_by_role("button", name=name, exact=True) for name in ("Same object", "Similar")
    )
    same.click()
    expect(same).to_have_attribute("aria-pressed", "true")
    similar.click()  # one verdict per user and pair: the new one replaces the old
    expect(similar).to_have_attribute("aria-pressed", "true")
    expect(same).to_have_attribute("aria-pressed", "false")
    expect(pair.locator(".verdicts")).to_have_text(
        "same object 0 \u00b7 similar 1 \u00b7 not similar 0"
    )
    similar.click()  # pressing the pressed toggle clears it
    expect(similar).to_have_attribute("aria-pressed", "false")
    expect(pair.locator(".verdicts")).to_be_hidden()
    assert judgements(page, served)["total"] == 0

    # With a session cookie the server wants the CSRF header on the upload's POST too.
    page.set_input_files("#upload", str(catalog.root / "photos/photo_000_00003.jpg"))
    wait_for_neighbours(page, 5)
    assert page.locator("#message").inner_text() == ""
    assert page.locator("#neighbours .judge").count() == 0  # an upload's pairs: no verdicts

    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_role("button", name="Sign in", exact=True)).to_be_visible()
    expect(page.locator("#signed-in")).to_be_hidden()


def test_without_a_writer_the_page_says_judgements_cannot_be_saved(
    archive: tuple[Catalog, str], page: Any, tmp_path_factory: pytest.TempPathFactory
) -> None:
    catalog, token = archive
    with serving(app_settings(catalog.url, tmp_path_factory.mktemp("read-only"))) as url:
        open_first_image(page, url, catalog)
        sign_in(page, token=token)
        expect(page.locator("#signed-in-as")).to_have_text("Signed in as ann (curator)")
        expect(page.locator("#judging-note")).to_have_text(
            "Judgements cannot be saved: this server does not accept judgements."
        )
        expect(page.get_by_label("Hide pairs I marked not similar")).to_be_visible()
        wait_for_neighbours(page, 4)
        assert page.locator("#neighbours .judge").count() == 0


def test_an_archive_that_needs_an_account_asks_for_one_first(
    archive: tuple[Catalog, str], page: Any, tmp_path_factory: pytest.TempPathFactory
) -> None:
    catalog, _ = archive
    settings = app_settings(
        catalog.url, tmp_path_factory.mktemp("closed"), read_requires_login=True
    )
    with serving(settings) as url:
        asked: list[str] = []
        page.on("request", lambda request: asked.append(request.url.removeprefix(url)))
        page.goto(f"{url}/?id={catalog.ok_ids[0]}")
        expect(page.get_by_label("Token")).to_be_focused()
        expect(page.locator("#message")).to_have_text("Sign in to see this archive.")
        assert [path for path in asked if path.startswith("/api/")] == ["/api/session"]
        page.get_by_label("Name", exact=True).fill("ann")
        page.get_by_label("Password").fill(PASSWORD)
        page.get_by_label("Password").press("Enter")
        wait_for_neighbours(page, 4)
        expect(page.locator("#stats")).to_contain_text("11 images", timeout=TIMEOUT_MS)
        expect(page.locator("#message")).to_have_text("")
