"""Model upscalers for the hires fix: ESRGAN and Real-ESRGAN files (the RRDBNet architecture: RealESRGAN_x4plus,
4x-UltraSharp, ...) found by name in the models folders' `ESRGAN/` and `RealESRGAN/` (A1111's folders) or beside
them (the flat layout, told by their keys), read safely, and run on the decoded image in tiles.

The network is written here (about forty lines of torch.nn.functional) instead of taken from `spandrel`, which
needs torchvision. Both key layouts load: Real-ESRGAN's "new arch" (`conv_first`, `body.N.rdbM.convK`,
`conv_body`, `conv_up1`, `conv_up2`, `conv_hr`, `conv_last`) and the original ESRGAN's "old arch" (`model.0`,
`model.1.sub.N.RDBM.convK.0`, ...). The scale comes from the shapes: each `conv_upN` doubles; Real-ESRGAN's x2
and x1 models first fold 2x2 or 4x4 pixels into channels (pixel-unshuffle: 12 or 48 input channels).

Files: `.safetensors` always; `.pth`/`.pt` only with the opt-in (`--allow-pickle`), read with weights_only.
Light to import (no torch at the top): names are found before any model loads.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .add_on_files import NO_MODELS_FOLDER, FileCache, looks_like_path, refuse_pickle
from .requests import StudioInputError, quote
from .settings import Settings

BUILTIN_UPSCALERS = ("lanczos", "nearest", "latent")  # Pillow's resamplers and latent interpolation
UPSCALER_FOLDERS = ("ESRGAN", "RealESRGAN")  # A1111's folders for RRDBNet models
UPSCALER_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".pth", ".pt")
# A1111 lists the Real-ESRGAN files under these names (its API's hr_upscaler takes them).
A1111_NAMES = {
    "r-esrgan 4x+": "RealESRGAN_x4plus",
    "r-esrgan 4x+ anime6b": "RealESRGAN_x4plus_anime_6B",
    "r-esrgan 2x+": "RealESRGAN_x2plus",
}
TILE = 192  # input pixels per tile side (A1111's ESRGAN default)
TILE_OVERLAP = 8  # input pixels each tile borrows from its neighbours, cut off again after upscaling
MAX_CACHED_UPSCALERS = 2  # an ESRGAN file is about 65 MB in float32


# -- finding an upscaler by name ----------------------------------------------------------------------


def folder_upscalers(settings: Settings) -> dict[str, Path]:
    """Every upscaler model in the models folders by name (its file name without the suffix; the first folder
    wins): the files in `ESRGAN/` and `RealESRGAN/`, and .safetensors files beside them whose keys are an
    RRDBNet's. What `studio models`, the UI's hires upscaler list and `/sdapi/v1/upscalers` offer."""
    from .models import classify_weights_file

    found: dict[str, Path] = {}
    for root in settings.models_dirs:
        root = Path(root).expanduser()
        for folder in (root / name for name in UPSCALER_FOLDERS):
            for path in sorted(folder.iterdir()) if folder.is_dir() else []:
                if path.is_file() and path.suffix.lower() in UPSCALER_SUFFIXES + PICKLE_SUFFIXES:
                    found.setdefault(path.stem, path)
        for path in sorted(root.glob("*.safetensors")) if root.is_dir() else []:
            if path.stem not in found and classify_weights_file(path)[0] == "upscaler":
                found[path.stem] = path
    return found


def resolve_upscaler(name: str, settings: Settings) -> Path:
    """The file an upscaler's name points at (a name only: a request never gives a path), pickles refused
    without the opt-in; a clear error naming where it looked when it is not there."""
    value = name.strip()
    if looks_like_path(value, UPSCALER_SUFFIXES + PICKLE_SUFFIXES):
        raise StudioInputError(
            f"hr_upscaler {quote(value)}: give lanczos, nearest, latent or an upscaler's name from the models "
            "folders' ESRGAN/ or RealESRGAN/, not a path"
        )
    value = A1111_NAMES.get(value.lower(), value)
    path = folder_upscalers(settings).get(value)
    if path is None:
        folders = [str(Path(root).expanduser() / folder) for root in settings.models_dirs for folder in UPSCALER_FOLDERS]
        where = f"; looked in {', '.join(folders)} and beside them" if folders else NO_MODELS_FOLDER
        raise StudioInputError(f"hr_upscaler {quote(value)} is not lanczos, nearest, latent, nor an upscaler model{where}")
    refuse_pickle(path, settings, "upscaler", value, PICKLE_SUFFIXES)
    return path.resolve()


def upscaler_hash(path: Path, settings: Settings) -> str:
    """The file's short SHA-256 (10 hex digits, like the model hash); cached by path, size and mtime."""
    from .models import ModelRef, weights_hash

    return weights_hash(ModelRef("single_file", str(path), path.stem), settings.hash_cache)


