"""Text-to-image: a prompt (and negative prompt) to images, one CPU-seeded generator per image."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from studio.requests import BaseRequest
from studio.tasks import Task

from .toolbox import check_task, native_side, output_size

if TYPE_CHECKING:
    from .common import TaskContext


class TextToImageRequest(BaseRequest):
    task: Literal["text_to_image"] = "text_to_image"


def check_inputs(request: TextToImageRequest, context: TaskContext) -> None:
    """Checks the schema cannot express; runs before any model is loaded."""
    if not request.prompt.strip() and request.guidance_scale > 1 and not request.negative_prompt.strip():
        # Legal (unconditional sampling), but almost always a mistake in a UI or batch line.
        context.warnings.append("the prompt is empty: the image is unconditioned")
    check_task(request, "text_to_image")


def run(request: TextToImageRequest, context: TaskContext, seeds: list[int], plan=None) -> list:
    """Render `len(seeds)` images for the request; returns PIL images in seed order."""
    from .common import (
        check_standard_unet,
        decode_latents,
        sampling_kwargs,
        to_pil,
        warn_if_truncated,
        with_loras,
        with_scheduler,
    )
    from .prompts import with_prompt_weights

    # 1. load the model (cached) and pick the sampler
    loaded = context.models.get(request.model)
    check_standard_unet(loaded, "text_to_image")
    pipe = with_scheduler(context, loaded, loaded.pipe, request.scheduler, request.prediction_type)
    pipe = with_prompt_weights(pipe)  # A1111 prompt syntax and long prompts, encoded at call time
    pipe = with_loras(context, loaded, pipe, request)  # the request's LoRAs, for its sampling call only
    width, height = output_size(request, native_side(pipe))

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
