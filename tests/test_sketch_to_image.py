"""Sketch-to-image: sketch preprocessing (polarity, transparency, the embedded ControlNet's convention),
method choice, the ControlNet / T2I-Adapter / SDEdit paths on tiny models, and a semantic check on the
embedded model."""

import random
import shutil

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from studio_pipelines.common import TaskContext
from studio_pipelines.sketch_to_image import (
    DARK_ON_LIGHT,
    LIGHT_ON_DARK,
    SketchToImageRequest,
    choose_method,
    control_image,
    flatten_sketch,
    is_coloured,
    output_size,
    sketch_polarity,
)

from studio import Settings
from studio.demo import world
from studio.requests import StudioInputError
from studio.settings import AddOns
from studio.settings import EMBEDDED_MODEL_DIR

STEPS = 2


def scene(prompt="a large red circle on the left on a white background", seed=0):
    return world.scene_from_prompt(prompt, random.Random(seed))


def circle_sketch(size=64, box=(6, 18, 32, 44), width=2) -> Image.Image:
    image = Image.new("RGB", (size, size), "white")
    ImageDraw.Draw(image).ellipse(box, outline=(20, 20, 20), width=width)
    return image


def square_sketch(size=64) -> Image.Image:
    image = Image.new("RGB", (size, size), "white")
    ImageDraw.Draw(image).rectangle((34, 10, 58, 34), outline=(20, 20, 20), width=2)
    return image


def grey(image) -> np.ndarray:
    return np.asarray(image.convert("L")).astype(np.int16)


def randomise_zero_convs(controlnet, seed=0):
    """A fresh ControlNet's zero convolutions make it a no-op (and blind to the sketch); give them weights."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in controlnet.named_parameters():
            if name.startswith(
                ("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")
            ):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return controlnet


@pytest.fixture(scope="session")
def controlnet_folder(sd15_folder, tmp_path_factory):
    """A tiny ControlNetModel built from the tiny UNet (64 px sketch -> 32 px latents)."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(sd15_folder / "unet")
    torch.manual_seed(0)
    controlnet = randomise_zero_convs(ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16)))
    folder = tmp_path_factory.mktemp("controlnets") / "tiny-controlnet"
    controlnet.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="session")
def model_with_controlnet(sd15_folder, controlnet_folder, tmp_path_factory):
    """The tiny model laid out like the embedded one: a controlnet/ subfolder in the model folder."""
    folder = tmp_path_factory.mktemp("models") / "tiny-sd15-with-controlnet"
    shutil.copytree(sd15_folder, folder)
    shutil.copytree(controlnet_folder, folder / "controlnet")
    return folder


@pytest.fixture(scope="session")
def adapter_folder(tmp_path_factory):
    from diffusers import T2IAdapter

    torch.manual_seed(0)
    # The tiny UNet adds the first residual after its (downsampling) first block: 16x16 features twice.
    adapter = T2IAdapter(
        in_channels=1, channels=[16, 32], num_res_blocks=1, downscale_factor=4, adapter_type="full_adapter_xl"
    )
    folder = tmp_path_factory.mktemp("adapters") / "tiny-sketch-adapter"
    adapter.save_pretrained(folder, safe_serialization=True)
    return folder


def context_for(studio, **add_ons) -> TaskContext:
    settings = studio.settings.with_(add_ons=AddOns(**add_ons)) if add_ons else studio.settings
    return TaskContext(settings=settings, models=studio.models)


# -- preprocessing ---------------------------------------------------------------------------------


def test_world_sketch_passes_through_exactly_as_the_embedded_controlnet_was_trained():
    # studio/demo/train.py feeds render_sketch(scene).convert("L") / 255, replicated to 3 channels.
    sketch = world.render_sketch(scene(), 64)
    control = control_image(sketch, DARK_ON_LIGHT, (64, 64))
    assert control.mode == "RGB" and control.size == (64, 64)
    expected = np.asarray(sketch.convert("L"))
    assert all(np.array_equal(np.asarray(control)[..., c], expected) for c in range(3))


def test_polarity_is_detected_and_converted():
    sketch = world.render_sketch(scene(), 64)
    inverted = Image.fromarray(255 - np.asarray(sketch), "RGB")
    assert sketch_polarity(grey(sketch)) == DARK_ON_LIGHT
    assert sketch_polarity(grey(inverted)) == LIGHT_ON_DARK
    # Whatever was drawn, each convention comes out the same.
    for target in (DARK_ON_LIGHT, LIGHT_ON_DARK):
        assert np.array_equal(
            np.asarray(control_image(sketch, target, (64, 64))), np.asarray(control_image(inverted, target, (64, 64)))
        )
    light = grey(control_image(sketch, LIGHT_ON_DARK, (64, 64)))
    assert np.array_equal(light, 255 - grey(sketch))
    assert np.median(light) == 0 and light.max() > 200  # white strokes on black
    single = control_image(sketch, LIGHT_ON_DARK, (64, 64), channels=1)
    assert single.mode == "L"


