"""EditEval: ShapesEval for the four editing tasks, on held-out toy-world scenes, from pixels alone.

Each task gets its own deterministic list of cases (`make_cases(task, n, seed)`; case i is the same
whatever n is), rendered through the studio's own API with requests that set only the prompt, the
input images and the seed, so that what is measured is what a user gets at the defaults (`overrides`
changes that, and the result says so). Every output is scored by the pixel detector of ShapesEval
(`studio.demo.shapes_eval`), never by a model; `score_<task>` returns one bool per sub-check plus
"success".

The tasks and what counts as success (thresholds are justified beside their constants):

* inpaint: the input is one object (at an asserted position); the mask is a box on an empty place
  (the new object's box plus MASK_MARGIN), kept clear of the object by the mask's feather; the
  prompt names a new object there ("a small blue square on the right on a white background").
  Success: a detection of the named shape and colour has its centre inside the mask, and every pixel
  farther than mask_blur (the request's default) outside the mask is byte-identical to the input,
  as the inpaint task guarantees.
* sketch: a held-out caption (`world.eval_scenes`) and its sketch (`world.render_sketch`). Success:
  each object of the scene is matched to its own detection of the same shape and colour whose
  silhouette overlaps the object's drawn silhouette (`world.render_masks`) with IoU >= SKETCH_MIN_IOU.
* style_prompt: a solid object on a plain background; the prompt is its caption with a fill word
  ("striped", "dotted", "outlined"); no method is named, so style_transfer's "auto" picks "prompt"
  (image-to-image at the default strength). Success: the detector reads the requested fill on the
  object, and its colour, shape, position word and size word are those of the input.
* style_reference: the same input plus a reference image (another object, of another shape and
  colour, with the wanted fill, on the same background) and an empty prompt ("auto" picks
  "reference"). Success: as for style_prompt.
* imagic: one solid object; the target prompt is its caption with another colour. Success: the
  detected colour is the new one, the shape is kept, the centre moved at most IMAGIC_MAX_SHIFT of the
  image side and the area changed by a factor within IMAGIC_AREA_RATIO.

Scenes come from held-out content only: every prompt a case sends parses (`world.parse_claims`) to
claims in the held-out bucket (`world.is_held_out`), and sketch scenes are `world.eval_scenes`.

    from studio import Studio
    from studio.demo.edit_eval import evaluate_edits
    report = evaluate_edits(Studio(), ["inpaint", "sketch"], n=20, seed=0)
"""

from __future__ import annotations

import itertools
import math
import random
import time
import zlib
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from studio.demo import shapes_eval, world
from studio.demo.shapes_eval import Detection
from studio.demo.world import Scene, ShapeObject

TASKS = ("inpaint", "sketch", "style_prompt", "style_reference", "imagic")
STUDIO_TASKS = {  # EditEval task -> the studio task that renders it
    "inpaint": "inpaint",
    "sketch": "sketch_to_image",
    "style_prompt": "style_transfer",
    "style_reference": "style_transfer",
    "imagic": "imagic",
}
SIZE = 64  # inputs are rendered at the embedded model's native size
SCENE_SEED = 1234  # the held-out scenes (world.eval_scenes' default seed)

# inpaint: the mask is the new object's bounding box plus this margin on every side (2 px at 64), so
# that a shape drawn a pixel too large is not clipped by the mask.
MASK_MARGIN = 0.03
# sketch: IoU of a detected silhouette with the drawn one. 0.5 is the usual detection threshold
# (PASCAL VOC), and here it separates the cases cleanly: a silhouette one pixel too thick all round
# (blur) keeps IoU ~0.78 for a small square, a circle drawn where a square was sketched ~0.79
# (the shape check catches that), while the wrong size at the right place gives (0.12/0.21)^2 = 0.33
# and a small object moved by a third of its width (5 px at 64) about 0.5.
SKETCH_MIN_IOU = 0.5
# imagic: "in place" = the centre moved at most 0.1 of the image side (6 px at 64: less than a small
# object's half extent, so the edited object still covers the original's centre; the world's
# position regions are at least 0.16 off-centre, so it also keeps the position word) ...
IMAGIC_MAX_SHIFT = 0.1
# ... and "same size" = area ratio within 0.6-1.6: the world's two sizes differ by (0.21/0.12)^2 =
# 3.1x in area, so a size flip always fails, while a blurred edge a pixel wider all round (area x1.28
# for a small square) passes.
IMAGIC_AREA_RATIO = (0.6, 1.6)
STYLE_FILLS = ("outline", "striped", "dotted")  # the fills a solid input can be restyled to


