"""One settings object, built once at start-up and passed down.

Nothing here reads the environment or picks a device at import time: the CLI,
the UI and the tests call `Settings(...)` (or `Settings.from_env()`) themselves.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_DIR = PACKAGE_DIR.parent


def _embedded_model_dir() -> Path:
    """The default model: assets/embedded-model, installed as the `studio_assets` package (from a wheel
    or an editable install), else beside the package in a source checkout."""
    spec = importlib.util.find_spec("studio_assets")
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations))) / "embedded-model"
    return REPO_DIR / "assets" / "embedded-model"


EMBEDDED_MODEL_DIR = _embedded_model_dir()


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/studio, else ~/.cache/studio (read when Settings are made, not at import)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "studio"
# Configs and tokenizer files for loading single-file SD checkpoints offline.
CONFIGS_DIR = PACKAGE_DIR / "configs"

# Help of the --max-output-pixels / --job-time-limit flags (CLI and server).
MAX_OUTPUT_PIXELS_HELP = (
    "refuse requests whose width x height x batch size is larger "
    "(default: 4000000 on CPU/MPS, 8388608 on CUDA; also STUDIO_MAX_OUTPUT_PIXELS)"
)
JOB_TIME_LIMIT_HELP = "stop a job running longer; queue wait not counted (default: none; also STUDIO_JOB_TIME_LIMIT)"


@dataclass(frozen=True)
class AddOns:
    """Weights used beside the model, each a local folder (the studio never downloads); None: none configured."""

    controlnet: Path | None = None  # a sketch ControlNet (else the model's own controlnet/ subfolder, if it ships one)
    controlnet_sketch: str | None = None  # the strokes it was trained on: "dark_on_light" or "light_on_dark"
    t2i_adapter: Path | None = None  # a T2I-Adapter for sketches
    t2i_adapter_sketch: str | None = None  # as controlnet_sketch, for the T2I-Adapter
    ip_adapter: Path | None = None  # an IP-Adapter folder: its .safetensors and image_encoder/ (style by image)
    ip_adapter_weights: str | None = None  # which .safetensors in it, when it holds several


# Each add-on's environment variable, flag and label (the CLI, the server and the UI's models tab read it).
ADD_ON_FOLDERS = {
    "controlnet": ("STUDIO_CONTROLNET", "--default-controlnet", "sketch ControlNet folder"),
    "t2i_adapter": ("STUDIO_T2I_ADAPTER", "--default-t2i-adapter", "sketch T2I-Adapter folder"),
    "ip_adapter": ("STUDIO_IP_ADAPTER", "--ip-adapter", "IP-Adapter folder (with image_encoder/)"),
}


@dataclass(frozen=True)
class Settings:
    outputs_dir: Path = Path("outputs")  # where generated PNGs go unless told otherwise
    model: str = "embedded"  # default model reference (see studio.models.resolve_model_ref)
    models_dirs: tuple[Path, ...] = ()  # extra folders searched for local models by `studio models`
    device: str = "auto"  # "auto" (cuda > mps > cpu), or any torch device string
    dtype: str = "auto"  # "auto" (fp16/bf16 on GPU, fp32 on CPU), "float32", "float16", "bfloat16"
    attention: str = "auto"  # "auto" (xformers on CUDA when installed, else SDPA), "sdpa", "xformers"
    attention_slicing: bool = False  # lower peak memory, slower
    vae_tiling: bool = False  # decode large images tile by tile
    offload: str = "none"  # "none", "model" (whole models to CPU when idle), "sequential" (per layer)
    threads: int | None = None  # CPU: torch's intra-op threads; None: torch's choice (the cores)
    compile: bool = False  # torch.compile the UNet (inductor): the first image of each size pays the compile
    channels_last: bool = False  # the UNet in channels-last memory layout
    backend: str = "torch"  # "torch", or "openvino": fp32 on the CPU, the UNet and VAE decoder in OpenVINO
    # OpenVINO conversions of models (--backend openvino), by weights hash, so each model is converted once
    compiled_cache: Path | None = field(default_factory=lambda: default_cache_dir() / "openvino")
    allow_pickle: bool = False  # load .ckpt/.pt/.bin pickles (always with weights_only=True)
    use_ema: bool = False  # single-file checkpoints: the UNet's EMA weights (model_ema.*) instead of the trained ones
    configs_dir: Path = CONFIGS_DIR  # config folders (sd15, sd21, sdxl, ...) for single-file checkpoints
    max_cached_models: int = 1  # loaded base models kept in memory; older ones are freed
    max_image_pixels: int = 4096 * 4096  # larger input images are refused (decompression bombs)
    max_batch_lines: int = 10_000  # batch files with more jobs are refused
    max_output_pixels: int | None = None  # width x height x batch_size per request; None: by device (devices.py)
    job_time_limit: float | None = None  # seconds a job may run (the queue wait not counted); None: no limit
    host: str = "127.0.0.1"  # the UI/API server's bind address
    port: int = 7860  # the UI/API server's port
    # SHA-256 of model files by path, size and mtime, so a file is read for hashing once (A1111's cache.json)
    hash_cache: Path | None = field(default_factory=lambda: default_cache_dir() / "hashes.json")
    lora_paths: bool = True  # LoRAs may be given by file path (the CLI, Python); a server takes names only
    add_ons: AddOns = field(default_factory=AddOns)  # ControlNet, T2I-Adapter, IP-Adapter weights beside the model

    @classmethod
    def from_env(cls, environ: dict | None = None, **overrides) -> "Settings":
        """Settings from STUDIO_* environment variables, then explicit overrides."""
        env = os.environ if environ is None else environ
        values: dict = {}
        if "STUDIO_OUTPUTS" in env:
            values["outputs_dir"] = Path(env["STUDIO_OUTPUTS"])
        if "STUDIO_MODEL" in env:
            values["model"] = env["STUDIO_MODEL"]
        if "STUDIO_MODELS_DIRS" in env:
            values["models_dirs"] = tuple(Path(p) for p in env["STUDIO_MODELS_DIRS"].split(os.pathsep) if p)
        if "STUDIO_DEVICE" in env:
            values["device"] = env["STUDIO_DEVICE"]
        if "STUDIO_DTYPE" in env:
            values["dtype"] = env["STUDIO_DTYPE"]
        if "STUDIO_BACKEND" in env:
            values["backend"] = env["STUDIO_BACKEND"]
        if "STUDIO_THREADS" in env:
            values["threads"] = _from_env(env, "STUDIO_THREADS", positive_int)
        if "STUDIO_MAX_OUTPUT_PIXELS" in env:
            values["max_output_pixels"] = _from_env(env, "STUDIO_MAX_OUTPUT_PIXELS", positive_int)
        if "STUDIO_JOB_TIME_LIMIT" in env:
            values["job_time_limit"] = _from_env(env, "STUDIO_JOB_TIME_LIMIT", positive_seconds)
        add_ons = {name: Path(env[variable]) for name, (variable, _, _) in ADD_ON_FOLDERS.items() if env.get(variable)}
        values["add_ons"] = AddOns(**add_ons)
        given = {k: v for k, v in overrides.items() if v is not None}
        if isinstance(given.get("add_ons"), dict):  # some add-ons given (flags): the others stay as the environment set them
            given["add_ons"] = replace(values["add_ons"], **given["add_ons"])
        values.update(given)
        return cls(**values)

    def with_(self, **changes) -> "Settings":
        return replace(self, **changes)


def positive_int(text: str) -> int:
    """A whole number > 0 (argparse type and environment variable parser)."""
    value = int(text)
    if value <= 0:
        raise ValueError(f"{text!r} is not a positive whole number")
    return value


def positive_seconds(text: str) -> float:
    """A finite number of seconds > 0 (argparse type and environment variable parser)."""
    value = float(text)
    if not 0 < value < float("inf"):
        raise ValueError(f"{text!r} is not a positive number of seconds")
    return value


def _from_env(env, name: str, parse):
    """A variable's value parsed, None when empty or "none"; the error names the variable."""
    text = env[name].strip()
    if text.lower() in ("", "none"):
        return None
    try:
        return parse(text)
    except ValueError:
        raise ValueError(f"{name}={env[name]!r} should be a positive number") from None
