"""EditEval: its cases, its scorers on ground truth drawn by the world renderer, and its plumbing."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from studio.demo import edit_eval, shapes_eval, world
from studio.demo.edit_eval import (
    SKETCH_MIN_IOU,
    TASKS,
    grow,
    iou,
    make_cases,
    score_imagic,
    score_inpaint,
    score_sketch,
    score_style,
)
from studio.demo.world import Scene, ShapeObject
from studio.settings import EMBEDDED_MODEL_DIR

N = 12  # cases per task in the scorer tests (each scores in a few milliseconds)


@pytest.fixture(scope="module")
def cases() -> dict:
    return {task: make_cases(task, N) for task in TASKS}


def one(shape="square", color="red", size="small", fill="solid", cx=0.5, cy=0.5) -> ShapeObject:
    return ShapeObject(shape, color, size, fill, cx, cy, world.SIZE_RADIUS[size])


def scene_of(*objects, background="white") -> Scene:
    return Scene(background, tuple(objects), "", "single", {})


def moved(obj: ShapeObject, dx=0.0, dy=0.0, **changes) -> ShapeObject:
    return replace(obj, cx=obj.cx + dx, cy=obj.cy + dy, **changes)


# -- cases --------------------------------------------------------------------------------------------


def test_cases_are_deterministic_held_out_and_a_prefix_of_longer_lists(cases):
    for task in TASKS:
        again = make_cases(task, N + 3)
        assert [c.prompt for c in again[:N]] == [c.prompt for c in cases[task]], task
        assert all(
            np.array_equal(np.asarray(a.images[k]), np.asarray(b.images[k]))
            for a, b in zip(again, cases[task])
            for k in a.images
        )
        assert make_cases(task, 3, seed=99)[0].scene != cases[task][0].scene or task == "sketch"
        for case in cases[task]:
            if case.prompt:  # every prompt the model gets is held-out content of the world's grammar
                assert world.is_held_out(world.parse_claims(case.prompt)), case.prompt
    assert [c.scene for c in cases["sketch"]] == world.eval_scenes(N)


def test_case_contents(cases):
    blur = edit_eval.default_mask_blur()
    for case in cases["inpaint"]:
        (existing,) = case.scene.objects
        claims = world.parse_claims(case.prompt)["objects"][0]
        assert (claims["shape"], claims["color"]) == (case.info["shape"], case.info["color"])
        assert claims["color"] != existing.color and claims["position"] != world.position_of(existing.cx, existing.cy)
        # The mask, with its feather, stays clear of the object that is already there.
        assert not (grow(case.info["mask"], blur) & world.render_masks(case.scene)[0]).any()
        assert np.array_equal(np.asarray(case.images["mask_image"]) > 127, case.info["mask"])
    for style in ("style_prompt", "style_reference"):
        for case, twin in zip(cases[style], cases["style_prompt"]):
            (obj,) = case.scene.objects
            assert obj.fill == "solid" and case.info["fill"] in edit_eval.STYLE_FILLS
            assert np.array_equal(np.asarray(case.images["image"]), np.asarray(twin.images["image"]))
    for case in cases["style_prompt"]:
        claims = world.parse_claims(case.prompt)["objects"][0]
        obj = case.scene.objects[0]
        assert claims == world.object_claim(obj.shape, obj.color, obj.size, case.info["fill"], world.position_of(obj.cx, obj.cy))
    for case in cases["style_reference"]:
        assert case.prompt == ""
        reference = case.info["reference"].objects[0]
        assert reference.fill == case.info["fill"]
        assert reference.shape != case.info["object"].shape and reference.color != case.info["object"].color
    for case in cases["imagic"]:
        obj = case.scene.objects[0]
        claims = world.parse_claims(case.prompt)["objects"][0]
        assert claims["color"] == case.info["color"] != obj.color and claims["shape"] == obj.shape


# -- detection with silhouettes ---------------------------------------------------------------------------


def test_silhouettes_are_the_detectors_own(cases):
    for case in cases["sketch"]:
        image = world.render(case.scene)
        found = edit_eval.detect_with_silhouettes(image)
        assert [d for d, _ in found] == shapes_eval.detect(image)
        masks = world.render_masks(case.scene)
        for obj, mask in zip(case.scene.objects, masks):
            best = max(iou(s, mask) for _, s in found)
            assert best >= 0.9, (case.prompt, obj)


def test_the_iou_threshold_separates_following_the_drawing_from_not():
    small = one(size="small")
    drawn = world.render_masks(scene_of(small))[0]
    thicker = grow(drawn, 1)  # a blurred edge, a pixel wider all round
    assert iou(thicker, drawn) >= 0.7
    assert iou(world.render_masks(scene_of(replace(small, shape="circle")))[0], drawn) >= 0.7
    assert iou(world.render_masks(scene_of(replace(small, radius=world.SIZE_RADIUS["large"])))[0], drawn) < 0.4
    shifted = world.render_masks(scene_of(moved(small, dx=0.1)))[0]
    assert iou(shifted, drawn) < SKETCH_MIN_IOU


# -- scorers on ground truth ---------------------------------------------------------------------------


def test_inpaint_scorer(cases):
    for case in cases["inpaint"]:
        image, mask = case.images["image"], case.info["mask"]
        args = (mask, case.info["shape"], case.info["color"])
        perfect = world.render(case.target)
        assert score_inpaint(perfect, image, *args) == {
            "object_in_mask": True, "color_in_mask": True, "outside_unchanged": True, "success": True,
        }, case.prompt
        assert score_inpaint(image, image, *args) == {
            "object_in_mask": False, "color_in_mask": False, "outside_unchanged": True, "success": False,
        }
        # One pixel changed outside the feathered mask: the task's promise is broken.
        pixels = np.asarray(perfect).copy()
        outside = np.argwhere(~grow(mask, case.info["mask_blur"]))
        y, x = outside[len(outside) // 2]
        pixels[y, x] = 255 - pixels[y, x]
        result = score_inpaint(Image.fromarray(pixels), image, *args)
        assert result["object_in_mask"] and not result["outside_unchanged"] and not result["success"]
        # Changes inside the feather band are allowed.
        band = np.argwhere(grow(mask, case.info["mask_blur"]) & ~mask)
        pixels = np.asarray(perfect).copy()
        pixels[tuple(band.T)] = (128, 128, 128)
        assert score_inpaint(Image.fromarray(pixels), image, *args)["outside_unchanged"]
    # The right colour but the wrong shape; the right object outside the mask.
    case = cases["inpaint"][0]
    existing, added = case.target.objects
    other = next(s for s in world.SHAPES if s != added.shape)
    wrong_shape = world.render(scene_of(existing, replace(added, shape=other), background=case.scene.background))
    result = score_inpaint(wrong_shape, case.images["image"], case.info["mask"], case.info["shape"], case.info["color"])
    assert result["color_in_mask"] and not result["object_in_mask"] and not result["success"]
    elsewhere = score_inpaint(world.render(case.target), case.images["image"], _far_mask(case), case.info["shape"], case.info["color"])
    assert not elsewhere["object_in_mask"] and not elsewhere["success"]


def _far_mask(case) -> np.ndarray:
    """A mask in the corner away from both objects (for 'the object is not inside the mask')."""
    mask = np.zeros_like(case.info["mask"])
    covered = grow(np.any(world.render_masks(case.target), axis=0), 2)
    for y0, x0 in ((0, 0), (0, 48), (48, 0), (48, 48)):
        if not covered[y0 : y0 + 16, x0 : x0 + 16].any():
            mask[y0 : y0 + 16, x0 : x0 + 16] = True
            return mask
    mask[0:4, 0:4] = True
    return mask


def test_sketch_scorer(cases):
    for case in cases["sketch"]:
        assert score_sketch(world.render(case.scene), case.scene) == {"objects": True, "silhouettes": True, "success": True}, case.prompt
    case = next(c for c in cases["sketch"] if len(c.scene.objects) == 1)
    (obj,) = case.scene.objects
    away = 0.2 if obj.cx < 0.5 else -0.2
    shifted = world.render(replace(case.scene, objects=(moved(obj, dx=away),)))
    assert score_sketch(shifted, case.scene) == {"objects": True, "silhouettes": False, "success": False}
    recoloured = next(c for c in world.COLORS if c != obj.color)
    wrong = world.render(replace(case.scene, objects=(replace(obj, color=recoloured),)))
    assert score_sketch(wrong, case.scene) == {"objects": False, "silhouettes": True, "success": False}
    blank = Image.new("RGB", (64, 64), world.BACKGROUNDS[case.scene.background])
    assert score_sketch(blank, case.scene) == {"objects": False, "silhouettes": False, "success": False}
    # Two objects: each must be matched by its own detection.
    two = next(c for c in cases["sketch"] if len(c.scene.objects) == 2)
    only_first = world.render(replace(two.scene, objects=two.scene.objects[:1]))
    assert not score_sketch(only_first, two.scene)["success"]


def test_style_scorer(cases):
    for case in cases["style_prompt"]:
        obj, fill = case.info["object"], case.info["fill"]
        background = case.scene.background
        assert score_style(world.render(case.target), obj, fill) == dict.fromkeys(
            ("fill", "color", "shape", "position", "size", "success"), True
        ), case.prompt
        solid = score_style(case.images["image"], obj, fill)
        assert not solid["fill"] and not solid["success"] and solid["color"] and solid["position"]
        styled = replace(obj, fill=fill)
        position = world.position_of(obj.cx, obj.cy)
        target = {"left": (0.5, 0.5), "right": (0.5, 0.5), "top": (0.5, 0.5), "bottom": (0.5, 0.5), "center": (0.25, 0.5)}[position]
        elsewhere = world.render(scene_of(replace(styled, cx=target[0], cy=target[1]), background=background))
        assert score_style(elsewhere, obj, fill) == {
            "fill": True, "color": True, "shape": True, "position": False, "size": True, "success": False,
        }
        other_size = "large" if obj.size == "small" else "small"
        resized = replace(styled, size=other_size, radius=world.SIZE_RADIUS[other_size])
        result = score_style(world.render(scene_of(resized, background=background)), obj, fill)
        assert not result["size"] and not result["success"]
        recoloured = replace(styled, color=next(c for c in world.COLORS if c != obj.color))
        result = score_style(world.render(scene_of(recoloured, background=background)), obj, fill)
        assert not result["color"] and result["fill"] and not result["success"]
    blank = Image.new("RGB", (64, 64), (255, 255, 255))
    assert not any(score_style(blank, one(), "striped").values())


def test_imagic_scorer(cases):
    for case in cases["imagic"]:
        image, color = case.images["image"], case.info["color"]
        obj = case.scene.objects[0]
        background = case.scene.background
        assert score_imagic(world.render(case.target), image, color) == dict.fromkeys(
            ("color", "shape", "place", "size", "success"), True
        ), case.prompt
        same = score_imagic(image, image, color)
        assert same == {"color": False, "shape": True, "place": True, "size": True, "success": False}
        recoloured = replace(obj, color=color)
        towards_middle = (0.5 - obj.cx, 0.5 - obj.cy)
        scale = 0.2 / max(np.hypot(*towards_middle), 1e-9)
        if np.hypot(*towards_middle) > 0.01:
            far = world.render(scene_of(moved(recoloured, towards_middle[0] * scale, towards_middle[1] * scale), background=background))
            assert not score_imagic(far, image, color)["place"]
        other_size = "large" if obj.size == "small" else "small"
        resized = replace(recoloured, size=other_size, radius=world.SIZE_RADIUS[other_size])
        if world.EDGE_MARGIN <= resized.cx - resized.radius and resized.cx + resized.radius <= 1 - world.EDGE_MARGIN \
                and world.EDGE_MARGIN <= resized.cy - resized.radius and resized.cy + resized.radius <= 1 - world.EDGE_MARGIN:
            result = score_imagic(world.render(scene_of(resized, background=background)), image, color)
            assert not result["size"] and not result["success"] and result["place"]
        nudged = world.render(scene_of(moved(recoloured, dx=0.05 if obj.cx < 0.5 else -0.05), background=background))
        assert score_imagic(nudged, image, color)["success"]


# -- plumbing ------------------------------------------------------------------------------------------


def test_report_format():
    report = {
        "settings": {"n": 2, "seed": 0, "scene_seed": 1234, "model": "embedded", "at_defaults": True, "overrides": {}},
        "tasks": {
            "inpaint": {
                "n": 2, "studio_task": "inpaint", "counts": {"object_in_mask": 1, "success": 1}, "errors": 0,
                "seconds_per_image": 1.0,
            }
        },
    }
    text = edit_eval.format_report(report)
    assert "inpaint            0.50  (1/2)" in text and "  object_in_mask   0.50  (1/2)" in text
    assert "default" in text and "NOT" not in text
    report["settings"].update(at_defaults=False, overrides={"embedding_steps": 5})
    assert "NOT AT THE DEFAULTS: overrides embedding_steps=5" in edit_eval.format_report(report)


needs_embedded = pytest.mark.skipif(
    not (EMBEDDED_MODEL_DIR / "model_index.json").is_file(), reason="the embedded model is not exported yet"
)

FEW_STEPS = {"num_inference_steps": 2, "embedding_steps": 2, "finetune_steps": 2}


@needs_embedded
def test_evaluate_edits_end_to_end_on_the_embedded_model(tmp_path):
    from studio import Settings, Studio

    studio = Studio(Settings(model="embedded", outputs_dir=tmp_path / "outputs"))
    with pytest.raises(ValueError, match="not a request field"):
        edit_eval.evaluate_edits(studio, ["sketch"], 1, 0, {"embedding_steps": 3})
    with pytest.raises(ValueError, match="num_inference_steps"):
        edit_eval.evaluate_edits(studio, ["sketch"], 1, 0, {"num_inference_steps": 0})
    seen = []
    sheet = tmp_path / "sheet.png"
    report = edit_eval.evaluate_edits(
        studio, TASKS, 1, 5, FEW_STEPS, sheet=sheet, on_case=lambda *args: seen.append(args[:2])
    )
    assert seen == [(task, 0) for task in TASKS]
    assert report["settings"]["at_defaults"] is False and report["settings"]["overrides"] == FEW_STEPS
    expected = {
        "inpaint": {"object_in_mask", "color_in_mask", "outside_unchanged"},
        "sketch": {"objects", "silhouettes"},
        "style_prompt": {"fill", "color", "shape", "position", "size"},
        "style_reference": {"fill", "color", "shape", "position", "size"},
        "imagic": {"color", "shape", "place", "size"},
    }
    for task, checks in expected.items():
        result = report["tasks"][task]
        assert result["errors"] == 0, result["cases"]
        assert set(result["counts"]) == checks | {"success"} == set(result["rates"])
        assert result["n"] == 1 and result["cases"][0]["seed"] == 5
        assert all(isinstance(v, bool) for v in result["cases"][0]["checks"].values())
        assert result["request"]["num_inference_steps"] == 2
    # Only prompt, images, seed (and the overrides) are set: the rest are the schema's defaults.
    from studio_pipelines.inpaint import InpaintRequest

    assert report["tasks"]["inpaint"]["request"]["mask_blur"] == InpaintRequest.model_fields["mask_blur"].default
    assert report["tasks"]["style_prompt"]["request"]["method"] == "auto"
    # The inpaint task keeps every pixel beyond the feathered mask, whatever it paints.
    assert report["tasks"]["inpaint"]["cases"][0]["checks"]["outside_unchanged"] is True
    json.dumps(report)
    with Image.open(sheet) as opened:
        assert opened.width > 3 * 128


@needs_embedded
def test_studio_eval_edits_command(tmp_path, capsys):
    from studio.demo.evaluate import main

    with pytest.raises(SystemExit):
        main(["--edits", "--tasks", "paint"])
    with pytest.raises(SystemExit):
        main(["--edits", "--tasks", "sketch", "--override", "embedding_steps=3"])  # no sketch request has it
    capsys.readouterr()
    out = tmp_path / "edits.json"
    assert main(["--edits", "--tasks", "style_prompt", "--scenes", "1", "--steps", "2", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "NOT AT THE DEFAULTS: overrides num_inference_steps=2" in printed
    assert "\nstyle_prompt " in printed and "  fill " in printed and "/1)" in printed
    report = json.loads(out.read_text())
    assert set(report["tasks"]) == {"style_prompt"} and report["settings"]["overrides"] == {"num_inference_steps": 2}