# --------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------


def describe(shape: str, color: str, size: str | None = None, fill: str | None = None, position: str | None = None) -> str:
    """A canonical noun phrase of the world's grammar: "a small striped blue square on the right"."""
    words = []
    if size:
        words.append(size)
    if fill and fill != "solid":
        words.append(world.FILL_ADJECTIVES[fill][0])
    words += [color, shape]
    if position:
        words += world.POSITION_PHRASES[position][0]
    return " ".join([world._article(words[0])] + words)


def caption(obj: ShapeObject, background: str, fill: str | None = None, color: str | None = None) -> str:
    """The caption of a one-object scene, its fill and colour optionally replaced; the background always said."""
    position = world.position_of(obj.cx, obj.cy)
    return f"{describe(obj.shape, color or obj.color, obj.size, fill, position)} on a {background} background"


def _held_out(prompt: str) -> bool:
    return world.is_held_out(world.parse_claims(prompt))


# --------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------


@dataclass
class EditCase:
    """One edit to render: the request's prompt and images, and what scoring needs."""

    task: str  # one of TASKS
    index: int
    prompt: str
    images: dict  # request image field -> PIL image
    scene: Scene  # the input's scene (sketch: the scene drawn)
    target: Scene  # what a perfect output shows (rendered by the world for the contact sheet and tests)
    info: dict = field(default_factory=dict)  # task specifics: mask, fill, color, ...


def _rng(task: str, seed: int) -> random.Random:
    return random.Random(zlib.crc32(f"edit_eval:{task}:{seed}".encode()))


def _background(rng: random.Random) -> str:
    return rng.choices(list(world.BACKGROUNDS), weights=(2, 1, 1))[0]


def _one_object(rng: random.Random, background: str, fill: str | None = None, exclude=()) -> ShapeObject:
    """A solid (or `fill`) object at an asserted position, of a shape and colour not in `exclude`."""
    shape = rng.choice([s for s in world.SHAPES if s not in exclude])
    color = rng.choice([c for c in world.COLORS if c not in exclude])
    claims = world.make_claims(
        [world.object_claim(shape, color, rng.choice(world.SIZES), fill, rng.choice(world.POSITIONS))], 1, None, background
    )
    return world.layout(claims, rng)[0]


def _scene(background: str, objects, text: str) -> Scene:
    claims = world.parse_claims(text) if text else {}
    return Scene(background, tuple(objects), text, world.kind_of(claims) if claims else "single", claims)


def default_mask_blur() -> int:
    """The inpaint request's default feather radius (what the studio uses when the user sets none)."""
    from studio_pipelines.inpaint import InpaintRequest

    return InpaintRequest.model_fields["mask_blur"].default


