"""Text-to-image on tiny in-code models: seeds, schedulers, batches, warnings, cancel, non-finite outputs."""

import numpy as np
import pytest
import torch

from studio_pipelines.common import NonFiniteOutputError
from studio.progress import GenerationCancelled, Progress


def pixels(image):
    return np.asarray(image, dtype=np.int16)


def test_same_request_same_pixels_and_seed_changes_them(studio):
    first = studio.text_to_image("a red circle", seed=11, num_inference_steps=3)
    again = studio.text_to_image("a red circle", seed=11, num_inference_steps=3)
    other = studio.text_to_image("a red circle", seed=12, num_inference_steps=3)
    assert np.array_equal(pixels(first.images[0]), pixels(again.images[0]))
    assert np.abs(pixels(first.images[0]) - pixels(other.images[0])).mean() > 1.0
    assert first.images[0].size == (64, 64)  # the model's native size


def test_batch_has_one_seed_per_image_matching_single_renders(studio):
    batch = studio.text_to_image("a blue square", seed=[21, 8], num_inference_steps=3)
    assert batch.seeds == [21, 8]
    single = studio.text_to_image("a blue square", seed=8, num_inference_steps=3)
    # Same noise from the same CPU generator: the batch's second image is the seed-8 image
    # (batched matmuls may differ by a rounding step, never by content).
    assert np.abs(pixels(batch.images[1]) - pixels(single.images[0])).max() <= 2
    assert np.abs(pixels(batch.images[0]) - pixels(batch.images[1])).mean() > 1.0


def test_random_seed_is_recorded(studio):
    result = studio.text_to_image("a green triangle", num_inference_steps=2)
    assert result.request.seed == result.seeds[0]
    replayed = studio.text_to_image("a green triangle", num_inference_steps=2, seed=result.seeds[0])
    assert np.array_equal(pixels(result.images[0]), pixels(replayed.images[0]))


@pytest.mark.parametrize("scheduler", ["euler_a", "dpm++_2m_karras", "ddim", "unipc", "lcm", "dpm++_2m_sde"])
def test_schedulers_by_friendly_name(studio, scheduler):
    result = studio.text_to_image("a circle", seed=1, num_inference_steps=4, scheduler=scheduler)
    assert result.records[0].sampler  # an A1111 sampler name is recorded
    assert np.isfinite(pixels(result.images[0])).all()
    # The cached model keeps its own scheduler: a request's sampler never leaks into the next one.
    loaded = studio.models.get(None)
    assert type(loaded.pipe.scheduler).__name__ == "EulerDiscreteScheduler"


def test_other_size_and_sdxl_model(studio, sdxl_folder):
    result = studio.text_to_image("a circle", seed=1, num_inference_steps=2, width=96, height=64, model=str(sdxl_folder))
    assert result.images[0].size == (96, 64)
    assert result.records[0].model_name == "tiny-sdxl"


def test_overlong_prompt_is_truncated_with_a_warning(studio):
    result = studio.text_to_image("red " * 25_000, seed=1, num_inference_steps=1)
    assert any("tokens long" in warning for warning in result.warnings)


def test_cancel_stops_and_raises(studio):
    seen = []
    progress = Progress(on_update=lambda stage, step, total, preview: (seen.append(step), progress.cancel()))
    with pytest.raises(GenerationCancelled):
        studio.text_to_image("a circle", seed=1, num_inference_steps=20, progress=progress)
    assert seen == [1]  # stopped after the first step


def _previews_of(studio, **fields):
    previews = []
    progress = Progress(on_update=lambda stage, step, total, preview: previews.append((step, preview())))
    result = studio.text_to_image("a red circle", seed=3, num_inference_steps=4, progress=progress, **fields)
    return previews, result.images[0]


def test_previews_show_the_image_being_sampled(studio):
    previews, final = _previews_of(studio)
    assert [step for step, _ in previews] == [1, 2, 3, 4]
    # Small latents are decoded by the model's VAE: the last step's preview is the result itself.
    assert previews[-1][1].size == final.size
    assert np.abs(pixels(previews[-1][1]) - pixels(final)).max() <= 1
    assert np.abs(pixels(previews[0][1]) - pixels(final)).mean() > 1.0  # the first step is still noise


def test_large_latents_get_the_cheap_linear_preview(studio, monkeypatch):
    from studio import previews as previews_module

    monkeypatch.setattr(previews_module, "VAE_PREVIEW_MAX_CELLS", 0)
    previews, final = _previews_of(studio)
    latent_side = final.size[0] // studio.models.get(None).pipe.vae_scale_factor  # one pixel per latent cell
    assert previews[-1][1].size == (latent_side, latent_side)
    assert np.ptp(pixels(previews[-1][1])) > 0


def test_non_finite_decode_is_refused_not_saved(sd15_folder, tmp_path):
    from studio import Settings, Studio

    studio = Studio(Settings(model=str(sd15_folder)))
    loaded = studio.models.get(None)
    with torch.no_grad():
        loaded.pipe.vae.decoder.conv_out.bias.fill_(float("nan"))
    with pytest.raises(NonFiniteOutputError, match="NaN"):
        studio.text_to_image("a circle", seed=1, num_inference_steps=1)


def test_zero_terminal_snr_model_refuses_samplers_that_would_ignore_it():
    from diffusers import DPMSolverMultistepScheduler

    from studio.schedulers import make_scheduler

    config = DPMSolverMultistepScheduler(prediction_type="v_prediction", rescale_betas_zero_snr=True).config
    euler = make_scheduler("euler", config)
    assert euler.config.rescale_betas_zero_snr and euler.alphas_cumprod[-1] < 1e-6  # starts from pure noise
    with pytest.raises(ValueError, match="'lms'.*zero-terminal-SNR.*euler"):
        make_scheduler("lms", config)
    ordinary = DPMSolverMultistepScheduler(prediction_type="v_prediction").config
    assert make_scheduler("lms", ordinary).alphas_cumprod[-1] > 1e-5  # (default linear betas end at 4e-5)


def test_prediction_type_is_a_request_field_recorded_in_the_png(studio, tmp_path):
    """Issue 17: --prediction-type for models whose files do not say (SD 2.x 512-base runs as v otherwise)."""
    fields = dict(seed=3, num_inference_steps=2)
    plain = studio.text_to_image("a red circle", **fields)
    same = studio.text_to_image("a red circle", prediction_type="epsilon", **fields)  # what the model says
    v_pred = studio.text_to_image("a red circle", prediction_type="v_prediction", **fields)
    assert np.array_equal(np.asarray(plain.images[0]), np.asarray(same.images[0]))
    assert not np.array_equal(np.asarray(plain.images[0]), np.asarray(v_pred.images[0]))
    assert studio.models.get(None).pipe.scheduler.config.prediction_type == "epsilon"  # the cached model unchanged
    saved = v_pred.save(tmp_path / "v.png")[0]
    from studio.metadata import read_record

    assert read_record(saved).request.prediction_type == "v_prediction"
