"""The demo page in headless Chromium (Playwright driving the system's Chromium): upload an image,
pick an adapter, see the caption; a broken image shows the server's message. Skipped where no
Chromium is installed (``apt-get install chromium``)."""

import shutil

import pytest

from tests.adapter_runs import LLAVA_PLACEMENT, make_run

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on this machine")


def test_page_uploads_and_shows_the_caption(tmp_path, shapes_small, tiny_llava_dir):
    sync_api = pytest.importorskip("playwright.sync_api")
    from mmlora.serve.app import create_app
    from mmlora.serve.engine import Engine
    from mmlora.serve.local import on_loopback

    runs = {"red": make_run(tmp_path / "red", "tiny-llava", LLAVA_PLACEMENT, 1)}
    image = sorted((shapes_small / "world_B/images/test").glob("*.png"))[0]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    app = create_app(Engine("tiny-llava", runs, max_new_tokens=4), max_wait_ms=1)
    with on_loopback(app) as url, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(url)
        page.wait_for_selector("#adapter option[value=red]", state="attached")
        assert "tiny-llava (caption)" in page.inner_text("#about")
        page.set_input_files("#image", str(image))
        page.select_option("#adapter", "red")
        page.click("#submit")
        page.wait_for_selector("#meta")
        assert page.inner_text("#meta").startswith("adapter red,") and page.inner_text("#caption").strip()
        page.screenshot(path=str(tmp_path / "page.png"))
        page.set_input_files("#image", str(broken))
        page.click("#submit")
        page.wait_for_function("document.getElementById('error').textContent.length > 0")
        assert page.inner_text("#error").startswith("400: image could not be decoded")
        browser.close()