def box_mask(obj: ShapeObject, size: int = SIZE, margin: float = MASK_MARGIN) -> np.ndarray:
    """bool (size, size): the object's bounding box plus `margin`, in whole pixels."""
    x0 = max(0, math.floor((obj.cx - obj.radius - margin) * size))
    x1 = min(size, math.ceil((obj.cx + obj.radius + margin) * size))
    y0 = max(0, math.floor((obj.cy - obj.radius - margin) * size))
    y1 = min(size, math.ceil((obj.cy + obj.radius + margin) * size))
    mask = np.zeros((size, size), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


def grow(mask: np.ndarray, pixels: int) -> np.ndarray:
    """Chebyshev dilation by `pixels` (the inpaint task's feather reaches exactly this far)."""
    out = mask.copy()
    for _ in range(max(0, pixels)):
        padded = np.pad(out, 1)
        out = np.zeros_like(out)
        for dy in range(3):
            for dx in range(3):
                out |= padded[dy : dy + mask.shape[0], dx : dx + mask.shape[1]]
    return out


def _inpaint_case(rng: random.Random, index: int, blur: int) -> EditCase:
    while True:
        background = _background(rng)
        existing = _one_object(rng, background)
        new_position = rng.choice([p for p in world.POSITIONS if p != world.position_of(existing.cx, existing.cy)])
        new = {
            "shape": rng.choice(world.SHAPES),
            "color": rng.choice([c for c in world.COLORS if c != existing.color]),
            "size": rng.choice(world.SIZES),
            "position": new_position,
        }
        prompt = f"{describe(**new)} on a {background} background"
        if not _held_out(prompt):
            continue
        radius = world.SIZE_RADIUS[new["size"]]
        centres = world._candidate_centres(radius, new_position)
        # The mask, grown by the feather and one more pixel, must stay clear of the existing object's box.
        reach = radius + MASK_MARGIN + (blur + 2) / SIZE + existing.radius
        free = (np.abs(centres[:, 0] - existing.cx) >= reach) | (np.abs(centres[:, 1] - existing.cy) >= reach)
        centres = centres[free]
        if len(centres) == 0:
            continue
        cx, cy = centres[rng.randrange(len(centres))]
        added = ShapeObject(new["shape"], new["color"], new["size"], "solid", round(float(cx), 4), round(float(cy), 4), radius)
        mask = box_mask(added)
        if (grow(mask, blur + 1) & world.render_masks(_scene(background, [existing], ""), SIZE)[0]).any():
            continue  # (cannot happen with the reach above; kept as the rule's definition)
        source = _scene(background, [existing], caption(existing, background))
        target = Scene(background, (existing, added), prompt, "two", {})
        images = {"image": world.render(source, SIZE), "mask_image": Image.fromarray(mask.astype(np.uint8) * 255, "L")}
        info = {"mask": mask, "shape": new["shape"], "color": new["color"], "mask_blur": blur}
        return EditCase("inpaint", index, prompt, images, source, target, info)


def _style_case(rng: random.Random, index: int, task: str) -> EditCase:
    while True:
        background = _background(rng)
        fill = rng.choice(STYLE_FILLS)
        obj = _one_object(rng, background)
        prompt = caption(obj, background, fill=fill)
        if not _held_out(prompt):
            continue
        source = _scene(background, [obj], caption(obj, background))
        target = _scene(background, [ShapeObject(obj.shape, obj.color, obj.size, fill, obj.cx, obj.cy, obj.radius)], prompt)
        reference_obj = _one_object(rng, background, fill=fill, exclude=(obj.shape, obj.color))
        reference = _scene(background, [reference_obj], caption(reference_obj, background, fill=fill))
        images = {"image": world.render(source, SIZE)}
        if task == "style_reference":
            images["reference_image"] = world.render(reference, SIZE)
            prompt = ""
        info = {"fill": fill, "object": obj, "reference": reference}
        return EditCase(task, index, prompt, images, source, target, info)


def _imagic_case(rng: random.Random, index: int) -> EditCase:
    while True:
        background = _background(rng)
        obj = _one_object(rng, background)
        color = rng.choice([c for c in world.COLORS if c != obj.color])
        prompt = caption(obj, background, color=color)
        if not _held_out(prompt):
            continue
        source = _scene(background, [obj], caption(obj, background))
        target = _scene(background, [ShapeObject(obj.shape, color, obj.size, obj.fill, obj.cx, obj.cy, obj.radius)], prompt)
        info = {"color": color, "object": obj}
        return EditCase("imagic", index, prompt, {"image": world.render(source, SIZE)}, source, target, info)


def make_cases(task: str, n: int, seed: int = SCENE_SEED) -> list[EditCase]:
    """n cases of an EditEval task, deterministic in (task, seed); the first k are the same for any n >= k.

    style_prompt and style_reference share their inputs (the same objects and wanted fills).
    """
    if task not in TASKS:
        raise ValueError(f"unknown EditEval task {task!r}; choose from: {', '.join(TASKS)}")
    if task == "sketch":
        cases = []
        for index, scene in enumerate(world.eval_scenes(n, seed)):
            image = world.render_sketch(scene, SIZE)
            cases.append(EditCase("sketch", index, scene.caption, {"control_image": image}, scene, scene))
        return cases
    rng = _rng("style" if task.startswith("style") else task, seed)
    if task == "inpaint":
        blur = default_mask_blur()
        return [_inpaint_case(rng, i, blur) for i in range(n)]
    if task == "imagic":
        return [_imagic_case(rng, i) for i in range(n)]
    return [_style_case(rng, i, task) for i in range(n)]


# --------------------------------------------------------------------------
# Detection with silhouettes
# --------------------------------------------------------------------------

def detect_with_silhouettes(image) -> list[tuple[Detection, np.ndarray]]:
    """ShapesEval's detections, each with the filled silhouette it measured (bool, at its working size)."""
    return [(detection, detection.silhouette) for detection in shapes_eval.detect(image)]


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 0.0


def _nearest(detections: list[Detection], cx: float, cy: float) -> Detection | None:
    return min(detections, key=lambda d: (d.cx - cx) ** 2 + (d.cy - cy) ** 2, default=None)


def _rgb(image) -> Image.Image:
    return image.convert("RGB") if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image).astype(np.uint8))


