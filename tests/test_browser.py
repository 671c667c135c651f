"""The web UI in a real browser: Chromium (Debian's /usr/bin/chromium) driven by Playwright.

Generates an image on the text tab, paints a mask with the mouse on the inpaint tab and runs
it, and checks what the page shows and what the files hold: the result appears, its PNG keeps
the studio's metadata, and every pixel outside the painted stroke is the uploaded image's.
Screenshots go to a temp folder (STUDIO_SCREENSHOTS names another, e.g. docs/screenshots).
The page may reach only the studio's own server; any other request fails the test.
"""

from __future__ import annotations

import io
import os
import re
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
from PIL import Image

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="/usr/bin/chromium is not installed (apt-get install chromium)"
)

sync_api = pytest.importorskip("playwright.sync_api")
pytest.importorskip("gradio")

from studio.metadata import read_record  # noqa: E402
from studio.server import free_port  # noqa: E402

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",  # without these, Chromium's own calls home are refused by a closed network
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 180_000  # a render on two busy CPU cores


@pytest.fixture(scope="module")
def served(studio):
    from studio.ui import build_app, launch

    settings = studio.settings.with_(port=free_port())
    demo = build_app(studio, settings)
    demo.studio_ui.first_preview_seconds = 0.0  # previews from the first step: the tiny model renders in less
    _, url, _ = launch(demo, settings, block=False, quiet=True)
    yield url
    demo.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = os.environ.get("STUDIO_SCREENSHOTS")
    path = Path(folder) if folder else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def browser_context(served):
    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            tempfile.mkdtemp(prefix="studio-chromium-"),  # a fresh profile
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_FLAGS,
            viewport={"width": 1400, "height": 1000},
        )
        context.foreign_requests = []
        local = urlsplit(served).netloc

        def only_local(route):
            if urlsplit(route.request.url).netloc == local or route.request.url.startswith(("data:", "blob:")):
                return route.continue_()
            context.foreign_requests.append(route.request.url)
            return route.abort()

        context.route("**/*", only_local)
        context.set_default_timeout(TIMEOUT_MS)
        yield context
        context.close()


@pytest.fixture
def page(browser_context, served):
    page = browser_context.new_page()
    page.goto(served)
    page.wait_for_selector("#text_to_image-run")
    yield page
    page.close()
    assert browser_context.foreign_requests == [], "the page tried to reach another server"


def set_number(page, elem_id: str, value) -> None:
    """Type into a number box (or a slider's box) until the page holds the value."""
    box = page.locator(f"#{elem_id} input[type=number]").first
    box.wait_for(state="visible")
    for _ in range(20):
        box.fill(str(value))
        box.press("Enter")
        page.wait_for_timeout(150)
        if box.input_value() == str(value):
            return
    raise AssertionError(f"#{elem_id} did not take the value {value}")


def fetch(page, url: str) -> bytes:
    response = page.request.get(url)
    assert response.ok, (url, response.status)
    return response.body()


def gallery_image_url(page, gallery_id: str, status_id: str, shots: Path) -> str:
    """The first result image's URL, once the run is saved (live previews show before it);
    an error toast or a timeout fails with what the page says."""
    image = page.locator(f"#{gallery_id} img").first
    status = page.locator(f"#{status_id}")
    deadline = TIMEOUT_MS / 1000
    waited = 0.0
    while not (image.is_visible() and "Saved" in status.inner_text()):
        errors = page.locator(".toast-body").all_inner_texts()
        if errors or waited > deadline:
            page.screenshot(path=str(shots / f"{gallery_id}-failed.png"), full_page=True)
            text = status.inner_text()
            raise AssertionError(f"no result after {waited:.0f} s; status {text!r}; messages {errors}")
        page.wait_for_timeout(250)
        waited += 0.25
    return image.get_attribute("src")


