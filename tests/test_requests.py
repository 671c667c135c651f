"""The request schema rejects bad values before any model is loaded, quoting them."""

import math

import pytest

from studio.requests import MAX_PROMPT_CHARS, StudioInputError, parse_request, seeds_for


@pytest.mark.parametrize(
    "fields, quoted",
    [
        ({"width": 100}, "100"),
        ({"width": 0}, "0"),
        ({"height": -8}, "-8"),
        ({"width": 100000}, "100000"),
        ({"num_inference_steps": 0}, "0"),
        ({"num_inference_steps": -1}, "-1"),
        ({"num_inference_steps": 10**6}, "1000000"),
        ({"guidance_scale": math.nan}, "nan"),
        ({"guidance_scale": math.inf}, "inf"),
        ({"batch_size": 1000}, "1000"),
        ({"seed": 2**64}, str(2**64)),
        ({"seed": -1}, "-1"),
        ({"scheduler": "euler_b"}, "euler_b"),
        ({"task": "upscale"}, "upscale"),
        ({"custom_pipeline": "lpw_stable_diffusion"}, "lpw_stable_diffusion"),
        ({"trust_remote_code": True}, "trust_remote_code"),
        ({"task": "inpaint", "image": "a.png", "strength": -0.1}, "-0.1"),
        ({"task": "inpaint", "image": "a.png", "strength": 1.5}, "1.5"),
        ({"seed": [1, 2, 3], "batch_size": 2}, "3 seeds"),
        ({"prompt": "x" * (MAX_PROMPT_CHARS + 1)}, "prompt"),
    ],
)
def test_bad_values_are_rejected_with_the_value_quoted(fields, quoted):
    with pytest.raises(StudioInputError) as error:
        parse_request(fields)
    assert quoted in str(error.value)


def test_valid_request_defaults_and_task():
    request = parse_request({"prompt": "a red circle"})
    assert request.task == "text_to_image"
    assert request.width is None and request.height is None  # the model's native size
    assert request.batch_size == 1


def test_seed_list_sets_batch_size_and_seeds_follow_first_seed():
    assert parse_request({"seed": [7, 3, 9]}).batch_size == 3
    assert seeds_for(parse_request({"seed": 5, "batch_size": 3}), random_seed=0) == [5, 6, 7]
    assert seeds_for(parse_request({"batch_size": 2}), random_seed=41) == [41, 42]
    assert seeds_for(parse_request({"seed": 2**64 - 1, "batch_size": 2}), random_seed=0) == [2**64 - 1, 0]


def test_long_and_control_character_prompts_are_accepted_for_truncation():
    request = parse_request({"prompt": "red " * 25_000 + "\u202e\x00\x07"})
    assert "\x00" not in request.prompt  # NUL would break PNG text chunks
    assert len(request.prompt) > 100_000


def test_non_object_batch_line_is_rejected():
    with pytest.raises(StudioInputError, match="JSON object"):
        parse_request(["a", "list"])
