"""Fitting a model to one image, as imagic's stages 1-2 do: UNet clones (weights shared or copied), LoRA on
the attention projections, the standard denoising loss with every random draw from one seeded generator,
and an Adam loop that writes no .grad onto a shared model. torch and diffusers pieces, imported by
imagic inside `run`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from studio.requests import StudioInputError

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


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


# --------------------------------------------------------------------------- prompts


def encode_target(pipe, prompt: str, device, prompts: dict | None = None) -> dict:
    """The prompt's text embedding(s) as the UNet takes them (SDXL: with the pooled embedding). `prompts`:
    what pipelines.prompts.prompt_kwargs gave for the sampling call; its embeddings, when it has them."""
    if prompts is not None and "prompt_embeds" in prompts:  # A1111 weights, BREAK or a long prompt
        names = ("prompt_embeds", "pooled_prompt_embeds")
        return {name: prompts[name].to(device) for name in names if name in prompts}
    prompt = prompts["prompt"] if prompts is not None else prompt
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
