"""Screenshots of every tab of the UI on the embedded model, after a run: docs/screenshots/<tab>.png.

    python docs/make_screenshots.py          # needs Debian's chromium (/usr/bin/chromium) and playwright
    python docs/make_screenshots.py --only inpaint,sketch_to_image   # those tabs' screenshots again

Serves the app in-process on a free port, drives it with Playwright as a user would (the inputs are
toy-world scenes drawn by studio.demo.world), and writes one full-page screenshot per tab.
"""

from __future__ import annotations

import argparse
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
    "style_transfer": ("", {"image": "scene", "reference_image": "reference"}),  # the style image's fill
    "imagic": ("a large blue circle on the left on a white background", {"image": "scene"}),
}


MASK_BOX = (36, 18, 60, 44)  # inpaint: an empty place right of the scene's circle, a triangle's size


def inputs(folder: Path) -> dict[str, Path]:
    scene = world.scene_from_prompt(SCENE, random.Random(0))
    paths = {name: folder / f"{name}.png" for name in ("scene", "sketch", "reference")}
    world.render(scene, 64).save(paths["scene"])
    reference = world.scene_from_prompt("a small striped blue square on the right on a white background", random.Random(2))
    world.render(reference, 64).save(paths["reference"])
    world.render_sketch(world.scene_from_prompt("a green square on the right", random.Random(1)), 64).save(paths["sketch"])
    return paths


def upload(page, widget: str, path: Path) -> None:
    """Into the widget's file input. An image editor takes a moment to hold it: a Run clicked before that
    sends its old value (a sketch editor's blank canvas), which the tab refuses; main() then uploads again."""
    page.locator(f"#{widget}").locator("input[type=file]").first.set_input_files(str(path))
    page.wait_for_timeout(3000)


def paint_box(page, widget: str, box: tuple[int, int, int, int], side: int = 64) -> None:
    """Fill `box` (x0, y0, x1, y1 in the image's pixels) of an image editor with brush strokes: the
    inpainting mask, where the new object goes (an empty place, as EditEval's masks are)."""
    editor = page.locator(f"#{widget}")
    brush = editor.get_by_role("button", name="Brush", exact=True)
    if "highlight" not in (brush.get_attribute("class") or ""):
        brush.click()
    canvas = editor.locator("canvas").last.bounding_box()
    shown = min(canvas["width"], canvas["height"])  # the image is fitted, centred, into the canvas
    left = canvas["x"] + (canvas["width"] - shown) / 2
    top = canvas["y"] + (canvas["height"] - shown) / 2
    scale = shown / side
    x0, y0, x1, y1 = box
    for y in range(y0 + 2, y1 - 1, 3):
        page.mouse.move(left + (x0 + 2) * scale, top + y * scale)
        page.mouse.down()
        for x in range(x0 + 2, x1 - 1, 2):
            page.mouse.move(left + x * scale, top + y * scale)
        page.mouse.up()


def click_run(page, task: str) -> bool:
    """Click Run; False when the tab refuses the click (an editor that does not hold its upload yet)."""
    page.locator(f"#{task}-run").click()
    page.wait_for_function(
        f"document.querySelector('#{task}-status').innerText.trim() !== ''"  # queued, running or done
        " || [...document.querySelectorAll('.toast-body')].some((t) => t.innerText.includes('first'))"
    )
    refused = page.locator(".toast-body").filter(has_text="first")
    if not refused.count():
        return True
    for close in page.locator(".toast-close").all():
        close.click()
    return False


def wait_saved(page, task: str) -> str:
    page.wait_for_function(f"document.querySelector('#{task}-status').innerText.match(/Saved|error|Error|needs/)")
    page.wait_for_timeout(1500)
    return page.locator(f"#{task}-status").inner_text()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help="comma-separated tab ids (default: every tab)")
    only = {name for name in parser.parse_args(argv).only.split(",") if name}
    OUT.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp())
    images = inputs(folder)
    settings = Settings(outputs_dir=folder / "outputs", port=free_port())
    demo = build_app(Studio(settings), settings)
    _, url, _ = launch(demo, settings, block=False, quiet=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(1_200_000)  # Imagic at its 150 + 150 training steps on a busy CPU: minutes
        page.goto(url)
        for task, (prompt, uploads) in RUNS.items():
            if only and task not in only:
                continue
            page.get_by_role("tab", name=next(spec.title for spec in demo.studio_ui.tasks if spec.name == task)).click()
            page.wait_for_timeout(2000)  # an editor set up after this would drop an upload made earlier
            page.locator(f"#{task}-prompt textarea").fill(prompt)
            for _ in range(5):
                for field, name in uploads.items():
                    upload(page, f"{task}-{field}", images[name])
                if task == "inpaint":
                    paint_box(page, "inpaint-image", MASK_BOX)
                if click_run(page, task):
                    break
            status = wait_saved(page, task)
            page.screenshot(path=str(OUT / f"{task}.png"), full_page=True)
            print(f"{task}: {' '.join(status.split())}", flush=True)
        for tab, name in (("Batch", "batch"), ("PNG info", "png_info"), ("Models and settings", "models")):
            if only and name not in only:
                continue
            page.get_by_role("tab", name=tab).click()
            page.wait_for_timeout(1000)
            page.screenshot(path=str(OUT / f"{name}.png"), full_page=True)
        browser.close()
    demo.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
