"""Shared attention for style transfer's reference method: the reference image lends its keys and values
to every self-attention layer of the generation (reference-only), with AdaIN'd queries and keys
(StyleAligned). torch and diffusers pieces, imported by style_transfer inside `run`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


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


def reference_unet(pipe, reference_latents: torch.Tensor, style_strength: float, noise_seed: int) -> ReferenceUNet:
    """A per-call wrapper around `pipe`'s UNet that runs the reference (scaled latents, noised with a fixed
    `noise_seed`) first in every batch; install its `state` with `shared_attention` around the call."""
    noise_generator = torch.Generator("cpu").manual_seed(noise_seed)
    noise = torch.randn(reference_latents.shape, generator=noise_generator)
    alphas_cumprod = getattr(pipe.scheduler, "alphas_cumprod", None)
    if alphas_cumprod is None:
        from diffusers import DDPMScheduler

        alphas_cumprod = DDPMScheduler.from_config(pipe.scheduler.config).alphas_cumprod
    state = SharedAttentionState(style_strength=style_strength)
    return ReferenceUNet(pipe.unet, state, reference_latents.to(pipe.device), noise.to(pipe.device), alphas_cumprod)
