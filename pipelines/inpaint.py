"""Region inpainting and outpainting: repaint the masked part of an image, keep every other pixel exactly.

Which pixels are repainted (see studio_pipelines.masks for the exact conventions):
- `mask_image` without transparency: white = repaint. With transparency (an RGBA paint layer from a
  browser editor): the painted (alpha > 0) area is repainted.
- no `mask_image`, and an RGBA `image` with transparent pixels: the not-fully-opaque area is repainted.
- `outpaint_left/right/up/down`: the canvas grows by that many pixels on each side; the new area is
  filled by repeating the edge pixels and always repainted. The original pixels are kept exactly
  (the seam's feather lies inside the new area). `mask_grow` applies to the user's mask only.

Then `mask_grow` grows (> 0) or shrinks (< 0) the mask by that many pixels, and `mask_blur` feathers its
edge over that many pixels on each side. The model repaints every pixel the feathered mask touches, and
the result is composited over the original in pixel space: out = original * (1 - m) + generated * m,
so pixels with m == 0 (farther than mask_grow + mask_blur outside the drawn mask) are the input's bytes
and VAE round-trip drift never reaches them.

Size: the output has the image's size (plus any outpainting). The canvas given to the model is padded
on the right/bottom to a multiple of 8 (edge pixels repeated) and the result cropped back, so nothing is
cropped or resampled. With `width`/`height` set, the image (and mask) are first resized to that size
(one of them alone keeps the aspect ratio). In `only_masked` mode the image keeps its size; the box
around the mask (plus `only_masked_padding`, widened to the working aspect ratio) is inpainted at
`width` x `height` (default: the model's native size) and pasted back.

Models: dedicated inpainting UNets (unet.config.in_channels == 9, SD1.x/2.x or SDXL) get the mask and
masked image as extra input channels; any ordinary 4-channel model works too (diffusers re-noises the
original latents outside the mask at every step and blends them in, "latent blending").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
from PIL import Image
from pydantic import Field

from studio.requests import BaseRequest, ImageInput, StudioInputError, image_field
from studio.tasks import Task

from . import masks
from .toolbox import (
    SOURCE,
    check_strength_steps,
    check_task,
    effective_steps,
    flatten,
    has_transparency,
    native_side,
    output_size,
)

if TYPE_CHECKING:
    from .common import TaskContext


class InpaintRequest(BaseRequest):
    task: Literal["inpaint"] = "inpaint"
    image: ImageInput = image_field(..., "The image to edit.")
    mask_image: ImageInput = image_field(
        None,
        "White = repaint; or an RGBA paint layer whose painted (alpha > 0) area is repainted. "
        "None: the image's transparent (alpha < 255) area, or only the outpainted area.",
    )
    strength: float = Field(1.0, ge=0.0, le=1.0, description="How much of the masked area is renoised.")
    mask_blur: int = Field(4, ge=0, le=256, description="Feather radius of the mask edge, in pixels.")
    mask_grow: int = Field(0, ge=-256, le=256, description="Grow (>0) or shrink (<0) the mask, in pixels.")
    only_masked: bool = Field(
        False,
        description="Inpaint a crop around the mask at width x height (default: the model's native size), then paste.",
    )
    only_masked_padding: int = Field(32, ge=0, le=1024, description="Padding around the mask crop, in pixels.")
    outpaint_left: int = Field(0, ge=0, le=1024, description="Extend the canvas to the left by this many pixels.")
    outpaint_right: int = Field(0, ge=0, le=1024, description="Extend the canvas to the right.")
    outpaint_up: int = Field(0, ge=0, le=1024, description="Extend the canvas upwards.")
    outpaint_down: int = Field(0, ge=0, le=1024, description="Extend the canvas downwards.")


@dataclass
class InpaintPlan:
    """Everything about a request that needs no model: the canvas and which of its pixels may change."""

    canvas: Image.Image  # RGB, output size: the original pixels (resized / outpainted as asked)
    repaint: np.ndarray  # bool (H, W): pixels the model regenerates (every pixel with soft > 0)
    soft: np.ndarray  # float (H, W) in [0, 1]: weight of the generated image in the final composite
    mask_fraction: float  # share of the (resized) image the user's mask covers, before grow/blur


def plan_inpaint(request: InpaintRequest, images: dict) -> InpaintPlan:
    """Work out the canvas and masks from the request's opened images; StudioInputError on bad input."""
    image = images["image"]
    mask_image = images.get("mask_image")
    sides = (request.outpaint_left, request.outpaint_up, request.outpaint_right, request.outpaint_down)
    outpainting = any(sides)

    # 1. the user's mask
    if mask_image is not None:
        if mask_image.size != image.size:
            raise StudioInputError(
                f"mask_image is {mask_image.width}x{mask_image.height} but image is {image.width}x{image.height}; "
                "they must be the same size"
            )
        mask = masks.mask_from_image(mask_image)
    elif has_transparency(image):
        mask = masks.mask_from_transparency(image)
    elif outpainting:
        mask = np.zeros((image.height, image.width), dtype=bool)
    else:
        raise StudioInputError(
            "nothing marks the area to repaint: give a mask_image (white = repaint), an RGBA image whose "
            "transparent area is to be repainted, or outpaint_left/right/up/down"
        )
    if not outpainting and not mask.any():
        source = mask_image if mask_image is not None else image
        what = "fully transparent" if has_transparency(source) else "all black"
        raise StudioInputError(f"the mask is empty ({what}): nothing to repaint")

    # 2. the working size: the image's, or width/height when given (not in only_masked mode)
    canvas = flatten(image)
    if not request.only_masked:
        size = output_size(request, source=canvas.size, unset=SOURCE, min_side=8)
        if size != canvas.size:
            canvas = canvas.resize(size, Image.LANCZOS)
            mask = masks.resize_mask(mask, size)
    mask_fraction = float(mask.mean())

    # 3. grow / shrink, then outpaint
    grown = masks.grow_mask(mask, request.mask_grow)
    if mask.any() and not grown.any() and not outpainting:
        raise StudioInputError(f"mask_grow={request.mask_grow} shrinks the mask to nothing: nothing to repaint")
    left, up, right, down = sides
    if outpainting:
        canvas = masks.pad_edges(canvas, left, up, right, down)
        grown = masks.pad_mask(grown, left, up, right, down)
        new_area = ~masks.pad_mask(np.ones(mask.shape, dtype=bool), left, up, right, down)
    else:
        new_area = np.zeros(grown.shape, dtype=bool)

    # 4. feather: symmetric around the user's mask, inside-only for the outpainted area
    soft = masks.feather(grown, request.mask_blur)
    if outpainting:
        soft = np.maximum(soft, masks.feather_inside(new_area, request.mask_blur))
    repaint = (soft > 0) | new_area | grown
    return InpaintPlan(canvas=canvas, repaint=repaint, soft=soft, mask_fraction=mask_fraction)


