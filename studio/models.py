"""Model references, the loading rules, and the cache of loaded pipelines.

A model reference is one of:
  - "embedded": the studio's own model in assets/ (the default),
  - a local diffusers folder (with model_index.json),
  - a Hugging Face hub id that is already in the local cache (never downloaded),
  - a single-file SD1.x/SD2.x/SDXL checkpoint (.safetensors; pickles only with an explicit opt-in).

Loading never runs remote code and never downloads. Task pipelines are derived
from the loaded base with `from_pipe`, so every task shares one set of weights.
"""

from __future__ import annotations

import functools
import gc
import hashlib
import json
import logging
import pickle
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .devices import apply_memory_options, apply_speed_options, pick_device, pick_dtype
from .outputs import atomic_write_bytes
from .requests import StudioInputError, quote
from .settings import EMBEDDED_MODEL_DIR, Settings
from .loras import LoraFiles
from .embeddings import EmbeddingFiles
from .upscalers import UpscalerFiles
from .vae import VaeCache
from .single_file import torch_load_reason

log = logging.getLogger(__name__)

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Component libraries a model folder may name; anything else would import code shipped with the model.
TRUSTED_LIBRARIES = {"diffusers", "transformers", None}
SINGLE_FILE_SUFFIXES = {".safetensors", ".ckpt", ".pt", ".pth", ".bin"}


class ModelError(StudioInputError):
    """A model reference that cannot be used; the message names it and says why."""


@dataclass(frozen=True)
class ModelRef:
    kind: str  # "embedded", "folder", "hub" or "single_file"
    location: str  # folder or file path, or the hub id
    name: str  # what metadata shows as "Model:"


@dataclass
class LoadedModel:
    ref: ModelRef
    pipe: object  # the base diffusers pipeline (text-to-image)
    device: torch.device
    dtype: torch.dtype
    model_hash: str  # 10 hex digits, A1111 style
    # Pipelines derived from `pipe`, sharing its weights: by class name, or "Class[add-on folder]" when they
    # carry an add-on (a ControlNet, a T2I-Adapter).
    pipelines: dict[str, object] = field(default_factory=dict)
    # What a task keeps for this model between requests (Imagic's trained states), by task name; freed with it.
    task_state: dict[str, object] = field(default_factory=dict)

    @property
    def is_sdxl(self) -> bool:
        return "XL" in type(self.pipe).__name__


def resolve_model_ref(reference: str | None, settings: Settings) -> ModelRef:
    """Decide what a model reference points at, without loading anything."""
    reference = (reference or settings.model or "embedded").strip()
    if reference == "embedded":
        if not (EMBEDDED_MODEL_DIR / "model_index.json").is_file():
            raise ModelError(f"the embedded model is missing from {str(EMBEDDED_MODEL_DIR)!r}; reinstall the studio")
        return ModelRef("embedded", str(EMBEDDED_MODEL_DIR), "embedded")
    path = Path(reference).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ModelError(f"model folder {reference!r} has no model_index.json (not a diffusers pipeline folder)")
        return ModelRef("folder", str(path.resolve()), path.resolve().name)
    if path.is_file():
        return ModelRef("single_file", str(path.resolve()), path.stem)
    if path.suffix.lower() in SINGLE_FILE_SUFFIXES or "/" not in reference or reference.startswith((".", "/", "~")):
        raise ModelError(f"model {reference!r} not found: no such file or folder")
    if HUB_ID.match(reference):
        return ModelRef("hub", reference, reference)
    raise ModelError(f"model {reference!r} is neither a local folder, a checkpoint file nor a hub id")


def config_folder(ref: ModelRef) -> Path | None:
    """The diffusers folder whose configs describe a model, read without loading it; None for a single
    file or a hub id that is not cached."""
    if ref.kind == "single_file":
        return None
    if ref.kind == "hub":
        try:
            return hub_snapshot_folder(ref.location)
        except ModelError:
            return None
    return Path(ref.location)


def hub_snapshot_folder(repo_id: str) -> Path:
    """The cached snapshot of a hub model; a clear error (no network, no wait) when it is not cached."""
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(repo_id, "model_index.json")
    except Exception as error:  # invalid ids and the like
        raise ModelError(f"hub model {repo_id!r} cannot be looked up in the local cache: {error}") from None
    if not isinstance(cached, str):
        raise ModelError(
            f"hub model {repo_id!r} is not in the local Hugging Face cache, and the studio never downloads; "
            "download it once elsewhere (huggingface-cli download) or pass a local folder or .safetensors file"
        )
    return Path(cached).parent