# --------------------------------------------------------------------------
# Scorers: one bool per sub-check, plus "success"
# --------------------------------------------------------------------------


def score_inpaint(output, image, mask: np.ndarray, shape: str, color: str, mask_blur: int | None = None) -> dict[str, bool]:
    """Inpainting a named object into a masked empty place.

    object_in_mask: a detection of `shape` and `color` has its centre inside the mask.
    color_in_mask: a detection of `color` (any shape) has its centre inside the mask.
    outside_unchanged: every pixel farther than mask_blur (default: the request's) from the mask is
        byte-identical to the input's (the task's promise: only the feathered mask is repainted).
    success: object_in_mask and outside_unchanged.
    """
    blur = default_mask_blur() if mask_blur is None else mask_blur
    out = np.asarray(_rgb(output))
    src = np.asarray(_rgb(image))
    mask = np.asarray(mask, dtype=bool)
    if out.shape != src.shape:
        unchanged = False
        out = np.asarray(_rgb(output).resize((src.shape[1], src.shape[0]), Image.BOX))
    else:
        keep = ~grow(mask, blur)
        unchanged = bool(np.array_equal(out[keep], src[keep]))
    h, w = mask.shape

    def inside(d: Detection) -> bool:
        return bool(mask[min(h - 1, int(d.cy * h)), min(w - 1, int(d.cx * w))])

    detections = [d for d in shapes_eval.detect(out) if inside(d)]
    found = any(d.shape == shape and d.color == color for d in detections)
    result = {
        "object_in_mask": found,
        "color_in_mask": any(d.color == color for d in detections),
        "outside_unchanged": unchanged,
    }
    result["success"] = found and unchanged
    return result


def score_sketch(output, scene: Scene, min_iou: float = SKETCH_MIN_IOU) -> dict[str, bool]:
    """Sketch-to-image: the scene's objects, where and as large as the sketch drew them.

    objects: each object is matched by its own detection of the same shape and colour.
    silhouettes: each object is matched by its own detection whose silhouette has IoU >= min_iou with
        the object's drawn silhouette, whatever its shape and colour (the layout follows the drawing).
    success: one matching does both (same shape and colour, and IoU >= min_iou).
    """
    found = detect_with_silhouettes(_rgb(output))
    side = found[0][1].shape[0] if found else SIZE
    drawn = world.render_masks(scene, side)
    objects = scene.objects
    same = [[d.shape == o.shape and d.color == o.color for d, _ in found] for o in objects]
    overlap = [[iou(s, drawn[i]) >= min_iou if s.shape == drawn[i].shape else False for _, s in found] for i in range(len(objects))]

    def assignable(ok) -> bool:
        return any(
            all(ok[i][j] for i, j in enumerate(chosen)) for chosen in itertools.permutations(range(len(found)), len(objects))
        )

    both = [[a and b for a, b in zip(row_same, row_overlap)] for row_same, row_overlap in zip(same, overlap)]
    return {"objects": assignable(same), "silhouettes": assignable(overlap), "success": assignable(both)}


def score_style(output, obj: ShapeObject, fill: str) -> dict[str, bool]:
    """Restyling a solid object to `fill`, keeping it (both style tasks).

    The object is the detection nearest the input object's centre (none: every check fails).
    fill: the detector reads `fill`. color / shape / size: the input's. position: the input's
    position word (`world.position_of`). success: all five.
    """
    detection = _nearest(shapes_eval.detect(_rgb(output)), obj.cx, obj.cy)
    keys = ("fill", "color", "shape", "position", "size")
    if detection is None:
        return {key: False for key in keys} | {"success": False}
    result = {
        "fill": detection.fill == fill,
        "color": detection.color == obj.color,
        "shape": detection.shape == obj.shape,
        "position": detection.position == world.position_of(obj.cx, obj.cy),
        "size": detection.size == obj.size,
    }
    result["success"] = all(result.values())
    return result


score_style_prompt = score_style
score_style_reference = score_style


