"""The web page of `ctrlnet serve` in headless Chromium (Debian's, driven by Playwright): upload an
image, preview canny, generate, see the result. `make test` installs chromium when it can (root +
apt); elsewhere this test is skipped, unless CTRLNET_REQUIRE_BROWSER=1 (CI) makes that a failure."""

import contextlib
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from servekit import decode_data_url, png

ROOT = Path(__file__).resolve().parents[2]
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]
HANG_MS = 600_000  # waits end when the page gets there; this only bounds a hang, it is no speed expectation


def chromium_path() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path:
        return path
    if os.environ.get("CTRLNET_REQUIRE_BROWSER") == "1":
        pytest.fail("chromium is not installed; `make test` installs it with apt-get (needs root)")
    pytest.skip("chromium is not installed (make test installs it with apt-get when run as root)")


@contextlib.contextmanager
def served_page(url: str):
    """(page, errors): headless Chromium on ``url`` once the page is ready; ``errors`` collects the page's
    uncaught JavaScript errors."""
    sync_api = pytest.importorskip("playwright.sync_api")
    executable = chromium_path()
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=FLAGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(HANG_MS)
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url + "/")
            page.wait_for_selector("body[data-ready='1']")
            yield page, errors
        finally:
            browser.close()


def test_page_upload_preview_generate(server, shapes_sample, tmp_path):
    sample, maps = shapes_sample
    photo = tmp_path / "photo.png"
    photo.write_bytes(png(maps["target"]))
    shot = tmp_path / "serve-page.png"
    with served_page(server.url) as (page, errors):
        unit = page.locator(".unit").first
        assert unit.locator(".unit-model").input_value() == "nano-canny"
        assert unit.locator(".unit-annotator").input_value() == "canny"  # the net's own annotator
        # an annotator that cannot run (the test server finds no detector weights) is listed,
        # greyed out, with the reason
        option = unit.locator(".unit-annotator option[value='softedge_hed']")
        assert option.is_disabled() and "unavailable" in option.inner_text()
        assert "ControlNetHED.pth" in option.get_attribute("title")
        unit.locator(".unit-image").set_input_files(str(photo))
        page.wait_for_selector(".unit-input:not([hidden])")
        unit.locator(".unit-preview").click()
        page.wait_for_selector(".unit-map:not([hidden])")
        detected = unit.locator(".unit-map").get_attribute("src")
        assert np.array_equal(np.asarray(decode_data_url(detected).convert("RGB")), maps["canny"])
        page.fill("#prompt", sample.prompt)
        page.fill("#steps", "4")
        page.click("#generate")
        page.wait_for_selector("#gallery .result-image")
        result = decode_data_url(page.locator("#gallery .result-image").first.get_attribute("src"))
        assert result.size == (128, 128) and "Steps: 4" in result.text["parameters"]
        assert "done in" in page.locator("#status").inner_text()
        assert not errors, errors
        page.screenshot(path=str(shot), full_page=True)
    keep = ROOT / "outputs" / "tests"
    keep.mkdir(parents=True, exist_ok=True)
    shutil.copy(shot, keep / shot.name)  # for a person to look at; outputs/ is not tracked
    assert shot.stat().st_size > 10_000


def test_page_offers_union_types_and_sends_the_chosen_one(shapes_sample, tmp_path):
    """A server offering a Union ControlNet (built here for the nano base): the page shows a Type menu
    with the net's types for it (and none for a classic net), and the generated image's parameters name
    the type chosen."""
    chromium_path()  # skipped (or failed under CI) before any work when there is no browser
    import torch
    from servekit import launch, stop
    from ctrlnet.base import load_base
    from ctrlnet.formats import save_controlnet
    from ctrlnet.models.union import ControlNetUnion
    torch.manual_seed(0)
    net = ControlNetUnion.from_unet(load_base("nano").unet, 8)
    save_controlnet(net, tmp_path / "union")
    weights = tmp_path / "no-weights"
    weights.mkdir()
    client = launch(["--controlnet", f"union={tmp_path / 'union'}"], tmp_path / "server.log", weights)
    sample, maps = shapes_sample
    edges = tmp_path / "edges.png"
    edges.write_bytes(png(maps["canny"]))
    try:
        with served_page(client.url) as (page, errors):
            unit = page.locator(".unit").first
            unit.locator(".unit-model").select_option("nano-canny")
            assert unit.locator(".unit-type-box").is_hidden()
            unit.locator(".unit-model").select_option("union")
            assert unit.locator(".unit-type-box").is_visible()
            assert unit.locator(".unit-type option").count() == 8
            unit.locator(".unit-type").select_option("depth")
            unit.locator(".unit-annotator").select_option("")
            unit.locator(".unit-image").set_input_files(str(edges))
            page.wait_for_selector(".unit-input:not([hidden])")
            page.fill("#prompt", sample.prompt)
            page.fill("#steps", "2")
            page.click("#generate")
            page.wait_for_selector("#gallery .result-image")
            result = decode_data_url(page.locator("#gallery .result-image").first.get_attribute("src"))
            assert "Type: depth" in result.text["parameters"] and "Model: union" in result.text["parameters"]
            assert not errors, errors
    finally:
        stop(client)