def check_model_folder(folder: Path, reference: str, allow_pickle: bool) -> dict:
    """Refuse folders that would run code shipped with the model, or that hold only pickle weights."""
    index = _read_model_index(folder, reference)
    for component, spec in index.items():
        if component.startswith("_") or not isinstance(spec, list):
            continue  # private keys, and plain init arguments such as requires_safety_checker
        if len(spec) != 2 or not all(part is None or isinstance(part, str) for part in spec):
            raise ModelError(
                f"model {reference!r} has a malformed model_index.json entry for {component!r}: {quote(spec)} "
                "(expected [library, class name])"
            )
        library, class_name = spec
        if library not in TRUSTED_LIBRARIES and not _diffusers_pipeline_class(library, class_name):
            raise ModelError(
                f"model {reference!r} component {component!r} comes from {library!r} (remote code), which is refused"
            )
    has_safetensors = any(folder.glob("*/*.safetensors"))
    has_pickles = any(folder.glob("*/*.bin")) or any(folder.glob("*/*.ckpt")) or any(folder.glob("*/*.pt"))
    if has_pickles and not has_safetensors and not allow_pickle:
        raise ModelError(
            f"model {reference!r} has only pickle (.bin) weights, which can run code when loaded; "
            "convert them to .safetensors, or opt in with --allow-pickle (loaded with weights_only)"
        )
    return index


def _diffusers_pipeline_class(library: str, class_name: str | None) -> bool:
    """Whether [library, class] names a class of diffusers' own pipeline modules, as published SD folders do
    (`"safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"]`): installed code, not the model's."""
    import importlib

    if not library.isidentifier() or not class_name:
        return False
    try:
        module = importlib.import_module(f"diffusers.pipelines.{library}")
    except ImportError:
        return False
    return isinstance(getattr(module, class_name, None), type)


def fp16_only_variant(folder: Path) -> str | None:
    """"fp16" when the folder's weights exist only as `*.fp16.safetensors` (as some hub repos publish them)."""
    weights = list(folder.glob("*/*.safetensors"))
    variants = [path for path in weights if path.name.endswith(".fp16.safetensors")]
    return "fp16" if variants and len(variants) == len(weights) else None


def _read_model_index(folder: Path, reference: str) -> dict:
    """model_index.json as a JSON object whose _class_name is a diffusers pipeline class."""
    try:
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as error:
        raise ModelError(f"model {reference!r} has an unreadable model_index.json: {quote(str(error))}") from None
    if not isinstance(index, dict):
        raise ModelError(f"model {reference!r} has a model_index.json that is not a JSON object")
    class_name = index.get("_class_name")
    if not isinstance(class_name, str):
        raise ModelError(f"model {reference!r} has no pipeline class name in model_index.json (got {quote(class_name)})")
    import diffusers

    pipeline_class = getattr(diffusers, class_name, None)
    if not (isinstance(pipeline_class, type) and issubclass(pipeline_class, diffusers.DiffusionPipeline)):
        raise ModelError(f"model {reference!r} needs the custom pipeline {quote(class_name)} (remote code), which is refused")
    return index


def check_checkpoint_file(ref: ModelRef, allow_pickle: bool) -> None:
    """Refuse pickle checkpoints (judged by content, not by name) unless the user opted in."""
    from .single_file import detect_file_format

    file_format = detect_file_format(ref.location)
    if file_format == "pickle" and not allow_pickle:
        raise ModelError(
            f"checkpoint {ref.location!r} is a pickle, which can run code when loaded; "
            "use a .safetensors file, or opt in with --allow-pickle (loaded with weights_only)"
        )
    if file_format == "unknown":
        raise ModelError(f"checkpoint {ref.location!r} is neither safetensors nor a torch checkpoint")


def weights_hash(ref: ModelRef, cache: Path | None = None) -> str:
    """A1111-style short model hash: SHA-256 of the checkpoint file, or of a folder's weight files.
    `cache`: a JSON file of earlier hashes by path, size and mtime (a file unchanged is not read again)."""
    known = _read_hash_cache(cache)
    sha256 = functools.partial(_cached_sha256, known)
    digest = hashlib.sha256()
    if ref.kind == "single_file":
        files = [Path(ref.location)]
    else:
        folder = Path(ref.location) if ref.kind != "hub" else hub_snapshot_folder(ref.location)
        files = sorted(p for p in folder.glob("*/*") if p.suffix in (".safetensors", ".bin"))
    if len(files) == 1:  # one file: the hash A1111 shows for it
        short = sha256(files[0])[:10]
    else:
        for path in files:
            digest.update(path.parent.name.encode() + b"/" + path.name.encode() + sha256(path).encode())
        short = digest.hexdigest()[:10]
    _write_hash_cache(cache, known)
    return short


