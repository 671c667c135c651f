"""Style transfer: restyle an image, keeping its layout.

Three methods (request.method; "auto" = "reference" when a reference_image is given, else "prompt"):

- prompt: image-to-image (SDEdit) with `strength`: the image is noised part of the way and denoised
  towards the prompt, so the layout stays and the look follows the text.
- reference: training-free, works with any SD/SDXL UNet and needs no extra weights. The same
  image-to-image run, but every self-attention layer of the generation also attends to the keys and
  values of the reference image, noised to the current timestep and run through the UNet in the same
  batch ("reference-only", as in the A1111 ControlNet extension), with the generation's queries and
  keys AdaIN-normalised to the reference's statistics (StyleAligned's shared attention, Hertz et al.
  2023). `style_strength` scales the attention paid to the reference (a log-bias on its keys) and the
  AdaIN blend; 0 turns the sharing off.
- ip_adapter: an IP-Adapter whose weights the user already has locally, named by
  `Settings.extra["ip_adapter"]` (a folder, or a dict with folder / weight_name / subfolder /
  image_encoder_folder). Nothing is ever downloaded.

The cached model is never changed: the reference method installs its attention processors on the
shared UNet only for the duration of the call, from a copy of the processors map that is restored in a
`finally`, and runs through a derived pipeline whose UNet is a thin per-call wrapper.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from studio.requests import BaseRequest, ImageInput, StudioInputError, image_field
from studio.tasks import Task

from .common import (
    TaskContext,
    decode_latents,
    sampling_kwargs,
    to_pil,
    warn_if_truncated,
)


class StyleTransferRequest(BaseRequest):
    task: Literal["style_transfer"] = "style_transfer"
    image: ImageInput = image_field(..., "The image to restyle.")
    reference_image: ImageInput = image_field(None, "An image whose style to take.")
    method: Literal["auto", "prompt", "reference", "ip_adapter"] = Field("auto", description="How style is applied.")
    strength: float = Field(0.6, ge=0.0, le=1.0, description="How far from the input image to go.")
    style_strength: float = Field(1.0, ge=0.0, le=2.0, description="How strongly the reference style is applied.")

MIN_SIDE = 64  # input images smaller than this on either side are refused
REFERENCE_NOISE_SEED = 0x5EED  # the reference's noise: fixed, so image i of a batch is the single render of seed i


# --------------------------------------------------------------------------- checks


def resolve_method(request: StyleTransferRequest) -> str:
    if request.method == "auto":
        return "reference" if request.reference_image is not None else "prompt"
    return request.method


def check_min_side(image, name: str, min_side: int = MIN_SIDE) -> None:
    if image is not None and min(image.size) < min_side:
        raise StudioInputError(
            f"{name} is {image.width}x{image.height}; it must be at least {min_side} pixels on each side"
        )


def effective_steps(num_inference_steps: int, strength: float) -> int:
    """Denoising steps an image-to-image run takes (diffusers' rule)."""
    return min(int(num_inference_steps * strength), num_inference_steps)


def check_strength_steps(request) -> None:
    if effective_steps(request.num_inference_steps, request.strength) < 1:
        raise StudioInputError(
            f"strength {request.strength:g} with num_inference_steps {request.num_inference_steps} leaves no "
            "denoising step (strength x steps must be at least 1); raise strength or num_inference_steps"
        )


def check_inputs(request: StyleTransferRequest, context: TaskContext) -> None:
    """Checks the schema cannot express; runs before any model is loaded."""
    if request.task != "style_transfer":
        raise StudioInputError(f"style_transfer cannot run a {request.task!r} request")
    method = resolve_method(request)
    check_min_side(context.images.get("image"), "image")
    if method in ("reference", "ip_adapter") and request.reference_image is None:
        raise StudioInputError(f"method {request.method!r} needs a reference_image (the image whose style to take)")
    if method == "prompt" and request.reference_image is not None:
        context.warnings.append("reference_image is ignored by method 'prompt'")
    if method != "prompt":
        check_min_side(context.images.get("reference_image"), "reference_image", 32)
    check_strength_steps(request)
    if method == "prompt" and not request.prompt.strip():
        context.warnings.append("the prompt is empty: method 'prompt' restyles towards nothing in particular")
    if method == "reference" and request.style_strength == 0:
        context.warnings.append("style_strength is 0: the reference image is not used")
    if method == "ip_adapter":
        ip_adapter_config(context.settings)  # not configured or missing files: a clear error, before loading


# --------------------------------------------------------------------------- helpers shared with imagic


def rgb(image):
    """RGB copy of an input image; transparent areas become white, as drawing apps show them."""
    from PIL import Image

    if image.mode == "RGBA":
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image).convert("RGB")
    return image.convert("RGB")


