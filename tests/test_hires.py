"""The hires fix (text_to_image's hr_* fields, A1111's): render at the base size, upscale, refine with
image-to-image; on the tiny in-code SD model. Sizes, what the refining pass changes, seeds, the output-size
limit before loading, the A1111 text (written and read back), A1111's API `enable_hr`, the CLI flags."""

import json

import numpy as np
import pytest
from helpers import pixels
from PIL import Image

from studio.metadata import a1111_parameters, parse_a1111_parameters
from studio.requests import StudioInputError

STEPS = 2
HIRES = dict(hr_scale=2, hr_steps=2)  # strength 0.7 x 2 steps: 1 refining step


def render(studio, **fields):
    return studio.text_to_image("a red circle", **{"seed": 3, "num_inference_steps": STEPS, **fields})


def test_the_image_is_the_scaled_size_and_refined_not_just_resized(studio):
    base = render(studio).images[0]
    hires = render(studio, **HIRES).images[0]
    assert hires.size == (128, 128)
    resized = base.resize((128, 128), Image.LANCZOS)
    assert np.abs(pixels(hires) - pixels(resized)).mean() > 1.0  # the refining pass drew new detail
    # ...on the base image's layout: far closer to its upscale than to an unrelated image's
    unrelated = render(studio, seed=99).images[0].resize((128, 128), Image.LANCZOS)
    assert np.abs(pixels(hires) - pixels(resized)).mean() < np.abs(pixels(hires) - pixels(unrelated)).mean()


def test_strength_zero_gives_the_upscale_exactly(studio):
    base = render(studio).images[0]
    for upscaler, resample in (("lanczos", Image.LANCZOS), ("nearest", Image.NEAREST)):
        result = render(studio, hr_scale=1.5, hr_denoising_strength=0, hr_upscaler=upscaler)
        assert np.array_equal(pixels(result.images[0]), pixels(base.resize((96, 96), resample)))
        assert not result.warnings


def test_a_strength_too_small_for_one_step_keeps_the_upscale_with_a_warning(studio):
    result = render(studio, hr_scale=1.5, hr_denoising_strength=0.1, hr_steps=4)
    base = render(studio).images[0]
    assert np.array_equal(pixels(result.images[0]), pixels(base.resize((96, 96), Image.LANCZOS)))
    assert any("less than one step" in warning for warning in result.warnings)


def test_latent_upscaler_and_sizes_that_are_not_square(studio):
    latent = render(studio, width=64, height=96, hr_scale=1.5, hr_upscaler="latent", hr_steps=2)
    assert latent.images[0].size == (96, 144)
    lanczos = render(studio, width=64, height=96, hr_scale=1.5, hr_steps=2)
    assert np.abs(pixels(latent.images[0]) - pixels(lanczos.images[0])).mean() > 0.5


def test_seeds_are_reproducible_and_a_batch_matches_single_images(studio):
    first = render(studio, seed=[5, 6], **HIRES)
    again = render(studio, seed=6, **HIRES)
    assert np.abs(pixels(first.images[1]) - pixels(again.images[0])).max() <= 2  # batched rounding at most
    assert np.array_equal(pixels(render(studio, seed=6, **HIRES).images[0]), pixels(again.images[0]))
    assert np.abs(pixels(first.images[0]) - pixels(first.images[1])).mean() > 1.0


def test_too_large_a_target_is_refused_before_loading(tmp_path):
    from studio import Settings, Studio

    unloadable = Studio(Settings(model=str(tmp_path / "no-such-model"), max_output_pixels=512 * 512))
    with pytest.raises(StudioInputError, match=r"1024x1024 .* or hr_scale \(now 2\)"):
        unloadable.text_to_image("a circle", width=512, height=512, hr_scale=2)
    with pytest.raises(StudioInputError, match="hr_scale"):
        unloadable.text_to_image("a circle", hr_scale=5)  # out of bounds (1-4)


def test_hires_fields_without_hr_scale_are_reported(studio):
    result = render(studio, hr_upscaler="latent")
    assert any("hr_upscaler ignored: the hires fix is off" in warning for warning in result.warnings)