def _cached_sha256(known: dict, path: Path) -> str:
    stat = path.stat()
    key = str(path.resolve())
    entry = known.get(key)
    if isinstance(entry, dict) and entry.get("size") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns:
        return entry["sha256"]
    sha256 = _file_sha256(path)
    known[key] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha256}
    return sha256


def cached_sha256(path: Path, cache: Path | None) -> str | None:
    """A file's SHA-256 as the hash cache holds it; None when it was never hashed or has changed since (the
    file itself is never read here)."""
    known = _read_hash_cache(cache).get(str(path.resolve()))
    stat = path.stat()
    fresh = isinstance(known, dict) and known.get("size") == stat.st_size and known.get("mtime_ns") == stat.st_mtime_ns
    return known["sha256"] if fresh else None


def _read_hash_cache(cache: Path | None) -> dict:
    if cache is None:
        return {}
    try:
        known = json.loads(Path(cache).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # none yet, or damaged: hash again
        return {}
    return known if isinstance(known, dict) else {}


def _write_hash_cache(cache: Path | None, known: dict) -> None:
    if cache is None or not known:
        return
    try:
        atomic_write_bytes(Path(cache), json.dumps(known, sort_keys=True).encode())
    except OSError as error:  # a read-only home: hashing again next time is all it costs
        log.info("could not write the hash cache %s: %s", cache, error)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_base_pipeline(ref: ModelRef, settings: Settings, dtype: torch.dtype):
    """Load the text-to-image pipeline a reference points at, offline, safetensors only unless opted in."""
    from diffusers import DiffusionPipeline

    if ref.kind == "single_file":
        from .single_file import load_single_file_pipeline

        try:
            return load_single_file_pipeline(
                ref.location,
                torch_dtype=dtype,
                allow_pickle=settings.allow_pickle,
                configs_dir=settings.configs_dir,
                use_ema=settings.use_ema,
            )
        except StudioInputError:
            raise
        except ValueError as error:
            raise ModelError(str(error)) from None

    folder = Path(ref.location) if ref.kind != "hub" else hub_snapshot_folder(ref.location)
    index = check_model_folder(folder, ref.name, settings.allow_pickle)
    extra = {}
    if "safety_checker" in index:
        # The studio never loads the safety checker (nor the feature extractor that only feeds it).
        extra.update(safety_checker=None, requires_safety_checker=False)
    if "feature_extractor" in index:
        extra.update(feature_extractor=None)
    variant = fp16_only_variant(folder)
    if variant:
        log.warning("model %s has only %s variant weights (*.%s.safetensors): loading those", ref.name, variant, variant)
        extra.update(variant=variant)
    try:
        return DiffusionPipeline.from_pretrained(
            folder,
            dtype=dtype,
            local_files_only=True,
            # The opt-in only adds pickles: safetensors files are still preferred wherever they exist.
            use_safetensors=None if settings.allow_pickle else True,
            **extra,
        )
    except pickle.UnpicklingError as error:
        raise ModelError(
            f"model {ref.name!r} has pickle weights that weights_only loading refused ({torch_load_reason(error)}); "
            "use a .safetensors version of the model"
        ) from None


class ModelManager:
    """Keeps loaded pipelines; derives task pipelines from them; frees the oldest when over the limit."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.lora_files = LoraFiles()  # LoRA tensors read once per file version (studio.loras)
        self.embedding_files = EmbeddingFiles()  # embedding vectors read once per file version (studio.embeddings)
        self.vaes = VaeCache()  # models with a request's separate VAE (studio.vae)
        self.upscaler_files = UpscalerFiles()  # hires fix upscaler models read once per file version (studio.upscalers)
        self._loaded: OrderedDict[ModelRef, LoadedModel] = OrderedDict()

    def get(self, reference: str | None) -> LoadedModel:
        ref = resolve_model_ref(reference, self.settings)
        if ref in self._loaded:
            self._loaded.move_to_end(ref)
            return self._loaded[ref]
        if ref.kind == "single_file":
            check_checkpoint_file(ref, self.settings.allow_pickle)  # before evicting anything or touching torch
        elif ref.kind == "hub":
            hub_snapshot_folder(ref.location)
        self._evict(keep=self.settings.max_cached_models - 1)
        device = pick_device(self.settings.device)
        dtype = pick_dtype(device, self.settings.dtype)
        log.info("loading model %s (%s) on %s as %s", ref.name, ref.kind, device, dtype)
        pipe = load_base_pipeline(ref, self.settings, dtype)
        pipe.set_progress_bar_config(disable=True)
        apply_memory_options(pipe, device, self.settings)
        apply_speed_options(pipe, device, self.settings)
        loaded = LoadedModel(ref, pipe, device, dtype, weights_hash(ref, self.settings.hash_cache))
        self._loaded[ref] = loaded
        return loaded

    def derive(self, loaded: LoadedModel, pipeline_class, **components):
        """A pipeline of another class sharing the loaded weights (cached when no components are swapped)."""
        if not components and pipeline_class.__name__ in loaded.pipelines:
            return loaded.pipelines[pipeline_class.__name__]
        if type(loaded.pipe) is pipeline_class and not components:
            return loaded.pipe
        # from_pipe casts to dtype (float32 by default): pass the loaded dtype so shared weights stay as they are.
        pipe = pipeline_class.from_pipe(loaded.pipe, dtype=loaded.dtype, **components)
        pipe.set_progress_bar_config(disable=True)
        if not components:
            loaded.pipelines[pipeline_class.__name__] = pipe
        return pipe

    def loaded_models(self) -> list[ModelRef]:
        return list(self._loaded)

    def _evict(self, keep: int) -> None:
        while len(self._loaded) > max(keep, 0):
            ref, loaded = self._loaded.popitem(last=False)
            log.info("freeing model %s", ref.name)
            loaded.pipelines.clear()
            loaded.task_state.clear()
            self.vaes.forget(ref)
            del loaded
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def clear(self) -> None:
        self._evict(keep=0)


def recorded_reference(ref: ModelRef) -> str:
    """How a PNG names its model: "embedded", a hub id, or the absolute path (not the path as typed, which
    means nothing from another folder)."""
    return "embedded" if ref.kind == "embedded" else ref.location


def find_model_by_hash(short_hash: str, settings: Settings) -> str | None:
    """A model in the models folders (--models-dir) whose weights hash to `short_hash`, for a PNG whose
    model has moved; hashes come from the hash cache after the first time."""
    for entry in list_local_models(settings):
        if entry["kind"] not in ("folder", "single_file") or not short_hash:
            continue
        try:
            ref = resolve_model_ref(entry["reference"], settings)
            if weights_hash(ref, settings.hash_cache) == short_hash:
                return entry["reference"]
        except (StudioInputError, OSError):
            continue
    return None


# The A1111 models folder: what each sub-folder holds. Files beside them (the flat layout) are told by their keys.
A1111_FOLDERS = {
    "Stable-diffusion": "checkpoint", "Lora": "lora", "embeddings": "embedding", "VAE": "vae",
    "ESRGAN": "upscaler", "RealESRGAN": "upscaler",
}  # fmt: skip
ADD_ON_TYPES = ("lora", "embedding", "vae", "upscaler")
# Cross-attention / token width -> the family a file was made for.
WIDTH_ARCHITECTURES = {768: "sd1", 1024: "sd2", 2048: "sdxl", 1280: "sdxl"}
SINGLE_FILE_ARCHITECTURES = {"sd15": "sd1", "sd21": "sd2", "sd2_base": "sd2", "sdxl": "sdxl", "sdxl_refiner": "sdxl-refiner"}


def list_local_models(settings: Settings, add_ons: bool = False, hashes: bool | str = False) -> list[dict]:
    """What `studio models` shows: the embedded model, the checkpoints in the models folders (their
    `Stable-diffusion/` and the flat layout: diffusers folders, and files told by their keys), cached hub models;
    with `add_ons`, the LoRAs (`Lora/`), embeddings (`embeddings/`), VAEs (`VAE/`) and the hires fix's upscaler
    models (`ESRGAN/`, `RealESRGAN/`) too.

    Each entry: reference (what --model, --lora, --embedding, --vae or --hr-upscaler takes), kind (how it loads),
    location, type (checkpoint, lora, embedding, vae, upscaler), name, architecture (sd1, sd2, sdxl, esrgan-x4,
    from tensor shapes read without loading), size in bytes and short hash: computed with `hashes=True` (cached
    by path, size and mtime), only when already cached with "cached", none with False.
    """
    found = []
    if (EMBEDDED_MODEL_DIR / "model_index.json").is_file():
        architecture = _folder_architecture(EMBEDDED_MODEL_DIR)
        found.append(_listed("checkpoint", EMBEDDED_MODEL_DIR, "embedded", "embedded", "embedded", architecture))
    for root in settings.models_dirs:
        root = Path(root).expanduser()
        if not root.is_dir():
            continue
        for folder_name, folder_type in A1111_FOLDERS.items():
            folder = root / folder_name
            if folder.is_dir() and (add_ons or folder_type == "checkpoint"):
                found += [entry for path in sorted(folder.iterdir()) for entry in _folder_entry(path, folder_type)]
        for path in sorted(root.iterdir()):
            if path.name not in A1111_FOLDERS:
                found += [entry for entry in _folder_entry(path, None) if add_ons or entry["type"] == "checkpoint"]
    try:
        from huggingface_hub import scan_cache_dir

        for repo in scan_cache_dir().repos:
            if repo.repo_type == "model":
                found.append(_listed("checkpoint", Path(repo.repo_path), repo.repo_id, "hub (cached)", repo.repo_id, ""))
    except Exception:  # no cache folder yet
        pass
    if hashes:
        for entry in found:
            entry["hash"] = _listed_hash(entry, settings.hash_cache, compute=hashes is True)
    return found


def _listed(type_: str, path: Path, reference: str, kind: str, name: str, architecture: str) -> dict:
    return {
        "reference": reference, "kind": kind, "location": str(path), "type": type_, "name": name,
        "architecture": architecture, "size": _size(path), "hash": "",
    }


def _folder_entry(path: Path, folder_type: str | None) -> list[dict]:
    """The entry for one file or folder of a models folder; `folder_type`: what its A1111 sub-folder holds
    (None: the flat layout, told by the file's keys)."""
    suffix = path.suffix.lower()
    if path.is_dir():
        if (path / "model_index.json").is_file() and folder_type in (None, "checkpoint"):
            return [_listed("checkpoint", path, str(path), "folder", path.name, _folder_architecture(path))]
        if folder_type == "vae" and ((path / "config.json").is_file() or (path / "vae" / "config.json").is_file()):
            return [_listed("vae", path, path.name, "folder", path.name, "kl-f8")]
        return []
    if not path.is_file() or suffix not in SINGLE_FILE_SUFFIXES:
        return []
    if suffix != ".safetensors":  # a pickle is not opened to be told apart
        type_ = folder_type or "checkpoint"
        kind = "pickle (needs --allow-pickle)"
        return [_listed(type_, path, _add_on_reference(type_, path, folder_type), kind, _add_on_name(type_, path), "")]
    type_, architecture = classify_weights_file(path)
    if folder_type is not None and type_ != folder_type:
        type_ = folder_type if type_ == "unknown" else type_  # trust the keys over the folder
    kind = "single_file" if type_ == "checkpoint" else "safetensors"
    return [_listed(type_, path, _add_on_reference(type_, path, folder_type), kind, _add_on_name(type_, path), architecture)]


def _add_on_reference(type_: str, path: Path, folder_type: str | None) -> str:
    """What the flags take: a checkpoint's path; a LoRA, embedding or VAE by name where the resolvers look for
    names (LoRAs, embeddings, VAEs: their sub-folder, and .safetensors files of the flat layout), else its path."""
    safetensors = path.suffix.lower() == ".safetensors"
    by_name = {
        "lora": folder_type in ("lora", None) and safetensors,
        "embedding": folder_type == "embedding" or (folder_type is None and safetensors),
        "vae": folder_type == "vae" or (folder_type is None and safetensors),
        "upscaler": folder_type == "upscaler" or (folder_type is None and safetensors),
    }
    return _add_on_name(type_, path) if by_name.get(type_) else str(path)


def _add_on_name(type_: str, path: Path) -> str:
    return path.name if type_ == "vae" else path.stem


def classify_weights_file(path: Path) -> tuple[str, str]:
    """(type, architecture) of a .safetensors file from its key names and shapes (the header only):
    checkpoint, lora, embedding, vae, upscaler or unknown; sd1, sd2, sdxl (esrgan-x4, ... for upscalers), or ""
    when the shapes do not say."""
    from .single_file import SingleFileError, UnknownArchitectureError, detect_architecture, read_safetensors_header

    try:
        shapes, _ = read_safetensors_header(path)
    except Exception:  # a damaged file: listed, as unknown
        return "unknown", ""
    keys = list(shapes)
    if any(key.startswith("model.diffusion_model.") for key in keys):
        try:
            architecture = SINGLE_FILE_ARCHITECTURES.get(detect_architecture(keys, shapes), "")
        except (UnknownArchitectureError, SingleFileError):
            architecture = ""
        if architecture and shapes.get("model.diffusion_model.input_blocks.0.0.weight", (0, 4))[1] == 9:
            architecture += "-inpainting"
        return "checkpoint", architecture
    if "conv_first.weight" in shapes or "model.0.weight" in shapes:  # ESRGAN / Real-ESRGAN (studio.upscalers)
        from .upscalers import layout_of_shapes

        layout = layout_of_shapes(shapes)
        if layout is not None:
            return "upscaler", layout.description
    if any("lora" in key.lower() for key in keys):
        return "lora", _lora_architecture(keys, shapes)
    if "emb_params" in shapes or "string_to_param" in shapes or ("clip_l" in shapes and "clip_g" in shapes) or (
        len(keys) == 1 and 1 <= len(shapes[keys[0]]) <= 2
    ):
        if "clip_g" in shapes:
            return "embedding", "sdxl"
        return "embedding", WIDTH_ARCHITECTURES.get(shapes[keys[0]][-1] if len(keys) == 1 else shapes["emb_params"][-1], "")
    vae_keys = [key.removeprefix("first_stage_model.").removeprefix("vae.") for key in keys]
    if any(key.startswith(("decoder.up.", "decoder.up_blocks.")) for key in vae_keys) and any(
        key.startswith("encoder.") for key in vae_keys
    ):
        return "vae", "kl-f8"
    return "unknown", ""


def flat_layout_file(root: Path, name: str, type_: str, suffixes: tuple[str, ...] = (".safetensors",)) -> Path | None:
    """`<root>/<name><suffix>` when it is a .safetensors file beside the A1111 sub-folders whose keys say it is a
    `type_` (the listing's classification: a LoRA is never taken for an embedding, nor a checkpoint for a VAE)."""
    for suffix in suffixes:
        candidate = Path(root).expanduser() / f"{name}{suffix}"
        if candidate.suffix.lower() == ".safetensors" and candidate.is_file():
            if classify_weights_file(candidate)[0] == type_:
                return candidate
    return None


def _lora_architecture(keys: list[str], shapes: dict) -> str:
    """A LoRA's family from its cross-attention key projection's input width (or a second text encoder)."""
    if any(key.startswith(("lora_te2_", "text_encoder_2.", "te2.")) for key in keys):
        return "sdxl"
    for key in keys:
        lowered = key.lower()
        if "attn2" in lowered and "to_k" in lowered and ("lora_down" in lowered or "lora_a" in lowered or "lora.down" in lowered):
            return WIDTH_ARCHITECTURES.get(shapes[key][-1], "")
    return ""


def _folder_architecture(folder: Path) -> str:
    try:
        unet = json.loads((folder / "unet" / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return ""
    architecture = WIDTH_ARCHITECTURES.get(unet.get("cross_attention_dim") if isinstance(unet, dict) else None, "")
    if architecture and isinstance(unet, dict) and unet.get("in_channels") == 9:
        architecture += "-inpainting"
    return architecture


def _size(path: Path) -> int:
    try:
        if path.is_file():
            return path.stat().st_size
        return sum(item.stat().st_size for item in path.rglob("*") if item.is_file())
    except OSError:
        return 0


def size_text(size: int) -> str:
    """A file size as people read it (12 B, 3.4 MB, 2.1 GB)."""
    if size < 1024:
        return f"{size} B"
    for unit in ("KB", "MB", "GB"):
        size /= 1024
        if size < 1024 or unit == "GB":
            return f"{size:.1f} {unit}"


def _listed_hash(entry: dict, cache: Path | None, compute: bool) -> str:
    """The entry's short hash: the hash cache's, or (`compute`) hashed now; "" for what has no weights file."""
    location = Path(entry["location"])
    if entry["kind"] == "hub (cached)":
        return ""
    if location.is_dir() and entry["type"] == "vae":
        from .vae import weights_file

        location = weights_file(location) or location
    ref = ModelRef("single_file" if location.is_file() else "folder", str(location), entry["name"])
    if not compute:
        return (cached_sha256(location, cache) or "")[:10] if ref.kind == "single_file" else ""
    try:
        return weights_hash(ref, cache)
    except (OSError, StudioInputError):
        return ""
