"""Imagic (Kawar et al. 2023): edit a real image with a text, by fitting the model to the image first.

1. "imagic: embedding": the target text's embedding e_tgt is optimised (Adam, model frozen) into
   e_opt, the embedding that best reconstructs the input image under the standard diffusion loss.
2. "imagic: fine-tune": the UNet is fine-tuned on (image, e_opt) with the same loss: the full UNet
   (a private float32 copy), or, with use_lora, low-rank adapters on the attention projections of a
   clone that shares the frozen weights (much faster, no second copy of the model).
3. "sampling": images from e = eta * e_tgt + (1 - eta) * e_opt with the fine-tuned UNet.

Defaults follow the diffusers community script (500 steps at 1e-3, then 1000 at 2e-6), with two
changes: every training noise and timestep comes from a torch.Generator seeded with the request's
(first) seed, so a request always gives the same pixels; and the cached model is never touched (no
.grad written to it, no flag changed: gradients are taken with torch.autograd.grad).

Stages 1-2 are cached per (image, prompt, model, training settings, seed) in a small LRU kept with the
loaded model (freed with it), so sweeping eta, guidance or the sampler re-renders without training.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from studio.images import image_sha256
from studio.requests import BaseRequest, ImageInput, StudioInputError, image_field
from studio.tasks import Task

from .common import (
    TaskContext,
    decode_latents,
    sampling_kwargs,
    to_pil,
    warn_if_truncated,
)
from .style_transfer import (
    check_min_side,
    check_standard_unet,
    encode_image,
    fresh_scheduler,
    rgb,
    working_size,
)


class ImagicRequest(BaseRequest):
    task: Literal["imagic"] = "imagic"
    image: ImageInput = image_field(..., "The real image to edit.")
    eta: float = Field(0.7, ge=0.0, le=1.5, description="Interpolation: 0 reconstructs the input, 1 is the target text.")
    embedding_steps: int = Field(500, ge=1, le=10_000, description="Stage 1: text-embedding optimisation steps.")
    embedding_lr: float = Field(1e-3, gt=0.0, le=1.0, description="Stage 1 learning rate.")
    finetune_steps: int = Field(1000, ge=0, le=20_000, description="Stage 2: model fine-tuning steps.")
    finetune_lr: float | None = Field(
        None, gt=0.0, le=1.0, description="Stage 2 learning rate; None: 2e-6 for a full SD-sized UNet (1e-4 under 100M parameters), 1e-4 for a LoRA."
    )
    use_lora: bool = Field(False, description="Fine-tune a LoRA instead of the full UNet (faster, smaller).")
    lora_rank: int = Field(4, ge=1, le=256, description="LoRA rank when use_lora is set.")

CACHE_SIZE = 2  # trained states kept per loaded model
CACHE_KEY = "imagic:cache"  # where the cache lives in LoadedModel.derived (cleared when the model is freed)
FULL_FINETUNE_LR = 2e-6  # the community script's, for SD-sized UNets (860M parameters and up)
SMALL_UNET_FINETUNE_LR = 1e-4  # a UNet under SMALL_UNET_PARAMETERS barely moves at 2e-6 in 1000 steps
SMALL_UNET_PARAMETERS = 100_000_000  # (the embedded model's has 4M)
LORA_FINETUNE_LR = 1e-4
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def check_inputs(request: ImagicRequest, context: TaskContext) -> None:
    """Checks the schema cannot express; runs before any model is loaded."""
    if request.task != "imagic":
        raise StudioInputError(f"imagic cannot run a {request.task!r} request")
    if not request.prompt.strip():
        raise StudioInputError("imagic needs a prompt: the text describing the edited image (e.g. 'a blue circle')")
    check_min_side(context.images.get("image"), "image")
    if request.finetune_steps == 0 and request.use_lora:
        context.warnings.append("use_lora has no effect with finetune_steps 0 (no fine-tuning)")


def finetune_lr(request: ImagicRequest, unet=None) -> float:
    """The request's stage-2 learning rate, or the default for its method and the UNet's size."""
    if request.finetune_lr is not None:
        return request.finetune_lr
    if request.use_lora:
        return LORA_FINETUNE_LR
    if unet is not None and sum(p.numel() for p in unet.parameters()) < SMALL_UNET_PARAMETERS:
        return SMALL_UNET_FINETUNE_LR
    return FULL_FINETUNE_LR


# --------------------------------------------------------------------------- the cache of trained states


@dataclass
class TrainedState:
    """What stages 1-2 produce for one (image, prompt, model, settings, seed)."""

    optimised: dict  # the optimised embedding(s): prompt_embeds (+ pooled_prompt_embeds for SDXL), float32
    unet: object | None  # the fine-tuned UNet, or None when finetune_steps is 0 (the shared UNet is used)


@dataclass
class ImagicCache:
    """A small LRU of trained states; `trained` counts the training runs (stage 1 + 2) it has paid for."""

    capacity: int = CACHE_SIZE
    entries: OrderedDict = field(default_factory=OrderedDict)
    hits: int = 0
    trained: int = 0

    def get(self, key):
        state = self.entries.get(key)
        if state is not None:
            self.entries.move_to_end(key)
            self.hits += 1
        return state

    def put(self, key, state: TrainedState) -> None:
        self.entries[key] = state
        self.entries.move_to_end(key)
        while len(self.entries) > self.capacity:
            self.entries.popitem(last=False)

    def clear(self) -> None:
        self.entries.clear()


def imagic_cache(loaded) -> ImagicCache:
    """The trained-state cache of a loaded model (created on first use, freed with the model)."""
    cache = loaded.derived.get(CACHE_KEY)
    if cache is None:
        cache = loaded.derived[CACHE_KEY] = ImagicCache()
    return cache


def cache_key(request: ImagicRequest, loaded, image, size, seed: int) -> tuple:
    lora = (True, request.lora_rank) if request.use_lora and request.finetune_steps else (False, 0)
    return (
        image_sha256(image),
        size,
        request.prompt,
        loaded.ref,
        loaded.model_hash,
        str(loaded.dtype),
        request.embedding_steps,
        request.embedding_lr,
        request.finetune_steps,
        finetune_lr(request, loaded.pipe.unet) if request.finetune_steps else 0.0,
        lora,
        seed,
    )


# --------------------------------------------------------------------------- UNet clones and LoRA


def clone_unet(unet, *, share_weights: bool, dtype: torch.dtype | None = None):
    """A UNet of the same architecture and weights, without the original's hooks or flags.

    share_weights=True: the clone's parameters are new Parameter objects over the original's storage
    (no memory; for frozen use). False: an independent copy (in `dtype`), for full fine-tuning.
    """
    state = unet.state_dict()
    if any(tensor.is_meta for tensor in state.values()):
        raise StudioInputError("imagic cannot fine-tune a model loaded with sequential offload; use offload 'none'")
    if not share_weights:
        state = {name: tensor.detach().to(dtype=dtype or tensor.dtype, copy=True) for name, tensor in state.items()}
    with torch.device("meta"):
        clone = type(unet).from_config(unet.config)
    clone.load_state_dict(state, assign=True, strict=True)
    if any(tensor.is_meta for tensor in list(clone.parameters()) + list(clone.buffers())):
        raise RuntimeError("could not clone the UNet (it has tensors outside its state dict)")
    clone.set_attn_processor(dict(unet.attn_processors))
    clone.requires_grad_(False)
    return clone.eval()


class LoRALinear(torch.nn.Module):
    """base(x) + up(down(x)): a rank-r update of a frozen linear layer, trained in float32."""

    def __init__(self, base: torch.nn.Linear, rank: int, generator: torch.Generator):
        super().__init__()
        self.base = base
        down = torch.randn(rank, base.in_features, generator=generator) / rank  # diffusers' LoRA init
        self.down = torch.nn.Parameter(down.to(base.weight.device))
        self.up = torch.nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))

    def forward(self, hidden_states, *args, **kwargs):
        update = F.linear(F.linear(hidden_states.to(self.down.dtype), self.down), self.up)
        return self.base(hidden_states) + update.to(hidden_states.dtype)


def add_lora(unet, rank: int, generator: torch.Generator) -> list[torch.nn.Parameter]:
    """Wrap the attention projections of a (cloned) UNet with LoRA layers; returns the trainable parameters."""
    from diffusers.models.attention_processor import Attention

    params = []
    for module in [m for m in unet.modules() if isinstance(m, Attention)]:
        for target in LORA_TARGETS:
            if target == "to_out.0":
                parent, name = module.to_out, "0"
                base = module.to_out[0]
            else:
                parent, name = module, target
                base = getattr(module, target, None)
            if not isinstance(base, torch.nn.Linear):
                continue
            lora = LoRALinear(base, rank, generator)
            if name == "0":
                parent[0] = lora
            else:
                setattr(parent, name, lora)
            params += [lora.down, lora.up]
    return params


# --------------------------------------------------------------------------- the diffusion loss


@dataclass
class Trainer:
    """The standard denoising loss on one image, with all randomness from one seeded CPU generator."""

    latents: torch.Tensor  # the input image's scaled latents (1, C, h, w), float32
    noise_scheduler: object  # a DDPMScheduler with the model's training schedule
    generator: torch.Generator
    added_cond: dict | None = None  # SDXL: time_ids (text_embeds come with the embedding)

    def loss(self, unet, embeds: dict) -> torch.Tensor:
        device, dtype = unet.device, unet.dtype
        noise = torch.randn(self.latents.shape, generator=self.generator)
        timestep = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (1,), generator=self.generator)
        latents = self.latents.cpu()
        noisy = self.noise_scheduler.add_noise(latents, noise, timestep)
        prediction_type = self.noise_scheduler.config.prediction_type
        if prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timestep)
        elif prediction_type == "sample":
            target = latents
        else:
            target = noise
        added = None
        if "pooled_prompt_embeds" in embeds:
            added = {
                "text_embeds": embeds["pooled_prompt_embeds"].to(device, dtype),
                "time_ids": self.added_cond["time_ids"].to(device, dtype),
            }
        prediction = unet(
            noisy.to(device, dtype),
            timestep.to(device),
            encoder_hidden_states=embeds["prompt_embeds"].to(device, dtype),
            added_cond_kwargs=added,
            return_dict=False,
        )[0]
        return F.mse_loss(prediction.float(), target.to(device).float())


def fit(loss_of, params: list, lr: float, total: int, stage: str, progress) -> None:
    """`total` Adam steps on `params` alone, reporting each step and stopping after a cancel.

    Gradients come from autograd.grad for `params` only, so no .grad lands on a shared model;
    a parameter the loss does not reach (an unused layer) gets none and is left as it is.
    """
    optimiser = torch.optim.Adam(params, lr=lr)
    for step in range(total):
        grads = torch.autograd.grad(loss_of(), params, allow_unused=True)
        for param, grad in zip(params, grads):
            param.grad = grad
        optimiser.step()
        optimiser.zero_grad(set_to_none=True)
        progress.update(stage, step + 1, total)
        progress.raise_if_cancelled()


def optimise_embedding(unet, trainer: Trainer, target: dict, request: ImagicRequest, progress) -> dict:
    """Stage 1: the embedding that reconstructs the image, the (shared, frozen) model untouched."""
    embeds = {name: tensor.detach().float().clone().requires_grad_(True) for name, tensor in target.items()}
    params = list(embeds.values())
    stage = "imagic: embedding"
    fit(partial(trainer.loss, unet, embeds), params, request.embedding_lr, request.embedding_steps, stage, progress)
    return {name: tensor.detach() for name, tensor in embeds.items()}


def finetune(loaded, trainer: Trainer, optimised: dict, request: ImagicRequest, progress):
    """Stage 2: the model fitted to (image, optimised embedding), as a new UNet; the shared one is untouched."""
    base = loaded.pipe.unet
    if request.use_lora:
        unet = clone_unet(base, share_weights=True)
        params = add_lora(unet, request.lora_rank, trainer.generator)
    else:
        unet = clone_unet(base, share_weights=False, dtype=torch.float32).to(loaded.device)
        unet.requires_grad_(True)
        params = list(unet.parameters())
    unet.train()
    try:
        lr, steps = finetune_lr(request, base), request.finetune_steps
        fit(partial(trainer.loss, unet, optimised), params, lr, steps, "imagic: fine-tune", progress)
    finally:
        unet.eval()
    unet.requires_grad_(False)
    if not request.use_lora:
        unet.to(loaded.dtype)  # sampled like the shared model
    return unet


# --------------------------------------------------------------------------- the task


def encode_target(pipe, prompt: str, device) -> dict:
    """The prompt's text embedding(s) as the UNet takes them (SDXL: with the pooled embedding)."""
    with torch.no_grad():
        encoded = pipe.encode_prompt(
            prompt=prompt, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
    if len(encoded) == 4:  # SDXL: prompt, negative, pooled, negative pooled
        return {"prompt_embeds": encoded[0], "pooled_prompt_embeds": encoded[2]}
    return {"prompt_embeds": encoded[0]}


def sdxl_time_ids(pipe, width: int, height: int):
    projection = pipe.text_encoder_2.config.projection_dim
    return pipe._get_add_time_ids((height, width), (0, 0), (height, width), torch.float32, text_encoder_projection_dim=projection)


def train(loaded, request: ImagicRequest, image, target: dict, seed: int, progress) -> TrainedState:
    """Stages 1 and 2, seeded."""
    from diffusers import DDPMScheduler

    pipe = loaded.pipe
    generator = torch.Generator("cpu").manual_seed(seed)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    added = {"time_ids": sdxl_time_ids(pipe, *image.size)} if "pooled_prompt_embeds" in target else None
    trainer = Trainer(encode_image(pipe, image).cpu(), noise_scheduler, generator, added)
    optimised = optimise_embedding(pipe.unet, trainer, target, request, progress)
    unet = finetune(loaded, trainer, optimised, request, progress) if request.finetune_steps else None
    return TrainedState(optimised, unet)


def run(request: ImagicRequest, context: TaskContext, seeds: list[int], plan=None) -> list:
    """Edit the input image `len(seeds)` times; returns PIL images in seed order."""
    # 1. load the model (cached); the input image at the working size
    loaded = context.models.get(request.model)
    check_standard_unet(loaded, "imagic")
    base = loaded.pipe
    image = rgb(context.images["image"])
    width, height = working_size(base, request, image)
    image = image.resize((width, height), resample=3)
    warn_if_truncated(base, request.prompt, context)
    warn_if_truncated(base, request.negative_prompt, context, "negative_prompt")
    target = encode_target(base, request.prompt, loaded.device)

    # 2. stages 1-2: the optimised embedding and fine-tuned UNet, from the cache or trained now
    cache = imagic_cache(loaded)
    key = cache_key(request, loaded, image, (width, height), seeds[0])
    state = cache.get(key)
    if state is None:
        context.progress.raise_if_cancelled()
        state = train(loaded, request, image, target, seeds[0], context.progress)
        cache.trained += 1
        cache.put(key, state)

    # 3. stage 3: sample from the interpolated embedding with the fine-tuned UNet
    eta = request.eta
    embeds = {
        name: (eta * target[name].float() + (1 - eta) * state.optimised[name]).to(loaded.device, base.unet.dtype)
        for name in target
    }
    unet = state.unet if state.unet is not None else base.unet
    pipe = context.models.derive(loaded, type(base), unet=unet, scheduler=fresh_scheduler(loaded, request.scheduler))
    context.progress.raise_if_cancelled()
    output = pipe(
        width=width,
        height=height,
        callback_on_step_end=context.progress.diffusers_callback("sampling", request.num_inference_steps),
        **embeds,
        **sampling_kwargs(request, seeds),
    )
    context.progress.raise_if_cancelled()

    # 4. decode, refusing non-finite pixels
    return to_pil(decode_latents(base, output.images, context.progress))


TASK = Task(
    name="imagic",
    request_type=ImagicRequest,
    prepare=check_inputs,
    run=run,
    title="Imagic",
    command="imagic",
    summary="edit a real image by text, Imagic-style (--image)",
    prompt_label="prompt (the target text)",
    prompt_placeholder="the same scene, but blue",
    main_fields=("eta",),
    image_labels={"image": "image: the photo to edit"},
    rerender_fields=("eta",),
)