def test_a1111_text_has_the_hires_lines_and_reads_back(studio):
    result = render(studio, hr_scale=2, hr_steps=4, hr_denoising_strength=0.55, hr_upscaler="latent")
    text = a1111_parameters(result.records[0], *result.images[0].size)
    assert "Size: 64x64" in text  # A1111's Size is the first pass's
    assert "Denoising strength: 0.55, Hires upscale: 2, Hires steps: 4, Hires upscaler: Latent" in text
    request = parse_a1111_parameters(text).request
    assert (request.hr_scale, request.hr_steps, request.hr_denoising_strength, request.hr_upscaler.name) == (
        2,
        4,
        0.55,
        "latent",
    )
    assert (request.width, request.height) == (64, 64)
    plain = parse_a1111_parameters(a1111_parameters(render(studio).records[0], 64, 64)).request
    assert plain.hr_scale is None and "Hires" not in a1111_parameters(render(studio).records[0], 64, 64)


def test_a1111_api_enable_hr(studio, tmp_path):
    from fastapi.testclient import TestClient

    from studio.api import JobGate, api_only_app
    from studio.api.a1111 import parse_infotext
    from studio.ui.runner import StudioUI

    ui = StudioUI(studio, studio.settings.with_(outputs_dir=tmp_path / "out"))
    app = api_only_app(ui, queue_size=2, allowed_hosts=("testserver",), gate=JobGate(ui, 2))
    client = TestClient(app)
    body = {"prompt": "a red circle", "steps": 2, "width": 64, "height": 64, "seed": 3}
    hires = {
        "enable_hr": True,
        "hr_scale": 1.5,
        "hr_upscaler": "Lanczos",
        "denoising_strength": 0.6,
        "hr_second_pass_steps": 2,
    }
    answer = client.post("/sdapi/v1/txt2img", json={**body, **hires}).json()
    info = json.loads(answer["info"])
    assert (info["width"], info["height"]) == (96, 96)
    fields = parse_infotext(info["infotexts"][0])
    hires_fields = (fields["Hires upscale"], fields["Hires upscaler"], fields["Denoising strength"])
    assert hires_fields == ("1.5", "Lanczos", "0.6")
    off = json.loads(client.post("/sdapi/v1/txt2img", json={**body, "hr_scale": 2}).json()["info"])
    assert (off["width"], off["height"]) == (64, 64)  # enable_hr false: hr_scale alone does nothing, as A1111
    esrgan = client.post("/sdapi/v1/txt2img", json={**body, **hires, "hr_upscaler": "R-ESRGAN 4x+"}).json()
    esrgan = json.loads(esrgan["info"])
    assert any("R-ESRGAN 4x+" in warning for warning in esrgan["warnings"])


def test_cli_flags_come_from_the_fields(capsys):
    from studio.cli import main

    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = capsys.readouterr().out
    for flag in ("--hr-scale", "--hr-steps", "--hr-denoising-strength", "--hr-upscaler"):
        assert flag in text



def test_the_text_to_image_tab_has_a_hires_fix_accordion(studio):
    from studio.ui.app import build_app

    blocks = {getattr(block, "elem_id", None): block for block in build_app(studio, studio.settings).blocks.values()}
    assert blocks["text_to_image-options"].label == "Hires fix"
    assert blocks["text_to_image-hr_upscaler"].choices == [(name, name) for name in ("lanczos", "nearest", "latent")]
    assert (blocks["text_to_image-hr_denoising_strength"].value, blocks["text_to_image-hr_steps"].value) == (0.7, 0)
    assert blocks["text_to_image-hr_scale"].value is None  # off until the user sets a factor


def test_replay_gives_the_same_hires_image(studio, tmp_path):
    result = studio.text_to_image("a (red:1.4) circle BREAK blue", seed=4, num_inference_steps=STEPS, **HIRES)
    [png] = result.save(tmp_path / "hires.png")
    replayed = studio.replay(png)
    assert replayed.request.hr_scale == 2 and replayed.request.prompt == "a (red:1.4) circle BREAK blue"
    assert np.array_equal(pixels(replayed.images[0]), pixels(result.images[0]))
