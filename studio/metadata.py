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
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, PngImagePlugin

from .requests import IMAGE_FIELDS, BaseRequest, StudioInputError, parse_request

STUDIO_KEY = "studio"
PARAMETERS_KEY = "parameters"
FORMAT_VERSION = 1


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
    for name in IMAGE_FIELDS:
        if name in data and data[name] is not None:
            data[name] = str(data[name]) if isinstance(data[name], (str, Path)) else None
    return json.loads(json.dumps(data))


def _format_number(value: float) -> str:
    return f"{value:g}"


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
    strength = getattr(request, "strength", None)
    if strength is not None:
        fields.append(("Denoising strength", _format_number(strength)))
    if request.task != "text_to_image":
        fields.append(("Task", request.task))
    fields.append(("Version", f"studio {record.environment.get('studio', '')}".strip()))
    # A1111 quotes values containing commas or colons.
    settings_line = ", ".join(f"{key}: {json.dumps(value) if re.search(r'[,:]', value) else value}" for key, value in fields if value)
    text = request.prompt
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


def read_record(path: Path) -> ImageRecord:
    """The record stored in a studio PNG; A1111 PNGs (parameters only) give a best-effort request."""
    try:
        with Image.open(path) as image:
            text = dict(image.text) if hasattr(image, "text") else {}
    except FileNotFoundError:
        raise StudioInputError(f"image {str(path)!r} does not exist") from None
    except OSError:
        raise StudioInputError(f"{str(path)!r} is not a readable image") from None
    if STUDIO_KEY in text:
        try:
            payload = json.loads(text[STUDIO_KEY])
        except json.JSONDecodeError:
            raise StudioInputError(f"{str(path)!r} has a damaged studio metadata chunk") from None
        return ImageRecord(
            request=parse_request(payload["request"]),
            image_index=int(payload.get("image_index", 0)),
            seed=int(payload.get("seed", 0)),
            input_hashes=dict(payload.get("input_hashes", {})),
            model_name=payload.get("model", {}).get("name", ""),
            model_hash=payload.get("model", {}).get("hash", ""),
            sampler=payload.get("sampler", ""),
            environment=dict(payload.get("environment", {})),
        )
    if PARAMETERS_KEY in text:
        return parse_a1111_parameters(text[PARAMETERS_KEY])
    raise StudioInputError(f"{str(path)!r} has no generation metadata")


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
    settings = {}
    for key, value in _SETTING.findall(settings_line):
        settings[key.strip()] = json.loads(value) if value.startswith('"') else value.strip()
    data: dict = {"prompt": "\n".join(prompt_lines), "negative_prompt": "\n".join(negative_lines)}
    seed = 0
    if "Steps" in settings:
        data["num_inference_steps"] = int(settings["Steps"])
    if "CFG scale" in settings:
        data["guidance_scale"] = float(settings["CFG scale"])
    if "Seed" in settings:
        seed = int(settings["Seed"])
        data["seed"] = seed
    if "Size" in settings:
        width, height = settings["Size"].lower().split("x")
        data["width"], data["height"] = int(width), int(height)
    sampler = settings.get("Sampler", "")
    from .schedulers import SCHEDULERS

    for name, choice in SCHEDULERS.items():
        if choice.a1111_name == sampler:
            data["scheduler"] = name
    return ImageRecord(
        request=parse_request(data),
        seed=seed,
        model_name=settings.get("Model", ""),
        model_hash=settings.get("Model hash", ""),
        sampler=sampler,
    )
