"""Text-to-image: a prompt (and negative prompt) to images, one CPU-seeded generator per image; with the
hires fix (A1111's): render at the base size, upscale, then image-to-image at the larger size."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from studio.requests import BaseRequest
from studio.tasks import Task

from .toolbox import check_task, effective_steps, native_side, output_size

if TYPE_CHECKING:
    from .common import TaskContext


BUILTIN_UPSCALERS = ("lanczos", "nearest", "latent")  # studio.upscalers' too (kept light: no import here)


class UpscalerRef(BaseModel):
    """The hires fix's upscaler: lanczos, nearest, latent, or an upscaler model's name in the models folders
    (ESRGAN/, RealESRGAN/: RRDBNet files such as 4x-UltraSharp), with that file's hash."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(..., min_length=1, max_length=255, description="lanczos, nearest, latent, or a model's name.")
    hash: str | None = Field(
        None, max_length=64, description="Filled by the studio: an upscaler model file's short SHA-256."
    )


class TextToImageRequest(BaseRequest):
    task: Literal["text_to_image"] = "text_to_image"
    # The hires fix, with A1111's names (its API's `enable_hr` is hr_scale set).
    hr_scale: float | None = Field(
        None,
        ge=1,
        le=4,
        description="Hires fix: render at width x height, upscale by this factor, then refine at the larger size "
        "(image-to-image); None: off.",
    )
    hr_steps: int = Field(
        0, ge=0, le=500, description="Hires fix: the refining pass's steps (0: num_inference_steps)."
    )
    hr_denoising_strength: float = Field(
        0.7,
        ge=0.0,
        le=1.0,
        description="Hires fix: how much the refining pass changes the upscaled image (0: the upscale as it is).",
    )
    hr_upscaler: UpscalerRef = Field(
        UpscalerRef(name="lanczos"),
        description="Hires fix: how the base image is upscaled: its pixels (lanczos, nearest), its latents (latent), "
        "or an upscaler model's name from the models folders' ESRGAN/ or RealESRGAN/ (its output then resized "
        "to the target with Lanczos).",
        json_schema_extra={"metavar": "NAME"},
    )

    @field_validator("hr_upscaler", mode="before")
    @classmethod
    def _upscaler_by_name(cls, value):
        # `--hr-upscaler NAME`, `"hr_upscaler": "latent"`: a name is the usual way to give one.
        if isinstance(value, str):
            return {"name": value.lower() if value.lower() in BUILTIN_UPSCALERS else value}
        return value


