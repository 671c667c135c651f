"""Text-to-image: a prompt (and negative prompt) to images, one CPU-seeded generator per image."""

from __future__ import annotations

from typing import Literal

from studio.requests import BaseRequest, StudioInputError
from studio.tasks import Task

from .common import (
    TaskContext,
    decode_latents,
    default_size,
    sampling_kwargs,
    to_pil,
    warn_if_truncated,
    with_scheduler,
)


class TextToImageRequest(BaseRequest):
    task: Literal["text_to_image"] = "text_to_image"


def check_inputs(request: TextToImageRequest, context: TaskContext) -> None:
    """Checks the schema cannot express; runs before any model is loaded."""
    if not request.prompt.strip() and request.guidance_scale > 1 and not request.negative_prompt.strip():
        # Legal (unconditional sampling), but almost always a mistake in a UI or batch line.
        context.warnings.append("the prompt is empty: the image is unconditioned")
    if request.task != "text_to_image":
        raise StudioInputError(f"text_to_image cannot run a {request.task!r} request")


def run(request: TextToImageRequest, context: TaskContext, seeds: list[int], plan=None) -> list:
    """Render `len(seeds)` images for the request; returns PIL images in seed order."""
    # 1. load the model (cached) and pick the sampler
    loaded = context.models.get(request.model)
    pipe = with_scheduler(context, loaded, loaded.pipe, request.scheduler)
    width, height = default_size(pipe, request)

    # 2. check the prompts against the tokenizer limit
    warn_if_truncated(pipe, request.prompt, context)
    warn_if_truncated(pipe, request.negative_prompt, context, "negative_prompt")

    # 3. sample latents, reporting each step and stopping after a cancel
    context.progress.raise_if_cancelled()
    output = pipe(
        prompt=request.prompt,
        width=width,
        height=height,
        callback_on_step_end=context.progress.diffusers_callback("sampling", request.num_inference_steps),
        **sampling_kwargs(request, seeds),
    )
    context.progress.raise_if_cancelled()

    # 4. decode, refusing non-finite pixels
    return to_pil(decode_latents(pipe, output.images, context.progress))


TASK = Task(
    name="text_to_image",
    request_type=TextToImageRequest,
    prepare=check_inputs,
    run=run,
    title="Text to image",
    command="generate",
    summary="make images from a prompt",
    prompt_placeholder="a large red circle on the left",
    run_label="Generate",
)
