"""A1111 prompt syntax and long prompts (pipelines/prompts.py): the parser's weights and chunks, embeddings
equal to diffusers' own for plain text, and on tiny in-code models: weights change pixels, `(word:1.0)` is
`word`, a long prompt's tail matters, BREAK starts a chunk, negative weights work, every task takes them."""

import numpy as np
import pytest
import torch
from helpers import noise_image, pixels

from studio_pipelines.prompts import (
    BREAK,
    MAX_PROMPT_CHUNKS,
    chunk_tokens,
    encode_weighted,
    parse_prompt_attention,
    prompt_kwargs,
)

STEPS = 2


def differs(first, second) -> bool:
    """Clearly different pixels (the tiny models' text conditioning is weak: a few levels on average)."""
    return np.abs(first.astype(int) - second.astype(int)).mean() > 0.05


def weights(prompt):
    return [(("BREAK" if text is BREAK else text), weight) for text, weight in parse_prompt_attention(prompt)]


# -- the parser --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prompt, expected",
    [
        ("a red circle", [("a red circle", 1.0)]),
        ("(red:1.0) circle", [("red circle", 1.0)]),  # (word:1.0) is word
        ("a (red) circle", [("a ", 1.0), ("red", 1.1), (" circle", 1.0)]),
        ("a [red] circle", [("a ", 1.0), ("red", 1 / 1.1), (" circle", 1.0)]),
        ("(red:1.5) circle", [("red", 1.5), (" circle", 1.0)]),
        ("((red))", [("red", 1.1 * 1.1)]),
        ("(a (b:2) c:0.5)", [("a ", 0.5), ("b", 1.0), (" c", 0.5)]),
        ("(unclosed", [("unclosed", 1.1)]),  # an open bracket runs to the end
        (r"\(literal\) \[x\] a\\b", [(r"(literal) [x] a\b", 1.0)]),  # escapes are text
        ("a) b] c: d", [("a) b] c: d", 1.0)]),  # closers with nothing open and lone colons are text
        ("a BREAK b", [("a", 1.0), ("BREAK", None), ("b", 1.0)]),
        ("aBREAKb", [("aBREAKb", 1.0)]),  # only the word
        ("", [("", 1.0)]),
    ],
)
def test_parser_weights(prompt, expected):
    got = weights(prompt)
    assert [text for text, _ in got] == [text for text, _ in expected]
    for (_, weight), (_, wanted) in zip(got, expected):
        assert weight == pytest.approx(wanted) if wanted is not None else weight is None


def test_chunks_of_75_tokens_with_break_and_comma_backtrack(sdxl_pipe):
    tokenizer = sdxl_pipe.tokenizer  # character-level: one token per character
    chunks, total = chunk_tokens(sdxl_pipe, tokenizer, parse_prompt_attention("ab" * 40))
    assert total == 80 and [len(chunk.tokens) for chunk in chunks] == [75, 5]
    chunks, _ = chunk_tokens(sdxl_pipe, tokenizer, parse_prompt_attention("abc BREAK (de:1.5)"))
    assert [len(chunk.tokens) for chunk in chunks] == [3, 2]
    assert chunks[1].weights == [1.5, 1.5]
    # A chunk that fills up moves the words after its last comma (within 20 tokens) into the next one.
    chunks, _ = chunk_tokens(sdxl_pipe, tokenizer, parse_prompt_attention("a" * 70 + "," + "b" * 10))
    assert [len(chunk.tokens) for chunk in chunks] == [71, 10]


@pytest.fixture(scope="module")
def sd_pipe(sd15_folder):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(sd15_folder)


@pytest.fixture(scope="module")
def sdxl_pipe(sdxl_folder):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(sdxl_folder)


