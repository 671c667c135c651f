"""PNG metadata: an A1111-compatible `parameters` text and the studio's own JSON.

`parameters` is what common SD metadata readers (A1111's PNG info, Civitai, ComfyUI
loaders) show. The `studio` chunk holds the full request, the image's seed and
index in its batch, input hashes and an environment fingerprint, so that reading a
PNG back gives the request and replaying it on the same machine gives the same pixels.
"""

from __future__ import annotations

import io
import json
import platform
import re
import struct
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, PngImagePlugin

from .requests import MAX_SEED, BaseRequest, StudioInputError, image_field_names, parse_request, quote

STUDIO_KEY = "studio"
PARAMETERS_KEY = "parameters"
FORMAT_VERSION = 2  # 2: an Imagic request names its training_seed (format 1 trained from its first seed)


@dataclass
class ImageRecord:
    """What one output image carries about how it was made."""

    request: BaseRequest  # the request that made the image's batch
    image_index: int = 0  # which image of the batch this is
    seed: int = 0  # this image's own seed
    input_hashes: dict[str, str] = field(default_factory=dict)  # image field -> SHA-256 of its pixels
    model_name: str = ""  # the model reference as resolved
    model_hash: str = ""  # short hash of the model's weights (A1111 style, 10 hex digits)
    sampler: str = ""  # A1111 sampler name
    environment: dict = field(default_factory=dict)  # versions, device, dtype


def environment_fingerprint(device: str, dtype: str) -> dict:
    import diffusers
    import torch

    from . import __version__

    return {
        "studio": __version__,
        "diffusers": diffusers.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": device,
        "dtype": dtype,
    }


def request_to_json(request: BaseRequest) -> dict:
    """The request as plain JSON; in-memory images become null (their hash is kept in input_hashes)."""
    data = request.model_dump(mode="python")
    for name in image_field_names(type(request)):
        if name in data and data[name] is not None:
            data[name] = str(data[name]) if isinstance(data[name], (str, Path)) else None
    return json.loads(json.dumps(data))


def _format_number(value: float) -> str:
    return f"{value:g}"


# The hires fix's upscalers (text_to_image's hr_upscaler) as A1111 names them.
HIRES_UPSCALERS = {"lanczos": "Lanczos", "nearest": "Nearest", "latent": "Latent"}


def a1111_parameters(record: ImageRecord, width: int, height: int) -> str:
    """The text A1111 writes into its `parameters` chunk."""
    request = record.request
    fields = [
        ("Steps", str(request.num_inference_steps)),
        ("Sampler", record.sampler),
        ("CFG scale", _format_number(request.guidance_scale)),
        ("Seed", str(record.seed)),
        ("Size", f"{width}x{height}"),
        ("Model hash", record.model_hash),
        ("Model", record.model_name),
    ]
    vae = getattr(request, "vae", None)
    if vae is not None:  # A1111's form: VAE hash: <10 hex>, VAE: <file name>
        from .vae import vae_display_name

        fields += [("VAE hash", vae.hash or ""), ("VAE", vae_display_name(vae))]
    strength = getattr(request, "strength", None)
    if strength is not None:
        fields.append(("Denoising strength", _format_number(strength)))
    hr_scale = getattr(request, "hr_scale", None)
    if hr_scale is not None:  # A1111's hires fix lines; its Size is the first pass's
        sides = ((request.width, width), (request.height, height))
        base = [given or max(64, round(side / hr_scale / 8) * 8) for given, side in sides]
        fields = [("Size", f"{base[0]}x{base[1]}") if key == "Size" else (key, value) for key, value in fields]
        fields += [
            ("Denoising strength", _format_number(request.hr_denoising_strength)),
            ("Hires upscale", _format_number(hr_scale)),
            ("Hires steps", str(request.hr_steps) if request.hr_steps else ""),
            ("Hires upscaler", HIRES_UPSCALERS.get(request.hr_upscaler.name, request.hr_upscaler.name)),
            ("Hires upscaler hash", request.hr_upscaler.hash or ""),  # an upscaler model's, as the add-ons'
        ]
    if request.task != "text_to_image":
        fields.append(("Task", request.task))
    loras = getattr(request, "loras", None) or []
    if loras:  # A1111's form: Lora hashes: "name: hash, name: hash"
        from .loras import lora_display_name

        fields.append(("Lora hashes", ", ".join(f"{lora_display_name(ref)}: {ref.hash or ''}" for ref in loras)))
    embeddings = getattr(request, "embeddings", None) or []
    if embeddings:  # A1111's form: TI hashes: "name: hash, name: hash"
        from .embeddings import embedding_display_name

        fields.append(("TI hashes", ", ".join(f"{embedding_display_name(ref)}: {ref.hash or ''}" for ref in embeddings)))
    fields.append(("Version", f"studio {record.environment.get('studio', '')}".strip()))
    # A1111 quotes values containing commas or colons.
    settings_line = ", ".join(f"{key}: {json.dumps(value) if re.search(r'[,:]', value) else value}" for key, value in fields if value)
    text = request.prompt
    if loras:  # A1111 keeps the tags in its prompt text; the studio's record keeps them in `loras`
        from .loras import lora_display_name

        tags = " ".join(f"<lora:{lora_display_name(ref)}:{_format_number(ref.weight)}>" for ref in loras)
        text = f"{text} {tags}" if text else tags
    if request.negative_prompt:
        text += f"\nNegative prompt: {request.negative_prompt}"
    return f"{text}\n{settings_line}"