def score_imagic(output, image, color: str) -> dict[str, bool]:
    """An Imagic colour edit: the object turned `color`, in place, same shape and size.

    The input's object is its largest detection; the output's, the detection nearest its centre.
    color: the output's object is `color`. shape: the input's shape. place: centres at most
    IMAGIC_MAX_SHIFT of the image side apart. size: area ratio (output / input) within IMAGIC_AREA_RATIO.
    success: all four.
    """
    before = shapes_eval.detect(_rgb(image))
    if not before:
        raise ValueError("the input image shows no object")
    source = before[0]
    detection = _nearest(shapes_eval.detect(_rgb(output)), source.cx, source.cy)
    keys = ("color", "shape", "place", "size")
    if detection is None:
        return {key: False for key in keys} | {"success": False}
    low, high = IMAGIC_AREA_RATIO
    result = {
        "color": detection.color == color,
        "shape": detection.shape == source.shape,
        "place": math.hypot(detection.cx - source.cx, detection.cy - source.cy) <= IMAGIC_MAX_SHIFT,
        "size": low <= detection.area / source.area <= high,
    }
    result["success"] = all(result.values())
    return result


def score_case(case: EditCase, output) -> dict[str, bool]:
    """The scorer of the case's task, on one output image."""
    if case.task == "inpaint":
        return score_inpaint(output, case.images["image"], case.info["mask"], case.info["shape"], case.info["color"], case.info["mask_blur"])
    if case.task == "sketch":
        return score_sketch(output, case.scene)
    if case.task in ("style_prompt", "style_reference"):
        return score_style(output, case.info["object"], case.info["fill"])
    return score_imagic(output, case.images["image"], case.info["color"])


# --------------------------------------------------------------------------
# Rendering through the studio, and the report
# --------------------------------------------------------------------------


def _split_overrides(registry, tasks, overrides: dict | None) -> dict[str, dict]:
    """Per task, the override fields its request has; a field no chosen task has is an error."""
    overrides = dict(overrides or {})
    per_task = {task: {} for task in tasks}
    forbidden = {"prompt", "seed", "task"}
    for name, value in overrides.items():
        if name in forbidden:
            raise ValueError(f"override {name!r}: EditEval sets the prompt, the seed and the images itself")
        takers = [t for t in tasks if name in registry.get(STUDIO_TASKS[t]).request_type.model_fields]
        if not takers or any(name in registry.get(STUDIO_TASKS[t]).image_fields for t in takers):
            raise ValueError(f"override {name!r} is not a request field of any of: {', '.join(tasks)}")
        for task in takers:
            per_task[task][name] = value
    return per_task


def check_overrides(studio, tasks, overrides: dict | None) -> None:
    """ValueError (naming it) for an override no chosen task takes, or a value a request refuses."""
    per_task = _split_overrides(studio.tasks, list(tasks), overrides)
    for task in tasks:
        case = make_cases(task, 1)[0]
        studio.tasks.make_request(STUDIO_TASKS[task], prompt=case.prompt, seed=0, **case.images, **per_task[task])


