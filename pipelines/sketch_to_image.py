"""Sketch-to-image: a drawing guides the layout, through a ControlNet, a T2I-Adapter, or SDEdit.

Methods (`method`; "auto" picks the first that applies):
1. "controlnet": any diffusers ControlNetModel folder. Looked up in this order: the request's
   `controlnet` field, the studio's default ControlNet (`--default-controlnet`), then the model folder's own `controlnet/`
   subfolder (the embedded model ships one, trained by studio/demo/train.py).
2. "t2i_adapter": a diffusers T2IAdapter folder (sketch adapter), from the request's `t2i_adapter` field
   or the studio's default T2I-Adapter (`--default-t2i-adapter`); StableDiffusion(XL)AdapterPipeline.
3. "sdedit": image-to-image from the sketch itself with `strength`; needs no extra weights.
Under "auto" a coloured sketch goes through SDEdit (a ControlNet would drop its colours).

Sketch preprocessing (`control_image`, the one place the convention lives): transparency is flattened
onto white (onto black when the strokes themselves are light), the polarity of what was drawn is
detected (dark strokes on a light ground, or light on dark), and the strokes are redrawn in the
polarity the conditioning model was trained on:
- the embedded model's ControlNet (and any ControlNet shipped inside a model folder): dark strokes on
  white, grey replicated to RGB, exactly what studio/demo/train.py feeds it
  (`render_sketch(...).convert("L") / 255`);
- other ControlNets and T2I sketch adapters: white strokes on black (the scribble/sketch convention of
  the public lllyasviel and TencentARC models).
`Settings.add_ons.controlnet_sketch` / `Settings.add_ons.t2i_adapter_sketch` ("dark_on_light" or
"light_on_dark") override these defaults.

Size: `width`/`height`, else the model's native pixel count in the sketch's aspect ratio (multiples of 8).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
from PIL import Image, ImageFilter
from pydantic import Field

from studio.progress import GenerationCancelled
from studio.requests import BaseRequest, ImageInput, StudioInputError, image_field
from studio.tasks import Task

from .toolbox import (
    BLACK,
    NATIVE_AREA,
    WHITE,
    check_strength_steps,
    check_task,
    effective_steps,
    flatten,
    native_side,
)
from .toolbox import output_size as _output_size

if TYPE_CHECKING:
    from .common import TaskContext


class SketchToImageRequest(BaseRequest):
    task: Literal["sketch_to_image"] = "sketch_to_image"
    control_image: ImageInput = image_field(..., "The sketch that guides the layout.")
    method: Literal["auto", "controlnet", "t2i_adapter", "sdedit"] = Field(
        "auto", description="How the sketch conditions the model; auto picks the best available."
    )
    controlnet_conditioning_scale: float = Field(1.0, ge=0.0, le=2.0, description="Strength of the sketch guidance.")
    control_guidance_start: float = Field(0.0, ge=0.0, le=1.0, description="Fraction of steps where guidance starts.")
    control_guidance_end: float = Field(1.0, ge=0.0, le=1.0, description="Fraction of steps where guidance ends.")
    strength: float = Field(0.8, ge=0.0, le=1.0, description="SDEdit: how far from the sketch to go.")
    controlnet: str | None = Field(
        None,
        max_length=4096,
        description="A local diffusers ControlNet folder; None: the studio's --default-controlnet, else the model's own "
        "controlnet/ subfolder (the embedded model ships one).",
    )
    t2i_adapter: str | None = Field(
        None,
        max_length=4096,
        description="A local diffusers T2I-Adapter (sketch) folder; None: the studio's --default-t2i-adapter if set.",
    )

DARK_ON_LIGHT = "dark_on_light"  # what a person draws with a pen on paper
LIGHT_ON_DARK = "light_on_dark"  # scribble ControlNets and T2I sketch adapters
POLARITIES = (DARK_ON_LIGHT, LIGHT_ON_DARK)
INK_THRESHOLD = 48  # grey levels away from the background that count as a stroke
COLOUR_CHROMA = 60  # max - min channel difference of a coloured pixel
COLOURED_SHARE = 0.1  # a sketch is coloured when this share of its ink is coloured


# -- sketch preprocessing -----------------------------------------------------------------------------


def flatten_sketch(sketch: Image.Image) -> Image.Image:
    """RGB: transparency composited onto white, or onto black when the painted strokes are light."""
    return flatten(sketch, BLACK if _light_strokes(sketch) else WHITE)


def _light_strokes(sketch: Image.Image) -> bool:
    """True for a sketch with transparency whose painted (alpha-weighted) pixels are light on average."""
    if sketch.mode != "RGBA":
        return False
    rgba = np.asarray(sketch).astype(np.float64)
    alpha = rgba[..., 3] / 255.0
    if alpha.min() >= 1.0:
        return False  # nothing shows through: any background gives the same pixels
    grey = rgba[..., :3] @ np.array([0.299, 0.587, 0.114])
    return bool(alpha.sum() > 0 and (grey * alpha).sum() / alpha.sum() >= 128)


def sketch_polarity(grey: np.ndarray) -> str:
    """DARK_ON_LIGHT when the ground (the median grey level) is light, else LIGHT_ON_DARK."""
    return DARK_ON_LIGHT if float(np.median(grey)) >= 128 else LIGHT_ON_DARK


def ink_map(sketch: Image.Image) -> np.ndarray:
    """bool (H, W): the drawn strokes, whatever the polarity."""
    grey = np.asarray(flatten_sketch(sketch).convert("L")).astype(np.int16)
    ground = np.median(grey)
    return np.abs(grey - ground) >= INK_THRESHOLD


def is_coloured(sketch: Image.Image) -> bool:
    """True when a good share of the ink is saturated colour (not just grey/black strokes)."""
    rgb = np.asarray(flatten_sketch(sketch)).astype(np.int16)
    chroma = rgb.max(axis=-1) - rgb.min(axis=-1)
    ink = ink_map(sketch) | (chroma >= COLOUR_CHROMA)
    if not ink.any():
        return False
    return float((chroma[ink] >= COLOUR_CHROMA).mean()) >= COLOURED_SHARE


def control_image(sketch: Image.Image, polarity: str, size: tuple[int, int], channels: int = 3) -> Image.Image:
    """THE sketch convention: the drawing as strokes in `polarity`, grey, at `size` (width, height).

    A dark-on-white sketch whose size is already `size` comes back with exactly its grey levels
    (`convert("L")`), as the embedded ControlNet saw them in training. When shrinking, strokes are
    widened first so that thin pen lines survive. channels: 3 (grey as RGB) or 1 ("L").
    """
    if polarity not in POLARITIES:
        raise StudioInputError(f"unknown sketch polarity {polarity!r}; use {' or '.join(POLARITIES)}")
    grey = flatten_sketch(sketch).convert("L")
    if sketch_polarity(np.asarray(grey)) != polarity:
        grey = Image.fromarray(255 - np.asarray(grey), "L")
    if grey.size != tuple(size):
        shrink = max(grey.width / size[0], grey.height / size[1])
        if shrink >= 2:
            # Keep strokes visible: spread the ink (darkest pixel for dark strokes) over the area one
            # output pixel covers, then average it down.
            radius = int(shrink) // 2
            spread = ImageFilter.MinFilter if polarity == DARK_ON_LIGHT else ImageFilter.MaxFilter
            grey = grey.filter(spread(2 * radius + 1))
        grey = grey.resize(tuple(size), Image.BOX if shrink >= 1 else Image.BILINEAR)
    return grey.convert("RGB") if channels == 3 else grey


def output_size(request: SketchToImageRequest, native: int, sketch: Image.Image) -> tuple[int, int]:
    """width/height, else the native pixel count in the sketch's aspect ratio (multiples of 8)."""
    return _output_size(request, native, sketch.size, unset=NATIVE_AREA, float_ratio=True)


