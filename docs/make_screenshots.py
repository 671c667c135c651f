"""Screenshots of every tab of the UI on the embedded model, after a run: docs/screenshots/<tab>.png.

    python docs/make_screenshots.py          # needs Debian's chromium (/usr/bin/chromium) and playwright

Serves the app in-process on a free port, drives it with Playwright as a user would (the inputs are
toy-world scenes drawn by studio.demo.world), and writes one full-page screenshot per tab.
"""

from __future__ import annotations

import random
import sys
import tempfile
from pathlib import Path

from playwright.sync_api import sync_playwright

from studio import Settings, Studio
from studio.demo import world
from studio.server import free_port
from studio.ui import build_app, launch

OUT = Path(__file__).resolve().parent / "screenshots"
SCENE = "a large red circle on the left on a white background"
RUNS = {  # tab id -> (prompt, {image widget id: input image name})
    "text_to_image": ("a blue square above a yellow triangle on a black background", {}),
    "sketch_to_image": ("a green square on the right", {"control_image": "sketch"}),
    "inpaint": ("a yellow triangle", {"image": "scene"}),  # the mask is painted with the brush
    "style_transfer": ("a large red circle on the left, striped", {"image": "scene"}),
    "imagic": ("a large blue circle on the left on a white background", {"image": "scene"}),
}


def inputs(folder: Path) -> dict[str, Path]:
    scene = world.scene_from_prompt(SCENE, random.Random(0))
    paths = {name: folder / f"{name}.png" for name in ("scene", "sketch")}
    world.render(scene, 64).save(paths["scene"])
    world.render_sketch(world.scene_from_prompt("a green square on the right", random.Random(1)), 64).save(paths["sketch"])
    return paths


def upload(page, widget: str, path: Path) -> None:
    """Into an image editor through its Upload button, else into the widget's file input."""
    editor = page.locator(f"#{widget}")
    button = editor.get_by_role("button", name="Upload")
    if button.count():
        with page.expect_file_chooser() as chooser:
            button.first.click()
        chooser.value.set_files(str(path))
    else:
        editor.locator("input[type=file]").first.set_input_files(str(path))
    page.wait_for_timeout(1500)


def paint_stroke(page, widget: str) -> None:
    """A brush stroke across the middle of an image editor's canvas (the inpainting mask)."""
    editor = page.locator(f"#{widget}")
    brush = editor.get_by_role("button", name="Brush", exact=True)
    if "highlight" not in (brush.get_attribute("class") or ""):
        brush.click()
    box = editor.locator("canvas").last.bounding_box()
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(cx - 60, cy - 40)
    page.mouse.down()
    for step in range(1, 21):
        page.mouse.move(cx - 60 + step * 4, cy - 40 + step * 4)
    page.mouse.up()


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp())
    images = inputs(folder)
    settings = Settings(outputs_dir=folder / "outputs", port=free_port())
    demo = build_app(Studio(settings), settings)
    _, url, _ = launch(demo, settings, block=False, quiet=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(300_000)
        page.goto(url)
        for task, (prompt, uploads) in RUNS.items():
            page.get_by_role("tab", name=next(spec.title for spec in demo.studio_ui.tasks if spec.name == task)).click()
            page.locator(f"#{task}-prompt textarea").fill(prompt)
            for field, name in uploads.items():
                upload(page, f"{task}-{field}", images[name])
            if task == "inpaint":
                paint_stroke(page, "inpaint-image")
            page.locator(f"#{task}-run").click()
            page.wait_for_function(
                f"document.querySelector('#{task}-status').innerText.match(/Saved|error|Error|needs/)"
            )
            page.wait_for_timeout(1500)
            page.screenshot(path=str(OUT / f"{task}.png"), full_page=True)
            print(f"{task}: {page.locator(f'#{task}-status').inner_text().splitlines()[0]}", flush=True)
        for tab, name in (("Batch", "batch"), ("PNG info", "png_info"), ("Models and settings", "models")):
            page.get_by_role("tab", name=tab).click()
            page.wait_for_timeout(1000)
            page.screenshot(path=str(OUT / f"{name}.png"), full_page=True)
        browser.close()
    demo.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
