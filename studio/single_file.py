"""Load single-file Stable Diffusion checkpoints (SD 1.x, SD 2.x, SDXL) fully offline.

A "single file" is the original CompVis/SGM checkpoint layout that Civitai and the HF model pages serve:
one `.safetensors` (or legacy pickle `.ckpt`) holding the UNet, VAE and text encoder(s) under keys like
`model.diffusion_model.*`, `first_stage_model.*`, `cond_stage_model.*` / `conditioner.embedders.*`.
Such a file carries weights but no configs, so diffusers' `from_single_file` normally downloads the
matching diffusers repo's config files. Here the studio ships those config folders (studio/configs/<arch>,
copied from the official repos, no weights) plus one copy of the CLIP BPE tokenizer files, and points
diffusers at them with `local_files_only=True`, so nothing is ever fetched.

Pickle checkpoints can run arbitrary code when unpickled. They are refused unless the caller opts in,
and even then they are read only with `torch.load(..., weights_only=True)`, which rejects anything
that is not plain tensors and containers.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import re
import shutil
import tempfile
import zipfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from .settings import CONFIGS_DIR

if TYPE_CHECKING:  # heavy imports stay out of module import time
    import torch
    from diffusers import DiffusionPipeline

FileFormat = Literal["safetensors", "pickle", "unknown"]

# Architectures with a shipped config folder under studio/configs/.
ARCHITECTURES = ("sd15", "sd21", "sd2_base", "sdxl", "sdxl_refiner")
PREDICTION_TYPES = ("epsilon", "v_prediction")

# The one shared copy of CLIP's BPE files (built by configs/build_clip_tokenizer.py). SD 1.x, SD 2.x and
# both SDXL tokenizers use the same 49408-token vocabulary; they differ only in tokenizer_config.json.
CLIP_TOKENIZER_DIR = CONFIGS_DIR / "clip_tokenizer"
TOKENIZER_FILES = ("vocab.json", "merges.txt")

UNET_PREFIX = "model.diffusion_model."
UNET_CONV_IN = UNET_PREFIX + "input_blocks.0.0.weight"

# Text-encoder key families, checked in this order: the strongest sign of which model a file holds.
TEXT_ENCODER_FAMILIES = (
    ("conditioner.embedders.1.model.", "sdxl"),  # SGM: CLIP ViT-L + OpenCLIP bigG as second embedder
    ("conditioner.embedders.0.model.", "sdxl_refiner"),  # SGM: OpenCLIP bigG alone
    ("cond_stage_model.model.", "sd21"),  # LDM: OpenCLIP ViT-H
    ("cond_stage_model.transformer.", "sd15"),  # LDM: OpenAI CLIP ViT-L (see SD1_CLIP_PREFIX)
)
# Width of the UNet's cross-attention context (attn2.to_k input) in the released models.
CONTEXT_DIMS = {768: "sd15", 1024: "sd21", 2048: "sdxl", 1280: "sdxl_refiner"}

# The parts a complete checkpoint holds, by the key prefixes diffusers' converters read.
_VAE = ("VAE", ("first_stage_model.", "vae."))
COMPONENT_PREFIXES = {
    "sd15": (_VAE, ("text encoder", ("cond_stage_model.transformer.",))),
    "sd21": (_VAE, ("text encoder", ("cond_stage_model.model.",))),
    "sdxl": (
        _VAE,
        ("CLIP ViT-L text encoder", ("conditioner.embedders.0.transformer.",)),
        ("OpenCLIP bigG text encoder", ("conditioner.embedders.1.model.",)),
    ),
    "sdxl_refiner": (_VAE, ("OpenCLIP bigG text encoder", ("conditioner.embedders.0.model.",))),
}

PIPELINE_CLASSES = {
    "sd15": "StableDiffusionPipeline",
    "sd21": "StableDiffusionPipeline",
    "sd2_base": "StableDiffusionPipeline",
    "sdxl": "StableDiffusionXLPipeline",
    "sdxl_refiner": "StableDiffusionXLImg2ImgPipeline",
}

# SD 1.x files saved with transformers < 4.10 lack the `text_model.` level in their CLIP key names
# (cond_stage_model.transformer.embeddings.*); diffusers only knows the newer names, so they are renamed.
SD1_CLIP_PREFIX = "cond_stage_model.transformer."
LEGACY_CLIP_KEYS = tuple(SD1_CLIP_PREFIX + part for part in ("embeddings.", "encoder.", "final_layer_norm."))

SAFETENSORS_MAX_HEADER = 100 * 1024 * 1024  # the safetensors format's own limit
ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default (zip) format
PICKLE_PROTO = 0x80  # PROTO opcode: first byte of any protocol >= 2 pickle (torch's legacy format)
SD2_512_GLOBAL_STEP = 875000  # global_step of the released 512-base SD 2.x checkpoints (diffusers' heuristic)

log = logging.getLogger(__name__)


class SingleFileError(ValueError):
    """A single-file checkpoint that cannot be loaded; the message names the file or the bad value."""


class PickleRefusedError(SingleFileError):
    """A pickle checkpoint was refused: not opted in, or it holds more than plain tensors."""


class UnknownArchitectureError(SingleFileError):
    """The checkpoint's keys and shapes match none of the supported architectures."""