def test_generate_on_the_text_tab(page, shots):
    page.locator("#text_to_image-prompt textarea").fill("a large red circle")
    set_number(page, "text_to_image-seed", 7)
    set_number(page, "text_to_image-num_inference_steps", 2)
    page.locator("#text_to_image-run").click()
    url = gallery_image_url(page, "text_to_image-gallery", "text_to_image-status", shots)
    page.wait_for_function(
        "document.querySelector('#text_to_image-seed-used textarea, #text_to_image-seed-used input').value === '7'"
    )
    assert "Saved 1 image" in page.locator("#text_to_image-status").inner_text()
    page.locator("#history img").first.wait_for(state="visible")  # the session history shows it too
    page.screenshot(path=str(shots / "text_to_image.png"), full_page=True)

    # What the browser downloads is the studio's PNG, metadata intact.
    data = fetch(page, url)
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG" and image.size == (64, 64)
        assert "studio" in image.text and "a large red circle" in image.text["parameters"]
    path = Path(tempfile.mkdtemp()) / "download.png"
    path.write_bytes(data)
    record = read_record(path)
    assert record.request.prompt == "a large red circle" and record.seed == 7


def test_inpaint_a_mask_painted_with_the_mouse(page, shots, tmp_path):
    # A 128x128 scene: grey, a blue block on the left. The stroke goes on the right half.
    size = 128
    scene = Image.new("RGB", (size, size), (128, 128, 128))
    scene.paste((40, 90, 225), (15, 40, 55, 90))
    scene_path = tmp_path / "scene.png"
    scene.save(scene_path)

    page.get_by_role("tab", name="Inpaint").click()
    editor = page.locator("#inpaint-image")
    upload = editor.get_by_role("button", name="Upload").first
    upload.wait_for(state="visible")  # the editor has mounted
    zoom = editor.get_by_text("%", exact=False).first
    before = zoom.inner_text()
    with page.expect_file_chooser() as chooser:
        upload.click()
    chooser.value.set_files(str(scene_path))
    # The editor fits the canvas to the uploaded image: its zoom changes once the image is drawn.
    page.wait_for_function("([element, before]) => element.innerText !== before", arg=[zoom.element_handle(), before])
    page.wait_for_timeout(500)
    brush = editor.get_by_role("button", name="Brush", exact=True)
    if "highlight" not in (brush.get_attribute("class") or ""):
        brush.click()
    canvas = editor.locator("canvas").last
    box = canvas.bounding_box()
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(cx + 60, cy - 70)
    page.mouse.down()
    for step in range(1, 21):
        page.mouse.move(cx + 60 + step * 5, cy - 70 + step * 7)
    page.mouse.up()
    page.screenshot(path=str(shots / "inpaint_painted.png"))

    page.locator("#inpaint-prompt textarea").fill("a red circle")
    page.locator("#inpaint-settings").get_by_text("Settings").first.click()
    set_number(page, "inpaint-seed", 3)
    set_number(page, "inpaint-num_inference_steps", 2)
    set_number(page, "inpaint-mask_blur", 0)
    page.locator("#inpaint-run").click()
    url = gallery_image_url(page, "inpaint-gallery", "inpaint-status", shots)
    page.screenshot(path=str(shots / "inpaint.png"), full_page=True)

    result_path = tmp_path / "result.png"
    result_path.write_bytes(fetch(page, url))
    record = read_record(result_path)
    assert record.request.task == "inpaint" and record.request.mask_blur == 0
    mask = np.asarray(Image.open(record.request.mask_image).convert("L")) > 127
    ys, xs = np.nonzero(mask)
    assert len(xs) > 50, "the stroke did not reach the mask"
    assert xs.min() >= size // 2 - 8, "the stroke was painted on the right half"
    margin = 4
    outside = np.ones(mask.shape, bool)
    outside[max(ys.min() - margin, 0) : ys.max() + margin + 1, max(xs.min() - margin, 0) : xs.max() + margin + 1] = (
        False
    )
    result = np.asarray(Image.open(result_path).convert("RGB"), dtype=np.int16)
    original = np.asarray(scene, dtype=np.int16)
    assert result.shape == original.shape
    assert np.abs(result[outside] - original[outside]).max() == 0, "pixels outside the painted stroke changed"
    assert np.abs(result[~outside] - original[~outside]).mean() > 1.0, "nothing was repainted"


