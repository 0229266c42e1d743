"""The web page in a real browser: Debian's Chromium, headless, driven by Playwright."""

import os
import shutil
from pathlib import Path

import pytest
from PIL import Image
from playwright.sync_api import sync_playwright

from support.processes import start_gateway

BROWSER = next((p for p in ("/usr/lib/chromium/chromium", shutil.which("chromium")) if p and Path(p).exists()), None)
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]


@pytest.fixture(scope="module")
def browser():
    if BROWSER is None:
        pytest.fail("the web page test needs Debian's chromium package (`make test-deps` installs it)")
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


def open_page(browser, url, viewport=(1280, 900)):
    page = browser.new_page(viewport={"width": viewport[0], "height": viewport[1]})
    page.errors, page.elsewhere = [], []
    page.on("pageerror", lambda error: page.errors.append(str(error)))
    # The page and everything it loads come from the gateway: nothing from any other host.
    page.on(
        "request", lambda request: request.url.startswith((url, "data:", "blob:")) or page.elsewhere.append(request.url)
    )
    page.goto(url + "/")
    page.wait_for_selector("#up-model option[value=lanczos]", state="attached")
    return page


def set_range(page, selector, value):
    page.eval_on_selector(
        selector,
        "(input, value) => { input.value = value; input.dispatchEvent(new Event('input', {bubbles: true})); }",
        str(value),
    )


def screenshots(tmp_path) -> Path:
    """Where the page's screenshots go: $IMAGEMESH_SCREENSHOTS to keep them, else the test's folder."""
    folder = Path(os.environ.get("IMAGEMESH_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def test_upload_run_and_compare_before_and_after(browser, gateway, photo_file, tmp_path):
    page = open_page(browser, gateway.url)
    assert page.is_hidden("#auth")  # the mesh under test is open: no token field
    page.set_input_files("#file", str(photo_file))
    set_range(page, "#scale", 2)
    page.select_option("#up-model", "lanczos")
    page.wait_for_function("document.querySelector('#output-size').textContent.includes('768 × 576')")
    assert page.inner_text("#output-size") == "Output: 768 × 576 (from 384 × 288)."  # known before running
    assert page.inner_text("#scale-value") == "2×"
    page.check("#use-effect")
    page.select_option("#effect", "blackwhite")
    assert page.inner_text("label.param:has([data-param=grain_strength]) span") == "Grain strength"
    slider = page.locator("[data-param=grain_strength]")
    assert slider.get_attribute("type") == "range" and slider.get_attribute("max") and slider.get_attribute("min")
    set_range(page, "[data-param=grain_strength]", 0.2)
    page.click("#run")
    assert page.is_disabled("#run") and page.is_disabled("#compare") and page.is_disabled("#file")
    page.wait_for_selector("#result:not([hidden])", timeout=60_000)
    page.wait_for_selector(".item.done")
    page.wait_for_function("!document.querySelector('#run').disabled")
    assert page.eval_on_selector("#after", "img => [img.naturalWidth, img.naturalHeight]") == [768, 576]
    sizes = page.inner_text("#result-sizes")
    assert "384 × 288" in sizes and "768 × 576" in sizes and "KB" in sizes
    assert page.get_attribute("#download", "href").startswith("blob:")
    assert "effect: blackwhite (numpy)" in page.inner_text("#result-info")
    assert page.is_visible(".tag-before") and page.is_visible(".tag-after") and page.is_visible("#divider")
    set_range(page, "#slider", 20)
    assert "80%" in page.eval_on_selector("#before-layer", "layer => layer.style.clipPath")
    page.click("#zoom-in")
    box = page.locator("#stage").bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.8, box["y"] + box["height"] * 0.5)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.6, box["y"] + box["height"] * 0.4, steps=4)
    page.mouse.up()
    before, after = (page.eval_on_selector(side, "img => img.style.transform") for side in ("#before", "#after"))
    assert before == after and "scale(1.5)" in after and "translate(0px, 0px)" not in after  # zoomed, panned, in sync
    assert page.errors == [] and page.elsewhere == []
    page.close()


