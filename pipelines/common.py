"""What every task module shares: the context it runs in, seeds, prompt checks and safe decoding."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from studio.models import LoadedModel, ModelManager
from studio.progress import Progress
from studio.requests import BaseRequest
from studio.schedulers import make_scheduler
from studio.settings import Settings


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


def with_scheduler(context: TaskContext, loaded: LoadedModel, pipe, scheduler_name: str | None):
    """The pipeline with the requested sampler, as a new pipeline object: the cached one is never changed."""
    if scheduler_name is None:
        return pipe
    scheduler = make_scheduler(scheduler_name, loaded.pipe.scheduler.config)
    return context.models.derive(loaded, type(pipe), scheduler=scheduler)


def default_size(pipe, request: BaseRequest) -> tuple[int, int]:
    """The request's size, or the model's native one."""
    native = pipe.unet.config.sample_size * pipe.vae_scale_factor
    return request.width or native, request.height or native


def warn_if_truncated(pipe, prompt: str, context: TaskContext, field_name: str = "prompt") -> None:
    """CLIP sees at most model_max_length tokens; say so instead of silently dropping the rest."""
    tokenizer = pipe.tokenizer
    if not prompt or tokenizer is None:
        return
    token_count = len(tokenizer(prompt, truncation=False, add_special_tokens=True).input_ids)
    if token_count > tokenizer.model_max_length:
        context.warnings.append(
            f"{field_name} is {token_count} tokens long; only the first {tokenizer.model_max_length} are used"
        )


def unscale_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Undo the VAE's latent scaling (and SDXL-style mean/std when the config has them)."""
    mean = getattr(vae.config, "latents_mean", None)
    std = getattr(vae.config, "latents_std", None)
    if mean is not None and std is not None:
        mean = torch.tensor(mean).view(1, -1, 1, 1).to(latents)
        std = torch.tensor(std).view(1, -1, 1, 1).to(latents)
        return latents * std / vae.config.scaling_factor + mean
    return latents / vae.config.scaling_factor


@torch.no_grad()
def decode_latents(pipe, latents: torch.Tensor) -> torch.Tensor:
    """Decode latents to images in [0, 1] (N, 3, H, W) on the CPU, retrying in fp32 if fp16 overflows.

    Raises NonFiniteOutputError rather than returning NaN/inf pixels (which would be saved as black).
    """
    if not torch.isfinite(latents).all():
        raise NonFiniteOutputError("the sampler produced NaN/inf latents; try another scheduler, fewer steps or fp32")
    vae = pipe.vae
    force_fp32 = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
    images = None
    if not force_fp32:
        images = vae.decode(unscale_latents(vae, latents).to(vae.device, vae.dtype)).sample
    if images is None or (not torch.isfinite(images).all() and vae.dtype != torch.float32):
        original_dtype = vae.dtype
        vae.to(torch.float32)
        try:
            images = vae.decode(unscale_latents(vae, latents).to(vae.device, torch.float32)).sample
        finally:
            vae.to(original_dtype)
    if not torch.isfinite(images).all():
        raise NonFiniteOutputError("the VAE decoded NaN/inf pixels; the image was not saved")
    return (images.float().cpu() / 2 + 0.5).clamp(0, 1)


def to_pil(images: torch.Tensor) -> list:
    """(N, 3, H, W) in [0, 1] to PIL images, rounding as diffusers does."""
    from PIL import Image

    arrays = (images.permute(0, 2, 3, 1).numpy() * 255).round().astype("uint8")
    return [Image.fromarray(array) for array in arrays]