def test_plain_prompts_go_to_the_pipeline_as_text(sd_pipe):
    # The pipeline gets exactly what it got before this module existed: today's pixels.
    assert prompt_kwargs(sd_pipe, "a red circle", "") == {"prompt": "a red circle", "negative_prompt": None}
    assert prompt_kwargs(sd_pipe, "a red circle", "blue") == {"prompt": "a red circle", "negative_prompt": "blue"}
    assert prompt_kwargs(sd_pipe, "(red:1.0) circle", "") == {"prompt": "red circle", "negative_prompt": None}
    assert "prompt_embeds" in prompt_kwargs(sd_pipe, "(red:1.2) circle", "")
    assert "prompt_embeds" in prompt_kwargs(sd_pipe, "red circle", "[blue]")
    assert "prompt_embeds" in prompt_kwargs(sd_pipe, "red " * 30, "")  # 120 tokens: chunked


def test_unweighted_embeddings_equal_diffusers_own_bit_for_bit(sd_pipe, sdxl_pipe):
    mine = encode_weighted(sd_pipe, "a red circle", "blue")
    theirs = sd_pipe.encode_prompt("a red circle", "cpu", 1, True, "blue")
    assert torch.equal(mine["prompt_embeds"], theirs[0]) and torch.equal(mine["negative_prompt_embeds"], theirs[1])
    for negative in ("blue", ""):  # SDXL: both encoders, pooled, and zeros for an empty negative prompt
        mine = encode_weighted(sdxl_pipe, "a red circle", negative)
        theirs = sdxl_pipe.encode_prompt("a red circle", device="cpu", negative_prompt=negative or None)
        names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
        assert all(torch.equal(mine[name], value) for name, value in zip(names, theirs))


def test_weights_scale_tokens_and_keep_the_mean(sd_pipe, sdxl_pipe):
    # SDXL's penultimate states have a mean to keep; the tiny SD model's final layer norm (no offset) has
    # none, and is only scaled.
    for pipe, keeps_mean in ((sdxl_pipe, True), (sd_pipe, False)):
        plain = encode_weighted(pipe, "ab cd", "")["prompt_embeds"]
        weighted = encode_weighted(pipe, "ab (cd:1.5)", "")["prompt_embeds"]
        if keeps_mean:
            assert weighted.mean().item() == pytest.approx(plain.mean().item(), rel=1e-4)
        # Every state scaled by one factor, the emphasised tokens (after BOS: 'a', 'b', ' ', then 'c', 'd') 1.5x more.
        ratio = (weighted / plain)[0, :, 0]
        assert ratio[4].item() == pytest.approx(ratio[1].item() * 1.5, rel=1e-3)
        assert ratio[2].item() == pytest.approx(ratio[1].item(), rel=1e-4)


def test_long_prompts_are_padded_to_equal_length_for_guidance(sd_pipe, sdxl_pipe):
    for pipe in (sd_pipe, sdxl_pipe):
        embeds = prompt_kwargs(pipe, "red circle " * 20, "(blue:1.2)")  # 220 tokens: 3 chunks; negative 1
        assert embeds["prompt_embeds"].shape[1] == embeds["negative_prompt_embeds"].shape[1] == 3 * 77
    embeds = prompt_kwargs(sd_pipe, "x " * 75 * (MAX_PROMPT_CHUNKS + 3), "")
    assert embeds["prompt_embeds"].shape[1] == MAX_PROMPT_CHUNKS * 77  # the limit


# -- images ------------------------------------------------------------------------------------------------


def image(studio, prompt, **fields):
    fields = {"seed": 7, "num_inference_steps": STEPS, **fields}
    return pixels(studio.text_to_image(prompt, **fields).images[0])


def test_weights_change_the_image_and_weight_one_does_not(studio):
    base = image(studio, "a red circle")
    assert np.array_equal(image(studio, "a (red:1.0) circle"), base)
    assert differs(image(studio, "a (red:1.6) circle"), base)
    assert differs(image(studio, "a [[red]] circle"), base)


def test_negative_prompt_weights_change_the_image(studio):
    base = image(studio, "a circle", negative_prompt="blue")
    assert np.array_equal(image(studio, "a circle", negative_prompt="(blue:1.0)"), base)
    assert differs(image(studio, "a circle", negative_prompt="(blue:1.8)"), base)