@pytest.mark.parametrize("size", [(1280, 900), (390, 844)], ids=["desktop", "phone"])
def test_a_batch_of_three_with_progress_results_and_a_zip(browser, gateway, photo, tmp_path, size):
    import io
    import zipfile

    import numpy as np

    files = []
    for i in range(3):
        files.append(tmp_path / f"photo{i}.png")
        Image.fromarray(np.tile(photo, (2 + i, 2, 1))).save(files[-1])
    folder = screenshots(tmp_path)
    name = "x".join(map(str, size))
    page = open_page(browser, gateway.url, size)
    page.set_input_files("#file", [str(f) for f in files])
    assert page.locator(".item").count() == 3 and page.inner_text("#run") == "Run 3 images"
    page.select_option("#up-model", "realesr-general-x4v3")
    set_range(page, "#scale", 4)
    page.screenshot(path=str(folder / f"batch-ready-{name}.png"), full_page=True)
    page.click("#run")
    page.wait_for_selector(".item.running, .item.done", timeout=60_000)
    page.screenshot(path=str(folder / f"batch-running-{name}.png"), full_page=True)
    page.wait_for_function("document.querySelectorAll('.item.done').length === 3", timeout=120_000)
    page.wait_for_function("!document.querySelector('#zip').disabled")
    page.screenshot(path=str(folder / f"batch-done-{name}.png"), full_page=True)
    if size[0] < 500:  # on a phone the result is scrolled into view
        assert page.evaluate("document.querySelector('#result').getBoundingClientRect().top < innerHeight")
    page.locator(".item >> nth=2").get_by_text("Compare").click()
    assert page.inner_text("#result-title") == "photo2.png"
    assert page.eval_on_selector("#after", "img => img.naturalHeight") == 96 * 4 * 4
    with page.expect_download() as download:
        page.click("#zip")
    with zipfile.ZipFile(download.value.path()) as archive:
        names = archive.namelist()
        assert names == [f"photo{i}.imagemesh.png" for i in range(3)]
        assert archive.testzip() is None
        sizes = [Image.open(io.BytesIO(archive.read(n))).size for n in names]
    assert sizes == [(128 * 2 * 4, 96 * (2 + i) * 4) for i in range(3)]
    assert page.errors == [] and page.elsewhere == []
    page.close()


def test_compare_background_removal_models_and_pick_one(browser, gateway, photo_file):
    page = open_page(browser, gateway.url)
    page.set_input_files("#file", str(photo_file))
    page.check(".compare-model[value=keyer]")
    page.check(".compare-model[value=mediapipe-selfie]")
    page.click("#compare")
    page.wait_for_selector(".candidate >> nth=1", timeout=60_000)
    assert page.locator(".candidate").count() == 2
    page.wait_for_function("!document.querySelector('#compare').disabled")
    page.click("#compare")  # the same image and models again: answered from the cache, and labelled so
    page.wait_for_selector(".candidate .badge", timeout=60_000)
    assert page.locator(".candidate .badge").first.inner_text() == "cached"
    page.locator(".candidate", has_text="mediapipe-selfie").locator("button").click()
    page.wait_for_selector(".candidate.chosen")
    assert "mediapipe-selfie (chosen)" in page.inner_text("#result-info")
    assert page.errors == [] and page.elsewhere == []
    page.close()


def test_the_api_docs_load_with_nothing_from_another_host(browser, gateway):
    page = open_page(browser, gateway.url)
    page.goto(gateway.url + "/docs")
    page.wait_for_selector(".swagger-ui .info", timeout=30_000)
    assert "imagemesh" in page.inner_text(".swagger-ui .info")
    assert page.errors == [] and page.elsewhere == []
    page.close()


def test_token_field_when_auth_is_on(browser, tmp_path_factory, mesh, mesh_ports, photo_file):
    secured = start_gateway(tmp_path_factory, mesh_ports, API_TOKENS="web-token")
    try:
        page = open_page(browser, secured.url)
        assert page.is_visible("#token")
        page.set_input_files("#file", str(photo_file))
        page.select_option("#up-model", "lanczos")
        page.click("#run")
        page.wait_for_selector(".item.failed")
        assert "Bearer" in page.inner_text(".item .meta")
        page.fill("#token", "web-token")
        page.click("#run")
        page.wait_for_selector("#result:not([hidden])", timeout=60_000)
        page.close()
    finally:
        secured.stop()
