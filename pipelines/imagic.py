"""Imagic (Kawar et al. 2023): edit a real image with a text, by fitting the model to the image first.

1. "imagic: embedding": the target text's embedding e_tgt is optimised (Adam, model frozen) into
   e_opt, the embedding that best reconstructs the input image under the standard diffusion loss.
2. "imagic: fine-tune": the UNet is fine-tuned on (image, e_opt) with the same loss: the full UNet
   (a private float32 copy), or, with use_lora, low-rank adapters on the attention projections of a
   clone that shares the frozen weights (much faster, no second copy of the model).
3. "sampling": images from e = eta * e_tgt + (1 - eta) * e_opt with the fine-tuned UNet.

Defaults follow the diffusers community script (500 steps at 1e-3, then 1000 at 2e-6), with two
changes: every training noise and timestep comes from a torch.Generator seeded with the request's
`training_seed`, so a request always gives the same pixels; and the cached model is never touched (no
.grad written to it, no flag changed: gradients are taken with torch.autograd.grad).

Stages 1-2 are cached per (image, prompt, model, training settings, training seed) in a small LRU kept
with the loaded model (freed with it), so sweeping eta, guidance, the sampler or the seed (a random one
too: the training seed is apart from it) re-renders without training.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from studio.images import image_sha256
from studio.requests import MAX_SEED, BaseRequest, ImageInput, StudioInputError, image_field
from studio.tasks import Task

from .toolbox import check_min_side, check_task, flatten, working_size

if TYPE_CHECKING:
    from .common import TaskContext
    from .finetune import Trainer


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
    training_seed: int = Field(
        0, ge=0, le=MAX_SEED, description="Seed of stages 1-2, apart from the sampling seed (another seed reuses the fine-tune)."
    )

CACHE_SIZE = 2  # trained states kept per loaded model
FULL_FINETUNE_LR = 2e-6  # the community script's, for SD-sized UNets (860M parameters and up)
SMALL_UNET_FINETUNE_LR = 1e-4  # a UNet under SMALL_UNET_PARAMETERS barely moves at 2e-6 in 1000 steps
SMALL_UNET_PARAMETERS = 100_000_000  # (the embedded model's has 4M)
LORA_FINETUNE_LR = 1e-4
REUSED_NOTE = "reused the fine-tune of an earlier run (same image, prompt and training settings): no training"


def check_inputs(request: ImagicRequest, context: TaskContext) -> None:
    """Checks the schema cannot express; runs before any model is loaded."""
    check_task(request, "imagic")
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


def planned_stages(request: ImagicRequest) -> list[tuple[str, int]]:
    """The progress stages a run reports, in order, with their step counts (for time estimates; a run that
    reuses a cached fine-tune reports only the sampling)."""
    stages = [("imagic: embedding", request.embedding_steps)]
    if request.finetune_steps:
        stages.append(("imagic: fine-tune", request.finetune_steps))
    return [*stages, ("sampling", request.num_inference_steps)]


# --------------------------------------------------------------------------- the cache of trained states


@dataclass
class TrainedState:
    """What stages 1-2 produce for one (image, prompt, model, training settings and seed)."""

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
    return loaded.task_state.setdefault("imagic", ImagicCache())


def cache_key(request: ImagicRequest, loaded, image, size) -> tuple:
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
        request.training_seed,
    )


# --------------------------------------------------------------------------- stages 1-2 (torch, from .finetune)


def optimise_embedding(unet, trainer: Trainer, target: dict, request: ImagicRequest, progress) -> dict:
    """Stage 1: the embedding that reconstructs the image, the (shared, frozen) model untouched."""
    from .finetune import fit

    embeds = {name: tensor.detach().float().clone().requires_grad_(True) for name, tensor in target.items()}
    params = list(embeds.values())
    stage = "imagic: embedding"
    fit(partial(trainer.loss, unet, embeds), params, request.embedding_lr, request.embedding_steps, stage, progress)
    return {name: tensor.detach() for name, tensor in embeds.items()}


def finetune(loaded, trainer: Trainer, optimised: dict, request: ImagicRequest, progress):
    """Stage 2: the model fitted to (image, optimised embedding), as a new UNet; the shared one is untouched."""
    import torch

    from .finetune import add_lora, clone_unet, fit

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


def train(loaded, request: ImagicRequest, image, target: dict, progress) -> TrainedState:
    """Stages 1 and 2, seeded by the request's training_seed."""
    import torch
    from diffusers import DDPMScheduler

    from .common import encode_image
    from .finetune import Trainer, sdxl_time_ids

    pipe = loaded.pipe
    generator = torch.Generator("cpu").manual_seed(request.training_seed)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    added = {"time_ids": sdxl_time_ids(pipe, *image.size)} if "pooled_prompt_embeds" in target else None
    trainer = Trainer(encode_image(pipe, image).cpu(), noise_scheduler, generator, added)
    optimised = optimise_embedding(pipe.unet, trainer, target, request, progress)
    unet = finetune(loaded, trainer, optimised, request, progress) if request.finetune_steps else None
    return TrainedState(optimised, unet)


# --------------------------------------------------------------------------- the task


def run(request: ImagicRequest, context: TaskContext, seeds: list[int], plan=None) -> list:
    """Edit the input image `len(seeds)` times; returns PIL images in seed order."""
    from .common import (
        check_standard_unet,
        decode_latents,
        fresh_scheduler,
        sampling_kwargs,
        to_pil,
        warn_if_truncated,
    )
    from .finetune import encode_target
    from .prompts import prompt_kwargs

    # 1. load the model (cached); the input image at the working size
    loaded = context.models.get(request.model)
    check_standard_unet(loaded, "imagic")
    base = loaded.pipe
    image = flatten(context.images["image"])
    width, height = working_size(base, request, image)
    image = image.resize((width, height), resample=3)
    warn_if_truncated(base, request.prompt, context)
    warn_if_truncated(base, request.negative_prompt, context, "negative_prompt")
    prompts = prompt_kwargs(base, request.prompt, request.negative_prompt)  # A1111 syntax, long prompts
    target = encode_target(base, request.prompt, loaded.device, prompts)
    negative = {name: value for name, value in prompts.items() if name.startswith("negative")}

    # 2. stages 1-2: the optimised embedding and fine-tuned UNet, from the cache or trained now
    cache = imagic_cache(loaded)
    key = cache_key(request, loaded, image, (width, height))
    state = cache.get(key)
    if state is None:
        context.progress.raise_if_cancelled()
        state = train(loaded, request, image, target, context.progress)
        cache.trained += 1
        cache.put(key, state)
    else:
        context.progress.note(REUSED_NOTE)

    # 3. stage 3: sample from the interpolated embedding with the fine-tuned UNet
    eta = request.eta
    embeds = {
        name: (eta * target[name].float() + (1 - eta) * state.optimised[name]).to(loaded.device, base.unet.dtype)
        for name in target
    }
    unet = state.unet if state.unet is not None else base.unet
    pipe = context.models.derive(loaded, type(base), unet=unet, scheduler=fresh_scheduler(loaded, request.scheduler, request.prediction_type))
    context.progress.raise_if_cancelled()
    output = pipe(
        width=width,
        height=height,
        callback_on_step_end=context.progress.diffusers_callback("sampling", request.num_inference_steps),
        **embeds,
        **{**sampling_kwargs(request, seeds), "negative_prompt": None, **negative},
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