def test_cancel_stops_a_running_render(page, shots):
    page.locator("#text_to_image-prompt textarea").fill("a slow one")
    set_number(page, "text_to_image-num_inference_steps", 400)
    set_number(page, "text_to_image-width", 256)
    set_number(page, "text_to_image-height", 256)
    page.locator("#text_to_image-run").click()
    page.get_by_text("sampling").first.wait_for()  # the progress bar is up: the render is running
    page.locator("#text_to_image-gallery img").first.wait_for()  # a live preview of the latents
    page.screenshot(path=str(shots / "progress.png"))
    page.locator("#text_to_image-cancel").click()
    page.wait_for_function(
        "document.querySelector('#text_to_image-status').innerText.trim() === 'Cancelled.'", timeout=60_000
    )
    assert page.locator("#text_to_image-gallery img").count() == 0  # the preview goes: nothing was finished

    # The next run clears the stale "Cancelled." at once.
    set_number(page, "text_to_image-num_inference_steps", 2)
    set_number(page, "text_to_image-width", 64)
    set_number(page, "text_to_image-height", 64)
    page.locator("#text_to_image-run").click()
    page.wait_for_function(
        "!document.querySelector('#text_to_image-status').innerText.includes('Cancelled')", timeout=5_000
    )
    page.wait_for_function("document.querySelector('#text_to_image-status').innerText.includes('Saved')")


def test_a_missing_image_is_refused_at_the_click(page):
    page.get_by_role("tab", name="Imagic").click()
    page.locator("#imagic-prompt textarea").fill("a red circle")
    page.locator("#imagic-run").click()
    toast = page.locator(".toast-body")
    toast.first.wait_for(timeout=10_000)
    page.wait_for_timeout(1000)
    texts = toast.all_inner_texts()
    assert len(texts) == 1 and "add an image first" in texts[0], texts
    assert "Imagic" in texts[0]  # the message says which tab
    assert page.locator("#imagic-gallery img").count() == 0


def test_a_blank_sketch_is_refused_at_the_click(page):
    """The canvas starts white; that is no sketch (and a Run clicked while an upload is still on its way
    would send it): one message, nothing queued."""
    page.get_by_role("tab", name="Sketch to image").click()
    page.locator("#sketch_to_image-prompt textarea").fill("a green square")
    page.locator("#sketch_to_image-run").click()
    toast = page.locator(".toast-body")
    toast.first.wait_for(timeout=10_000)
    texts = toast.all_inner_texts()
    assert len(texts) == 1 and "Sketch to image: draw or upload a sketch first" in texts[0], texts
    assert page.locator("#sketch_to_image-gallery img").count() == 0


def test_png_info_sends_settings_to_their_tab(page, served, tmp_path, shots):
    from gradio_client import Client

    client = Client(served, verbose=False, download_files=str(tmp_path), analytics_enabled=False)
    gallery, _, _ = client.predict(
        prompt="a green triangle",
        negative_prompt="blur",
        seed=99,
        num_inference_steps=3,
        guidance_scale=5,
        api_name="/text_to_image",
    )
    page.get_by_role("tab", name="PNG info").click()
    drop = page.locator("#png-info-image")
    with page.expect_file_chooser() as chooser:
        drop.get_by_text("Drop Image Here").first.click()
    chooser.value.set_files(gallery[0]["image"])
    send = page.locator("#png-info-send:not([disabled])")
    send.wait_for()
    assert send.inner_text() == "Send to Text to image"
    page.screenshot(path=str(shots / "png_info.png"), full_page=True)
    send.click()
    page.wait_for_function("document.querySelector('#text_to_image-prompt textarea').value === 'a green triangle'")
    assert page.locator("#text_to_image-negative_prompt textarea").input_value() == "blur"
    assert page.locator("#text_to_image-seed input").first.input_value() == "99"
    assert page.locator("#text_to_image-num_inference_steps input[type=number]").first.input_value() == "3"


