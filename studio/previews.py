"""Live previews of the latents while a pipeline samples, for the UI.

Small latents (the embedded model's 16x16) are decoded by the model's own VAE, which
costs a few milliseconds; larger ones go through a fixed linear map from the four SD latent
channels to RGB, as ComfyUI and A1111 do for their cheap previews, so a 1024x1024 SDXL
preview costs no VAE pass.
"""

from __future__ import annotations

import torch
from PIL import Image

# Latent channel -> RGB weights fitted by the ComfyUI project (comfy/latent_formats.py).
SD_LATENT_RGB = [
    [0.3512, 0.2297, 0.3227],
    [0.3250, 0.4974, 0.2350],
    [-0.2829, 0.1762, 0.2721],
    [-0.2120, -0.2616, -0.7177],
]
SDXL_LATENT_RGB = [
    [0.3651, 0.4232, 0.4341],
    [-0.2533, -0.0042, 0.1068],
    [0.1076, 0.1111, -0.0362],
    [-0.3165, -0.2492, -0.2188],
]
SDXL_LATENT_RGB_BIAS = [0.1084, -0.0175, -0.0011]
VAE_PREVIEW_MAX_CELLS = 32 * 32  # at most this many latent cells are decoded by the VAE


@torch.no_grad()
def latent_preview(pipe, latents: torch.Tensor) -> Image.Image | None:
    """An RGB picture of the first image's current latents, or None for latents it cannot read."""
    first = latents[:1].detach().float()
    channels, height, width = first.shape[1:]
    if height * width <= VAE_PREVIEW_MAX_CELLS and getattr(pipe, "vae", None) is not None:
        vae = pipe.vae
        if getattr(vae.config, "latents_mean", None) is None:
            scaled = (first / vae.config.scaling_factor).to(vae.device, vae.dtype)
            rgb = vae.decode(scaled).sample[0].float().cpu() / 2 + 0.5
            return _to_image(rgb)
    if channels != 4:
        return None
    sdxl = getattr(pipe, "text_encoder_2", None) is not None
    weights = torch.tensor(SDXL_LATENT_RGB if sdxl else SD_LATENT_RGB)
    bias = torch.tensor(SDXL_LATENT_RGB_BIAS if sdxl else [0.0, 0.0, 0.0])
    rgb = torch.einsum("chw,cr->rhw", first[0].cpu(), weights) + bias.view(3, 1, 1)
    return _to_image(rgb / 2 + 0.5)


def _to_image(rgb: torch.Tensor) -> Image.Image:
    array = (rgb.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    return Image.fromarray(array)
