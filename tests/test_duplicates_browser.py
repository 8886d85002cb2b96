"""The Duplicates view in headless Chromium: groups, the threshold slider, the histogram."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from scripts.chromium_args import CHROMIUM
from tests.pipeline_catalog import app_settings, index_duplicate_set
from tests.test_api_browser import browser, page, serving  # noqa: F401 - fixtures

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium"
    ),
]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Eight photos, an exact copy and a re-encoded copy, indexed and grouped, served."""
    base = tmp_path_factory.mktemp("duplicates-browser")
    url = f"sqlite:///{base / 'db.sqlite'}"
    index_duplicate_set(url, base / "images", 0.06)
    with serving(app_settings(url, base)) as served_url:
        yield served_url


def group_names(shown: Any) -> list[list[str]]:
    return shown.eval_on_selector_all(
        "#groups > li",
        "groups => groups.map(g => [...g.querySelectorAll('span')].map(s => s.textContent))",
    )


def test_groups_show_with_representative_first_and_the_slider_regroups(
    page: Any,  # noqa: F811 - the fixture imported above
    served: str,
) -> None:
    page.goto(f"{served}/")
    page.get_by_role("link", name="Duplicates").click()
    page.wait_for_selector("#groups > li")
    groups = group_names(page)
    text = " ".join(" ".join(g) for g in groups)
    assert "exact_copy.jpg" in text and "reencoded.jpg" in text
    assert all(g[0].endswith("representative") for g in groups)
    # exact_copy.jpg and the photo it copies share a group: one of them is its representative
    # (the first in file order), the other is shown as its exact copy.
    pair = next(g for g in groups if any(n.startswith("exact_copy.jpg") for n in g))
    assert any(n.startswith("photo_000_00001.jpg") and n.endswith("exact copy") for n in pair) or (
        any(n.startswith("exact_copy.jpg") and n.endswith("exact copy") for n in pair)
    )
    assert page.locator("#histogram rect").count() > 10
    assert page.locator("#histogram line.threshold-line").count() == 1
    first = page.locator("#groups img").first
    page.wait_for_function(
        "img => img.complete && img.naturalWidth > 0", arg=first.element_handle()
    )
    before = page.text_content("#summary")
    # Keyboard: focus the slider, move it to the top with End; the groups are fetched again.
    page.focus("#threshold")
    page.keyboard.press("End")
    page.wait_for_function("() => document.querySelector('#summary').textContent.includes('0.25')")
    assert page.text_content("#threshold-value") == "0.25"
    assert page.text_content("#summary") != before
    page.locator("#groups a").first.click()
    page.wait_for_url("**/?id=*")
