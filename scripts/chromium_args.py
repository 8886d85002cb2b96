"""How lookalike starts headless Chromium: one definition for the page tests and the screenshot.

scripts/screenshot_page.py imports it as a sibling (`chromium_args`), the tests as
`scripts.chromium_args`; it needs only the standard library, so both can load it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# Debian's chromium package (apt-get install chromium); Playwright drives it over CDP.
CHROMIUM = Path("/usr/bin/chromium")

CHROMIUM_ARGS = [
    "--no-sandbox",  # runs as root in containers, where the sandbox cannot start
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def launch_chromium(playwright: Any) -> Any:
    """A headless Chromium browser from a started Playwright (sync or async API)."""
    return playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