# Every 50 ms, the gallery's first image source ("" while it shows none), kept in window.__gallerySrcs.
SAMPLE_GALLERY = """(selector) => {
    window.__gallerySrcs = [];
    window.__gallerySampler = setInterval(() => {
        const image = document.querySelector(selector + ' img');
        window.__gallerySrcs.push(image && image.getAttribute('src') ? image.getAttribute('src') : '');
    }, 50);
}"""


def test_live_previews_never_blank_the_gallery(page, shots, studio):
    loaded_before = bool(studio.models.loaded_models())
    page.locator("#text_to_image-prompt textarea").fill("a blue square")
    set_number(page, "text_to_image-seed", 5)
    set_number(page, "text_to_image-num_inference_steps", 60)
    set_number(page, "text_to_image-width", 128)
    set_number(page, "text_to_image-height", 128)
    page.evaluate(SAMPLE_GALLERY, "#text_to_image-gallery")
    page.locator("#text_to_image-run").click()
    # The progress is shown on the status line, not over the gallery.
    page.locator("#text_to_image-status").get_by_text("sampling").first.wait_for()
    assert page.locator("#text_to_image-gallery .eta-bar, #text_to_image-gallery .progress-text").count() == 0
    if loaded_before:
        assert "first run" not in page.locator("#text_to_image-status").inner_text()
    gallery_image_url(page, "text_to_image-gallery", "text_to_image-status", shots)
    page.wait_for_timeout(300)
    sources = page.evaluate("() => { clearInterval(window.__gallerySampler); return window.__gallerySrcs; }")
    first = next((i for i, src in enumerate(sources) if src), None)
    assert first is not None, "no preview or result was shown"
    assert all(sources[first:]), "the gallery went blank between a preview and the next"
    assert len(set(sources[first:])) >= 2, "expected a preview, then the result"
    assert not page.locator("#text_to_image-status").inner_text().startswith("Cancelled")


def test_images_render_pixelated(page, shots):
    page.locator("#text_to_image-prompt textarea").fill("a red circle")
    set_number(page, "text_to_image-num_inference_steps", 2)
    page.locator("#text_to_image-run").click()
    gallery_image_url(page, "text_to_image-gallery", "text_to_image-status", shots)
    page.locator("#history img").first.wait_for(state="visible")
    for selector in ("#text_to_image-gallery img", "#history img"):
        style = page.locator(selector).first.evaluate("(image) => getComputedStyle(image).imageRendering")
        assert style == "pixelated", (selector, style)


def test_send_a_result_to_other_tabs(page, shots, tmp_path):
    page.locator("#text_to_image-prompt textarea").fill("a yellow triangle")
    set_number(page, "text_to_image-seed", 11)
    set_number(page, "text_to_image-num_inference_steps", 2)
    set_number(page, "text_to_image-batch_size", 2)
    page.locator("#text_to_image-run").click()
    gallery_image_url(page, "text_to_image-gallery", "text_to_image-status", shots)
    page.wait_for_function("document.querySelectorAll('#text_to_image-gallery img').length >= 2")
    second = page.locator("#text_to_image-gallery img").nth(1)
    second_url = second.get_attribute("src")
    second.click()  # picks the second result
    page.wait_for_timeout(500)
    page.locator("#text_to_image-send-imagic").click()
    sent = page.locator("#imagic-image img").first
    sent.wait_for(state="visible")
    assert page.locator("#imagic-run").is_visible()  # the Imagic tab is open
    style = sent.evaluate("(image) => getComputedStyle(image).imageRendering")
    assert style == "pixelated"
    page.screenshot(path=str(shots / "send_to_imagic.png"), full_page=True)
    with Image.open(io.BytesIO(fetch(page, sent.get_attribute("src")))) as got:
        got_pixels = np.asarray(got.convert("RGB"))
    with Image.open(io.BytesIO(fetch(page, second_url))) as result:
        assert np.array_equal(got_pixels, np.asarray(result.convert("RGB"))), "not the picked result's pixels"

    # The result's settings go back to Text to image.
    page.get_by_role("tab", name="Text to image").click()
    page.locator("#text_to_image-prompt textarea").fill("something else")
    page.locator("#text_to_image-send-text_to_image").click()
    page.wait_for_function("document.querySelector('#text_to_image-prompt textarea').value === 'a yellow triangle'")

    # Into an editor: Inpaint's image to paint on.
    page.locator("#text_to_image-send-inpaint").click()
    editor = page.locator("#inpaint-image")
    editor.get_by_role("button", name="Upload").first.wait_for(state="visible")  # the editor has mounted
    editor.get_by_text("Upload an image").wait_for(state="detached")  # it shows the sent image instead
    page.screenshot(path=str(shots / "send_to_inpaint.png"), full_page=True)


