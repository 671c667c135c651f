"""Step caching (the cache_interval request field, DeepCache): deep UNet blocks run only every N-th step,
the images stay what the prompt asks for, and nothing of it stays on the cached model."""

from __future__ import annotations

import numpy as np
import pytest

from studio import Settings, Studio
from studio.demo import shapes_eval, world
from studio.metadata import read_record

PROMPTS = ["a large red circle on a white background", "a blue square on a black background"]


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    return Studio(Settings(outputs_dir=tmp_path_factory.mktemp("outputs")))


def pixels(result) -> np.ndarray:
    return np.asarray(result.images[0], dtype=np.int16)


def deep_block_calls(studio: Studio, **fields) -> int:
    """How often the UNet's middle block really ran during one 20-step text-to-image request."""
    mid = studio.models.get(None).pipe.unet.mid_block.resnets[0]
    calls = []
    handle = mid.register_forward_hook(lambda *args: calls.append(1))
    try:
        studio.text_to_image(PROMPTS[0], seed=1, num_inference_steps=20, **fields)
    finally:
        handle.remove()
    return len(calls)


def test_deep_blocks_run_every_nth_step_only(embedded):
    assert deep_block_calls(embedded, cache_interval=1) == 20  # 1: off
    assert deep_block_calls(embedded, cache_interval=3) == 7  # steps 0, 3, ..., 18
    assert deep_block_calls(embedded, cache_interval=2) == 10
    assert deep_block_calls(embedded) == 10  # unset: the embedded model's studio.json recommends 2


def test_cached_images_still_draw_the_prompt_and_stay_close_to_uncached(embedded):
    verdicts, differences = [], []
    for prompt in PROMPTS:
        claims = world.parse_claims(prompt)
        for seed in (1, 2, 3):
            plain = embedded.text_to_image(prompt, seed=seed, num_inference_steps=20, cache_interval=1)
            cached = embedded.text_to_image(prompt, seed=seed, num_inference_steps=20, cache_interval=3)
            verdicts.append(all(shapes_eval.score(cached.images[0], claims).values()))
            differences.append(np.abs(pixels(plain) - pixels(cached)).mean())
    assert sum(verdicts) >= 5, verdicts  # of 6, as the uncached model does on these prompts
    assert all(difference > 0 for difference in differences), differences  # the cache really ran
    assert np.median(differences) < 12, differences  # and mostly changed little (a toy model can flip a few)


def test_the_cached_model_is_left_unchanged(embedded):
    def render(**fields):
        return pixels(embedded.text_to_image(PROMPTS[1], seed=4, num_inference_steps=8, **fields))

    before = render(cache_interval=1)
    cached = render(cache_interval=2)
    assert np.array_equal(before, render(cache_interval=1))  # nothing of the cache stayed on the model
    assert np.array_equal(cached, render())  # the recommendation is the same cache


def test_image_to_image_tasks_cache_steps_and_record_the_interval(studio, tmp_path):
    from PIL import Image

    sketch = Image.new("RGB", (64, 64), "white")
    sketch.paste((220, 30, 30), (16, 16, 48, 48))
    fields = dict(seed=5, num_inference_steps=6, width=64, height=64, strength=0.8)
    plain = studio.style_transfer("striped", sketch, **fields)
    cached = studio.style_transfer("striped", sketch, cache_interval=2, **fields)
    assert not np.array_equal(pixels(plain), pixels(cached))
    path = cached.save(tmp_path / "cached.png")[0]
    assert read_record(path).request.cache_interval == 2


def test_interval_out_of_range_is_refused_naming_the_value():
    from studio.core import make_request

    with pytest.raises(ValueError, match="cache_interval"):
        make_request("text_to_image", prompt="x", cache_interval=0)
