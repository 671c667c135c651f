"""What the stages minimise: the CLIP, VAE and diffusion losses, the text probes, slot grounding; and EMA weights."""

from __future__ import annotations

import math

import numpy as np

from .architecture import LATENT_SIZE, TEXT_WIDTH
from .data import PLACE_COLUMNS, probe_classes


def clip_loss(model, pixel_values, input_ids, captions: list[str]):
    import torch
    import torch.nn.functional as F

    out = model(input_ids=input_ids, pixel_values=pixel_values, return_dict=True)
    logits = out.logits_per_image  # [B, B], already scaled by exp(logit_scale)
    same = np.asarray(captions)[:, None] == np.asarray(captions)[None, :]
    target = torch.from_numpy(same.astype(np.float32))
    target = target / target.sum(1, keepdim=True)
    loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target.t() / target.t().sum(1, keepdim=True)))
    return loss


def vae_loss(vae, x, gen, kl_weight: float = 1e-6):
    import torch
    import torch.nn.functional as F

    posterior = vae.encode(x).latent_dist
    z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
    rec = vae.decode(z).sample
    l1 = (rec - x).abs().mean()
    mse = F.mse_loss(rec, x)
    kl = posterior.kl().mean() / (x.shape[1] * x.shape[2] * x.shape[3])
    return l1 + mse + kl_weight * kl * 1000, mse


def diffusion_loss(model_out, target, snr, gamma: float = 5.0):
    """v-prediction MSE, weighted w = min(snr + 1, gamma + 1) / (snr + 1).

    In x0 terms the weight is min(snr + 1, gamma + 1): min-SNR's cap on the nearly clean
    timesteps, but never below 1 at the noisy ones, where the layout is decided. Plain
    min-SNR for v-prediction (min(snr, gamma) / (snr + 1), as in diffusers' scripts) weighs
    t ~ 999 by snr ~ 0.005, and the model then ignored "left" and "right".
    """
    import torch

    w = torch.clamp(snr + 1, max=gamma + 1) / (snr + 1)
    per = (model_out.float() - target.float()).pow(2).mean(dim=(1, 2, 3))
    return (per * w).mean()


def make_layout_head():
    """The linear probe of `layout_loss`: text width -> the logits of every `layout_labels` column."""
    import torch

    return torch.nn.Linear(TEXT_WIDTH, sum(probe_classes()))


def layout_loss(head, hidden, input_ids, eos_id: int, labels):
    """Cross-entropy of a linear probe reading the caption's layout and objects, in order, from the end-of-text states.

    The UNet's cross-attention puts most of its weight on the end-of-text (padding) states
    and almost none on the position word itself, and contrastive CLIP training leaves
    position out of those states; this pushes it in, where the UNet already looks, with the
    objects in order and the object at each place (a bag of words cannot say which object
    of a relation goes where).
    """
    import torch

    after_eos = torch.cumsum(input_ids == eos_id, dim=1) > 0
    pooled = (hidden * after_eos[..., None]).sum(1) / after_eos.sum(1, keepdim=True)
    logits = head(pooled).split(probe_classes(), dim=1)
    losses = [torch.nn.functional.cross_entropy(column, labels[:, k]) for k, column in enumerate(logits)]
    return torch.stack(losses).mean()


def make_slot_head():
    """The linear probe of `slot_loss`: a slot's state -> which place it is, and its object's colour and shape."""
    import torch

    from studio.demo import world

    return torch.nn.Linear(TEXT_WIDTH, len(world.POSITIONS) + 1 + len(world.COLORS) + 1 + len(world.SHAPES))