# -- the RRDBNet layout: from key names and shapes ----------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """What an RRDBNet file holds: its blocks, its doublings (conv_upN) and how many pixels it folds into
    channels first (1, or Real-ESRGAN x2's 2 and x1's 4); the image grows by `scale`."""

    blocks: int
    doublings: int
    unshuffle: int

    @property
    def scale(self) -> int:
        return 2**self.doublings // self.unshuffle

    @property
    def description(self) -> str:
        return f"esrgan-x{self.scale}"


OLD_BODY = re.compile(r"model\.1\.sub\.(\d+)\.RDB([123])\.conv([1-5])\.0\.(weight|bias)")
OLD_TRUNK = re.compile(r"model\.1\.sub\.(\d+)\.(weight|bias)")
OLD_TOP = re.compile(r"model\.(\d+)\.(weight|bias)")


def new_arch_names(keys) -> dict[str, str]:
    """key -> its Real-ESRGAN ("new arch") name; the original ESRGAN's "old arch" names are renamed (model.0:
    conv_first; model.1.sub.N.RDBM.convK.0: body.N.rdbM.convK; model.1.sub.<last>: conv_body; then the
    up-convolutions model.3, model.6, ..., and conv_hr and conv_last at the two last indices)."""
    keys = list(keys)
    if "model.0.weight" not in keys:
        return {key: key for key in keys}
    tops = sorted({int(m.group(1)) for key in keys if (m := OLD_TOP.fullmatch(key)) and int(m.group(1)) >= 2})
    tops_named = {index: f"conv_up{n + 1}" for n, index in enumerate(tops[:-2])}
    if len(tops) >= 2:
        tops_named |= {tops[-2]: "conv_hr", tops[-1]: "conv_last"}
    renamed = {}
    for key in keys:
        if m := OLD_BODY.fullmatch(key):
            renamed[key] = f"body.{m.group(1)}.rdb{m.group(2)}.conv{m.group(3)}.{m.group(4)}"
        elif m := OLD_TRUNK.fullmatch(key):
            renamed[key] = f"conv_body.{m.group(2)}"
        elif (m := OLD_TOP.fullmatch(key)) and (int(m.group(1)) == 0 or int(m.group(1)) in tops_named):
            renamed[key] = f"{'conv_first' if m.group(1) == '0' else tops_named[int(m.group(1))]}.{m.group(2)}"
        else:
            renamed[key] = key  # reported as unknown
    return renamed


def rrdbnet_layout(shapes: dict[str, tuple], label: str) -> Layout:
    """The layout of a state dict with new-arch names (key -> shape); a clear error naming the file when it is
    not an RRDBNet with three colour channels in and out, at x1, x2, x4 or x8."""
    if "conv_first.weight" not in shapes or "body.0.rdb1.conv1.weight" not in shapes:
        some = ", ".join(sorted(shapes)[:4])
        raise StudioInputError(
            f"upscaler {label} is not an ESRGAN/Real-ESRGAN RRDBNet model (no conv_first and body.0.rdb1 weights, "
            f"old or new names; its keys: {some}, ...)"
        )
    blocks = 1 + max(int(m.group(1)) for key in shapes if (m := re.match(r"body\.(\d+)\.", key)))
    doublings = sum(1 for key in shapes if re.fullmatch(r"conv_up\d+\.weight", key))
    channels_in, channels_out = shapes["conv_first.weight"][1], shapes.get("conv_last.weight", (0,))[0]
    unshuffle = {3: 1, 12: 2, 48: 4}.get(channels_in)
    if unshuffle is None or channels_out != 3 or 2**doublings < unshuffle:
        raise StudioInputError(
            f"upscaler {label} takes {channels_in} input and gives {channels_out} output channels with "
            f"{doublings} doublings: only RGB RRDBNets at x1, x2, x4 or x8 are supported"
        )
    expected = {f"{name}.{part}" for name in ("conv_first", "conv_body", "conv_hr", "conv_last") for part in ("weight", "bias")}
    expected |= {f"conv_up{n}.{part}" for n in range(1, doublings + 1) for part in ("weight", "bias")}
    expected |= {
        f"body.{block}.rdb{rdb}.conv{conv}.{part}"
        for block in range(blocks) for rdb in (1, 2, 3) for conv in range(1, 6) for part in ("weight", "bias")
    }  # fmt: skip
    unknown, missing = sorted(set(shapes) - expected), sorted(expected - set(shapes))
    if unknown or missing:
        what = f"unknown keys ({', '.join(unknown[:3])})" if unknown else f"missing keys ({', '.join(missing[:3])})"
        raise StudioInputError(f"upscaler {label} is not an RRDBNet model the studio can run: {what}")
    return Layout(blocks, doublings, unshuffle)


def layout_of_shapes(shapes: dict[str, tuple]) -> Layout | None:
    """The layout when a file's keys (either naming) are an RRDBNet's, else None (for the models listing)."""
    renamed = new_arch_names(shapes)
    try:
        return rrdbnet_layout({renamed[key]: tuple(shape) for key, shape in shapes.items()}, "")
    except StudioInputError:
        return None


# -- reading and running ------------------------------------------------------------------------------


class UpscalerFiles(FileCache):
    """Upscaler files' (layout, weights), read once per file version; the last few kept in memory. One per
    ModelManager (the studio's model cache)."""

    def __init__(self, capacity: int = MAX_CACHED_UPSCALERS):
        super().__init__(read_upscaler_file, capacity)


def read_upscaler_file(path: Path, allow_pickle: bool = False) -> tuple[Layout, dict]:
    """A file's layout and float32 weights with new-arch names (safetensors; a pickle only with the opt-in,
    weights_only; Real-ESRGAN's `params_ema`/`params` wrapping and a `module.` prefix are unwrapped)."""
    label = f"{quote(path.stem)} ({path})"
    if path.suffix.lower() in UPSCALER_SUFFIXES:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except (SafetensorError, OSError) as error:
            raise StudioInputError(f"upscaler {label} is not a readable safetensors file: {error}") from None
    else:
        if not allow_pickle:
            raise StudioInputError(f"upscaler {label} is a pickle; opt in with --allow-pickle")
        import pickle

        from .single_file import _torch_load_weights_only, torch_load_reason

        try:
            state = _torch_load_weights_only(path)
        except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
            raise StudioInputError(f"upscaler {label} was refused: {torch_load_reason(error)}") from None
        for wrapper in ("params_ema", "params"):
            if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
                state = state[wrapper]
                break
        if not isinstance(state, dict):
            raise StudioInputError(f"upscaler {label} holds {type(state).__name__}, not a state dict")
    state = {key.removeprefix("module."): value for key, value in state.items() if hasattr(value, "shape")}
    renamed = new_arch_names(state)
    state = {renamed[key]: value.float() for key, value in state.items()}
    return rrdbnet_layout({key: tuple(value.shape) for key, value in state.items()}, label), state


def rrdbnet(x, weights: dict, layout: Layout):
    """RRDBNet's forward pass (ESRGAN, Real-ESRGAN) on a batch of RGB images in [0, 1]."""
    import torch
    import torch.nn.functional as F

    def conv(features, name):
        return F.conv2d(features, weights[f"{name}.weight"], weights[f"{name}.bias"], padding=1)

    def residual_dense_block(features, name):
        grown = [features]
        for index in range(1, 5):
            grown.append(F.leaky_relu(conv(torch.cat(grown, 1), f"{name}.conv{index}"), 0.2))
        return conv(torch.cat(grown, 1), f"{name}.conv5") * 0.2 + features

    features = F.pixel_unshuffle(x, layout.unshuffle) if layout.unshuffle > 1 else x
    features = conv(features, "conv_first")
    trunk = features
    for block in range(layout.blocks):  # residual in residual dense blocks
        inner = trunk
        for rdb in (1, 2, 3):
            inner = residual_dense_block(inner, f"body.{block}.rdb{rdb}")
        trunk = inner * 0.2 + trunk
    features = features + conv(trunk, "conv_body")
    for index in range(1, layout.doublings + 1):
        features = F.leaky_relu(conv(F.interpolate(features, scale_factor=2, mode="nearest"), f"conv_up{index}"), 0.2)
    return conv(F.leaky_relu(conv(features, "conv_hr"), 0.2), "conv_last")


def upscale_tensor(
    x, weights: dict, layout: Layout, tile: int | None = TILE, overlap: int = TILE_OVERLAP, before_tile=None
):
    """`x` (1, 3, H, W) upscaled by the layout's scale, in tiles of `tile` input pixels that overlap by
    `overlap` (A1111's way: bounded memory, seams only where the overlap is smaller than the network sees);
    `before_tile()` is called before each tile (a cancel takes effect there)."""
    import torch.nn.functional as F

    def run(piece):
        height, width = piece.shape[-2:]
        fold = layout.unshuffle  # pixel-unshuffle needs sides that are multiples of it
        pad_h, pad_w = -height % fold, -width % fold
        if pad_h or pad_w:
            piece = F.pad(piece, (0, pad_w, 0, pad_h), mode="replicate")
        return rrdbnet(piece, weights, layout)[..., : height * layout.scale, : width * layout.scale]

    height, width = x.shape[-2:]
    if tile is None or (height <= tile and width <= tile):
        return run(x)
    scale = layout.scale
    out = x.new_zeros(x.shape[0], 3, height * scale, width * scale)
    for top in range(0, height, tile):
        for left in range(0, width, tile):
            if before_tile is not None:
                before_tile()
            bottom, right = min(top + tile, height), min(left + tile, width)
            y0, x0 = max(top - overlap, 0), max(left - overlap, 0)
            piece = run(x[..., y0 : min(bottom + overlap, height), x0 : min(right + overlap, width)])
            out[..., top * scale : bottom * scale, left * scale : right * scale] = piece[
                ..., (top - y0) * scale : (bottom - y0) * scale, (left - x0) * scale : (right - x0) * scale
            ]
    return out


def upscale_images(images: list, size: tuple[int, int], name: str, models, device, progress=None) -> list:
    """Each PIL image upscaled by the named model (on `device`, float32), again while it is smaller than `size`
    (as A1111: an x2 model for hr_scale 4 runs twice; three passes at most), then resized to exactly `size`
    with Lanczos (the hires fix's target)."""
    import numpy as np
    import torch
    from PIL import Image

    settings = models.settings
    path = resolve_upscaler(name, settings)
    layout, weights = models.upscaler_files.get(path, settings.allow_pickle)
    weights = {key: value.to(device) for key, value in weights.items()}
    before_tile = progress.raise_if_cancelled if progress is not None else None

    def once(image: Image.Image) -> Image.Image:
        pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)[None]
        with torch.inference_mode():
            try:
                out = upscale_tensor(pixels.to(device), weights, layout, before_tile=before_tile)
            except RuntimeError as error:  # shapes inside the file that do not fit together
                raise StudioInputError(f"upscaler {quote(path.stem)} ({path}) could not run: {error}") from None
        return Image.fromarray((out[0].clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8))

    upscaled = []
    for image in images:
        for _ in range(3 if layout.scale > 1 else 1):
            if image.width >= size[0] and image.height >= size[1]:
                break
            image = once(image)
        upscaled.append(image.resize(size, Image.LANCZOS))
    return upscaled