def test_transparent_sketches_are_flattened_whatever_the_ink_colour():
    strokes = world.render_sketch(scene(), 64)
    ink = np.asarray(strokes.convert("L")) < 128
    for colour in ((20, 20, 20), (250, 250, 250)):  # dark or light pen on a transparent layer
        layer = np.zeros((64, 64, 4), dtype=np.uint8)
        layer[ink] = colour + (255,)
        rgba = Image.fromarray(layer, "RGBA")
        control = grey(control_image(rgba, DARK_ON_LIGHT, (64, 64)))
        assert (control[ink] < 128).all() and (control[~ink] > 200).all()
    assert flatten_sketch(Image.fromarray(np.zeros((8, 8, 4), np.uint8), "RGBA")).getpixel((0, 0)) == (255, 255, 255)


def test_thin_strokes_survive_shrinking_a_large_canvas():
    big = circle_sketch(512, box=(48, 144, 256, 352), width=3)
    control = grey(control_image(big, DARK_ON_LIGHT, (64, 64)))
    assert control.min() < 100  # the pen line is still dark at 1/8 size
    assert (control < 128).sum() > 40  # a closed ring of stroke pixels, not a few specks


def test_coloured_sketch_detection():
    assert not is_coloured(world.render_sketch(scene(), 64))
    assert not is_coloured(circle_sketch())
    assert is_coloured(world.render(scene(), 64))  # a filled red circle
    coloured = circle_sketch()
    ImageDraw.Draw(coloured).ellipse((6, 18, 32, 44), outline=(40, 90, 225), width=2)
    assert is_coloured(coloured)


def test_output_size_follows_the_sketch_aspect_ratio():
    request = SketchToImageRequest(prompt="x", control_image="unused.png")
    assert output_size(request, 64, circle_sketch()) == (64, 64)
    width, height = output_size(request, 512, Image.new("RGB", (1024, 512)))
    assert width % 8 == height % 8 == 0 and abs(width / height - 2) < 0.1 and abs(width * height / 512**2 - 1) < 0.05
    assert output_size(
        SketchToImageRequest(prompt="x", control_image="u.png", width=128), 64, Image.new("RGB", (200, 100))
    ) == (128, 64)


# -- choosing the method ---------------------------------------------------------------------------


def test_method_choice(studio, controlnet_folder, adapter_folder, model_with_controlnet):
    sketch = circle_sketch()

    def choose(context=None, **fields):
        request = SketchToImageRequest(prompt="x", control_image="unused.png", **fields)
        return choose_method(request, context or context_for(studio), sketch)

    assert choose() == ("sdedit", None)  # nothing configured
    method, found = choose(controlnet=str(controlnet_folder))
    assert method == "controlnet" and found.polarity == LIGHT_ON_DARK
    method, found = choose(context_for(studio, controlnet=str(controlnet_folder)))
    assert method == "controlnet" and "--default-controlnet" in found.source
    method, found = choose(model=str(model_with_controlnet))  # shipped with the model, like the embedded one
    assert method == "controlnet" and found.polarity == DARK_ON_LIGHT
    assert found.folder == (model_with_controlnet / "controlnet").resolve()
    method, found = choose(context_for(studio, t2i_adapter=str(adapter_folder)))
    assert method == "t2i_adapter"
    assert choose(controlnet=str(controlnet_folder), method="sdedit") == ("sdedit", None)
    # A coloured sketch goes through SDEdit under auto, with a note when a ControlNet was available.
    context = context_for(studio)
    request = SketchToImageRequest(prompt="x", control_image="u.png", controlnet=str(controlnet_folder))
    assert choose_method(request, context, world.render(scene(), 64))[0] == "sdedit"
    assert any("coloured" in warning for warning in context.warnings)


def test_unavailable_method_or_bad_folder_is_refused_before_loading(studio, tmp_path):
    loaded_before = studio.models.loaded_models()
    with pytest.raises(StudioInputError, match="needs a ControlNet"):
        studio.sketch_to_image("x", circle_sketch(), method="controlnet")
    with pytest.raises(StudioInputError, match="needs a T2I-Adapter"):
        studio.sketch_to_image("x", circle_sketch(), method="t2i_adapter")
    with pytest.raises(StudioInputError, match="not a diffusers model folder"):
        studio.sketch_to_image("x", circle_sketch(), controlnet=str(tmp_path))
    with pytest.raises(StudioInputError, match="control_guidance_start"):
        studio.sketch_to_image("x", circle_sketch(), control_guidance_start=0.6, control_guidance_end=0.5)
    assert studio.models.loaded_models() == loaded_before