def slot_loss(head, hidden, labels):
    """Cross-entropy of a probe reading, from the last len(POSITIONS) text states, one place each.

    The causal text encoder cannot tell "blue square" in "a blue square above a yellow
    triangle" that it goes on top, and the UNet's cross-attention, which mixes token values,
    then bound relations by a coin flip (x0 at t = 999 was the same for "A above B" and
    "A below B"). The padding states at the end have read the whole caption: here each one
    becomes the slot of one place (left, right, top, bottom, center) that names which place it
    is, so the UNet can find it by a fixed key, and which object is there (its value). Only
    slots whose place holds an object are asked for it: asking the others for "nothing" taught
    the UNet, which reads the slots, to draw nothing for "a red circle and a blue square".
    labels: `layout_labels`; from PLACE_COLUMNS on, the colour and shape at each place.
    """
    import torch
    import torch.nn.functional as F

    from studio.demo import world

    places = len(world.POSITIONS)
    logits = head(hidden[:, -places:]).flatten(0, 1)  # (batch x places, classes)
    place, color, shape = logits.split((places, 1 + len(world.COLORS), 1 + len(world.SHAPES)), dim=-1)
    loss = F.cross_entropy(place, torch.arange(places).repeat(len(hidden)))
    color_there = labels[:, PLACE_COLUMNS::2].flatten()
    shape_there = labels[:, PLACE_COLUMNS + 1 :: 2].flatten()
    held = color_there > 0
    if held.any():
        loss = loss + F.cross_entropy(color[held], color_there[held])
        loss = loss + F.cross_entropy(shape[held], shape_there[held])
    return loss / 3


class CrossAttentionMaps:
    """Cross-attention that also keeps its attention probabilities (mean over heads) in `maps`.

    For `slot_grounding_loss` (training only); self-attention goes through diffusers' default
    processor unchanged.
    """

    def __init__(self, maps: list):
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.maps, self.self_attention = maps, AttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        import torch

        if encoder_hidden_states is None:
            return self.self_attention(attn, hidden_states, attention_mask=attention_mask)
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        value = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        probs = attn.get_attention_scores(query, key, attention_mask)
        self.maps.append(probs.view(-1, attn.heads, *probs.shape[1:]).mean(1))
        return attn.to_out[1](attn.to_out[0](attn.batch_to_head_dim(torch.bmm(probs, value))))

    @classmethod
    def install(cls, unet, maps: list) -> None:
        """Route every cross-attention layer of `unet` through one recorder appending to `maps`."""
        unet.set_attn_processor(
            {
                name: cls(maps) if name.endswith("attn2.processor") else processor
                for name, processor in unet.attn_processors.items()
            }
        )


def slot_grounding_loss(maps: list, masks):
    """TokenCompose's token loss on the place slots: each slot's attention should fall on its object.

    For the 8x8 cross-attention layers (at 16x16 the down path knows too little of where it is
    when the input is pure noise: a linear probe reads x, y from it with R^2 0.17, from the
    8x8 features with 0.8), the share of a slot's attention inside the mask of the object at
    its place; the loss is the mean of (1 - share)^2 over the slots that hold an object.
    maps: (batch, pixels, tokens) per layer; masks: (batch, places, LATENT_SIZE, LATENT_SIZE) in [0, 1].
    """
    import torch
    import torch.nn.functional as F

    held = masks.flatten(2).sum(-1) > 0
    losses = []
    for probs in maps:
        side = math.isqrt(probs.shape[1])
        if side != LATENT_SIZE // 2 or not held.any():
            continue
        place_masks = F.adaptive_avg_pool2d(masks, side).flatten(2)  # (batch, places, pixels)
        attention = probs[:, :, -masks.shape[1] :].transpose(1, 2)  # (batch, places, pixels)
        share = (attention * place_masks).sum(-1) / attention.sum(-1).clamp_min(1e-8)
        losses.append((1 - share[held]).pow(2).mean())
    return torch.stack(losses).mean() if losses else torch.zeros(())


class EMA:
    """An exponential moving average of a model's weights (in `.model`), with a short warm-up of the decay."""

    def __init__(self, model, decay: float = 0.999):
        import copy

        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay

    def update(self, model, step: int) -> None:
        import torch

        d = min(self.decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(self.model.parameters(), model.parameters()):
                e.lerp_(p.detach(), 1 - d)