def test_history_survives_a_reload_newest_first(page, shots):
    page.locator("#text_to_image-prompt textarea").fill("a small blue square")
    set_number(page, "text_to_image-seed", 31)
    set_number(page, "text_to_image-num_inference_steps", 1)
    page.locator("#text_to_image-run").click()
    gallery_image_url(page, "text_to_image-gallery", "text_to_image-status", shots)
    name = re.search(r"([\w.-]+\.png)", page.locator("#text_to_image-status").inner_text()).group(1)

    page.reload()
    page.wait_for_selector("#text_to_image-run")
    first = page.locator("#history img").first
    first.wait_for(state="visible")
    assert name in (first.get_attribute("src") or ""), "the newest image should lead the reloaded history"
    assert page.locator("#history").get_by_text("generate · seed 31").count() >= 1
    page.screenshot(path=str(shots / "history_after_reload.png"), full_page=True)


def _model_copy(source: Path, folder: Path, recommended: dict) -> Path:
    import json
    import shutil

    shutil.copytree(source, folder)
    (folder / "studio.json").write_text(json.dumps(recommended))
    return folder


def test_the_tabs_follow_a_new_models_recommendations(browser_context, sd15_folder, tmp_path, shots):
    """Two models with their own studio.json: after Apply in the models tab, the task tabs show the second's
    steps, CFG, sampler, size and Imagic settings, except a value the user set; a reloaded page shows them too."""
    from studio import Settings
    from studio.ui import build_app, launch

    models = tmp_path / "models"
    first = _model_copy(sd15_folder, models / "alpha", {"defaults": {"num_inference_steps": 11, "guidance_scale": 3.0},
                                                         "tasks": {"imagic": {"eta": 1.1, "embedding_steps": 40}}})
    second = _model_copy(sd15_folder, models / "beta", {
        "defaults": {"num_inference_steps": 17, "guidance_scale": 4.5, "scheduler": "euler_a", "width": 96},
        "tasks": {"imagic": {"eta": 1.4, "embedding_steps": 60, "finetune_steps": 30}},
    })
    settings = Settings(model=str(first), models_dirs=(models,), outputs_dir=tmp_path / "outputs", port=free_port())
    demo = build_app(None, settings)  # nothing is loaded: swapping the model only names another
    _, url, _ = launch(demo, settings, block=False, quiet=True)
    browser_context.route(f"{url.rstrip('/')}/**", lambda route: route.continue_())  # this app is local too
    page = browser_context.new_page()
    try:
        page.goto(url)
        page.wait_for_selector("#text_to_image-run")

        page.set_default_timeout(20_000)

        def number(elem_id: str) -> str:
            box = page.locator(f"#{elem_id} input[type=number]").first
            if not box.is_visible():  # in a closed accordion: "Settings" or "Task options"
                task, name = elem_id.split("-", 1)
                common = name in ("num_inference_steps", "guidance_scale", "width", "height", "scheduler")
                page.locator(f"#{task}-{'settings' if common else 'options'} .label-wrap").first.click()
            return box.input_value()

        def open_tab(name: str) -> None:
            page.get_by_role("tab", name=name).click()

        assert (number("text_to_image-num_inference_steps"), number("text_to_image-guidance_scale")) == ("11", "3")
        open_tab("Sketch to image")
        number("sketch_to_image-guidance_scale")  # opens its accordion
        set_number(page, "sketch_to_image-guidance_scale", 8)  # the user's own value: kept through the swap
        open_tab("Models and settings")
        model = page.locator("input[aria-label='model']")
        model.fill(str(second))
        model.press("Enter")
        page.get_by_role("button", name="Apply").click()
        page.locator("#models-status").get_by_text(str(second)).first.wait_for()
        open_tab("Text to image")
        page.wait_for_function(
            "document.querySelector('#text_to_image-num_inference_steps input[type=number]').value === '17'"
        )

        def check_second_models_values():
            open_tab("Text to image")
            assert number("text_to_image-guidance_scale") == "4.5"
            assert number("text_to_image-width") == "96"
            assert page.locator("#text_to_image-scheduler input").first.input_value() == "euler_a"
            open_tab("Imagic")
            assert (number("imagic-eta"), number("imagic-embedding_steps"), number("imagic-finetune_steps")) == (
                "1.4", "60", "30")
            assert number("imagic-num_inference_steps") == "17"

        check_second_models_values()
        open_tab("Sketch to image")
        assert number("sketch_to_image-guidance_scale") == "8"
        assert number("sketch_to_image-num_inference_steps") == "17"
        page.screenshot(path=str(shots / "recommendations_after_swap.png"), full_page=True)

        page.reload()  # a page loaded after the swap starts at the new model's values
        page.wait_for_selector("#text_to_image-run")
        page.wait_for_function(
            "document.querySelector('#text_to_image-num_inference_steps input[type=number]').value === '17'"
        )
        check_second_models_values()
        open_tab("Sketch to image")
        assert number("sketch_to_image-guidance_scale") == "4.5"
    finally:
        page.close()
        browser_context.unroute(f"{url.rstrip('/')}/**")
        demo.close()