def native_side(pipe) -> int:
    return pipe.unet.config.sample_size * pipe.vae_scale_factor


def working_size(pipe, request, image) -> tuple[int, int]:
    """Output size: the request's; else the input's aspect ratio at no more than the model's native area
    (unless that would make a side shorter than 64). One of width/height given: the other follows the
    input's aspect ratio. Sides are multiples of 8, from 64 to 2048.
    """
    def round8(value: float) -> int:
        return int(min(max(round(value / 8) * 8, 64), 2048))

    w, h = image.size
    if request.width and request.height:
        return request.width, request.height
    if request.width:
        return request.width, round8(request.width * h / w)
    if request.height:
        return round8(request.height * w / h), request.height
    native = native_side(pipe)
    scale = min(1.0, math.sqrt(native * native / (w * h)))
    scale = max(scale, min(1.0, 64 / min(w, h)))  # a long thin image keeps its shape, sides >= 64
    return round8(w * scale), round8(h * scale)


def scale_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """The VAE's latent scaling (inverse of common.unscale_latents)."""
    mean = getattr(vae.config, "latents_mean", None)
    std = getattr(vae.config, "latents_std", None)
    if mean is not None and std is not None:
        mean = torch.tensor(mean).view(1, -1, 1, 1).to(latents)
        std = torch.tensor(std).view(1, -1, 1, 1).to(latents)
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


def check_standard_unet(loaded, task: str) -> None:
    """Refuse UNets that take more than the latents (inpainting models take mask + masked image too)."""
    channels = loaded.pipe.unet.config.in_channels
    if channels != loaded.pipe.vae.config.latent_channels:
        raise StudioInputError(
            f"{task} needs a text-to-image model; {loaded.ref.name!r} has a {channels}-channel UNet "
            "(an inpainting model?)"
        )


def fresh_scheduler(loaded, name: str | None):
    """The requested sampler (or a copy of the model's own) as a new object for one derived pipeline."""
    from studio.schedulers import make_scheduler

    if name is not None:
        return make_scheduler(name, loaded.pipe.scheduler.config)
    return type(loaded.pipe.scheduler).from_config(loaded.pipe.scheduler.config)


# --------------------------------------------------------------------------- reference: shared attention + AdaIN


@dataclass
class SharedAttentionState:
    """What the shared-attention processors read; `active` only while the wrapper runs the UNet."""

    style_strength: float = 1.0
    active: bool = False

    @property
    def key_bias(self) -> float:
        """Added to the attention logits of the reference's keys: log(style_strength)."""
        return math.log(self.style_strength) if self.style_strength > 0 else -math.inf

    @property
    def adain_weight(self) -> float:
        return min(self.style_strength, 1.0)