def hires_size(size: tuple[int, int], hr_scale: float) -> tuple[int, int]:
    """The hires fix's target size: each side times hr_scale, down to a multiple of 8 (as A1111, which takes
    int(side * scale))."""
    return tuple(max(64, int(side * hr_scale) // 8 * 8) for side in size)


def check_inputs(request: TextToImageRequest, context: TaskContext) -> None:
    """Checks the schema cannot express; runs before any model is loaded."""
    if not request.prompt.strip() and request.guidance_scale > 1 and not request.negative_prompt.strip():
        # Legal (unconditional sampling), but almost always a mistake in a UI or batch line.
        context.warnings.append("the prompt is empty: the image is unconditioned")
    defaults = {name: field.default for name, field in TextToImageRequest.model_fields.items()}
    hires = ("hr_steps", "hr_denoising_strength", "hr_upscaler")
    unused = [name for name in hires if getattr(request, name) != defaults[name]]
    if request.hr_scale is None and unused:
        context.warnings.append(f"{', '.join(unused)} ignored: the hires fix is off (set hr_scale)")
    check_task(request, "text_to_image")
    if request.hr_scale is not None and request.hr_upscaler.name not in BUILTIN_UPSCALERS:
        from studio.upscalers import resolve_upscaler, upscaler_hash

        # Found (or a clear error) before any model loads; its hash filled in here, for the metadata.
        path = resolve_upscaler(request.hr_upscaler.name, context.settings)
        request.hr_upscaler = UpscalerRef(name=path.stem, hash=upscaler_hash(path, context.settings))


def run(request: TextToImageRequest, context: TaskContext, seeds: list[int], plan=None) -> list:
    """Render `len(seeds)` images for the request; returns PIL images in seed order."""
    from .common import (
        check_output_size,
        check_standard_unet,
        decode_latents,
        for_sampling,
        sampling_kwargs,
        to_pil,
        warn_if_truncated,
        with_scheduler,
    )

    # 1. load the model (cached) and pick the sampler
    loaded = context.models.get(request.model)
    check_standard_unet(loaded, "text_to_image")
    base = with_scheduler(context, loaded, loaded.pipe, request.scheduler, request.prediction_type)
    pipe = for_sampling(context, loaded, base, request)  # prompt syntax, LoRAs, step cache: this call only
    width, height = output_size(request, native_side(pipe))
    if request.hr_scale is not None:
        check_output_size(request, context)  # again, now that the model's native size is known (single files)

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

    # 4. the hires fix, when asked for: upscale and refine
    if request.hr_scale is not None:
        return hires_fix(request, context, loaded, base, output.images, seeds, (width, height))

    # 5. decode, refusing non-finite pixels
    return to_pil(decode_latents(pipe, output.images, context.progress))


def hires_fix(request: TextToImageRequest, context: TaskContext, loaded, base, latents, seeds: list[int], size):
    """A1111's hires fix on the base pass's latents: upscale them (bilinear) or their decoded images (Pillow, or
    an upscaler model then Lanczos to the exact size), then image-to-image at the target size with
    hr_denoising_strength, the same seeds and prompts."""
    import torch
    from PIL import Image

    from .common import (
        decode_latents,
        for_sampling,
        encode_image,
        fresh_scheduler,
        image_to_image_class,
        sampling_kwargs,
        to_pil,
    )

    target_w, target_h = hires_size(size, request.hr_scale)
    steps = request.hr_steps or request.num_inference_steps
    refine_steps = effective_steps(steps, request.hr_denoising_strength)
    if request.hr_denoising_strength > 0 and refine_steps < 1:
        context.warnings.append(
            f"hr_denoising_strength {request.hr_denoising_strength:g} x {steps} steps is less than one step: "
            "the upscaled image is kept as it is"
        )

    # 1. upscale: the latents themselves, or the decoded images (Pillow, or a model then Lanczos to the size)
    upscaler = request.hr_upscaler.name
    if upscaler == "latent":
        factor = base.vae_scale_factor
        upscaled = torch.nn.functional.interpolate(
            latents.float(), size=(target_h // factor, target_w // factor), mode="bilinear", align_corners=False
        ).to(latents.dtype)
        if refine_steps < 1:
            return to_pil(decode_latents(base, upscaled, context.progress))
    else:
        decoded = to_pil(decode_latents(base, latents, context.progress))
        if upscaler in ("lanczos", "nearest"):
            resample = Image.LANCZOS if upscaler == "lanczos" else Image.NEAREST
            images = [image.resize((target_w, target_h), resample) for image in decoded]
        else:
            from studio.upscalers import upscale_images

            images = upscale_images(decoded, (target_w, target_h), upscaler, context.models, loaded.device, context.progress)
        if refine_steps < 1:
            return images
        context.progress.raise_if_cancelled()
        upscaled = torch.cat([encode_image(base, image) for image in images])

    # 2. refine: image-to-image from the upscaled latents, sharing the model (its own sampler object)
    pipe = context.models.derive(
        loaded,
        image_to_image_class(loaded.pipe),
        scheduler=fresh_scheduler(loaded, request.scheduler, request.prediction_type),
        vae=base.vae,
    )
    pipe = for_sampling(context, loaded, pipe, request)
    context.progress.raise_if_cancelled()
    output = pipe(
        prompt=request.prompt,
        image=upscaled,
        strength=request.hr_denoising_strength,
        callback_on_step_end=context.progress.diffusers_callback("hires fix", refine_steps),
        **{**sampling_kwargs(request, seeds), "num_inference_steps": steps},
    )
    context.progress.raise_if_cancelled()
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
