"""Debian's Chromium, headless, driven by Playwright (no browser download: the system one).

Playwright rather than Selenium: it talks to Chromium over the DevTools protocol itself, so no
driver binary has to match the browser's version, its wheel carries everything it needs (it
installs from PyPI like any package), and its assertions wait for a condition up to a bound.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

from playwright.sync_api import BrowserContext, sync_playwright

CHROMIUM = "/usr/bin/chromium"
# Everything a test run needs and nothing that reaches out: no GPU, QUIC, first-run, sync,
# component updates or background requests. As root Chromium needs --no-sandbox. Playwright
# adds --headless itself, and the profile is a fresh --user-data-dir.
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# The longest any page condition is waited for.
WAIT_MS = 15_000


def chromium_path() -> str:
    if not Path(CHROMIUM).exists() and shutil.which("chromium") is None:
        raise RuntimeError("Chromium is missing: run scripts/ensure-tools (as root)")
    return CHROMIUM if Path(CHROMIUM).exists() else str(shutil.which("chromium"))


@contextlib.contextmanager
def chromium(profile_dir: Path, width: int = 1100, height: int = 900) -> Iterator[BrowserContext]:
    """A headless Chromium with a fresh profile in `profile_dir`."""
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            profile_dir,
            executable_path=chromium_path(),
            headless=True,
            args=CHROMIUM_FLAGS,
            viewport={"width": width, "height": height},
        )
        context.set_default_timeout(WAIT_MS)
        try:
            yield context
        finally:
            context.close()