def record_to_json(record: ImageRecord) -> dict:
    """The record as plain JSON: what the `studio` chunk stores and what `studio info` prints."""
    return {
        "request": request_to_json(record.request),
        "image_index": record.image_index,
        "seed": record.seed,
        "input_hashes": record.input_hashes,
        "model": {"name": record.model_name, "hash": record.model_hash},
        "sampler": record.sampler,
        "environment": record.environment,
    }


def png_bytes(image: Image.Image, record: ImageRecord) -> bytes:
    """Encode an image as PNG with both metadata chunks."""
    info = PngImagePlugin.PngInfo()
    info.add_text(PARAMETERS_KEY, a1111_parameters(record, image.width, image.height))
    payload = {"format": FORMAT_VERSION, **record_to_json(record)}
    info.add_itxt(STUDIO_KEY, json.dumps(payload, sort_keys=True))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def read_record(path: Path, tasks=None) -> ImageRecord:
    """The record stored in a studio PNG; A1111 PNGs (parameters only) give a best-effort request.

    Whatever the file holds, the answer is a record or a StudioInputError naming what is wrong.
    `tasks`: the task registry its request may belong to (default: the built-in tasks).
    """
    text = _png_text(Path(path))
    if STUDIO_KEY in text:
        return _record_from_payload(_load_payload(text[STUDIO_KEY], path), path, tasks)
    if PARAMETERS_KEY in text:
        return parse_a1111_parameters(text[PARAMETERS_KEY])
    raise StudioInputError(f"{str(path)!r} has no generation metadata")


# A PNG's text chunks are read without decoding its pixels when they come before them (as every PNG
# writer puts them); only an image this small is decoded to look for chunks after the pixels.
MAX_DECODED_PIXELS = 4096 * 4096
# What a forged or damaged image file can make PIL raise while its header and chunks are read.
_UNREADABLE = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error, Image.DecompressionBombError,
               Image.DecompressionBombWarning)


def _png_text(path: Path) -> dict[str, str]:
    """The text chunks of a PNG (empty for other images); decompression bombs are refused."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                if not isinstance(image, PngImagePlugin.PngImageFile):
                    return {}
                text = {key: value for key, value in image.info.items() if key in (STUDIO_KEY, PARAMETERS_KEY)}
                if not text and image.width * image.height <= MAX_DECODED_PIXELS:
                    text = dict(image.text)
                return {key: str(value) for key, value in text.items() if isinstance(value, str)}
    except FileNotFoundError:
        raise StudioInputError(f"image {str(path)!r} does not exist") from None
    except _UNREADABLE:
        raise StudioInputError(f"{str(path)!r} is not a readable image (or it is too large)") from None


def _load_payload(text: str, path: Path):
    try:
        return json.loads(text)
    except (ValueError, RecursionError):  # bad JSON, numbers past the digit limit, absurd nesting
        raise StudioInputError(f"{str(path)!r} has a damaged studio metadata chunk") from None


def _record_from_payload(payload, path: Path, tasks=None) -> ImageRecord:
    """Check the shape of a `studio` chunk's JSON and build its record; a forged chunk is a StudioInputError."""
    where = f"the studio metadata of {str(path)!r}"
    if not isinstance(payload, dict):
        raise StudioInputError(f"{where} is not a JSON object")
    if "request" not in payload:
        raise StudioInputError(f"{where} has no request")
    try:
        request = (tasks.parse_request if tasks else parse_request)(_in_this_format(payload, where))
    except StudioInputError as error:
        raise StudioInputError(f"{where}: {error}") from None
    model = _typed(payload, "model", dict, {}, where)
    return ImageRecord(
        request=request,
        image_index=_whole_number(payload, "image_index", 0, request.batch_size - 1, where),
        seed=_whole_number(payload, "seed", 0, MAX_SEED, where),
        input_hashes=_input_hashes(payload, request, where),
        model_name=_typed(model, "name", str, "", where),
        model_hash=_typed(model, "hash", str, "", where),
        sampler=_typed(payload, "sampler", str, "", where),
        environment=_typed(payload, "environment", dict, {}, where),
    )