def evaluate_edits(
    studio,
    tasks=TASKS,
    n: int = 50,
    seed: int = 0,
    overrides: dict | None = None,
    *,
    scene_seed: int = SCENE_SEED,
    sheet=None,
    on_case=None,
) -> dict:
    """Render n cases of each task through `studio.run` and score them; a JSON-ready report.

    Requests set only prompt, images and seed (case i renders with seed + i), so every other field is
    the request schema's default, unless `overrides` ({field: value}, applied to each chosen task whose
    request has the field) says otherwise; the report's "at_defaults" is False then, and "overrides"
    lists them. sheet: write a contact sheet there (per case: input | mask, sketch, reference or
    target | output, with the failed checks). on_case(task, index, checks, seconds) is called after each.

    Report: {"settings": {...}, "tasks": {task: {"n", "counts", "rates", "errors", "seconds_per_image",
    "request" (the first request's fields as rendered, images left out), "cases": [{"index", "seed", "prompt",
    "checks", "seconds", "error"}]}}}.
    """
    tasks = list(tasks)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown EditEval task(s) {', '.join(map(repr, unknown))}; choose from: {', '.join(TASKS)}")
    if n < 1:
        raise ValueError("n must be at least 1")
    registry = studio.tasks
    check_overrides(studio, tasks, overrides)
    per_task = _split_overrides(registry, tasks, overrides)
    report = {
        "settings": {
            "model": studio.settings.model,
            "n": n,
            "seed": seed,
            "scene_seed": scene_seed,
            "at_defaults": not overrides,
            "overrides": dict(overrides or {}),
        },
        "tasks": {},
    }
    sheet_images, sheet_captions = [], []
    for task in tasks:
        studio_task = registry.get(STUDIO_TASKS[task])
        rows, request_fields = [], None
        for case in make_cases(task, n, scene_seed):
            fields = dict(prompt=case.prompt, seed=seed + case.index, **case.images, **per_task[task])
            request = registry.make_request(studio_task.name, **fields)
            started = time.perf_counter()
            error, output = None, None
            try:
                result = studio.run(request)
                output = result.images[0]
                if request_fields is None:  # as rendered: with the model's recommendations filled in
                    request_fields = result.request.model_dump(exclude=set(studio_task.image_fields) | {"prompt", "seed"})
                checks = score_case(case, output)
            except Exception as exc:  # noqa: BLE001 -- one failing request is reported, not fatal to the run
                error = f"{type(exc).__name__}: {exc}"
                checks = {"success": False}
            seconds = time.perf_counter() - started
            rows.append(
                {"index": case.index, "seed": seed + case.index, "prompt": case.prompt, "checks": checks, "seconds": round(seconds, 3), "error": error}
            )
            if on_case:
                on_case(task, case.index, checks, seconds)
            if sheet is not None:
                images, captions = _sheet_row(case, output, checks, error, seed + case.index)
                sheet_images += images
                sheet_captions += captions
        names = list(dict.fromkeys(k for row in rows for k in row["checks"] if k != "success")) + ["success"]
        counts = {k: sum(bool(row["checks"].get(k, False)) for row in rows) for k in names}
        report["tasks"][task] = {
            "studio_task": studio_task.name,
            "n": len(rows),
            "counts": counts,
            "rates": {k: counts[k] / len(rows) for k in names},
            "errors": sum(row["error"] is not None for row in rows),
            "seconds_per_image": round(sum(row["seconds"] for row in rows) / len(rows), 3),
            "request": _jsonable(request_fields or {}),
            "cases": rows,
        }
    if sheet is not None:
        shapes_eval.contact_sheet(sheet_images, sheet_captions, sheet, columns=6, cell=128)
    return report


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _sheet_row(case: EditCase, output, checks: dict, error, seed: int) -> tuple[list, list]:
    """Three cells: input | mask / sketch / reference / target | output, with captions."""
    blank = Image.new("RGB", (SIZE, SIZE), (230, 230, 230))
    source = case.images["control_image" if case.task == "sketch" else "image"]
    if case.task == "inpaint":
        middle, label = case.images["mask_image"].convert("RGB"), "mask"
    elif case.task == "style_reference":
        middle, label = case.images["reference_image"], f"reference ({case.info['fill']})"
    else:
        middle, label = world.render(case.target, SIZE), "target (world render)"
    failed = [k for k, v in checks.items() if k != "success" and not v]
    verdict = "ERROR " + error[:60] if error else ("OK" if checks.get("success") else "fails: " + ", ".join(failed))
    prompt = case.prompt or "(empty prompt)"
    return (
        [source, middle, output if output is not None else blank],
        [f"{case.task} #{case.index} seed {seed}: {'sketch' if case.task == 'sketch' else 'input'}", label, f"{verdict} | {prompt}"],
    )


def format_report(report: dict) -> str:
    """The per-task and per-sub-check success rates, with counts, as printed by `studio eval --edits`."""
    settings = report["settings"]
    lines = [
        (
            f"EditEval, {settings['n']} held-out scenes per task, render seed {settings['seed']} (+ scene index), "
            f"scene seed {settings['scene_seed']}, model {settings['model']}"
        )
    ]
    if settings["at_defaults"]:
        lines.append("requests set only prompt, images and seed: every other field is the user's default (the model's recommendation, else the schema's)")
    else:
        shown = ", ".join(f"{k}={v}" for k, v in settings["overrides"].items())
        lines.append(f"NOT AT THE DEFAULTS: overrides {shown}")
    for task, result in report["tasks"].items():
        counts, n = result["counts"], result["n"]
        extra = f", {result['errors']} errors" if result["errors"] else ""
        lines.append(
            f"{task:18s} {counts['success'] / n:.2f}  ({counts['success']}/{n})   "
            f"{result['seconds_per_image']:.2f} s/image ({result['studio_task']}){extra}"
        )
        for check, count in counts.items():
            if check != "success":
                name = f"{check:16s}" if len(check) < 16 else check + " "
                lines.append(f"  {name} {count / n:.2f}  ({count}/{n})")
    return "\n".join(lines)
