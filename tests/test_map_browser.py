"""The Map view in headless Chromium: points drawn, pan, zoom, hover, photos, click through."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from scripts.chromium_args import CHROMIUM
from tests.odd_images import write_photos
from tests.pipeline_catalog import app_settings, index_and_lay_out
from tests.test_api_browser import browser, page, serving  # noqa: F401 - fixtures

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium"
    ),
]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """Twenty photos indexed and laid out, served; with the database URL."""
    base = tmp_path_factory.mktemp("map-browser")
    url = f"sqlite:///{base / 'db.sqlite'}"
    write_photos(base / "images" / "old", 12, seed=21)
    write_photos(base / "images" / "new", 8, seed=22)
    index_and_lay_out(url, base / "images")
    with serving(app_settings(url, base)) as served_url:
        yield served_url, url


def view_of(shown: Any) -> dict[str, float]:
    return shown.evaluate("() => ({...window.lookalikeMap.view})")


def wait_drawn(shown: Any) -> None:
    shown.wait_for_function("() => window.lookalikeMap.map.frames.length > 0")


def test_the_map_draws_every_point_and_pans_and_zooms(
    page: Any,  # noqa: F811 - the fixture imported above
    served: tuple[str, str],
) -> None:
    url, _ = served
    page.goto(f"{url}/map")
    wait_drawn(page)
    assert page.evaluate("() => window.lookalikeMap.map.count") == 20
    assert page.locator("#summary").inner_text() == "20 images"
    box = page.locator("#map").bounding_box()
    start = view_of(page)
    page.mouse.move(box["x"] + 100, box["y"] + 100)
    page.mouse.down()
    page.mouse.move(box["x"] + 160, box["y"] + 130, steps=5)
    page.mouse.up()
    panned = view_of(page)
    assert panned["x"] < start["x"] and panned["y"] > start["y"]  # the map followed the drag
    page.mouse.wheel(0, -400)
    page.wait_for_function(f"() => window.lookalikeMap.view.scale > {panned['scale']}")
    page.focus("#map")
    before = view_of(page)["scale"]
    page.keyboard.press("-")
    assert view_of(page)["scale"] < before
    page.keyboard.press("0")
    page.keyboard.press("ArrowRight")
    assert view_of(page)["x"] != panned["x"]


def test_hover_names_a_point_photos_appear_close_up_and_a_click_opens_it(
    page: Any,  # noqa: F811
    served: tuple[str, str],
) -> None:
    url, _ = served
    page.goto(f"{url}/map")
    wait_drawn(page)
    box = page.locator("#map").bounding_box()
    sx, sy = page.evaluate("() => window.lookalikeMap.toScreen(3)")
    page.mouse.move(box["x"] + sx, box["y"] + sy)
    hover = page.locator("#hover")
    hover.wait_for(state="visible")
    assert hover.inner_text().endswith(".jpg")
    # Fewer than 60 points on screen: photos stand in for them.
    page.wait_for_function("() => document.querySelectorAll('#thumbnails img').length === 20")
    image_id = page.evaluate("() => window.lookalikeMap.map.ids[3]")
    page.mouse.click(box["x"] + sx, box["y"] + sy)
    page.wait_for_url(f"**/?id={image_id}")


def test_coming_from_an_image_picks_it_and_its_neighbours_out(
    page: Any,  # noqa: F811
    served: tuple[str, str],
) -> None:
    url, _ = served
    image_id = 5
    page.goto(f"{url}/map?id={image_id}")
    wait_drawn(page)
    picked = page.evaluate("() => [...window.lookalikeMap.map.highlight.keys()]")
    assert picked[0] == image_id and len(picked) == 20  # itself and its 19 neighbours


def test_the_main_page_links_to_the_map_of_its_image(
    page: Any,  # noqa: F811
    served: tuple[str, str],
) -> None:
    url, _ = served
    page.goto(f"{url}/?id=4")
    page.wait_for_function("() => document.getElementById('map-link').href.endsWith('/map?id=4')")


def test_points_can_be_coloured_by_folder(
    page: Any,  # noqa: F811
    served: tuple[str, str],
) -> None:
    url, _ = served
    page.goto(f"{url}/map")
    wait_drawn(page)
    page.check("#by-folder")
    page.wait_for_function("() => window.lookalikeMap.map.folderOf !== null")
    assert page.locator("#legend .legend-item").all_inner_texts() == ["new", "old"]
    counts = page.evaluate(
        "() => [...window.lookalikeMap.map.folderOf].reduce((c, f) => (c[f]++, c), [0, 0])"
    )
    assert counts == [8, 12]
