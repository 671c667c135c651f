"""What every task shares before any model runs: output sizes, transparency, input checks.

numpy and PIL only, so task modules import it at their top and stay cheap to import (the registry imports
every task module to read its `TASK`). What needs torch or diffusers (sampling, encoding, decoding, the
sampler choice) is in `common`, which tasks import inside `run`.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from studio.requests import StudioInputError

MIN_SIDE = 64  # input images smaller than this on either side are refused (check_min_side)
WHITE = (255, 255, 255)
BLACK = (0, 0, 0)


# -- sizes ---------------------------------------------------------------------------------------------

# What a task renders at when the request gives neither width nor height (see `output_size`).
NATIVE = "native"  # the model's native square (text-to-image; inpaint's only_masked crop)
SOURCE = "source"  # the input image's own size (inpaint)
NATIVE_AREA = "native_area"  # the native pixel count in the input's aspect ratio, up or down (sketch)
NATIVE_AREA_AT_MOST = "native_area_at_most"  # the same, but never larger than the input (style, imagic)


def native_side(pipe) -> int:
    """The side of the square a model was trained at, in pixels."""
    return pipe.unet.config.sample_size * pipe.vae_scale_factor


def working_size(pipe, request, image) -> tuple[int, int]:
    """The size of an edited image (style_transfer, imagic): the request's; else the input's aspect ratio
    at no more than the model's native area (unless that would make a side shorter than 64). One of
    width/height given: the other follows the input's aspect ratio. Sides are multiples of 8, from 64 to 2048.
    """
    return output_size(request, native_side(pipe), image.size, unset=NATIVE_AREA_AT_MOST, max_side=2048)


def round8(value: float, min_side: int = 64, max_side: int | None = None) -> int:
    """`value` to the nearest multiple of 8 (ties to even, as `round`), kept within [min_side, max_side]."""
    side = max(round(value / 8) * 8, min_side)
    return side if max_side is None else min(side, max_side)


def output_size(
    request,
    native: int | None = None,
    source: tuple[int, int] | None = None,
    *,
    unset: str = NATIVE,
    min_side: int = 64,
    max_side: int | None = None,
    float_ratio: bool = False,
) -> tuple[int, int]:
    """The (width, height) a task renders at: THE size rule, one function for every task.

    - `width` and `height` both set: those.
    - one of them set: the other follows the aspect ratio of `source` (the input image's (width, height)),
      rounded to a multiple of 8 within [min_side, max_side]; without a `source`, the other is `native`.
    - neither: by `unset`: NATIVE (native x native), SOURCE (the source's size), NATIVE_AREA (native² pixels
      in the source's aspect ratio, sides multiples of 8, at least 64) or NATIVE_AREA_AT_MOST (the same,
      never larger than the source, and a long thin source keeps its shape with sides >= 64; sides within
      [64, max_side]).

    float_ratio: derive the other side through the float ratio width / height of the source, as
    sketch_to_image always has (on an exact tie between two multiples of 8 it can round the other way than
    the exact rule; kept so that no sketch changes size).
    """
    width, height = request.width, request.height
    if width and height:
        return width, height
    if source is None:
        return width or native, height or native
    source_w, source_h = source
    if width:
        other = width / (source_w / source_h) if float_ratio else width * source_h / source_w
        return width, round8(other, min_side, max_side)
    if height:
        other = height * (source_w / source_h) if float_ratio else height * source_w / source_h
        return round8(other, min_side, max_side), height
    if unset == NATIVE:
        return native, native
    if unset == SOURCE:
        return source_w, source_h
    if unset == NATIVE_AREA:
        aspect = source_w / source_h
        return round8(native * aspect**0.5), round8(native / aspect**0.5)
    if unset == NATIVE_AREA_AT_MOST:
        scale = min(1.0, math.sqrt(native * native / (source_w * source_h)))
        scale = max(scale, min(1.0, 64 / min(source_w, source_h)))  # a long thin image keeps its shape, sides >= 64
        return round8(source_w * scale, 64, max_side), round8(source_h * scale, 64, max_side)
    raise ValueError(f"unknown size rule {unset!r}")


# -- transparency --------------------------------------------------------------------------------------


def has_transparency(image: Image.Image) -> bool:
    """True for an RGBA image with at least one pixel that is not fully opaque."""
    return image.mode == "RGBA" and int(np.asarray(image.getchannel("A")).min()) < 255


def flatten(image: Image.Image, background=WHITE) -> Image.Image:
    """RGB: an RGBA image composited onto `background` (white, as drawing apps show transparency);
    other modes converted."""
    if image.mode != "RGBA":
        return image.convert("RGB")
    base = Image.new("RGBA", image.size, tuple(background) + (255,))
    return Image.alpha_composite(base, image).convert("RGB")


# -- checks ----------------------------------------------------------------------------------------------


def check_task(request, name: str) -> None:
    if request.task != name:
        raise StudioInputError(f"{name} cannot run a {request.task!r} request")


def effective_steps(num_inference_steps: int, strength: float) -> int:
    """Denoising steps an image-to-image run takes (diffusers' rule)."""
    return min(int(num_inference_steps * strength), num_inference_steps)


def check_strength_steps(request) -> None:
    """Refuse a strength that leaves no denoising step."""
    if effective_steps(request.num_inference_steps, request.strength) < 1:
        raise StudioInputError(
            f"strength {request.strength:g} with num_inference_steps {request.num_inference_steps} leaves no "
            "denoising step (strength x steps must be at least 1); raise strength or num_inference_steps"
        )


def check_min_side(image, name: str, min_side: int = MIN_SIDE) -> None:
    if image is not None and min(image.size) < min_side:
        raise StudioInputError(
            f"{name} is {image.width}x{image.height}; it must be at least {min_side} pixels on each side"
        )


class PipelineWrapper:
    """A pipeline seen through a wrapper: every attribute is the wrapped pipeline's; subclasses change the call."""

    def __init__(self, pipe, **state):
        self.__dict__.update(_pipe=pipe, **{f"_{name}": value for name, value in state.items()})

    def __getattr__(self, name: str):
        return getattr(self.__dict__["_pipe"], name)

    def __setattr__(self, name: str, value) -> None:
        setattr(self._pipe, name, value)