# --------------------------------------------------------------------------------------------------
# Format detection (by content, never by file name)
# --------------------------------------------------------------------------------------------------


def detect_file_format(path: str | Path) -> FileFormat:
    """"safetensors", "pickle" or "unknown", judged from the file's first bytes, not its extension.

    safetensors: 8-byte little-endian header length, then a JSON header starting with '{'.
    pickle: a zip archive (torch.save's format) or a raw pickle stream (protocol byte 0x80).
    The safetensors test runs first because a header length may itself start with byte 0x80.
    """
    path = Path(path)
    with path.open("rb") as handle:
        head = handle.read(9)
        size = path.stat().st_size
        if _looks_like_safetensors(handle, head, size):
            return "safetensors"
    if head.startswith(ZIP_MAGIC) or (head and head[0] == PICKLE_PROTO):
        return "pickle"
    return "unknown"


def _looks_like_safetensors(handle, head: bytes, size: int) -> bool:
    if len(head) < 9 or head[8:9] != b"{":
        return False
    header_len = int.from_bytes(head[:8], "little")
    if not 2 <= header_len <= min(SAFETENSORS_MAX_HEADER, size - 8):
        return False
    handle.seek(8)
    try:
        header = json.loads(handle.read(header_len))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(header, dict)


# --------------------------------------------------------------------------------------------------
# Architecture detection (from key names and shapes only)
# --------------------------------------------------------------------------------------------------


