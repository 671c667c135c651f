"""The toy world: determinism, geometry, rendering, captions and the held-out split."""

from __future__ import annotations

import colorsys
import random
from collections import Counter

import numpy as np
import pytest

from studio.demo import world
from studio.demo.world import (
    BACKGROUNDS,
    COLORS,
    FILLS,
    KINDS,
    POSITIONS,
    RELATIONS,
    SHAPES,
    SIZES,
    Scene,
    ShapeObject,
    eval_scenes,
    render,
    render_masks,
    render_sketch,
    sample_scene,
    scene_from_prompt,
    training_scenes,
    vocabulary,
)


@pytest.fixture(scope="module")
def scenes() -> list[Scene]:
    return training_scenes(150, seed=0)


def test_vocabulary_of_the_world_is_complete():
    assert {"red", "orange", "yellow", "green", "blue", "purple"} <= set(COLORS)
    assert {"white", "black", "gray"} <= set(BACKGROUNDS)
    assert {"circle", "square", "triangle"} <= set(SHAPES)
    assert FILLS == ("solid", "outline", "striped", "dotted")
    assert SIZES == ("small", "large")
    assert POSITIONS == ("left", "right", "top", "bottom", "center")
    assert RELATIONS == ("left of", "right of", "above", "below")


def test_object_colours_are_separated_in_hue_and_from_every_background():
    hues = {n: colorsys.rgb_to_hsv(*(c / 255 for c in rgb))[0] * 360 for n, rgb in COLORS.items()}
    names = list(hues)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            gap = abs(hues[a] - hues[b]) % 360
            assert min(gap, 360 - gap) >= 20, (a, b)
    for rgb in COLORS.values():
        assert max(rgb) - min(rgb) >= 120  # saturated: never confused with an achromatic background
        for bg in BACKGROUNDS.values():
            assert np.linalg.norm(np.subtract(rgb, bg)) >= 100


def test_same_seed_same_scenes_and_pixels():
    a, b = training_scenes(30, seed=5), training_scenes(30, seed=5)
    assert a == b
    assert all(render(x).tobytes() == render(y).tobytes() for x, y in zip(a, b))
    assert all(render_sketch(x).tobytes() == render_sketch(y).tobytes() for x, y in zip(a, b))
    assert training_scenes(30, seed=6) != a
    assert sample_scene(random.Random(3)) == sample_scene(random.Random(3))


def test_scenes_are_well_formed(scenes):
    kinds = Counter(s.kind for s in scenes)
    assert set(kinds) == set(KINDS)
    for scene in scenes:
        assert 1 <= len(scene.objects) <= 3
        assert scene.background in BACKGROUNDS
        for obj in scene.objects:
            assert obj.radius == world.SIZE_RADIUS[obj.size]
            assert obj.shape in SHAPES and obj.color in COLORS and obj.fill in FILLS
            # Inside the image with a margin.
            assert obj.radius <= obj.cx <= 1 - obj.radius and obj.radius <= obj.cy <= 1 - obj.radius
        for i, a in enumerate(scene.objects):
            for b in scene.objects[i + 1 :]:
                reach = a.radius + b.radius + world.OBJECT_GAP - 1e-9
                assert abs(a.cx - b.cx) >= reach or abs(a.cy - b.cy) >= reach, scene.caption
        colors = [o.color for o in scene.objects]
        if scene.kind == "counting":
            assert len(set(colors)) == 1 and len({o.shape for o in scene.objects}) == 1
            assert len(scene.objects) == scene.claims["count"] in (2, 3)
        else:
            assert len(set(colors)) == len(colors), scene.caption


def test_objects_follow_their_claims(scenes):
    for scene in scenes:
        claims = scene.claims
        descs = claims["objects"] * claims["count"] if len(claims["objects"]) == 1 else claims["objects"]
        assert len(descs) == len(scene.objects)
        for desc, obj in zip(descs, scene.objects):
            for key in ("shape", "color", "size", "fill"):
                assert desc[key] in (None, getattr(obj, key)), (scene.caption, key)
            if desc["fill"] is None:
                assert obj.fill == world.DEFAULT_FILL
            if desc["position"]:
                assert world.position_of(obj.cx, obj.cy) == desc["position"]
                # Unambiguous at 64x64: the other words are at least 4 px away from applying.
                dx, dy = obj.cx - 0.5, obj.cy - 0.5
                if desc["position"] == "center":
                    assert max(abs(dx), abs(dy)) <= world.CENTER_TOLERANCE - 0.05
                else:
                    assert max(abs(dx), abs(dy)) - min(abs(dx), abs(dy)) >= 0.06
        assert scene.background == (claims["background"] or world.DEFAULT_BACKGROUND)
        if claims["relation"]:
            rel = claims["relation"]
            s, o = scene.objects[rel["subject"]], scene.objects[rel["object"]]
            main, across = world.relation_offsets((s.cx, s.cy), (o.cx, o.cy), rel["relation"])
            assert main >= 0.2 and abs(across) * 2 <= main, scene.caption


