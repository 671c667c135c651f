"""Device and dtype choice, attention backend and memory savers.

Called when a model is loaded, never at import time.
"""

from __future__ import annotations

import importlib.util
import logging

import torch

from .settings import Settings

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def pick_device(preference: str = "auto") -> torch.device:
    """CUDA > MPS > CPU for "auto"; otherwise the named device, checked to exist."""
    if preference == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(preference)
    except RuntimeError:
        raise ValueError(f"unknown device {preference!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {preference!r} was asked for but CUDA is not available here")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {preference!r} was asked for but MPS is not available here")
    return device


def pick_dtype(device: torch.device, preference: str = "auto") -> torch.dtype:
    """fp16 on CUDA/MPS (bf16 on CUDA that supports it well), fp32 on CPU, unless told otherwise."""
    if preference != "auto":
        if preference not in DTYPES:
            raise ValueError(f"unknown dtype {preference!r}; use auto, {', '.join(DTYPES)}")
        return DTYPES[preference]
    if device.type == "cuda":
        # fp16 is what SD checkpoints are published in; the VAE decode is retried in fp32 on overflow.
        return torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


# Default Settings.max_output_pixels (width x height x batch_size of one request) by device type.
# One job holds the device for every client, and its time and memory grow with the pixel count, faster than
# linearly for one large image (attention over every latent cell). On a CPU, 4 MP still allows 3 images at
# 1024², 15 at 512² or one of 2000x2000, but refuses one 2048² image (4.19 MP: minutes per step, GBs of RSS,
# a decode no cancel could stop) or 16 at 1024²; a CUDA GPU gets twice as much (8 SDXL images at 1024², 2 at 2048²).
# MPS shares the machine's memory and is far slower than CUDA, so it gets the CPU's limit.
DEFAULT_MAX_OUTPUT_PIXELS = {"cuda": 8 * 1024 * 1024}
CPU_MAX_OUTPUT_PIXELS = 4_000_000


def default_max_output_pixels(device: torch.device) -> int:
    return DEFAULT_MAX_OUTPUT_PIXELS.get(device.type, CPU_MAX_OUTPUT_PIXELS)


def xformers_available() -> bool:
    return importlib.util.find_spec("xformers") is not None


def apply_memory_options(pipe, device: torch.device, settings: Settings) -> None:
    """Move the pipeline to its device (or set up offload) and apply attention and memory options."""
    if settings.attention not in ("auto", "sdpa", "xformers"):
        raise ValueError(f"unknown attention backend {settings.attention!r}; use auto, sdpa or xformers")
    if settings.offload not in ("none", "model", "sequential"):
        raise ValueError(f"unknown offload mode {settings.offload!r}; use none, model or sequential")

    use_xformers = device.type == "cuda" and (
        settings.attention == "xformers" or (settings.attention == "auto" and xformers_available())
    )
    if settings.attention == "xformers" and not use_xformers:
        raise ValueError("attention 'xformers' needs CUDA and the xformers package (pip install 'studio[cuda]')")
    if use_xformers:
        pipe.enable_xformers_memory_efficient_attention()
    # Otherwise diffusers' default processors use torch's scaled_dot_product_attention (SDPA).

    if settings.attention_slicing:
        pipe.enable_attention_slicing()
    if settings.vae_tiling and hasattr(pipe, "vae"):
        pipe.vae.enable_tiling()

    if settings.offload == "model" and device.type != "cpu":
        pipe.enable_model_cpu_offload(device=device)
    elif settings.offload == "sequential" and device.type != "cpu":
        pipe.enable_sequential_cpu_offload(device=device)
    else:
        pipe.to(device)


def check_backend(settings: Settings) -> None:
    """Refuse an unknown backend, or OpenVINO without its package or with torch.compile (two compilers of one UNet)."""
    if settings.backend not in ("torch", "openvino"):
        raise ValueError(f"unknown backend {settings.backend!r}; use torch or openvino")
    if settings.backend == "openvino":
        if settings.compile:
            raise ValueError("--compile and --backend openvino are alternatives: choose one")
        if importlib.util.find_spec("openvino") is None:
            raise ValueError("--backend openvino needs the openvino package: pip install 'studio[openvino]'")


def apply_speed_options(pipe, device: torch.device, settings: Settings) -> None:
    """Thread count (CPU), channels-last layout and torch.compile of the UNet, as the settings say.
    (The OpenVINO backend applies per call: pipelines/openvino.py.)"""
    check_backend(settings)
    if device.type == "cpu" and settings.threads:
        torch.set_num_threads(settings.threads)  # process-wide; None leaves torch's own choice (or the caller's)
    unet = getattr(pipe, "unet", None)
    if unet is None:
        return
    if settings.channels_last:
        unet.to(memory_format=torch.channels_last)
    if settings.compile:
        # In place (the module keeps its class, config and blocks, so LoRAs and step caching still find them);
        # compiled on the first call, again for each new shape.
        unet.compile(dynamic=False)
