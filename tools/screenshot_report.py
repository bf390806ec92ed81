"""Take the README's screenshot of a run's report.html in headless Chromium (offline).

    .venv/bin/python tools/screenshot_report.py runs/demo figures/report.png

Needs the system's Chromium (/usr/bin/chromium) and playwright (in the dev extra); no browser
is downloaded. Every request that is not a local file is refused, so the picture shows what
an offline reader sees.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from playwright.sync_api import sync_playwright

ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]


def screenshot(run_dir: Path, out: Path, height: int = 1500) -> Path:
    """A PNG of the top ``height`` pixels of ``run_dir/report.html`` at 1280 px wide."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("no Chromium on this machine: apt-get install chromium")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": height})
        page.route("**/*", lambda route: route.continue_() if route.request.url.startswith("file://") else route.abort())
        page.goto((run_dir / "report.html").resolve().as_uri(), wait_until="load")
        page.wait_for_timeout(500)
        page.screenshot(path=str(out))
        browser.close()
    return out


if __name__ == "__main__":
    print(screenshot(Path(sys.argv[1]), Path(sys.argv[2])))