def test_small_and_large_are_clearly_distinct():
    assert world.SIZE_RADIUS["large"] - world.SIZE_RADIUS["small"] >= 0.08


def test_masks_match_rendered_pixels(scenes):
    for scene in scenes[:60]:
        for size in (64, 96):
            pixels = np.asarray(render(scene, size))
            masks = render_masks(scene, size)
            assert len(masks) == len(scene.objects)
            union = np.zeros((size, size), dtype=bool)
            for obj, mask in zip(scene.objects, masks):
                assert mask.shape == (size, size) and mask.dtype == bool
                assert not (mask & union).any()  # objects never overlap
                union |= mask
                inked = (pixels == COLORS[obj.color]).all(axis=-1) & mask
                # Every pixel of the mask is either the object's colour or the background showing through.
                background = (pixels == BACKGROUNDS[scene.background]).all(axis=-1)
                assert (inked | background)[mask].all()
                if obj.fill == "solid":
                    assert inked[mask].all()
                else:
                    assert 0.15 < inked[mask].mean() < 0.95, (obj, inked[mask].mean())
                # Mask area matches the geometry (to within the pixel staircase).
                side = 2 * obj.radius * size
                expected = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}[obj.shape] * side * side
                assert abs(mask.sum() - expected) <= 0.12 * expected + 2 * side
            # Outside every mask only background.
            assert (pixels[~union] == BACKGROUNDS[scene.background]).all()