def test_long_prompt_tail_matters_without_a_truncation_warning(studio):
    head = "a red circle on the left, " * 4  # 104 characters: past the tiny tokenizer's 75
    result = studio.text_to_image(head + "blue square", seed=7, num_inference_steps=STEPS)
    other = image(studio, head + "green stars")
    assert not any("tokens long" in warning for warning in result.warnings)
    assert differs(pixels(result.images[0]), other)
    assert result.request.prompt == head + "blue square"  # recorded as typed (A1111 writes it so)


def test_break_starts_a_new_chunk_and_changes_the_image(studio):
    assert differs(image(studio, "a red circle BREAK blue"), image(studio, "a red circle blue"))


def test_metadata_keeps_the_prompt_as_typed(studio):
    from studio.metadata import a1111_parameters

    result = studio.text_to_image("a (red:1.3) circle", seed=7, num_inference_steps=1, negative_prompt="[blue]")
    text = a1111_parameters(result.records[0], *result.images[0].size)
    assert text.startswith("a (red:1.3) circle\nNegative prompt: [blue]\n")


def test_sdxl_weights_change_the_image(studio, sdxl_folder):
    fields = dict(model=str(sdxl_folder), num_inference_steps=2)
    base = image(studio, "a red circle", **fields)
    assert np.array_equal(image(studio, "a (red:1.0) circle", **fields), base)
    assert differs(image(studio, "a (red:1.8) circle", **fields), base)
    long = image(studio, "a red circle " * 8 + "BREAK blue", negative_prompt="(green:1.2)", **fields)
    assert long.shape == base.shape


def test_every_task_takes_weighted_prompts(studio, tmp_path):
    photo = tmp_path / "photo.png"
    noise_image(0).save(photo)
    mask = tmp_path / "mask.png"
    from PIL import Image

    square = np.zeros((64, 64), np.uint8)
    square[16:48, 16:48] = 255
    Image.fromarray(square, "L").save(mask)
    runs = {
        "sketch_to_image": lambda prompt: studio.sketch_to_image(
            prompt, photo, seed=2, num_inference_steps=3, method="sdedit", strength=0.7
        ),
        "inpaint": lambda prompt: studio.inpaint(prompt, photo, mask, seed=2, num_inference_steps=2),
        "style_transfer": lambda prompt: studio.style_transfer(prompt, photo, seed=2, num_inference_steps=3),
        "imagic": lambda prompt: studio.imagic(
            prompt, photo, seed=2, num_inference_steps=2, embedding_steps=1, finetune_steps=1
        ),
    }
    for task, run in runs.items():  # plain text is the pipeline's own path (above); weights and length change it
        plain = pixels(run("a red circle").images[0])
        assert differs(pixels(run("a (red:1.8) circle " + "x" * 80).images[0]), plain), task


def test_a_text_encoder_lora_shapes_weighted_prompts(studio, sd_pipe, tmp_path):
    # Weighted prompts are encoded inside the sampling call, where the request's LoRAs are loaded: a LoRA on
    # the text encoder alone (kohya lora_te_* keys) changes them, and is gone again afterwards.
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(0)
    state = {}
    for name, module in sd_pipe.text_encoder.named_modules():
        if isinstance(module, torch.nn.Linear) and name.split(".")[-1] in ("q_proj", "k_proj", "v_proj", "out_proj"):
            key = "lora_te_" + name.replace(".", "_")
            state[f"{key}.lora_down.weight"] = torch.randn(2, module.in_features, generator=generator)
            state[f"{key}.lora_up.weight"] = torch.randn(module.out_features, 2, generator=generator)
            state[f"{key}.alpha"] = torch.tensor(2.0)
    save_file(state, str(tmp_path / "text-only.safetensors"))
    lora = {"name_or_path": str(tmp_path / "text-only.safetensors"), "weight": 1.0}
    base = image(studio, "a (red:1.5) circle")
    assert differs(image(studio, "a (red:1.5) circle", loras=[lora]), base)
    assert np.array_equal(image(studio, "a (red:1.5) circle"), base)
