"""Screenshot a page of a running service in headless Chromium (docs/screenshot.png)."""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

from chromium_args import CHROMIUM, launch_chromium  # scripts/chromium_args.py, a sibling

TIMEOUT_MS = 60_000
# The main page's image and neighbours, or the duplicates view's thumbnails, as far as the
# window shows them (thumbnails further down load lazily, only when scrolled to).
ALL_IMAGES_LOADED = """() => {
    if (window.lookalikeMap) {  // the map: drawn, and any photos on it loaded
        const photos = [...document.querySelectorAll('#thumbnails img')];
        return window.lookalikeMap.map.frames.length > 0
            && photos.every(i => i.complete && i.naturalWidth > 0);
    }
    const images = [...document.querySelectorAll('#current-image, #neighbours img, #groups img')]
        .filter(i => i.getBoundingClientRect().top < window.innerHeight);
    return images.length > 1 && images.every(i => i.complete && i.naturalWidth > 0);
}"""


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--url",
        default="http://127.0.0.1:5000/",
        help="page to capture, e.g. http://HOST:PORT/?id=12",
    )
    parser.add_argument("--out", type=Path, default=Path("docs/screenshot.png"))
    parser.add_argument("--width", type=int, default=1200)
    parser.add_argument("--height", type=int, default=1000)
    parser.add_argument("--full-page", action="store_true", help="capture below the fold too")
    return parser.parse_args(argv)


def take_screenshot(url: str, out: Path, width: int, height: int, full_page: bool) -> None:
    """Open url, wait until its images (or the map) are drawn, save a PNG."""
    from playwright.sync_api import sync_playwright

    out.parent.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.goto(url, timeout=TIMEOUT_MS)
            page.wait_for_function(ALL_IMAGES_LOADED, timeout=TIMEOUT_MS)
            png = page.screenshot(full_page=full_page)
        finally:
            browser.close()
    save_small_png(png, out)


def save_small_png(png: bytes, out: Path) -> None:
    """Save with a 256-colour palette: a third of the size, and it stays readable in docs."""
    from PIL import Image

    with Image.open(io.BytesIO(png)) as image:
        image.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(
            out, optimize=True
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if not CHROMIUM.exists():
        print(f"error: {CHROMIUM} not found; install Debian's chromium package", file=sys.stderr)
        return 2
    take_screenshot(args.url, args.out, args.width, args.height, args.full_page)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
