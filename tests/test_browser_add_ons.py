"""The VAE picker in a real browser (Chromium driven by Playwright, as tests/test_browser.py does): opening the
dropdown lists the models folders' VAEs, picking one and generating puts it in the PNG's metadata."""

from __future__ import annotations

import io
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from PIL import Image

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="/usr/bin/chromium is not installed (apt-get install chromium)"
)

sync_api = pytest.importorskip("playwright.sync_api")
pytest.importorskip("gradio")

from test_browser import (
    CHROMIUM_FLAGS,
    TIMEOUT_MS,
    fetch,
    gallery_image_url,
    set_number,
)
from test_vae import write_ldm_vae
from tiny_models import _vae

from studio import Settings, Studio
from studio.metadata import read_record
from studio.server import free_port


@pytest.fixture(scope="module")
def served(sd15_folder, tmp_path_factory):
    from studio.ui import build_app, launch

    models = tmp_path_factory.mktemp("models-dir")
    write_ldm_vae(models / "VAE" / "other.safetensors", _vae(seed=5))
    settings = Settings(
        model=str(sd15_folder), models_dirs=(models,), outputs_dir=tmp_path_factory.mktemp("out"), port=free_port()
    )
    demo = build_app(Studio(settings), settings)
    _, url, _ = launch(demo, settings, block=False, quiet=True)
    yield url
    demo.close()


@pytest.fixture
def page(served):
    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            tempfile.mkdtemp(prefix="studio-chromium-"),
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_FLAGS,
            viewport={"width": 1400, "height": 1000},
        )
        local = urlsplit(served).netloc
        foreign = []

        def only_local(route):
            if urlsplit(route.request.url).netloc == local or route.request.url.startswith(("data:", "blob:")):
                return route.continue_()
            foreign.append(route.request.url)
            return route.abort()

        context.route("**/*", only_local)
        context.set_default_timeout(TIMEOUT_MS)
        page = context.new_page()
        page.goto(served)
        page.wait_for_selector("#text_to_image-run")
        yield page
        context.close()
        assert foreign == [], "the page tried to reach another server"


def test_pick_a_vae_in_the_dropdown_and_generate(page, tmp_path):
    page.locator("#text_to_image-prompt textarea").fill("a red circle")
    set_number(page, "text_to_image-seed", 7)
    set_number(page, "text_to_image-num_inference_steps", 2)
    picker = page.locator("#text_to_image-vae input").first
    assert picker.input_value() == "Automatic"
    picker.click()  # opening it reads the models folders
    page.locator("#text_to_image-vae li", has_text="other.safetensors").first.click()
    page.wait_for_function("document.querySelector('#text_to_image-vae input').value === 'other.safetensors'")
    page.locator("#text_to_image-run").click()
    url = gallery_image_url(page, "text_to_image-gallery", "text_to_image-status", tmp_path)
    data = fetch(page, url)
    with Image.open(io.BytesIO(data)) as image:
        assert "VAE: other.safetensors" in image.text["parameters"]
    path = tmp_path / "download.png"
    path.write_bytes(data)
    vae = read_record(path).request.vae
    assert vae.name_or_path == "other.safetensors" and len(vae.hash) == 10