def _in_this_format(payload: dict, where: str):
    """The request of a record written in an earlier format, as this format says it (so that it replays)."""
    request = payload["request"]
    written_in = _whole_number(payload, "format", 1, 2**31, where)
    if written_in < 2 and isinstance(request, dict) and request.get("task") == "imagic":
        seed = request.get("seed")
        first = seed[0] if isinstance(seed, list) and seed else seed
        if isinstance(first, int):  # Imagic's training was seeded by the request's first seed
            request = {"training_seed": first, **request}
    return request


_KINDS = {dict: "a JSON object", str: "a string", int: "a whole number"}


def _typed(data: dict, key: str, kind: type, default, where: str):
    value = data.get(key, default)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise StudioInputError(f"{where}: {key} must be {_KINDS[kind]}, got {quote(value)}")
    return value


def _whole_number(data: dict, key: str, default: int, high: int, where: str) -> int:
    value = _typed(data, key, int, default, where)
    if not 0 <= value <= high:
        raise StudioInputError(f"{where}: {key} must be between 0 and {high}, got {quote(value)}")
    return value


def _input_hashes(payload: dict, request: BaseRequest, where: str) -> dict[str, str]:
    hashes = _typed(payload, "input_hashes", dict, {}, where)
    for name, digest in hashes.items():
        if name not in image_field_names(type(request)):
            raise StudioInputError(f"{where}: input_hashes names {quote(name)}, not an input image of {request.task}")
        if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise StudioInputError(f"{where}: input_hashes.{name} is not a SHA-256 hex digest: {quote(digest)}")
    return dict(hashes)


_SETTING = re.compile(r'\s*([\w \-/+]+):\s*("(?:\\.|[^"])*"|[^,]*)(?:,|$)')


def parse_a1111_parameters(text: str) -> ImageRecord:
    """Parse A1111's `parameters` text (prompt, `Negative prompt:`, settings line) into a record."""
    lines = text.strip().split("\n")
    settings_line = lines.pop() if lines and re.match(r"^\s*Steps:", lines[-1]) else ""
    prompt_lines, negative_lines, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:") :].strip()
        (negative_lines if in_negative else prompt_lines).append(line)
    settings = {key.strip(): _unquote(value) for key, value in _SETTING.findall(settings_line)}
    data: dict = {"prompt": "\n".join(prompt_lines), "negative_prompt": "\n".join(negative_lines)}
    seed = 0
    if "Steps" in settings:
        data["num_inference_steps"] = _number(settings, "Steps", int)
    if "CFG scale" in settings:
        data["guidance_scale"] = _number(settings, "CFG scale", float)
    if "Seed" in settings:
        seed = _number(settings, "Seed", int)
        data["seed"] = seed
    if "Size" in settings:
        size = re.fullmatch(r"([0-9]{1,6})x([0-9]{1,6})", settings["Size"].lower())
        if not size:
            raise StudioInputError(f"parameters: Size must be WIDTHxHEIGHT, got {quote(settings['Size'])}")
        data["width"], data["height"] = int(size[1]), int(size[2])
    if "Hires upscale" in settings:  # A1111's hires fix (an upscaler model without a hash line reads as Lanczos)
        data["hr_scale"] = _number(settings, "Hires upscale", float)
        if "Hires steps" in settings:
            data["hr_steps"] = _number(settings, "Hires steps", int)
        if "Denoising strength" in settings:
            data["hr_denoising_strength"] = _number(settings, "Denoising strength", float)
        upscaler = {name: key for key, name in HIRES_UPSCALERS.items()}.get(settings.get("Hires upscaler", ""))
        if upscaler is not None:
            data["hr_upscaler"] = upscaler
        elif settings.get("Hires upscaler", "").lower().startswith("latent"):
            data["hr_upscaler"] = "latent"  # A1111's "Latent (bicubic)", "Latent (nearest)", ...
        elif settings.get("Hires upscaler hash"):  # the studio's own line: an upscaler model, found by name
            data["hr_upscaler"] = settings["Hires upscaler"]
    sampler = settings.get("Sampler", "")
    from .schedulers import SCHEDULERS

    for name, choice in SCHEDULERS.items():
        if choice.a1111_name == sampler:
            data["scheduler"] = name
    try:
        request = parse_request(data)
    except StudioInputError as error:
        raise StudioInputError(f"parameters: {error}") from None
    return ImageRecord(
        request=request,
        seed=seed,
        model_name=settings.get("Model", ""),
        model_hash=settings.get("Model hash", ""),
        sampler=sampler,
    )


def _unquote(value: str) -> str:
    if value.startswith('"'):
        try:
            return json.loads(value)
        except ValueError:  # a bad escape: keep the text between the quotes
            return value[1:-1]
    return value.strip()


def _number(settings: dict, key: str, kind: type):
    try:
        return kind(settings[key])
    except ValueError:  # not a number, or past Python's 4300-digit limit
        raise StudioInputError(f"parameters: {key} must be a number, got {quote(settings[key])}") from None