# -- the three paths on tiny models -------------------------------------------------------------------


def test_controlnet_path_follows_the_sketch(studio, controlnet_folder):
    def render(sketch, **fields):
        result = studio.sketch_to_image(
            "a red circle", sketch, seed=3, num_inference_steps=STEPS, controlnet=str(controlnet_folder), **fields
        )
        return np.asarray(result.images[0]).astype(np.int16)

    circle, square = render(circle_sketch()), render(square_sketch())
    assert circle.shape == (64, 64, 3)
    assert np.abs(circle - square).mean() > 0.2  # the sketch steers the (random tiny) model
    # With the guidance off the sketch has no effect; a sampler override keeps the ControlNet.
    off_circle = render(circle_sketch(), controlnet_conditioning_scale=0.0)
    off_square = render(square_sketch(), controlnet_conditioning_scale=0.0)
    assert np.array_equal(off_circle, off_square)
    assert (
        np.abs(render(circle_sketch(), scheduler="euler_a") - render(square_sketch(), scheduler="euler_a")).mean() > 0.2
    )
    # The cached model is never changed.
    assert type(studio.models.get(None).pipe).__name__ == "StableDiffusionPipeline"


def test_controlnet_shipped_in_the_model_folder_is_used_by_default(studio, model_with_controlnet):
    def render(sketch):
        return np.asarray(
            studio.sketch_to_image(
                "x", sketch, seed=1, num_inference_steps=STEPS, model=str(model_with_controlnet)
            ).images[0]
        )

    assert np.abs(render(circle_sketch()).astype(int) - render(square_sketch()).astype(int)).mean() > 0.2


def test_t2i_adapter_path_runs(studio, adapter_folder):
    from studio import Studio

    with_adapter = Studio(studio.settings.with_(add_ons=AddOns(t2i_adapter=adapter_folder)))
    result = with_adapter.sketch_to_image("a red circle", circle_sketch(), seed=1, num_inference_steps=STEPS)
    other = with_adapter.sketch_to_image("a red circle", square_sketch(), seed=1, num_inference_steps=STEPS)
    assert result.images[0].size == (64, 64)
    assert np.abs(np.asarray(result.images[0]).astype(int) - np.asarray(other.images[0]).astype(int)).mean() > 0.1


def test_sdedit_path_runs_from_the_sketch(studio):
    first = studio.sketch_to_image(
        "a red circle", circle_sketch(), seed=2, num_inference_steps=4, method="sdedit", strength=0.5
    )
    again = studio.sketch_to_image(
        "a red circle", circle_sketch(), seed=2, num_inference_steps=4, method="sdedit", strength=0.5
    )
    other = studio.sketch_to_image(
        "a red circle", square_sketch(), seed=2, num_inference_steps=4, method="sdedit", strength=0.5
    )
    assert first.images[0].size == (64, 64)
    assert np.array_equal(np.asarray(first.images[0]), np.asarray(again.images[0]))
    assert np.abs(np.asarray(first.images[0]).astype(int) - np.asarray(other.images[0]).astype(int)).mean() > 0.5
    assert first.records[0].input_hashes.keys() == {"control_image"}


# -- the embedded model: does a sketched outline come out as a filled shape where it was drawn? -----

needs_embedded = pytest.mark.skipif(
    not (EMBEDDED_MODEL_DIR / "model_index.json").is_file(), reason="the embedded model is not built yet"
)


def foreground(image: Image.Image) -> np.ndarray:
    """Saturated pixels: the shapes of the toy world (its backgrounds are white, black or grey)."""
    rgb = np.asarray(image.convert("RGB")).astype(np.int16)
    return (rgb.max(axis=-1) - rgb.min(axis=-1)) >= 60


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


@needs_embedded
@pytest.mark.embedded_quality
@pytest.mark.parametrize("method", ["auto", "sdedit"])
def test_embedded_sketched_circle_becomes_a_filled_shape_where_it_was_drawn(method):
    from studio import Studio

    studio = Studio(Settings(model="embedded"))
    prompt = "a large red circle on the left on a white background"
    drawn = scene(prompt)
    sketch = world.render_sketch(drawn, 64)
    region = world.render_masks(drawn, 64)[0]
    scores = []
    for seed in (1, 2, 3):
        result = studio.sketch_to_image(prompt, sketch, seed=seed, method=method, num_inference_steps=20)
        scores.append(iou(foreground(result.images[0]), region))
    assert sorted(scores)[1] >= 0.5, scores  # most seeds
