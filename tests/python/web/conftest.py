"""Fixtures for the web view's tests: `backend`, a server to create data in (real
mboxd by default, the Python mock with MBOX_WEB_MOCK=1), `browser` (Debian's
Chromium through Playwright) and `tab`, a page that fails the test on any dialog and
leaves a screenshot in $MBOX_WEB_SCREENSHOTS (default target/web-screenshots).
Helpers live in webtest.py (a module name of its own: test modules import it, not
a conftest)."""

import os
import re

import pytest

from webtest import CHROMIUM, CHROMIUM_ARGS, MOCK, SCREENSHOTS, Page, start_backend


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    """A fresh server per test module, so counts in it are exact."""
    _, b, stop = start_backend(tmp_path_factory)
    yield b
    stop()


@pytest.fixture(scope="session")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is not installed: pip install -r tests/python/requirements.txt")
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"no Chromium at {CHROMIUM}: apt-get install chromium (scripts/test.sh does) or set MBOX_CHROMIUM")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def tab(browser, backend, request):
    # The page's Content-Security-Policy forbids eval, which Playwright's
    # wait_for_function uses; bypassing it also means the XSS test checks the page's
    # own rendering, not the CSP that would stop an injected handler anyway.
    context = browser.new_context(viewport={"width": 1400, "height": 1000}, bypass_csp=True)
    page = context.new_page()
    page.set_default_timeout(15_000)
    t = Page(page, backend.base_url)
    yield t
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name) + (".mock" if MOCK else "") + ".png"
    try:
        page.screenshot(path=str(SCREENSHOTS / name), full_page=True)
    finally:
        context.close()
    assert not t.dialogs, f"the page opened dialogs: {t.dialogs}"
