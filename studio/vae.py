"""A separate VAE for one request (A1111's `VAE/` folder, `--vae`): found by name or path, loaded offline into
the model's own VAE architecture (its config, so the latent scaling fits the model), and used by every encode and
decode of the request through a pipeline derived from the cached model with `vae=` swapped; the cached model
keeps its own VAE.

Files: single-file `.safetensors` with the original CompVis/LDM key names (`encoder.down.0.block.0...`, as
`vae-ft-mse-840000-ema-pruned.safetensors`; a `first_stage_model.` prefix is fine) or diffusers' names, or a
diffusers `AutoencoderKL` folder (or a pipeline folder's `vae/`). Pickles (.pt/.ckpt/.bin) only with the opt-in,
read with weights_only.

Light to import (no torch at the top): `prepare_vae` runs in `Studio.run` step 0, before any model loads.
"""

from __future__ import annotations

from pathlib import Path

from .add_on_files import NO_MODELS_FOLDER, LruCache, looks_like_path, refuse_paths_on_a_server, refuse_pickle
from .requests import BaseRequest, StudioInputError, VaeRef, quote
from .settings import Settings

VAE_FOLDER = "VAE"
VAE_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".pt", ".ckpt", ".bin")
# What a name in VAE/ may be followed by (A1111 names its files x.vae.pt, x.vae.safetensors, x.safetensors).
NAME_SUFFIXES = ("", ".safetensors", ".vae.safetensors", ".pt", ".vae.pt", ".ckpt", ".bin")
# The same beside the sub-folders (the flat layout), where only a .safetensors VAE is told by its keys.
FLAT_SUFFIXES = ("", ".safetensors", ".vae.safetensors")

# Tasks that cannot take another VAE, with the reason.
VAE_REFUSED_TASKS = {"imagic": "imagic trains on its own encoding of the image; a separate VAE is not supported there"}


def _check_vae_path(path: Path, settings: Settings, label: str) -> Path:
    if path.is_dir():
        if weights_file(path) is None:
            raise StudioInputError(
                f"VAE {quote(label)}: folder {str(path)!r} holds no diffusers VAE (config.json and "
                "diffusion_pytorch_model.safetensors, itself or in vae/)"
            )
        return path.resolve()
    refuse_pickle(path, settings, "VAE", label, PICKLE_SUFFIXES)
    if path.suffix.lower() not in VAE_SUFFIXES + PICKLE_SUFFIXES:
        raise StudioInputError(f"VAE {quote(label)} is neither a .safetensors file nor a diffusers VAE folder")
    return path.resolve()


def resolve_vae(name_or_path: str, settings: Settings) -> Path:
    """The VAE file or folder a reference points at: a path that must exist, or a name looked up in each models
    folder's `VAE/` (as given, then with .safetensors, .vae.safetensors, .pt, .vae.pt, .ckpt, .bin), then beside
    it (the flat layout: a .safetensors file whose keys are a VAE's)."""
    value = name_or_path.strip()
    if looks_like_path(value):
        refuse_paths_on_a_server(value, settings, "VAE", "VAEs")
        path = Path(value).expanduser()
        if not path.exists():
            raise StudioInputError(f"VAE {quote(value)} not found: no such file or folder")
        return _check_vae_path(path, settings, value)
    from .models import flat_layout_file

    looked = []
    for root in settings.models_dirs:
        folder = Path(root).expanduser() / VAE_FOLDER
        for suffix in NAME_SUFFIXES:
            candidate = folder / f"{value}{suffix}"
            looked.append(str(candidate))
            if candidate.is_file() or (candidate.is_dir() and weights_file(candidate) is not None):
                return _check_vae_path(candidate, settings, value)
        flat = flat_layout_file(root, value, "vae", FLAT_SUFFIXES)  # beside the sub-folders, told by its keys
        if flat is not None:
            return _check_vae_path(flat, settings, value)
    if looked:
        where = "; looked in " + ", ".join(dict.fromkeys(str(Path(p).parent) for p in looked))
        where += f" for {value}{{{','.join(suffix for suffix in NAME_SUFFIXES if suffix)}}} or a folder {value}/"
        where += ", and for a VAE .safetensors of that name beside those folders"
    else:
        where = NO_MODELS_FOLDER
    raise StudioInputError(f"VAE {quote(value)} not found{where}")


