"""PNG metadata: A1111 parameters, the studio JSON, reading back, replay."""

import numpy as np
import pytest
from PIL import Image

from studio.metadata import parse_a1111_parameters, read_record
from studio.requests import StudioInputError


def test_png_carries_a1111_parameters_and_the_full_request(studio, tmp_path):
    result = studio.text_to_image(
        "a red circle, on white", negative_prompt="blurry", seed=[4, 9], num_inference_steps=3, guidance_scale=5.5,
        scheduler="euler_a",
    )
    paths = result.save(tmp_path / "out.png")
    assert [p.name for p in paths] == ["out-1.png", "out-2.png"]
    text = Image.open(paths[1]).text["parameters"]
    assert text.splitlines()[0] == "a red circle, on white"
    assert text.splitlines()[1] == "Negative prompt: blurry"
    settings = text.splitlines()[2]
    for part in ["Steps: 3", "Sampler: Euler a", "CFG scale: 5.5", "Seed: 9", "Size: 64x64", "Model hash: ", "Model: tiny-sd15"]:
        assert part in settings
    record = read_record(paths[1])
    assert record.request.prompt == "a red circle, on white"
    assert record.request.seed == [4, 9] and record.seed == 9 and record.image_index == 1
    assert record.environment["device"] == "cpu" and record.environment["dtype"] == "float32"
    assert len(record.model_hash) == 10


def test_a1111_text_parses_back_into_a_request():
    record = parse_a1111_parameters(
        "masterpiece, a cat\nNegative prompt: lowres\n"
        'Steps: 30, Sampler: DPM++ 2M Karras, CFG scale: 6.5, Seed: 1234, Size: 512x768, Model hash: abcdef0123, Model: "v1-5, pruned"'
    )
    request = record.request
    assert (request.prompt, request.negative_prompt) == ("masterpiece, a cat", "lowres")
    assert (request.num_inference_steps, request.guidance_scale, request.seed) == (30, 6.5, 1234)
    assert (request.width, request.height, request.scheduler) == (512, 768, "dpm++_2m_karras")
    assert record.model_name == "v1-5, pruned" and record.model_hash == "abcdef0123"


def test_replay_gives_identical_pixels(studio, tmp_path):
    original = studio.text_to_image("a yellow square", seed=[30, 31], num_inference_steps=3, scheduler="euler_a")
    path = original.save(tmp_path / "{seed}.png")[1]
    replayed = studio.replay(path)
    assert replayed.seeds == [31]
    assert np.array_equal(np.asarray(replayed.images[0]), np.asarray(Image.open(path)))


def test_png_without_metadata_is_a_clear_error(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    with pytest.raises(StudioInputError, match="no generation metadata"):
        read_record(tmp_path / "plain.png")