def adain(features: torch.Tensor, reference: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Per channel of each head: the features' statistics over tokens replaced by the reference's.

    features (B, heads, L, d), reference (1, heads, L', d).
    """
    mean = features.mean(dim=-2, keepdim=True)
    std = (features.var(dim=-2, keepdim=True) + eps).sqrt()
    ref_mean = reference.mean(dim=-2, keepdim=True)
    ref_std = (reference.var(dim=-2, keepdim=True) + eps).sqrt()
    return (features - mean) / std * ref_std + ref_mean


class SharedSelfAttentionProcessor:
    """Self-attention where batch element 0 (the reference) lends its keys/values to every other element.

    Outside the reference wrapper's UNet call (state.active False), or for anything that is not plain
    self-attention, it defers to the processor it replaced.
    """

    def __init__(self, state: SharedAttentionState, original):
        self.state = state
        self.original = original

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        if (
            not self.state.active
            or encoder_hidden_states is not None
            or attention_mask is not None
            or hidden_states.shape[0] < 2
        ):
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)

        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        # The reference attends to itself only, as in a plain UNet pass.
        ref_q, ref_k, ref_v = query[:1], key[:1], value[:1]
        ref_out = F.scaled_dot_product_attention(ref_q, ref_k, ref_v, scale=attn.scale)

        # The others: AdaIN'd queries/keys, attending to their own tokens and to the reference's.
        gen_q, gen_k, gen_v = query[1:], key[1:], value[1:]
        weight = self.state.adain_weight
        if weight > 0:
            gen_q = torch.lerp(gen_q, adain(gen_q, ref_q), weight)
            gen_k = torch.lerp(gen_k, adain(gen_k, ref_k), weight)
        others = batch - 1
        keys = torch.cat([gen_k, ref_k.expand(others, -1, -1, -1)], dim=2)
        values = torch.cat([gen_v, ref_v.expand(others, -1, -1, -1)], dim=2)
        own_tokens = gen_k.shape[2]
        bias = torch.zeros(1, 1, 1, keys.shape[2], dtype=query.dtype, device=query.device)
        bias[..., own_tokens:] = self.state.key_bias
        gen_out = F.scaled_dot_product_attention(gen_q, keys, values, attn_mask=bias, scale=attn.scale)

        hidden_states = torch.cat([ref_out, gen_out]).transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def alpha_bar(alphas_cumprod: torch.Tensor, timestep) -> torch.Tensor:
    """ᾱ at a (possibly fractional) training timestep, linearly interpolated."""
    t = float(timestep)
    t = min(max(t, 0.0), len(alphas_cumprod) - 1.0)
    low = math.floor(t)
    high = min(low + 1, len(alphas_cumprod) - 1)
    frac = t - low
    return alphas_cumprod[low] * (1 - frac) + alphas_cumprod[high] * frac


class ReferenceUNet(torch.nn.Module):
    """A per-call wrapper around the shared UNet that puts the noised reference first in every batch.

    At timestep t the reference enters as sqrt(ᾱ_t)·x0 + sqrt(1-ᾱ_t)·ε, which is what a UNet sees at t
    under every SD sampler (Euler-type samplers scale their inputs to exactly this), so it works with any
    scheduler. Its output is dropped; it only lends keys/values to the shared-attention processors.
    """

    def __init__(self, unet, state: SharedAttentionState, reference_latents, noise, alphas_cumprod):
        super().__init__()
        self.unet = unet
        self.state = state
        self.reference_latents = reference_latents
        self.noise = noise
        self.alphas_cumprod = alphas_cumprod.float().cpu()

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("unet"), name)

    @property
    def config(self):
        return self.unet.config

    @property
    def dtype(self):
        return self.unet.dtype

    @property
    def device(self):
        return self.unet.device

    def _reference_input(self, timestep, like: torch.Tensor) -> torch.Tensor:
        t = timestep.flatten()[0] if torch.is_tensor(timestep) else timestep
        a = alpha_bar(self.alphas_cumprod, t)
        noised = a.sqrt() * self.reference_latents + (1 - a).sqrt() * self.noise
        return noised.to(like.device, like.dtype)

    @staticmethod
    def _prepend_first(value, batch: int):
        if torch.is_tensor(value) and value.ndim > 0 and value.shape[0] == batch:
            return torch.cat([value[:1], value])
        return value

    def forward(self, sample, timestep, encoder_hidden_states, *args, added_cond_kwargs=None, return_dict=True, **kwargs):
        batch = sample.shape[0]
        sample = torch.cat([self._reference_input(timestep, sample), sample])
        timestep = self._prepend_first(timestep, batch)
        # The reference is conditioned like the first row (the negative/empty prompt under CFG).
        encoder_hidden_states = self._prepend_first(encoder_hidden_states, batch)
        kwargs = {name: self._prepend_first(value, batch) for name, value in kwargs.items()}
        if added_cond_kwargs is not None:
            added_cond_kwargs = {name: self._prepend_first(value, batch) for name, value in added_cond_kwargs.items()}
        self.state.active = True
        try:
            output = self.unet(
                sample, timestep, encoder_hidden_states, *args, added_cond_kwargs=added_cond_kwargs, return_dict=False, **kwargs
            )[0]
        finally:
            self.state.active = False
        output = output[1:]
        if return_dict:
            from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

            return UNet2DConditionOutput(sample=output)
        return (output,)


class shared_attention:
    """Context manager: shared-attention processors on the UNet's self-attention layers, restored on exit."""

    def __init__(self, unet, state: SharedAttentionState):
        self.unet = unet
        self.state = state
        self.saved = None

    def __enter__(self):
        self.saved = dict(self.unet.attn_processors)  # a copy: set_attn_processor pops from the map it is given
        installed = {
            name: SharedSelfAttentionProcessor(self.state, processor) if name.endswith("attn1.processor") else processor
            for name, processor in self.saved.items()
        }
        self.unet.set_attn_processor(installed)
        return self

    def __exit__(self, *exc):
        self.unet.set_attn_processor(dict(self.saved))
        return False


# --------------------------------------------------------------------------- IP-Adapter (local weights only)


def ip_adapter_config(settings) -> dict:
    """Where the user's IP-Adapter weights are: Settings.extra["ip_adapter"], a folder or a dict. Never downloads."""
    entry = (settings.extra or {}).get("ip_adapter")
    if not entry:
        raise StudioInputError(
            "method 'ip_adapter' needs IP-Adapter weights on this machine, and none are configured: set "
            "Settings.extra['ip_adapter'] to a local folder holding the adapter .safetensors and its image_encoder/ "
            "(the studio never downloads); or use method 'reference', which needs no extra weights"
        )
    config = {"folder": entry} if isinstance(entry, (str, Path)) else dict(entry)
    folder = Path(config.get("folder", "")).expanduser()
    subfolder = config.get("subfolder", "")
    if not folder.is_dir():
        raise StudioInputError(f"IP-Adapter folder {str(folder)!r} (Settings.extra['ip_adapter']) does not exist")
    weight_name = config.get("weight_name")
    if weight_name is None:
        candidates = sorted((folder / subfolder).glob("*.safetensors"))
        if len(candidates) != 1:
            raise StudioInputError(
                f"IP-Adapter folder {str(folder / subfolder)!r} holds {len(candidates)} .safetensors files; "
                "name the one to use with Settings.extra['ip_adapter']['weight_name']"
            )
        weight_name = candidates[0].name
    if not (folder / subfolder / weight_name).is_file():
        raise StudioInputError(f"IP-Adapter weights {str(folder / subfolder / weight_name)!r} do not exist")
    encoder = config.get("image_encoder_folder", "image_encoder")
    encoder_path = Path(encoder) if Path(encoder).is_absolute() else folder / encoder
    if not (encoder_path / "config.json").is_file():
        raise StudioInputError(
            f"IP-Adapter image encoder {str(encoder_path)!r} is missing (a CLIPVisionModelWithProjection folder)"
        )
    return {"folder": str(folder), "subfolder": subfolder, "weight_name": weight_name, "image_encoder_folder": str(encoder_path)}


class ip_adapter_loaded:
    """Context manager: the adapter loaded into a derived pipeline; the shared UNet put back exactly on exit."""

    def __init__(self, pipe, config: dict, scale: float):
        self.pipe, self.config, self.scale = pipe, config, scale

    def __enter__(self):
        unet = self.pipe.unet
        self.saved = (dict(unet.attn_processors), unet.encoder_hid_proj, unet.config.get("encoder_hid_dim_type"))
        self.pipe.load_ip_adapter(
            self.config["folder"],
            subfolder=self.config["subfolder"],
            weight_name=self.config["weight_name"],
            image_encoder_folder=self.config["image_encoder_folder"],
            local_files_only=True,
        )
        self.pipe.set_ip_adapter_scale(self.scale)
        return self.pipe

    def __exit__(self, *exc):
        unet = self.pipe.unet
        processors, hid_proj, hid_type = self.saved
        try:
            self.pipe.unload_ip_adapter()
        finally:
            unet.encoder_hid_proj = hid_proj
            unet.register_to_config(encoder_hid_dim_type=hid_type)
            unet.set_attn_processor(dict(processors))
        return False


# --------------------------------------------------------------------------- the task


def run(request: StyleTransferRequest, context: TaskContext, seeds: list[int], plan=None) -> list:
    """Restyle the input image `len(seeds)` times; returns PIL images in seed order."""
    method = resolve_method(request)

    # 1. load the model (cached) and derive its image-to-image pipeline with a fresh sampler
    loaded = context.models.get(request.model)
    check_standard_unet(loaded, "style_transfer")
    pipeline_class = image_to_image_class(loaded.pipe)
    scheduler = fresh_scheduler(loaded, request.scheduler)

    # 2. the input image (and reference) at the working size
    image = rgb(context.images["image"])
    width, height = working_size(loaded.pipe, request, image)
    image = image.resize((width, height), resample=3)  # bicubic
    warn_if_truncated(loaded.pipe, request.prompt, context)
    warn_if_truncated(loaded.pipe, request.negative_prompt, context, "negative_prompt")

    steps = effective_steps(request.num_inference_steps, request.strength)
    call = dict(
        prompt=request.prompt,
        image=image,
        strength=request.strength,
        callback_on_step_end=context.progress.diffusers_callback("sampling", steps),
        **sampling_kwargs(request, seeds),
    )
    context.progress.raise_if_cancelled()

    # 3. sample, by the chosen method
    if method == "reference" and request.style_strength > 0:
        output = _run_reference(request, context, loaded, pipeline_class, scheduler, call, seeds)
    elif method == "ip_adapter":
        config = ip_adapter_config(context.settings)
        pipe = context.models.derive(loaded, pipeline_class, scheduler=scheduler)
        reference = rgb(context.images["reference_image"])
        with ip_adapter_loaded(pipe, config, request.style_strength):
            output = pipe(ip_adapter_image=reference, **call)
    else:
        pipe = context.models.derive(loaded, pipeline_class, scheduler=scheduler)
        output = pipe(**call)
    context.progress.raise_if_cancelled()

    # 4. decode with the shared VAE, refusing non-finite pixels
    return to_pil(decode_latents(loaded.pipe, output.images, context.progress))


def _run_reference(request, context, loaded, pipeline_class, scheduler, call, seeds):
    from PIL import ImageOps

    base = loaded.pipe
    width, height = call["image"].size
    reference = ImageOps.fit(rgb(context.images["reference_image"]), (width, height), method=3)
    reference_latents = encode_image(base, reference)
    noise_generator = torch.Generator("cpu").manual_seed(REFERENCE_NOISE_SEED)
    noise = torch.randn(reference_latents.shape, generator=noise_generator)
    alphas_cumprod = getattr(base.scheduler, "alphas_cumprod", None)
    if alphas_cumprod is None:
        from diffusers import DDPMScheduler

        alphas_cumprod = DDPMScheduler.from_config(base.scheduler.config).alphas_cumprod
    state = SharedAttentionState(style_strength=request.style_strength)
    wrapper = ReferenceUNet(base.unet, state, reference_latents.to(base.device), noise.to(base.device), alphas_cumprod)
    pipe = context.models.derive(loaded, pipeline_class, unet=wrapper, scheduler=scheduler)
    with shared_attention(base.unet, state):
        return pipe(**call)


TASK = Task(
    name="style_transfer",
    request_type=StyleTransferRequest,
    prepare=check_inputs,
    run=run,
    title="Style",
    command="style",
    summary="restyle an image by a prompt or a reference image (--image)",
    prompt_label="prompt (the style, in words)",
    main_fields=("method", "strength", "style_strength"),
    image_labels={"image": "image: to restyle", "reference_image": "style image (optional)"},
)