def weights_file(folder: Path) -> Path | None:
    """A diffusers VAE folder's weights file (the folder itself, or its vae/), safetensors first; None if none."""
    for base in (folder, folder / "vae"):
        if not (base / "config.json").is_file():
            continue
        for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                     "diffusion_pytorch_model.bin"):
            if (base / name).is_file():
                return base / name
    return None


def vae_hash(path: Path, settings: Settings) -> str:
    """The weights' short SHA-256 (10 hex digits, as A1111's `VAE hash`); cached by path, size and mtime."""
    from .models import ModelRef, weights_hash

    target = weights_file(path) if path.is_dir() else path
    return weights_hash(ModelRef("single_file", str(target), path.stem), settings.hash_cache)


def vae_display_name(ref: VaeRef) -> str:
    """What A1111's `VAE:` line shows: the file's name (with its suffix), or the folder's name."""
    return Path(ref.name_or_path).name


def prepare_vae(request: BaseRequest, settings: Settings) -> BaseRequest:
    """Step 0 of a request: its VAE found (a clear error naming it and where it looked when it is not) and
    hashed; nothing is loaded. A name stays a name; a path is recorded resolved."""
    ref = getattr(request, "vae", None)
    if ref is None:
        return request
    refused = VAE_REFUSED_TASKS.get(request.task)
    if refused:
        raise StudioInputError(f"{refused} (asked for {quote(ref.name_or_path)})")
    path = resolve_vae(ref.name_or_path, settings)
    if looks_like_path(ref.name_or_path):
        name_or_path = str(path)
    else:  # A1111 names a VAE by its file name in VAE/
        name_or_path = path.name if path.is_file() else ref.name_or_path
    return request.model_copy(update={"vae": VaeRef(name_or_path=name_or_path, hash=vae_hash(path, settings))})


# -- loading --------------------------------------------------------------------------------------------

MAX_CACHED_VAES = 2  # models-with-this-VAE kept (a VAE is about 160 MB in fp32)


class VaeCache(LruCache):
    """Loaded models as seen with another VAE (a pipeline derived with `vae=` swapped, sharing everything
    else), by model and VAE file version; the last few kept."""

    def __init__(self, capacity: int = MAX_CACHED_VAES):
        super().__init__(capacity)

    def with_vae(self, models, loaded, path: Path):
        """`loaded` (a LoadedModel) with the VAE at `path`: a LoadedModel whose pipe and derived pipelines use it."""
        from .models import LoadedModel

        def load():
            pipe = models.derive(loaded, type(loaded.pipe), vae=load_vae(path, loaded, models.settings))
            return LoadedModel(loaded.ref, pipe, loaded.device, loaded.dtype, loaded.model_hash)

        stat = (weights_file(path) if path.is_dir() else path).stat()
        return self.get_or_load((loaded.ref, loaded.model_hash, str(path), stat.st_size, stat.st_mtime_ns), load)

    def forget(self, ref) -> None:
        """Drop what was derived from a model (it is being freed)."""
        with self._lock:
            for key in [key for key in self.entries if key[0] == ref]:
                del self.entries[key]