def read_safetensors_header(path: str | Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Tensor shapes by key, and the file's string metadata, without reading any tensor data."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
        metadata = handle.metadata() or {}
    return shapes, metadata


def detect_architecture(state_dict_keys: Iterable[str], shapes: Mapping[str, Sequence[int]]) -> str:
    """One of ARCHITECTURES, from the original (CompVis/SGM) key names and tensor shapes.

    The text encoder's key family decides (it is what differs most between SD 1.x, 2.x and SDXL); the
    width of the UNet's cross-attention context (768 / 1024 / 2048 / 1280) must agree with it, and
    decides alone when a file carries no text encoder. SD 2.x is reported as "sd21" (768 px,
    v-prediction): the 512 px epsilon variant has identical shapes; see load_single_file_pipeline.
    """
    keys = set(state_dict_keys)
    conv_in = shapes.get(UNET_CONV_IN)
    if conv_in is None:
        raise UnknownArchitectureError(
            f"no Stable Diffusion UNet found: key {UNET_CONV_IN!r} is missing; "
            f"the file's keys start with {_key_prefixes(keys)} (a LoRA, VAE, embedding, diffusers-format "
            "or non-SD model such as Flux/SD3?)"
        )
    in_channels = conv_in[1]
    if in_channels not in (4, 9):
        raise UnknownArchitectureError(
            f"the UNet takes {in_channels} input channels (8: instruct-pix2pix); only text-to-image (4) and "
            "inpainting (9) checkpoints are supported"
        )
    context_dim = _context_dim(keys, shapes)
    family = next((arch for prefix, arch in TEXT_ENCODER_FAMILIES if _has_prefix(keys, prefix)), None)
    by_width = CONTEXT_DIMS.get(context_dim)
    if family and by_width and by_width != family:
        raise UnknownArchitectureError(
            f"mixed checkpoint: the text encoder keys say {family!r} but the UNet's cross-attention "
            f"width {context_dim} says {by_width!r}"
        )
    architecture = family or by_width
    if architecture is None:
        raise UnknownArchitectureError(
            f"unknown Stable Diffusion variant: cross-attention width {context_dim}, no known text encoder "
            f"keys; the file's keys start with {_key_prefixes(keys)}"
        )
    return architecture


def _context_dim(keys: set[str], shapes: Mapping[str, Sequence[int]]) -> int | None:
    cross_attention = sorted(k for k in keys if k.startswith(UNET_PREFIX) and k.endswith(".attn2.to_k.weight"))
    return shapes[cross_attention[0]][-1] if cross_attention else None


def _has_prefix(keys: Iterable[str], prefix: str | tuple[str, ...]) -> bool:
    return any(key.startswith(prefix) for key in keys)


def _key_prefixes(keys: Iterable[str], limit: int = 8) -> list[str]:
    """The distinct first two dotted parts of the keys, for error messages."""
    prefixes = sorted({".".join(key.split(".")[:2]) for key in keys})
    return prefixes[:limit] + (["..."] if len(prefixes) > limit else [])


# --------------------------------------------------------------------------------------------------
# Prediction type (what the UNet was trained to predict)
# --------------------------------------------------------------------------------------------------


def _prediction_hint(keys: Iterable[str], metadata: Mapping[str, str], global_step: Any = None) -> str | None:
    """What the file itself says about its prediction type, if anything.

    Conventions seen in the wild: a `v_pred` marker key (ComfyUI, v-pred SDXL finetunes), Stability's
    ModelSpec metadata (`modelspec.prediction_type` / `modelspec.architecture`), and the released
    SD 2.x 512-base checkpoints' global_step.
    """
    if "v_pred" in set(keys):
        return "v_prediction"
    declared = str(metadata.get("modelspec.prediction_type", "")).lower()
    if declared in ("v", "v_prediction", "v-prediction"):
        return "v_prediction"
    if declared in ("epsilon", "eps"):
        return "epsilon"
    architecture = str(metadata.get("modelspec.architecture", ""))
    if architecture.startswith("stable-diffusion-v2"):
        return "v_prediction" if architecture.endswith("-v") else "epsilon"
    if global_step == SD2_512_GLOBAL_STEP:
        return "epsilon"
    return None


def _config_architecture(detected: str, prediction_type: str | None) -> str:
    """SD 2.x comes in two shipped configs that share every shape: 768 px v-prediction and 512 px epsilon."""
    if detected == "sd21" and prediction_type == "epsilon":
        return "sd2_base"
    return detected


# --------------------------------------------------------------------------------------------------
# Shipped config folders
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def shipped_config(architecture: str, configs_dir: str | Path | None = None) -> Iterator[Path]:
    """A complete diffusers config folder (JSONs + tokenizer files) for `architecture`, valid inside the block.

    The repo keeps one copy of the CLIP BPE files; diffusers wants them inside every tokenizer*/ folder,
    so the folder is assembled in a temporary directory (about 1.4 MB per tokenizer, gone afterwards).
    """
    source = Path(configs_dir or CONFIGS_DIR) / architecture
    if not (source / "model_index.json").is_file():
        raise SingleFileError(f"no shipped config for architecture {architecture!r}: {source} has no model_index.json")
    with tempfile.TemporaryDirectory(prefix=f"studio-{architecture}-") as tmp:
        folder = Path(tmp) / architecture
        shutil.copytree(source, folder)
        for tokenizer_dir in folder.glob("tokenizer*"):
            for name in TOKENIZER_FILES:
                if not (tokenizer_dir / name).exists():
                    shutil.copyfile(CLIP_TOKENIZER_DIR / name, tokenizer_dir / name)
        yield folder


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def load_single_file_pipeline(
    path: str | Path,
    *,
    torch_dtype: torch.dtype,
    allow_pickle: bool = False,
    prediction_type: str | None = None,
    configs_dir: str | Path | None = None,
    use_ema: bool = False,
) -> DiffusionPipeline:
    """A diffusers pipeline built from one single-file SD 1.x / 2.x / SDXL checkpoint, without network access.

    - safetensors files load through diffusers' `from_single_file` with the shipped config folder.
    - pickle files (.ckpt/.pt/.bin, whatever the name) raise PickleRefusedError unless `allow_pickle`;
      with it they are read with `torch.load(weights_only=True)` only.
    - `prediction_type` ("epsilon" / "v_prediction") overrides what the file and config say; for SD 2.x
      "epsilon" also picks the 512 px config.
    - `configs_dir` replaces studio/configs (a folder holding sd15/, sdxl/, ...), e.g. for custom configs.
    - `use_ema`: the UNet's EMA weights (`model_ema.*`, which training checkpoints carry beside the
      trained ones) instead of the trained ones; a file without them is refused.
    The pipeline has no safety checker and no feature extractor.
    """
    path = Path(path)
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise SingleFileError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    if not path.is_file():
        raise SingleFileError(f"checkpoint not found: {str(path)!r}")

    file_format = detect_file_format(path)
    if file_format == "pickle":
        state_dict, global_step = _load_pickle_state_dict(path, allow_pickle=allow_pickle)
        shapes, metadata = {k: tuple(v.shape) for k, v in state_dict.items()}, {}
    elif file_format == "safetensors":
        state_dict, global_step = None, None
        shapes, metadata = _read_header_or_raise(path)
    else:
        raise SingleFileError(f"{str(path)!r} is neither a safetensors file nor a PyTorch checkpoint")

    if use_ema and not any(key.startswith(EMA_PREFIX) for key in shapes):
        raise SingleFileError(f"{path.name!r} has no EMA weights (no {EMA_PREFIX}* keys); load it without use_ema")
    detected = _detect_for_file(path, shapes)
    wanted = prediction_type or _prediction_hint(shapes, metadata, global_step)
    if detected == "sd21" and prediction_type is None:
        # The 768-v and the 512-base files share every shape: say what was taken, and why.
        reason = "as the file says" if wanted else "the file does not say (no v_pred key, no modelspec metadata)"
        log.warning(
            "%s: SD 2.x, %s: %s; if its images come out as noise, pass --prediction-type %s",
            path.name,
            reason,
            wanted or "v_prediction (the 768-v model)",
            "v_prediction" if wanted == "epsilon" else "epsilon",
        )
    architecture = _config_architecture(detected, wanted)

    with shipped_config(architecture, configs_dir) as config:
        in_channels = shapes[UNET_CONV_IN][1]
        if in_channels != 4:  # an inpainting checkpoint: image, mask and masked image in (the inpaint task's)
            unet_config = config / "unet" / "config.json"
            unet_config.write_text(json.dumps({**json.loads(unet_config.read_text()), "in_channels": in_channels}))
        if state_dict is None:
            # One component's tensors at a time (the UNet first): the whole file is never in memory beside
            # the converted models, which keeps the peak near the weights in the dtype they run in.
            read = functools.partial(_read_component, path, list(shapes), torch_dtype, use_ema)
        else:
            read = functools.partial(_component_of, state_dict, use_ema)
        pipe = _pipeline_from_components(read, config, architecture, torch_dtype)
    if wanted:
        _set_prediction_type(pipe, wanted)
    return pipe


def _read_header_or_raise(path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    from safetensors import SafetensorError

    try:
        return read_safetensors_header(path)
    except SafetensorError as error:
        raise SingleFileError(f"{str(path)!r} is a damaged safetensors file: {_first_line(error)}") from None


def _detect_for_file(path: Path, shapes: Mapping[str, Sequence[int]]) -> str:
    try:
        architecture = detect_architecture(shapes.keys(), shapes)
    except UnknownArchitectureError as error:
        raise UnknownArchitectureError(f"{str(path)!r}: {error}") from None
    missing = [name for name, prefixes in COMPONENT_PREFIXES[architecture] if not _has_prefix(shapes, prefixes)]
    if missing:
        # Caught here because diffusers reports a missing part with a bare Exception or a vague message.
        raise SingleFileError(
            f"{str(path)!r} looks like {architecture} but has no {' or '.join(missing)} weights; "
            "only complete checkpoints (UNet, VAE and text encoders in one file) are supported"
        )
    return architecture


def _load_pickle_state_dict(path: Path, *, allow_pickle: bool) -> tuple[dict, Any]:
    """The state dict of a pickle checkpoint, read with weights_only=True (never plain unpickling)."""
    if not allow_pickle:
        raise PickleRefusedError(
            f"{str(path)!r} is a pickle checkpoint, which can run code when loaded; refused. "
            "Prefer a .safetensors version of the model, or opt in with --allow-pickle / "
            "Settings(allow_pickle=True) (it is then read with torch.load(weights_only=True), tensors only)."
        )
    import pickle

    try:
        loaded = _torch_load_weights_only(path)
    except pickle.UnpicklingError as error:
        raise PickleRefusedError(
            f"{str(path)!r} was refused by weights_only loading ({torch_load_reason(error)}): it holds Python "
            "objects other than tensors, or is damaged; use a .safetensors version of the model"
        ) from None
    except (RuntimeError, EOFError, OSError) as error:
        raise SingleFileError(f"{str(path)!r} is not a readable PyTorch checkpoint: {torch_load_reason(error)}") from None
    global_step = loaded.get("global_step") if isinstance(loaded, dict) else None
    return _unwrap_state_dict(loaded, path), global_step


def _torch_load_weights_only(path: Path) -> Any:
    """torch.load with weights_only=True: the restricted unpickler admits tensors and plain containers only.

    mmap keeps multi-GB zip checkpoints out of RAM until used; the legacy format cannot be mapped. A path
    ending in .safetensors is passed as an open file, because torch.load reads such paths with the
    safetensors reader, whatever they hold.
    """
    import torch

    if zipfile.is_zipfile(path) and path.suffix.lower() != ".safetensors":
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    with path.open("rb") as handle:
        return torch.load(handle, map_location="cpu", weights_only=True)


def _unwrap_state_dict(loaded: Any, path: Path) -> dict:
    import torch

    # Lightning checkpoints nest the weights under "state_dict" (sometimes twice).
    while isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict):
        raise SingleFileError(f"{str(path)!r} does not hold a state dict (found {type(loaded).__name__})")
    tensors = {k: v for k, v in loaded.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise SingleFileError(f"{str(path)!r} holds no tensors")
    return tensors


def _has_legacy_clip_keys(keys: Iterable[str]) -> bool:
    return _has_prefix(keys, LEGACY_CLIP_KEYS)


def _fix_legacy_clip_keys(state_dict: dict) -> dict:
    """cond_stage_model.transformer.X -> cond_stage_model.transformer.text_model.X for the old names."""
    if not _has_legacy_clip_keys(state_dict):
        return state_dict
    cut = len(SD1_CLIP_PREFIX)
    return {
        (SD1_CLIP_PREFIX + "text_model." + key[cut:] if key.startswith(LEGACY_CLIP_KEYS) else key): value
        for key, value in state_dict.items()
    }


# Key prefixes of the parts diffusers converts; the text encoders get every other key (their converters
# find their own prefixes), EMA copies and training leftovers are never read.
MODEL_KEY_PREFIXES = {"unet": (UNET_PREFIX,), "vae": ("first_stage_model.",)}
EMA_PREFIX = "model_ema."
SKIPPED_PREFIXES = (EMA_PREFIX, "model.diffusion_model_ema.")
READ_GROUP = 64  # tensors read per opening of the file (about 150 MB of an SD 1.5 UNet)


def _wants_key(component: str, key: str) -> bool:
    if component in MODEL_KEY_PREFIXES:
        return key.startswith(MODEL_KEY_PREFIXES[component])
    owned = tuple(prefix for prefixes in MODEL_KEY_PREFIXES.values() for prefix in prefixes)
    return not key.startswith(owned + SKIPPED_PREFIXES)


def _source_key(component: str, key: str, keys: set[str], use_ema: bool) -> str:
    """Where a key's tensor is read from: with use_ema, a UNet weight's EMA copy, stored under the flattened
    name LDM's EMA module gives it (model.diffusion_model.out.0.weight -> model_ema.diffusion_modelout0weight)."""
    if not (use_ema and component == "unet"):
        return key
    ema_key = EMA_PREFIX + "".join(key.split(".")[1:])
    return ema_key if ema_key in keys else key


def _read_component(path: Path, keys: list[str], torch_dtype, use_ema: bool, component: str) -> dict:
    """The tensors of one component, read from a safetensors file and cast to the dtype the model runs in.

    The file is memory-mapped; it is reopened every READ_GROUP keys so that the pages already cast are
    unmapped (a mapping held open through the whole component would keep all of them resident beside the casts).
    """
    from safetensors import safe_open

    present = set(keys)
    wanted = [key for key in keys if _wants_key(component, key)]
    part = {}
    for start in range(0, len(wanted), READ_GROUP):
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            for key in wanted[start : start + READ_GROUP]:
                tensor = handle.get_tensor(_source_key(component, key, present, use_ema))
                part[key] = tensor.to(torch_dtype) if tensor.is_floating_point() else tensor.clone()
    return _fix_legacy_clip_keys(part)


def _component_of(state_dict: dict, use_ema: bool, component: str) -> dict:
    present = set(state_dict)
    return _fix_legacy_clip_keys(
        {
            key: state_dict[_source_key(component, key, present, use_ema)]
            for key in state_dict
            if _wants_key(component, key)
        }
    )


def _stored_dtype(part: dict):
    """The floating-point dtype a component's tensors are stored in (None: no tensors, or mixed)."""
    dtypes = {value.dtype for value in part.values() if value.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else None


def _pipeline_from_components(read_component, config: Path, architecture: str, torch_dtype) -> DiffusionPipeline:
    """diffusers' per-component single-file loader (`load_single_file_sub_model`, what `from_single_file` calls),
    fed one component's tensors at a time by `read_component(name)`, the UNet first; with the local config folder
    and local_files_only it never goes online.

    `from_single_file` would read the whole file and keep it beside every converted model (a 2 GB fp16 SD 1.5
    file loaded in fp32 peaked at 1.6x the fp32 weights); here a component's source tensors are dropped once it
    is built, and it is built in the file's dtype and then cast in place, parameter by parameter.
    """
    import torch
    from diffusers import pipelines
    from diffusers.loaders.single_file import load_single_file_sub_model

    pipeline_class = _pipeline_class(architecture)
    index = json.loads((config / "model_index.json").read_text("utf-8"))
    components: dict[str, Any] = {}
    names = [name for name, value in index.items() if not name.startswith("_") and isinstance(value, list)]
    for name in sorted(names, key=lambda name: (name != "unet", name)):
        library, class_name = index[name]
        if library is None:
            components[name] = None
            continue
        part = read_component(name) if name in ("unet", "vae") or name.startswith("text_encoder") else {}
        model = load_single_file_sub_model(
            library_name=library,
            class_name=class_name,
            name=name,
            checkpoint=part,
            pipelines=pipelines,
            is_pipeline_module=hasattr(pipelines, library),
            cached_model_config_path=str(config),
            local_files_only=True,
            torch_dtype=_stored_dtype(part),  # no second, cast copy while `part` is alive
        )
        del part
        if isinstance(model, torch.nn.Module):
            model.to(torch_dtype)  # one parameter at a time: each old tensor is freed as its cast is made
        components[name] = model
    init_args = {k: v for k, v in index.items() if not k.startswith("_") and not isinstance(v, list)}
    return pipeline_class(**components, **init_args)


def _pipeline_class(architecture: str):
    import diffusers

    return getattr(diffusers, PIPELINE_CLASSES[architecture])


def _no_safety_checker(architecture: str) -> dict:
    # SD 1.x/2.x pipelines take these; the shipped model_index.json has them null, this makes it explicit.
    if PIPELINE_CLASSES[architecture] == "StableDiffusionPipeline":
        return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    return {}


def _set_prediction_type(pipe, prediction_type: str) -> None:
    scheduler = pipe.scheduler
    if scheduler.config.get("prediction_type", "epsilon") != prediction_type:
        pipe.scheduler = type(scheduler).from_config(scheduler.config, prediction_type=prediction_type)


# Sentences of torch's weights_only error that are advice, not a reason: among them, to re-run with
# weights_only=False, which would let the file run code. The user must never be told that.
_TORCH_ADVICE = re.compile(
    r"weights.only|trusted source|can still be loaded|file an issue|documentation|will likely succeed", re.IGNORECASE
)


def torch_load_reason(error: BaseException) -> str:
    """The informative sentence of a torch.load error (what it refused), without torch's advice."""
    text = str(error).replace("WeightsUnpickler error:", "\n")
    for line in text.splitlines():
        for sentence in re.split(r"(?<=\.)\s+", line.strip()):
            if sentence and not _TORCH_ADVICE.search(sentence):
                return sentence.removesuffix(".")
    return "it holds objects other than tensors"


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
