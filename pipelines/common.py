"""What every task shares when it runs: the context, seeds, the sampler, prompt checks, the output size
check, encoding and safe decoding, the image-to-image pipeline.

This half imports torch and diffusers, so task modules import it inside `prepare`/`run`, never at their
top; the model-free half (sizes, transparency, input checks) is `toolbox`."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

from studio.devices import default_max_output_pixels, pick_device
from studio.models import LoadedModel, ModelManager, config_folder, resolve_model_ref
from studio.progress import Progress
from studio.requests import BaseRequest, StudioInputError
from studio.schedulers import make_scheduler
from studio.settings import Settings

from .toolbox import PipelineWrapper, native_side


class NonFiniteOutputError(RuntimeError):
    """The model produced NaN/inf values; nothing is saved rather than a black image."""


@dataclass
class TaskContext:
    """Services a task runs with, injected by `Studio` (no globals)."""

    settings: Settings
    models: ModelManager
    progress: Progress = field(default_factory=Progress)
    images: dict = field(default_factory=dict)  # the request's input images, opened and checked (PIL)
    warnings: list[str] = field(default_factory=list)  # shown to the user and kept with the result


def cpu_generators(seeds: list[int]) -> list[torch.Generator]:
    """One CPU generator per image: a seed draws the same noise on every device."""
    return [torch.Generator("cpu").manual_seed(seed) for seed in seeds]


def sampling_kwargs(request: BaseRequest, seeds: list[int]) -> dict:
    """The diffusers call arguments every task passes the same way; latents come out, the task decodes them."""
    return dict(
        negative_prompt=request.negative_prompt or None,
        num_inference_steps=request.num_inference_steps,
        guidance_scale=request.guidance_scale,
        num_images_per_prompt=len(seeds),
        generator=cpu_generators(seeds),
        output_type="latent",
    )


def fresh_scheduler(loaded: LoadedModel, name: str | None, prediction_type: str | None = None):
    """The requested sampler (or, for None, a copy of the model's own) as a new object for one derived pipeline;
    `prediction_type` overrides what the model's config says its UNet predicts."""
    config = dict(loaded.pipe.scheduler.config)
    if prediction_type is not None:
        config["prediction_type"] = prediction_type
    if name is not None:
        return make_scheduler(name, config)
    return type(loaded.pipe.scheduler).from_config(config)


def with_scheduler(
    context: TaskContext, loaded: LoadedModel, pipe, scheduler_name: str | None, prediction_type=None, **components
):
    """The pipeline with the requested sampler (and prediction type), as a new pipeline object (with
    `components`, as `pipe` has them): the cached one is never changed. Neither asked for: `pipe` itself."""
    if prediction_type == loaded.pipe.scheduler.config.get("prediction_type", "epsilon"):
        prediction_type = None  # what the model says already
    if scheduler_name is None and prediction_type is None:
        return pipe
    scheduler = fresh_scheduler(loaded, scheduler_name, prediction_type)
    return context.models.derive(loaded, type(pipe), scheduler=scheduler, **components)


class LoraPipeline(PipelineWrapper):
    """A pipeline whose call runs with the request's LoRAs loaded into the model (studio.loras), and unloaded
    again when the call returns or fails; everything else is the wrapped pipeline's."""

    def __call__(self, *args, **kwargs):
        from studio.loras import loras_applied

        with loras_applied(self._loaded, self._loras, self._settings, self._files):
            return self._pipe(*args, **kwargs)


def for_sampling(context: TaskContext, loaded: LoadedModel, pipe, request: BaseRequest):
    """`pipe` as the request samples with it, for that call only: A1111 prompt syntax and long prompts read
    at call time (prompts.py), inside the request's LoRAs (so text-encoder LoRAs shape the embeddings; the
    cached model never keeps them), inside the request's step caching (step_cache.py), inside the OpenVINO
    backend when the settings choose it (openvino.py; it runs PyTorch for whatever it cannot compute).
    Every task that samples through a pipeline gets it through here."""
    from .openvino import with_openvino
    from .prompts import with_prompt_weights
    from .step_cache import with_step_cache

    if not (request.cache_interval and request.cache_interval > 1):  # step caching needs PyTorch's UNet blocks
        pipe = with_openvino(pipe, loaded, context.settings)
    pipe = with_prompt_weights(pipe)
    if request.loras:
        pipe = LoraPipeline(pipe, loaded=loaded, loras=list(request.loras), settings=context.settings,
                            files=context.models.lora_files)
    return with_step_cache(pipe, request.cache_interval)


def check_output_size(request: BaseRequest, context: TaskContext) -> None:
    """Refuse, before any model is loaded, a request whose images add up to more than max_output_pixels:
    one such job would hold the device (and gigabytes of memory) for every other client."""
    loaded = _loaded_model(context.models, request.model)
    native = native_side(loaded.pipe) if loaded else _native_side_from_config(context.models, request.model)
    size = planned_size(request, context.images, native)
    if size is None:
        return  # the size depends on a model we cannot read without loading it
    limit, where = context.settings.max_output_pixels, ""
    if limit is None:
        try:
            device = loaded.device if loaded else pick_device(context.settings.device)
        except ValueError:  # reported when the model loads
            device = torch.device("cpu")
        limit, where = default_max_output_pixels(device), f" on {device.type}"
    width, height = size
    pixels = width * height * request.batch_size
    if pixels > limit:
        images = f"{request.batch_size} image{'s' if request.batch_size > 1 else ''}"
        raise StudioInputError(
            f"{width}x{height} x {images} = {pixels / 1e6:.3g} MP is more than this studio's limit of "
            f"{limit / 1e6:.3g} MP per request{where}; ask for a smaller size"
            + (f" or hr_scale (now {request.hr_scale:g})" if getattr(request, "hr_scale", None) else "")
            + " or fewer images, or raise the limit "
            "(max_output_pixels: --max-output-pixels or STUDIO_MAX_OUTPUT_PIXELS)"
        )


def planned_size(request: BaseRequest, images: dict, native: int | None) -> tuple[int, int] | None:
    """About the size the task will render at (its run() has the exact rule); None when only the model knows."""
    width, height = request.width, request.height
    only_masked = getattr(request, "only_masked", False)  # inpaints a crop at width x height, default native
    source = None if only_masked else images.get("image", images.get("control_image"))
    if source is not None and bool(width) != bool(height):  # the other side follows the input's aspect ratio
        width = width or round(height * source.width / source.height)
        height = height or round(width * source.height / source.width)
    if not (width and height) and source is not None and request.task == "inpaint":
        width, height = source.size  # inpainting keeps the image's size
    if not (width and height):
        if native is None:
            return None
        width, height = width or native, height or native  # other tasks: about the model's native area
    if request.task == "inpaint" and not only_masked:
        width += request.outpaint_left + request.outpaint_right
        height += request.outpaint_up + request.outpaint_down
    hr_scale = getattr(request, "hr_scale", None)
    if hr_scale is not None:  # text_to_image's hires fix: the images come out this much larger
        width, height = (max(64, int(side * hr_scale) // 8 * 8) for side in (width, height))
    return width, height


def _loaded_model(models: ModelManager, reference: str | None) -> LoadedModel | None:
    try:
        ref = resolve_model_ref(reference, models.settings)
    except StudioInputError:
        return None  # reported when the task loads the model
    return models.get(reference) if ref in models.loaded_models() else None


def _native_side_from_config(models: ModelManager, reference: str | None) -> int | None:
    """A diffusers folder's native size from its configs, without loading it; None for single files."""
    try:
        folder = config_folder(resolve_model_ref(reference, models.settings))
        if folder is None:
            return None
        unet = json.loads((folder / "unet" / "config.json").read_text())
        vae = json.loads((folder / "vae" / "config.json").read_text())
        return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)
    except (StudioInputError, OSError, ValueError, KeyError, TypeError):
        return None


def warn_if_truncated(pipe, prompt: str, context: TaskContext, field_name: str = "prompt") -> None:
    """Long prompts are encoded in chunks (pipelines.prompts), up to a limit; say so instead of silently
    dropping what lies past it."""
    from .prompts import prompt_token_count

    if not prompt or getattr(pipe, "tokenizer", None) is None and getattr(pipe, "tokenizer_2", None) is None:
        return
    token_count, limit = prompt_token_count(pipe, prompt)
    if token_count > limit:
        context.warnings.append(f"{field_name} is {token_count} tokens long; only the first {limit} are used")


def _latents_mean_std(vae, latents: torch.Tensor):
    """The VAE config's per-channel latent mean and std (SDXL-style VAEs have them), shaped like `latents`;
    None when it has none."""
    mean = getattr(vae.config, "latents_mean", None)
    std = getattr(vae.config, "latents_std", None)
    if mean is None or std is None:
        return None
    return torch.tensor(mean).view(1, -1, 1, 1).to(latents), torch.tensor(std).view(1, -1, 1, 1).to(latents)


def unscale_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Undo the VAE's latent scaling (and SDXL-style mean/std when the config has them)."""
    stats = _latents_mean_std(vae, latents)
    if stats is not None:
        mean, std = stats
        return latents * std / vae.config.scaling_factor + mean
    return latents / vae.config.scaling_factor


def scale_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """The VAE's latent scaling (inverse of unscale_latents)."""
    stats = _latents_mean_std(vae, latents)
    if stats is not None:
        mean, std = stats
        return (latents - mean) * vae.config.scaling_factor / std
    return latents * vae.config.scaling_factor


@torch.no_grad()
def encode_image(pipe, image) -> torch.Tensor:
    """Scaled latents (mean of the posterior) of a PIL image already at its working size, in float32."""
    pixels = pipe.image_processor.preprocess(image)  # (1, 3, H, W) in [-1, 1]
    vae = pipe.vae
    latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mean
    if not torch.isfinite(latents).all() and vae.dtype != torch.float32:
        original = vae.dtype
        vae.to(torch.float32)  # fp16 overflow (SDXL's VAE): retry in fp32, then put the shared VAE back
        try:
            latents = vae.encode(pixels.to(vae.device, torch.float32)).latent_dist.mean
        finally:
            vae.to(original)
    if not torch.isfinite(latents).all():
        raise StudioInputError("the VAE could not encode the input image (NaN/inf latents)")
    return scale_latents(vae, latents.float())


# One image above this many pixels is decoded in tiles of the VAE's own size: bounded memory, and a cancel
# check before every tile. Smaller images (SDXL's 1024² included) decode whole, their pixels as before.
TILED_DECODE_PIXELS = 2 * 1024 * 1024


@torch.no_grad()
def decode_latents(pipe, latents: torch.Tensor, progress: Progress | None = None) -> torch.Tensor:
    """Decode latents to images in [0, 1] (N, 3, H, W) on the CPU, one image at a time, retrying in fp32 if
    fp16 overflows. With `progress`, a cancel or time-out stops the decode between images and decoder blocks.

    Raises NonFiniteOutputError rather than returning NaN/inf pixels (which would be saved as black).
    """
    if not torch.isfinite(latents).all():
        raise NonFiniteOutputError("the sampler produced NaN/inf latents; try another scheduler, fewer steps or fp32")
    vae = pipe.vae
    original_dtype, was_tiling = vae.dtype, getattr(vae, "use_tiling", None)
    force_fp32 = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
    if was_tiling is not None and latents[0, 0].numel() * pipe.vae_scale_factor**2 > TILED_DECODE_PIXELS:
        vae.use_tiling = True
    hooks = _cancel_checks(vae, progress)
    decoded = []
    try:
        for latent in latents.split(1):
            if progress is not None:
                progress.raise_if_cancelled()
            images = None
            if not force_fp32:
                images = vae.decode(unscale_latents(vae, latent).to(vae.device, vae.dtype)).sample
                force_fp32 = not torch.isfinite(images).all() and vae.dtype != torch.float32
            if force_fp32:
                vae.to(torch.float32)
                images = vae.decode(unscale_latents(vae, latent).to(vae.device, torch.float32)).sample
            if not torch.isfinite(images).all():
                raise NonFiniteOutputError("the VAE decoded NaN/inf pixels; the image was not saved")
            decoded.append((images.float().cpu() / 2 + 0.5).clamp(0, 1))
    finally:
        for hook in hooks:
            hook.remove()
        if was_tiling is not None:
            vae.use_tiling = was_tiling
        if vae.dtype != original_dtype:
            vae.to(original_dtype)
    return torch.cat(decoded)


def _cancel_checks(vae, progress: Progress | None) -> list:
    """Hooks that check for a cancel before the decoder (each tile) and each of its blocks: one image's decode
    can take minutes on a CPU."""
    decoder = getattr(vae, "decoder", None)
    if progress is None or decoder is None:
        return []
    blocks = [decoder, getattr(decoder, "mid_block", None), *getattr(decoder, "up_blocks", [])]

    def check(module, args):
        progress.raise_if_cancelled()

    return [block.register_forward_pre_hook(check) for block in blocks if block is not None]


def to_pil(images: torch.Tensor) -> list:
    """(N, 3, H, W) in [0, 1] to PIL images, rounding as diffusers does."""
    from PIL import Image

    arrays = (images.permute(0, 2, 3, 1).numpy() * 255).round().astype("uint8")
    return [Image.fromarray(array) for array in arrays]


# -- image to image --------------------------------------------------------------------------------------


def image_to_image_class(pipe):
    """The image-to-image pipeline class matching a text-to-image pipeline (SD -> SD img2img, SDXL -> SDXL img2img)."""
    import diffusers

    common = {  # the usual cases, without importing every pipeline (auto_pipeline takes seconds to import)
        "StableDiffusionPipeline": "StableDiffusionImg2ImgPipeline",
        "StableDiffusionImg2ImgPipeline": "StableDiffusionImg2ImgPipeline",
        "StableDiffusionXLPipeline": "StableDiffusionXLImg2ImgPipeline",
        "StableDiffusionXLImg2ImgPipeline": "StableDiffusionXLImg2ImgPipeline",
    }
    if type(pipe).__name__ in common:
        return getattr(diffusers, common[type(pipe).__name__])
    from diffusers.pipelines.auto_pipeline import (
        AUTO_IMAGE2IMAGE_PIPELINES_MAPPING,
        _get_task_class,
    )

    try:
        return _get_task_class(AUTO_IMAGE2IMAGE_PIPELINES_MAPPING, type(pipe).__name__)
    except ValueError:
        raise StudioInputError(f"the model's pipeline {type(pipe).__name__} has no image-to-image variant") from None


def check_standard_unet(loaded: LoadedModel, task: str) -> None:
    """Refuse UNets that take more than the latents (inpainting models take mask + masked image too)."""
    channels = loaded.pipe.unet.config.in_channels
    if channels != loaded.pipe.vae.config.latent_channels:
        raise StudioInputError(
            f"{task} needs a text-to-image model; {loaded.ref.name!r} has a {channels}-channel UNet "
            "(an inpainting model?)"
        )