# -- choosing the method --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Conditioner:
    """A ControlNet or T2I-Adapter folder and the sketch polarity it expects."""

    kind: str  # "controlnet" or "t2i_adapter"
    folder: Path
    polarity: str
    source: str  # where it was found, for messages


def _check_folder(path: str, what: str, allow_pickle: bool) -> Path:
    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise StudioInputError(f"{what} {path!r} is not a diffusers model folder (no config.json)")
    if not any(folder.glob("*.safetensors")):
        if any(folder.glob("*.bin")) and allow_pickle:
            return folder.resolve()
        raise StudioInputError(f"{what} {path!r} has no .safetensors weights")
    return folder.resolve()


def _polarity_setting(context: TaskContext, key: str, default: str) -> str:
    value = getattr(context.settings.add_ons, key) or default
    if value not in POLARITIES:
        raise StudioInputError(f"Settings.add_ons.{key} is {value!r}; use {' or '.join(POLARITIES)}")
    return value


def find_controlnet(request: SketchToImageRequest, context: TaskContext) -> Conditioner | None:
    """The ControlNet to use, without loading it; None when there is none."""
    allow_pickle = context.settings.allow_pickle
    for path, source in (
        (request.controlnet, "the request's controlnet"),
        (context.settings.add_ons.controlnet, "the studio's --default-controlnet"),
    ):
        if path:
            folder = _check_folder(str(path), source, allow_pickle)
            return Conditioner(
                "controlnet", folder, _polarity_setting(context, "controlnet_sketch", LIGHT_ON_DARK), source
            )
    from studio.models import resolve_model_ref

    ref = resolve_model_ref(request.model, context.settings)
    if ref.kind in ("embedded", "folder"):
        shipped = Path(ref.location) / "controlnet"
        if (shipped / "config.json").is_file() and any(shipped.glob("*.safetensors")):
            # The studio's own layout (studio/demo/train.py export): trained on dark strokes on white.
            polarity = _polarity_setting(context, "controlnet_sketch", DARK_ON_LIGHT)
            return Conditioner("controlnet", shipped.resolve(), polarity, f"model {ref.name!r}")
    return None