def load_vae(path: Path, loaded, settings: Settings):
    """An AutoencoderKL with the model's own VAE config and the weights at `path`, on the model's device and
    dtype; a clear error naming both when they do not fit."""
    from diffusers import AutoencoderKL

    base = loaded.pipe.vae
    label = path.name
    if path.is_dir():
        weights = weights_file(path)
        variant = "fp16" if weights.name.endswith(".fp16.safetensors") else None  # a folder of the variant only
        try:
            vae = AutoencoderKL.from_pretrained(
                weights.parent,
                local_files_only=True,
                use_safetensors=None if settings.allow_pickle else True,
                variant=variant,
            )
        except (OSError, ValueError, RuntimeError) as error:
            raise StudioInputError(f"VAE {quote(label)} could not be loaded: {_short(error)}") from None
        if vae.config.latent_channels != base.config.latent_channels:
            raise StudioInputError(
                f"VAE {quote(label)} ({vae.config.latent_channels} latent channels) does not fit model "
                f"{quote(loaded.ref.name)} ({base.config.latent_channels})"
            )
    else:
        state = _diffusers_state_dict(read_vae_file(path, settings.allow_pickle), base.config)
        vae = AutoencoderKL.from_config(base.config)
        try:
            missing, _ = vae.load_state_dict(state, strict=False)
        except RuntimeError as error:  # a tensor of another shape
            raise StudioInputError(
                f"VAE {quote(label)} does not fit model {quote(loaded.ref.name)} (a VAE for another architecture?): "
                f"{_short(error)}"
            ) from None
        if missing:
            raise StudioInputError(
                f"VAE {quote(label)} does not fit model {quote(loaded.ref.name)}: {len(missing)} of the model's VAE "
                f"weights are not in the file (e.g. {missing[0]!r}); is it a VAE?"
            )
    if vae.dtype != loaded.dtype:
        vae.to(dtype=loaded.dtype)
    if vae.device != loaded.device:
        vae.to(loaded.device)
    vae.eval()
    vae.requires_grad_(False)
    if getattr(base, "use_tiling", False):
        vae.enable_tiling()
    return vae


def read_vae_file(path: Path, allow_pickle: bool = False) -> dict:
    """A VAE file's tensors (safetensors; a pickle only with the opt-in, with weights_only)."""
    from .single_file import detect_file_format

    file_format = detect_file_format(path)
    if file_format == "safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if file_format != "pickle":
        raise StudioInputError(f"VAE {quote(str(path))} is neither a safetensors file nor a PyTorch checkpoint")
    if not allow_pickle:
        raise StudioInputError(f"VAE {quote(str(path))} is a pickle; opt in with --allow-pickle")
    import pickle

    from .single_file import _torch_load_weights_only, _unwrap_state_dict, torch_load_reason

    try:
        return _unwrap_state_dict(_torch_load_weights_only(path), path)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
        raise StudioInputError(f"VAE {quote(str(path))} was refused: {torch_load_reason(error)}") from None


def _diffusers_state_dict(state: dict, config) -> dict:
    """diffusers' key names: files with the original (LDM) names are converted with diffusers' own converter."""
    for prefix in ("first_stage_model.", "vae."):
        if any(key.startswith(prefix) for key in state):
            state = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
            break
    if any(key.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for key in state):
        return state
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    return convert_ldm_vae_checkpoint(state, dict(config))


class ModelsWithVae:
    """The model cache as one request sees it: the model it gets comes with the request's VAE; everything else
    is the cache's."""

    def __init__(self, models, path: Path):
        self.__dict__.update(_models=models, _path=path)

    def get(self, reference):
        models = self.__dict__["_models"]
        return models.vaes.with_vae(models, models.get(reference), self.__dict__["_path"])

    def __getattr__(self, name: str):
        return getattr(self.__dict__["_models"], name)


def models_for_request(models, request: BaseRequest):
    """`models`, or, when the request names a VAE, a view of it whose models come with that VAE (a derived
    pipeline: every task's encode and decode use it; the cached model keeps its own)."""
    ref = getattr(request, "vae", None)
    if ref is None:
        return models
    return ModelsWithVae(models, resolve_vae(ref.name_or_path, models.settings))


def _short(error: Exception, limit: int = 300) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[:limit] + "…"
