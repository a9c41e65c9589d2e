"""Debian's Chromium driven by Playwright (never a downloaded browser), and where screenshots go."""
from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from stack import REPO

CHROMIUM = os.environ.get("CONSERVE_CHROMIUM", "/usr/bin/chromium")
# Flags the machine needs: as root there is no sandbox, and the closed network refuses Chromium's own calls.
FLAGS = ["--no-sandbox", "--disable-background-networking", "--disable-component-update", "--disable-gpu",
         "--no-first-run", "--disable-sync", "--disable-dev-shm-usage"]
ARTIFACTS = REPO / "test-artifacts"


@contextlib.contextmanager
def chromium() -> Iterator:
    from playwright.sync_api import sync_playwright

    if not shutil.which(CHROMIUM) and not Path(CHROMIUM).exists():
        pytest.fail(f"Chromium is required for the browser tests and is missing at {CHROMIUM} "
                    "(`make test` installs Debian's chromium package)", pytrace=False)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


def screenshot(page, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path