def find_adapter(request: SketchToImageRequest, context: TaskContext) -> Conditioner | None:
    for path, source in (
        (request.t2i_adapter, "the request's t2i_adapter"),
        (context.settings.add_ons.t2i_adapter, "the studio's --default-t2i-adapter"),
    ):
        if path:
            folder = _check_folder(str(path), source, context.settings.allow_pickle)
            return Conditioner(
                "t2i_adapter", folder, _polarity_setting(context, "t2i_adapter_sketch", LIGHT_ON_DARK), source
            )
    return None


def choose_method(
    request: SketchToImageRequest, context: TaskContext, sketch: Image.Image
) -> tuple[str, Conditioner | None]:
    """(method, conditioner): the requested method, or under auto the best available one."""
    if request.method == "sdedit":
        return "sdedit", None
    if request.method == "controlnet":
        found = find_controlnet(request, context)
        if found is None:
            raise StudioInputError(
                "method 'controlnet' needs a ControlNet: set the request's controlnet to a local folder, "
                "start the studio with --default-controlnet FOLDER, or use a model with a controlnet/ subfolder"
            )
        return "controlnet", found
    if request.method == "t2i_adapter":
        found = find_adapter(request, context)
        if found is None:
            raise StudioInputError(
                "method 't2i_adapter' needs a T2I-Adapter: set the request's t2i_adapter to a local folder "
                "or start the studio with --default-t2i-adapter FOLDER"
            )
        return "t2i_adapter", found
    # auto
    controlnet, adapter = find_controlnet(request, context), find_adapter(request, context)
    if is_coloured(sketch):
        note = (
            "the sketch is coloured: it was used as the starting image (SDEdit) to keep its colours; "
            "set method='controlnet' or 't2i_adapter' to use the sketch model instead"
        )
        if (controlnet or adapter) and note not in context.warnings:  # check_inputs and run both choose
            context.warnings.append(note)
        return "sdedit", None
    if controlnet:
        return "controlnet", controlnet
    if adapter:
        return "t2i_adapter", adapter
    return "sdedit", None