def check_inputs(request: InpaintRequest, context: TaskContext) -> InpaintPlan:
    """Image/mask checks, before any model is loaded; returns the plan `run` follows."""
    check_task(request, "inpaint")
    check_strength_steps(request)
    plan = plan_inpaint(request, context.images)
    if plan.mask_fraction >= 1.0:
        context.warnings.append("the mask covers the whole image: this is plain image-to-image")
    if not request.prompt.strip() and not request.negative_prompt.strip():
        context.warnings.append("the prompt is empty: the masked area is filled without guidance")
    return plan


def _pipeline_class(loaded):
    from diffusers import (
        StableDiffusionInpaintPipeline,
        StableDiffusionXLInpaintPipeline,
    )

    return StableDiffusionXLInpaintPipeline if loaded.is_sdxl else StableDiffusionInpaintPipeline


def run(request: InpaintRequest, context: TaskContext, seeds: list[int], plan=None) -> list:
    """Inpaint `len(seeds)` images; returns PIL images in seed order."""
    from .common import (
        decode_latents,
        for_sampling,
        sampling_kwargs,
        to_pil,
        warn_if_truncated,
        with_scheduler,
    )

    # 1. the canvas and masks, as check_inputs planned them
    plan = plan or plan_inpaint(request, context.images)
    width, height = plan.canvas.size

    # 2. load the model (cached) and derive its inpainting pipeline (9-channel UNet or latent blending)
    loaded = context.models.get(request.model)
    pipe = context.models.derive(loaded, _pipeline_class(loaded))
    pipe = with_scheduler(context, loaded, pipe, request.scheduler, request.prediction_type)
    pipe = for_sampling(context, loaded, pipe, request)  # prompt syntax, LoRAs, step cache: this call only
    factor = pipe.vae_scale_factor
    warn_if_truncated(pipe, request.prompt, context)
    warn_if_truncated(pipe, request.negative_prompt, context, "negative_prompt")

    # 3. what the model sees: the box around the mask (only_masked) or the whole canvas padded to a multiple of 8
    if request.only_masked:
        work_w, work_h = output_size(request, native_side(pipe))
        box = masks.crop_box_for(plan.repaint, request.only_masked_padding, work_w / work_h, (width, height))
        model_image = plan.canvas.crop(box).resize((work_w, work_h), Image.LANCZOS)
        model_mask = masks.resize_mask(plan.repaint[box[1] : box[3], box[0] : box[2]], (work_w, work_h), any_pixel=True)
    else:
        multiple = max(8, factor)
        pad_right, pad_down = -width % multiple, -height % multiple
        work_w, work_h = width + pad_right, height + pad_down
        model_image = masks.pad_edges(plan.canvas, 0, 0, pad_right, pad_down)
        model_mask = masks.pad_mask(plan.repaint, 0, 0, pad_right, pad_down, mode="edge")
    # Whole latent cells, so the pipeline's nearest-neighbour downsampling keeps thin strokes.
    model_mask = masks.latent_cells(model_mask, factor)

    # 4. sample, reporting each step and stopping after a cancel
    steps = effective_steps(request.num_inference_steps, request.strength)
    context.progress.raise_if_cancelled()
    output = pipe(
        prompt=request.prompt,
        image=model_image,
        mask_image=masks.mask_to_image(model_mask),
        width=work_w,
        height=work_h,
        strength=request.strength,
        callback_on_step_end=context.progress.diffusers_callback("inpainting", steps),
        **sampling_kwargs(request, seeds),
    )
    context.progress.raise_if_cancelled()

    # 5. decode (refusing non-finite pixels) and composite over the original in pixel space
    results = []
    for generated in to_pil(decode_latents(pipe, output.images, context.progress)):
        if request.only_masked:
            full = plan.canvas.copy()
            full.paste(generated.resize((box[2] - box[0], box[3] - box[1]), Image.LANCZOS), box[:2])
        else:
            full = generated.crop((0, 0, width, height))
        results.append(masks.composite(plan.canvas, full, plan.soft))
    return results


TASK = Task(
    name="inpaint",
    request_type=InpaintRequest,
    prepare=check_inputs,
    run=run,
    title="Inpaint",
    command="inpaint",
    summary="repaint the masked area of an image (--image, --mask-image)",
    main_fields=("strength", "mask_blur"),
    image_widgets={"image": "editor"},
    image_labels={"image": "image: upload it, then paint the area to repaint", "mask_image": "mask (white = repaint)"},
)
