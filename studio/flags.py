"""The model and device flags that `studio` and `python app.py` share, and the Settings they make.

Every flag defaults to None, "not given": the setting then comes from its STUDIO_* variable, if any,
else from `Settings`' own default. Both entry points call these two functions, so their flags cannot drift.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .settings import ADD_ON_FOLDERS, MAX_OUTPUT_PIXELS_HELP, Settings, positive_int

# Settings fields set by a flag of the same name (--models-dir, repeatable, sets models_dirs).
SETTINGS_FLAGS = (
    "model",
    "device",
    "dtype",
    "attention",
    "attention_slicing",
    "vae_tiling",
    "offload",
    "threads",
    "compile",
    "channels_last",
    "backend",
    "allow_pickle",
    "use_ema",
    "max_output_pixels",
)


def add_settings_arguments(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """Add the "model and device" group; returns it, for an entry point's own flags (--quiet, --no-preload)."""
    group = parser.add_argument_group("model and device")
    group.add_argument(
        "--model", help="embedded (default), a diffusers folder, a cached hub id, or a .safetensors file"
    )
    group.add_argument(
        "--models-dir", type=Path, action="append", default=[], help="a folder of models to offer (repeatable)"
    )
    group.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:N, mps")
    group.add_argument("--dtype", default=None, choices=["auto", "float32", "float16", "bfloat16"])
    group.add_argument(
        "--attention",
        default=None,
        choices=["auto", "sdpa", "xformers"],
        help="auto (default: xformers on CUDA when installed, else SDPA)",
    )
    group.add_argument("--attention-slicing", action="store_true", default=None, help="lower peak memory, slower")
    group.add_argument("--vae-tiling", action="store_true", default=None, help="decode large images in tiles")
    group.add_argument(
        "--offload", default=None, choices=["none", "model", "sequential"], help="CPU offload (GPU only)"
    )
    group.add_argument("--threads", type=positive_int, default=None, help="CPU: torch threads (default: torch's, the cores)")
    group.add_argument(
        "--compile", action="store_true", default=None, help="torch.compile the UNet (the first image pays the compile)"
    )
    group.add_argument("--channels-last", action="store_true", default=None, help="the UNet in channels-last layout")
    group.add_argument(
        "--backend", default=None, choices=["torch", "openvino"],
        help="torch (default), or openvino: on the CPU, the UNet and VAE decoder run in OpenVINO, about twice as "
        "fast; each model is converted once (pip install 'studio[openvino]'; also STUDIO_BACKEND)",
    )
    group.add_argument(
        "--allow-pickle",
        action="store_true",
        default=None,
        help="allow .ckpt/.pt/.bin pickle weights (loaded with weights_only)",
    )
    group.add_argument(
        "--ema", dest="use_ema", action="store_true", default=None,
        help="single-file checkpoints: use the UNet's EMA weights (model_ema.*) instead of the trained ones",
    )
    group.add_argument("--max-output-pixels", type=positive_int, metavar="N", help=MAX_OUTPUT_PIXELS_HELP)
    for name, (variable, flag, label) in ADD_ON_FOLDERS.items():
        # Not dest=name: a task's request may have a field of that name (sketch's per-request --controlnet).
        group.add_argument(flag, dest=f"add_on_{name}", type=Path, metavar="FOLDER", help=f"{label} (also {variable})")
    return group


def settings_from_args(args: argparse.Namespace, environ: dict | None = None, **overrides) -> Settings:
    """Settings from STUDIO_* variables, then the flags given, then `overrides` (an entry point's own flags).

    A flag missing from `args` (a sub-command without the group) counts as not given.
    """
    values = {name: getattr(args, name, None) for name in SETTINGS_FLAGS}
    if getattr(args, "models_dir", None):
        values["models_dirs"] = tuple(args.models_dir)
    add_ons = {name: getattr(args, f"add_on_{name}", None) for name in ADD_ON_FOLDERS}
    add_ons = {name: folder for name, folder in add_ons.items() if folder is not None}
    if add_ons:
        values["add_ons"] = add_ons
    return Settings.from_env(environ, **{**values, **overrides})
