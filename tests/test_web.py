"""The web page in a real browser: Debian's Chromium, headless, driven by Playwright."""
import shutil
from pathlib import Path

import pytest
from conftest import start_gateway
from PIL import Image
from playwright.sync_api import sync_playwright

BROWSER = next((p for p in ("/usr/lib/chromium/chromium", shutil.which("chromium")) if p and Path(p).exists()), None)
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]


@pytest.fixture(scope="module")
def browser():
    if BROWSER is None:
        pytest.fail("the web page test needs Debian's chromium package (`make test` installs it)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=BROWSER, headless=True, args=FLAGS)
        yield browser
        browser.close()


@pytest.fixture
def photo_file(tmp_path, photo):
    """Large enough that its result comes back in several tiles."""
    import numpy as np
    path = tmp_path / "photo.png"
    Image.fromarray(np.tile(photo, (3, 3, 1))).save(path)
    return path


def open_page(browser, url):
    page = browser.new_page()
    page.errors = []
    page.on("pageerror", lambda error: page.errors.append(str(error)))
    page.goto(url + "/")
    page.wait_for_selector("#up-model option[value=lanczos]", state="attached")
    return page


def test_upload_run_and_see_the_result(browser, gateway, photo_file, tmp_path):
    page = open_page(browser, gateway.url)
    assert page.is_hidden("#auth")  # the mesh under test is open: no token field
    page.set_input_files("#file", str(photo_file))
    page.fill("#scale", "2")
    page.select_option("#up-model", "lanczos")
    page.check("#use-effect")
    page.select_option("#effect", "blackwhite")
    page.fill("[data-param=grain_strength]", "0.2")
    page.click("#run")
    page.wait_for_selector("#result:not([hidden])", timeout=60_000)
    assert page.eval_on_selector("#progress", "p => p.value === p.max && p.max > 1")
    assert page.inner_text("#progress-text").startswith("done")
    assert page.eval_on_selector("#after", "img => [img.naturalWidth, img.naturalHeight]") == [768, 576]
    assert page.get_attribute("#download", "href").startswith("blob:")
    assert "effect: blackwhite (numpy)" in page.inner_text("#result-info")
    page.fill("#slider", "20")
    assert "80%" in page.eval_on_selector("#before", "img => img.style.clipPath")
    page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
    assert page.errors == []
    page.close()


def test_compare_background_removal_models_and_pick_one(browser, gateway, photo_file):
    page = open_page(browser, gateway.url)
    page.set_input_files("#file", str(photo_file))
    page.check(".compare-model[value=keyer]")
    page.check(".compare-model[value=mediapipe-selfie]")
    page.click("#compare")
    page.wait_for_selector(".candidate >> nth=1", timeout=60_000)
    assert page.locator(".candidate").count() == 2
    page.locator(".candidate", has_text="mediapipe-selfie").locator("button").click()
    page.wait_for_selector(".candidate.chosen")
    assert "mediapipe-selfie (chosen)" in page.inner_text("#result-info")
    assert page.errors == []
    page.close()


def test_token_field_when_auth_is_on(browser, tmp_path_factory, mesh, mesh_ports, photo_file):
    secured = start_gateway(tmp_path_factory, mesh_ports, API_TOKENS="web-token")
    try:
        page = open_page(browser, secured.url)
        assert page.is_visible("#token")
        page.set_input_files("#file", str(photo_file))
        page.select_option("#up-model", "lanczos")
        page.click("#run")
        page.wait_for_selector("#error:not([hidden])")
        assert "Bearer" in page.inner_text("#error")
        page.fill("#token", "web-token")
        page.click("#run")
        page.wait_for_selector("#result:not([hidden])", timeout=60_000)
        page.close()
    finally:
        secured.stop()