# -- the task -------------------------------------------------------------------------------------------


def check_inputs(request: SketchToImageRequest, context: TaskContext) -> tuple:
    """Checks before any model is loaded (the sketch is already opened in context.images); returns the
    (method, conditioner) that `run` uses."""
    check_task(request, "sketch_to_image")
    if request.control_guidance_start >= request.control_guidance_end:
        raise StudioInputError(
            f"control_guidance_start ({request.control_guidance_start}) must be below "
            f"control_guidance_end ({request.control_guidance_end})"
        )
    sketch = context.images["control_image"]
    if not ink_map(sketch).any() and not is_coloured(sketch):
        context.warnings.append("the sketch is blank: nothing guides the layout")
    method, conditioner = choose_method(request, context, sketch)
    if method == "sdedit":
        check_strength_steps(request)
    return method, conditioner


def _derived(context: TaskContext, loaded, pipeline_class, request, cache_key: str | None = None, **components):
    """A pipeline of `pipeline_class` sharing the loaded weights, plus `components` (cached per key), with the
    request's sampler and prediction type."""
    from .common import for_sampling, with_scheduler

    if components and cache_key:
        key = f"{pipeline_class.__name__}[{cache_key}]"
        pipe = loaded.pipelines.get(key)
        if pipe is None:
            pipe = context.models.derive(loaded, pipeline_class, **components)
            loaded.pipelines[key] = pipe
        components = {name: getattr(pipe, name) for name in components}
    else:
        pipe = context.models.derive(loaded, pipeline_class, **components)
    pipe = with_scheduler(context, loaded, pipe, request.scheduler, request.prediction_type, **components)
    return for_sampling(context, loaded, pipe, request)  # prompt syntax, LoRAs, step cache: this call only


def _load_component(conditioner: Conditioner, loaded, context: TaskContext):
    """The ControlNetModel / T2IAdapter, on the model's device and dtype, checked against the UNet."""
    from diffusers import ControlNetModel, T2IAdapter

    model_class = ControlNetModel if conditioner.kind == "controlnet" else T2IAdapter
    try:
        model = model_class.from_pretrained(
            conditioner.folder,
            dtype=loaded.dtype,
            local_files_only=True,
            use_safetensors=any(conditioner.folder.glob("*.safetensors")),
        )
    except (OSError, ValueError, RuntimeError) as error:
        raise StudioInputError(f"{conditioner.kind} from {conditioner.source} cannot be loaded: {error}") from None
    unet = loaded.pipe.unet
    if conditioner.kind == "controlnet" and model.config.cross_attention_dim != unet.config.cross_attention_dim:
        raise StudioInputError(
            f"the ControlNet from {conditioner.source} is for another base model (cross_attention_dim "
            f"{model.config.cross_attention_dim}, the model's UNet has {unet.config.cross_attention_dim})"
        )
    return model.to(loaded.device).eval()


