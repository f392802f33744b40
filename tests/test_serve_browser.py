"""``simdiff serve`` in a real headless Chromium (Debian's ``chromium``, driven by Playwright): the page loads, a
sample request shows its progress and then the PNG grid, a bad parameter shows the server's one-line message.

Skipped, with the reason, when Playwright or a Chromium executable is missing (``apt-get install chromium``; the
executable is ``$SIMDIFF_CHROMIUM`` or the first of chromium / chromium-browser / google-chrome on PATH).

``SIMDIFF_SERVE_SCREENSHOT=docs/gallery/serve.png`` also serves the shipped model, samples it from the page with
the documented settings and saves that screenshot there (run once to refresh the picture in docs/; not on every
test run, since the shipped model is slow on a CPU).
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import sys
import threading
from pathlib import Path

import pytest

pytest.importorskip("starlette", reason="simdiff serve needs the [serve] extra (starlette, uvicorn)")
uvicorn = pytest.importorskip("uvicorn", reason="simdiff serve needs the [serve] extra (starlette, uvicorn)")
sync_api = pytest.importorskip("playwright.sync_api",
                               reason="the browser test needs Playwright: pip install playwright")
expect = sync_api.expect


def _chromium() -> str | None:
    env = os.environ.get("SIMDIFF_CHROMIUM")
    if env:
        return env if Path(env).is_file() else None
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


CHROMIUM = _chromium()
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium executable: apt-get install chromium (or set "
                                                         "SIMDIFF_CHROMIUM to one)")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_serve import Gate, tiny_loaded  # noqa: E402

from simdiff.serve import build_entries, create_app, listen_socket, make_entry  # noqa: E402

SCREENSHOT = os.environ.get("SIMDIFF_SERVE_SCREENSHOT")


@pytest.fixture(scope="module")
def server():
    """A uvicorn server in a thread on a free loopback port: a tiny model behind a gate, plus the shipped model
    when a screenshot for the docs is asked for. Yields ``(url, gate)``."""
    gate = Gate(tiny_loaded().model)
    entries = [make_entry(dataclasses.replace(tiny_loaded(), model=gate), id="tiny", name="tiny 8x8 test model")]
    if SCREENSHOT:
        entries = build_entries([]) + entries
    app = create_app(entries, allowed_hosts=["127.0.0.1", "localhost"])
    sock = listen_socket("127.0.0.1", 0)
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        for _ in range(300):
            if srv.started:
                break
            thread.join(0.05)
        assert srv.started, "uvicorn did not start"
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/", gate
    finally:
        gate.release.set()
        srv.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture(scope="module")
def page(server):
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                     args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        try:
            pg = browser.new_page(viewport={"width": 1180, "height": 760})
            pg.set_default_timeout(30_000)
            pg.goto(server[0])
            pg.wait_for_selector("body[data-ready=true]")
            yield pg
        finally:
            browser.close()


def test_page_samples_with_progress_and_shows_the_grid(server, page, tmp_path):
    _, gate = server
    page.select_option("#model", "tiny")
    assert page.input_value("#steps") == "3"  # the model's own defaults fill the form
    page.click("#chips button:text-is('3')")
    page.click("#chips button:text-is('5')")
    assert page.input_value("#labels") == "3,5"
    page.fill("#num", "4")
    page.fill("#seed", "7")
    page.select_option("#sampler", "ddim")
    page.click("#sample")
    assert gate.entered.wait(30)
    expect(page.locator("#status")).to_contain_text("Sampling: 1 / 3")  # (the page's CSP forbids string eval)
    assert page.is_disabled("#sample")  # one request at a time from the page
    width = page.eval_on_selector("#bar", "el => el.style.width")
    assert width == "33%"
    gate.release.set()
    expect(page.locator("#result")).to_be_visible()
    expect(page.locator("#result")).to_have_js_property("complete", True)
    src = page.get_attribute("#result", "src")
    assert src.startswith("/api/jobs/") and src.endswith("/image.png")
    body = page.request.get(server[0].rstrip("/") + src).body()
    assert body[:8] == b"\x89PNG\r\n\x1a\n"
    # 2 columns (labels 3, 5) x 2 rows of 8x8 cells with 2-pixel borders, each pixel drawn 8 x 8
    assert page.eval_on_selector("#result", "i => [i.naturalWidth, i.naturalHeight]") == [176, 176]
    assert "Done" in page.text_content("#status")
    assert "ddim, 3 steps" in page.text_content("#result-info") and "labels 3,5,3,5" in page.text_content(
        "#result-info")
    assert page.is_hidden("#error") and page.is_enabled("#sample")
    out = tmp_path / "serve.png"
    page.screenshot(path=str(out), full_page=True)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_parameter_shows_the_servers_message(page):
    page.select_option("#model", "tiny")
    page.fill("#steps", "0")
    page.click("#sample")
    expect(page.locator("#error")).to_have_text("steps must be an integer >= 1, got 0")
    expect(page.locator("#error")).to_be_visible()
    page.fill("#steps", "3")
    page.fill("#guidance", "nan")
    page.click("#sample")
    expect(page.locator("#error")).to_have_text(re.compile("^guidance must be a finite number"))
    page.fill("#guidance", "0")
    page.fill("#labels", "4,12")
    page.click("#sample")
    expect(page.locator("#error")).to_contain_text("labels: 12 is out of range")


@pytest.mark.skipif(not SCREENSHOT, reason="set SIMDIFF_SERVE_SCREENSHOT=docs/gallery/serve.png to refresh the "
                                           "screenshot in docs/ (samples the shipped model)")
def test_docs_screenshot(page):
    page.select_option("#model", "pretrained")
    page.fill("#steps", "12")
    page.fill("#num", "20")
    page.fill("#guidance", "1")
    page.fill("#seed", "1")
    page.click("#sample")
    expect(page.locator("#status")).to_contain_text("Done", timeout=600_000)
    expect(page.locator("#result")).to_have_js_property("complete", True)
    out = Path(SCREENSHOT)
    out.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(out))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