def test_fills_render_their_pattern():
    size = 64
    for fill in FILLS:
        obj = ShapeObject("square", "red", "large", fill, 0.5, 0.5, world.SIZE_RADIUS["large"])
        pixels = np.asarray(render(Scene("white", (obj,), "", "single", {}), size))
        inked = (pixels == COLORS["red"]).all(axis=-1)
        inner = inked[26:38, 26:38]  # well inside the outline band
        if fill == "solid":
            assert inner.all()
        elif fill == "outline":
            assert not inner.any()
            # The band: a closed 2-px frame around the square.
            ys, xs = np.nonzero(inked)
            frame = inked[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
            assert frame[:2].all() and frame[-2:].all() and frame[:, :2].all() and frame[:, -2:].all()
        elif fill == "striped":
            rows = inner.mean(axis=1)
            assert set(np.round(rows, 3)) == {0.0, 1.0}  # whole rows on or off
        else:
            rows = inner.mean(axis=1)
            assert 0.15 < inner.mean() < 0.4 and (rows < 1).all()


def test_sketch_strokes_lie_on_the_outlines(scenes):
    for scene in scenes[:40]:
        size = 64
        sketch = np.asarray(render_sketch(scene, size)).astype(int)
        dark = sketch.max(axis=-1) < 128
        xs, ys = np.meshgrid((np.arange(size) + 0.5) / size, (np.arange(size) + 0.5) / size)
        distances = np.stack([np.abs(world.shape_sdf(o, xs, ys)) for o in scene.objects]) * size
        nearest = distances.min(axis=0)
        tolerance = world.stroke_pixels(size) / 2 + world.SKETCH_WOBBLE * size + 1.0
        assert dark.any()
        assert (nearest[dark] <= tolerance).all(), scene.caption
        # ... and they cover each outline: pixels right on an outline are dark or next to a dark one.
        near_dark = dark.copy()
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                near_dark |= np.roll(np.roll(dark, dy, axis=0), dx, axis=1)
        for dist in distances:
            on_outline = dist <= 0.5
            assert dark[on_outline].mean() >= 0.6, scene.caption
            assert near_dark[on_outline].mean() >= 0.97, scene.caption
        # Everything else stays white.
        assert (sketch[~dark] >= 200).all()


def test_held_out_captions_never_appear_in_training():
    held_out = eval_scenes(200)
    assert len(held_out) == 200
    assert all(world.is_held_out(s) for s in held_out)
    assert Counter(s.kind for s in held_out) == {k: 40 for k in KINDS}
    captions = {s.caption for s in held_out}
    for seed in (0, 1, 42):
        training = training_scenes(400, seed)
        assert not captions & {s.caption for s in training}
        assert not any(world.is_held_out(s) for s in training)
    # The split is by content: reparsing any held-out caption lands on the held-out side.
    assert all(world.is_held_out(world.parse_claims(s.caption)) for s in held_out)
    assert eval_scenes(20) == eval_scenes(20)
    assert sum(s.claims["background"] is not None for s in held_out) >= 100


def test_captions_round_trip_through_the_parser(scenes):
    for scene in scenes + eval_scenes(50):
        parsed = scene_from_prompt(scene.caption, random.Random(1))
        assert parsed.claims == scene.claims, scene.caption
        assert parsed.kind == scene.kind
        assert parsed.background == scene.background
        assert len(parsed.objects) == len(scene.objects)


def test_claimed_places_put_each_object_of_a_relation_on_its_side(scenes):
    def places(caption):
        return world.claimed_places(world.parse_claims(caption))

    assert places("a blue square above a yellow triangle") == {"top": 0, "bottom": 1}
    assert places("a yellow triangle below a blue square") == {"bottom": 0, "top": 1}
    assert places("a red circle to the right of a green square") == {"right": 0, "left": 1}
    assert places("a large red circle on the left") == {"left": 0}
    assert places("two green triangles, striped") == places("a red circle and a blue square") == {}
    for scene in scenes:  # and the rendered objects are there
        for place, j in world.claimed_places(scene.claims).items():
            obj, others = scene.objects[j], [o for k, o in enumerate(scene.objects) if k != j]
            if place in ("left", "right", "top", "bottom") and others:
                axis = "cx" if place in ("left", "right") else "cy"
                first = place in ("left", "top")
                assert all((getattr(obj, axis) < getattr(o, axis)) == first for o in others), scene.caption


def test_parsed_prompts_follow_the_words():
    rng = random.Random(0)
    scene = scene_from_prompt("A large red circle on the left.", rng)
    (obj,) = scene.objects
    assert (obj.shape, obj.color, obj.size, obj.fill) == ("circle", "red", "large", "solid")
    assert world.position_of(obj.cx, obj.cy) == "left" and scene.background == "white"
    assert scene.kind == "position"

    scene = scene_from_prompt("a blue square above a yellow triangle on a black background", rng)
    assert scene.kind == "relation" and scene.background == "black"
    square, triangle = scene.objects
    assert (square.shape, square.color, triangle.shape, triangle.color) == ("square", "blue", "triangle", "yellow")
    assert square.cy < triangle.cy
    assert scene.claims["relation"] == {"subject": 0, "relation": "above", "object": 1}

    scene = scene_from_prompt("two green triangles, striped", rng)
    assert scene.kind == "counting" and [o.fill for o in scene.objects] == ["striped"] * 2
    scene = scene_from_prompt("three small purple dots", rng)
    assert [(o.shape, o.size, o.color) for o in scene.objects] == [("circle", "small", "purple")] * 3
    scene = scene_from_prompt("an orange ring to the right of a green square with dots, grey background", rng)
    assert scene.objects[0].fill == "outline" and scene.objects[1].fill == "dotted" and scene.background == "gray"
    assert scene.objects[0].cx > scene.objects[1].cx


@pytest.mark.parametrize(
    "prompt, words",
    [
        ("a red hexagon", ["hexagon"]),
        ("a shiny red circle near the window", ["shiny", "near", "window"]),
        ("a red", ["shape"]),
        ("a red circle above a blue square and a green triangle", ["and"]),
    ],
)
def test_unparsable_prompts_name_the_words(prompt, words):
    with pytest.raises(ValueError) as info:
        scene_from_prompt(prompt, random.Random(0))
    for word in words:
        assert word in str(info.value)


def test_vocabulary_covers_every_caption(scenes):
    vocab = set(vocabulary())
    tokens = {t for s in scenes + eval_scenes(50) for t in world.caption_tokens(s.caption)}
    assert tokens <= vocab
    assert len(vocab) < 80  # small enough for a toy tokenizer


def test_scenes_render_at_any_resolution(scenes):
    scene = scenes[0]
    for size in (64, 100, 256):
        image = render(scene, size)
        assert image.size == (size, size) and image.mode == "RGB"
        assert render_sketch(scene, size).size == (size, size)
    # Same geometry: the small render is close to a reduced large render.
    big = np.asarray(render_masks(scene, 256)[0]).reshape(64, 4, 64, 4).mean(axis=(1, 3)) > 0.5
    small = render_masks(scene, 64)[0]
    assert (big != small).mean() < 0.01