def run(request: SketchToImageRequest, context: TaskContext, seeds: list[int], plan=None) -> list:
    """Render `len(seeds)` images guided by the sketch; returns PIL images in seed order."""
    import diffusers

    from .common import decode_latents, sampling_kwargs, to_pil, warn_if_truncated

    sketch = context.images["control_image"]
    # 1. load the model (cached) and choose the method
    loaded = context.models.get(request.model)
    method, conditioner = plan or choose_method(request, context, sketch)
    sdxl = loaded.is_sdxl
    width, height = output_size(request, native_side(loaded.pipe), sketch)
    common = dict(
        prompt=request.prompt,
        **sampling_kwargs(request, seeds),
    )

    # 2. the pipeline and its sketch input
    if method == "controlnet":
        pipeline_class = (
            diffusers.StableDiffusionXLControlNetPipeline if sdxl else diffusers.StableDiffusionControlNetPipeline
        )
        cached = loaded.pipelines.get(f"{pipeline_class.__name__}[{conditioner.folder}]")
        controlnet = cached.controlnet if cached is not None else _load_component(conditioner, loaded, context)
        pipe = _derived(context, loaded, pipeline_class, request, str(conditioner.folder), controlnet=controlnet)
        kwargs = dict(
            image=control_image(sketch, conditioner.polarity, (width, height)),
            width=width,
            height=height,
            controlnet_conditioning_scale=request.controlnet_conditioning_scale,
            control_guidance_start=request.control_guidance_start,
            control_guidance_end=request.control_guidance_end,
            callback_on_step_end=context.progress.diffusers_callback("sampling", request.num_inference_steps),
        )
    elif method == "t2i_adapter":
        pipeline_class = (
            diffusers.StableDiffusionXLAdapterPipeline if sdxl else diffusers.StableDiffusionAdapterPipeline
        )
        cached = loaded.pipelines.get(f"{pipeline_class.__name__}[{conditioner.folder}]")
        adapter = cached.adapter if cached is not None else _load_component(conditioner, loaded, context)
        pipe = _derived(context, loaded, pipeline_class, request, str(conditioner.folder), adapter=adapter)
        kwargs = dict(
            image=control_image(sketch, conditioner.polarity, (width, height), channels=adapter.config.in_channels),
            width=width,
            height=height,
            adapter_conditioning_scale=request.controlnet_conditioning_scale,
            callback=_legacy_callback(context, request.num_inference_steps),
        )
        if request.control_guidance_start > 0 or (request.control_guidance_end < 1 and not sdxl):
            context.warnings.append(
                "a T2I-Adapter cannot start late"
                + ("" if sdxl else " or stop early on this model")
                + "; control_guidance_start/end were ignored"
            )
        if sdxl:
            kwargs["adapter_conditioning_factor"] = request.control_guidance_end
    else:
        pipeline_class = (
            diffusers.StableDiffusionXLImg2ImgPipeline if sdxl else diffusers.StableDiffusionImg2ImgPipeline
        )
        pipe = _derived(context, loaded, pipeline_class, request)
        steps = effective_steps(request.num_inference_steps, request.strength)
        kwargs = dict(
            image=flatten_sketch(sketch).resize((width, height), Image.LANCZOS),
            strength=request.strength,
            callback_on_step_end=context.progress.diffusers_callback("sampling", steps),
        )
    warn_if_truncated(pipe, request.prompt, context)
    warn_if_truncated(pipe, request.negative_prompt, context, "negative_prompt")

    # 3. sample, reporting each step and stopping after a cancel
    context.progress.raise_if_cancelled()
    output = pipe(**common, **kwargs)
    context.progress.raise_if_cancelled()

    # 4. decode, refusing non-finite pixels
    return to_pil(decode_latents(pipe, output.images, context.progress))


def _legacy_callback(context: TaskContext, total: int):
    """The adapter pipelines' old-style `callback(step, timestep, latents)`: progress, and cancel by raising."""

    def callback(step, timestep, latents):
        context.progress.update("sampling", step + 1, total)
        if context.progress.cancelled:
            raise GenerationCancelled("cancelled by the user")

    return callback


TASK = Task(
    name="sketch_to_image",
    request_type=SketchToImageRequest,
    prepare=check_inputs,
    run=run,
    title="Sketch to image",
    command="sketch",
    summary="make images whose layout follows a sketch (--control-image)",
    main_fields=("method", "strength"),
    image_widgets={"control_image": "sketch"},
    image_labels={"control_image": "sketch: draw one, or upload one"},
)