def test_imagic_says_its_time_and_reuses_its_fine_tune(page, shots, tmp_path):
    scene = Image.new("RGB", (64, 64), (128, 128, 128))
    scene.paste((220, 30, 30), (16, 16, 40, 40))
    scene.save(tmp_path / "scene.png")
    page.set_default_timeout(60_000)
    page.get_by_role("tab", name="Imagic").click()
    estimate = page.locator("#imagic-estimate")
    assert "comes with the first run" in estimate.inner_text()  # this server has not timed Imagic yet
    with page.expect_file_chooser() as chooser:
        page.locator("#imagic-image").get_by_text("Drop Image Here").first.click()
    chooser.value.set_files(str(tmp_path / "scene.png"))
    page.locator("#imagic-prompt textarea").fill("a blue square")
    page.locator("#imagic-settings .label-wrap").first.click()
    assert page.locator("#imagic-seed input[type=number]").first.input_value() == "-1"  # a random seed each run
    set_number(page, "imagic-num_inference_steps", 2)
    page.locator("#imagic-options .label-wrap").first.click()
    set_number(page, "imagic-embedding_steps", 12)
    set_number(page, "imagic-finetune_steps", 6)

    def run() -> str:
        before = re.findall(r"[\w.-]+\.png", page.locator("#imagic-status").inner_text())
        page.locator("#imagic-run").click()
        page.wait_for_function(
            "(before) => { const s = document.querySelector('#imagic-status').innerText;"
            " return /Saved.*\\.png/.test(s) && !before.some((name) => s.includes(name)); }",
            arg=before,
        )
        return page.locator("#imagic-status").inner_text()

    first = run()
    assert "reused the fine-tune" not in first
    page.wait_for_function("document.querySelector('#imagic-estimate').innerText.includes('about')")
    assert re.search(r"Time: about \d+ s on this machine", estimate.inner_text())
    second = run()
    assert "reused the fine-tune of an earlier run" in second, second
    page.screenshot(path=str(shots / "imagic_reused.png"), full_page=True)
