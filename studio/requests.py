"""The one typed request schema every entry point speaks.

The CLI builds these from flags, a batch line is one of them as JSON, the PNG
metadata stores one, and the UI/API sends one. Validation happens here, before
any model is loaded, and every error quotes the bad value.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal, Union, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# Friendly scheduler names; studio.schedulers maps them onto diffusers classes.
SCHEDULER_NAMES = (
    "euler",
    "euler_a",
    "heun",
    "lms",
    "lms_karras",
    "dpm++_2m",
    "dpm++_2m_karras",
    "dpm++_2m_sde",
    "dpm++_2m_sde_karras",
    "dpm++_sde",
    "dpm++_sde_karras",
    "dpm2",
    "dpm2_a",
    "ddim",
    "ddpm",
    "pndm",
    "unipc",
    "deis",
    "lcm",
    "tcd",
)

MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed accepts [0, 2**64)
MAX_PROMPT_CHARS = 200_000  # longer prompts are refused; anything past the tokenizer limit is truncated with a warning
MAX_BATCH_SIZE = 16
MAX_SIDE = 2048

# An input image: a path (CLI, batch, API) or an in-memory PIL image (Python API).
ImageInput = Union[str, Path, Any]


class StudioInputError(ValueError):
    """Bad input, found before any model runs; the message names the bad value."""


QUOTE_CHARS = 80  # a quoted value longer than this is cut, so that a huge input never fills a message


def quote(value: Any, limit: int = QUOTE_CHARS) -> str:
    """repr(value) for an error message, cut to `limit` characters with the full length noted."""
    try:
        text = repr(value)
    except ValueError:  # an int past Python's 4300-digit conversion limit
        return f"<a {value.bit_length()}-bit number>"
    if len(text) <= limit:
        return text
    size = len(value) if isinstance(value, str) else len(text)
    return f"{text[:limit]}… ({size} characters)"


def _is_number(annotation) -> bool:
    """int, float, or a union or list holding one (`int | None`, `int | list[int] | None`)."""
    return annotation in (int, float) or any(_is_number(arg) for arg in get_args(annotation))


def _holds_bool(value) -> bool:
    return isinstance(value, bool) or (isinstance(value, list) and any(isinstance(item, bool) for item in value))


class LoraRef(BaseModel):
    """One LoRA applied to the request's model: a name in the models folders' `Lora/` (or the folder itself),
    or a path to a `.safetensors` file, with its weight."""

    model_config = ConfigDict(extra="forbid")

    name_or_path: str = Field(
        ...,
        min_length=1,
        max_length=1000,
        description="A LoRA's name (<models_dir>/Lora/<name>.safetensors or <models_dir>/<name>.safetensors) "
        "or a path to a .safetensors file.",
    )
    weight: float = Field(1.0, ge=-4.0, le=4.0, allow_inf_nan=False, description="How strongly it applies (0: not at all).")
    hash: str | None = Field(
        None, max_length=64, description="Filled by the studio: the file's short SHA-256, as A1111's `Lora hashes`."
    )

    @field_validator("weight", mode="before")
    @classmethod
    def _weight_is_not_a_boolean(cls, value):
        if isinstance(value, bool):
            raise ValueError(f"weight must be a number, got {quote(value)}")
        return value


class EmbeddingRef(BaseModel):
    """One textual inversion embedding for the request: a name in the models folders' `embeddings/` or a path,
    and the prompt word that calls it (default: the file's name, as A1111; a diffusers file's own token)."""

    model_config = ConfigDict(extra="forbid")

    name_or_path: str = Field(
        ...,
        min_length=1,
        max_length=1000,
        description="An embedding's name (<models_dir>/embeddings/<name>.safetensors) or a path to its file.",
    )
    token: str | None = Field(
        None,
        min_length=1,
        max_length=100,
        pattern=r"^[^\s,()\[\]:]+$",
        description="The prompt word that calls the embedding; None: the file's name (or a diffusers file's token).",
    )
    hash: str | None = Field(
        None, max_length=64, description="Filled by the studio: the file's short SHA-256, as A1111's `TI hashes`."
    )


class VaeRef(BaseModel):
    """A VAE used instead of the model's own: a name in the models folders' `VAE/` or a path (a single
    .safetensors file or a diffusers AutoencoderKL folder)."""

    model_config = ConfigDict(extra="forbid")

    name_or_path: str = Field(
        ..., min_length=1, max_length=1000, description="A VAE's name (<models_dir>/VAE/<name>) or a path."
    )
    hash: str | None = Field(
        None, max_length=64, description="Filled by the studio: the weights' short SHA-256, as A1111's `VAE hash`."
    )


class BaseRequest(BaseModel):
    """Fields shared by every task."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, arbitrary_types_allowed=True)

    prompt: str = Field("", max_length=MAX_PROMPT_CHARS, description="What to draw.")
    negative_prompt: str = Field("", max_length=MAX_PROMPT_CHARS, description="What to steer away from.")
    seed: int | list[int] | None = Field(
        None,
        description="Seed of the first image (later images use seed+1, seed+2, ...), or one seed per image; "
        "None picks a random seed and records it.",
    )
    width: int | None = Field(
        None, ge=64, le=MAX_SIDE, multiple_of=8, description="Image width in pixels (multiple of 8); None: the model's."
    )
    height: int | None = Field(
        None, ge=64, le=MAX_SIDE, multiple_of=8, description="Image height in pixels (multiple of 8); None: the model's."
    )
    num_inference_steps: int = Field(25, ge=1, le=500, description="Denoising steps.")
    guidance_scale: float = Field(7.0, ge=0.0, le=50.0, description="Classifier-free guidance scale.")
    scheduler: str | None = Field(None, description="Sampler by friendly name; None keeps the model's own.")
    prediction_type: Literal["epsilon", "v_prediction"] | None = Field(
        None,
        description="What the model's UNet predicts; None: what the model says (SD 2.x single files that do not "
        "say are taken as 768-v, v_prediction: a 512-base file needs epsilon).",
    )
    batch_size: int = Field(1, ge=1, le=MAX_BATCH_SIZE, description="Images made from this request.")
    cache_interval: int | None = Field(
        None,
        ge=1,
        le=10,
        description="Step caching (DeepCache): run the whole UNet every this many steps and reuse its deep "
        "features in between (faster, slightly different images); None or 1: off.",
    )
    loras: list[LoraRef] = Field(
        default_factory=list,
        max_length=16,
        description="LoRAs applied for this request only, each a name or .safetensors path with a weight; "
        "A1111's <lora:NAME:WEIGHT> in the prompt adds one.",
    )
    embeddings: list[EmbeddingRef] = Field(
        default_factory=list,
        max_length=32,
        description="Textual inversion embeddings for this request, each a name or path with its prompt word; "
        "an embedding in the models folders' embeddings/ whose file name is a word of the prompt is added.",
    )
    vae: VaeRef | None = Field(
        None,
        description="A VAE instead of the model's own: a name in the models folders' VAE/, or a .safetensors file "
        "or diffusers VAE folder; None: the model's.",
    )
    model: str | None = Field(None, description="Model reference; None uses the studio's default.")
    output: str | None = Field(
        None, max_length=255, description="Output file name (batch/CLI); kept inside the output folder."
    )

    @model_validator(mode="before")
    @classmethod
    def _numbers_are_not_booleans(cls, data):
        # bool is an int in Python (and in pydantic's lax mode): `"seed": true` would otherwise be seed 1.
        if isinstance(data, dict):
            for name, value in data.items():
                if name in cls.model_fields and _is_number(cls.model_fields[name].annotation) and _holds_bool(value):
                    raise ValueError(f"{name} must be a number, got {quote(value)}")
        return data

    @field_validator("vae", mode="before")
    @classmethod
    def _vae_by_name(cls, value):
        # `--vae NAME`, `"vae": "NAME"`: a plain name or path is the usual way to give one.
        return {"name_or_path": value} if isinstance(value, (str, Path)) else value

    @field_validator("guidance_scale", mode="before")
    @classmethod
    def _finite_guidance(cls, value):
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"guidance_scale must be a finite number, got {value!r}")
        return value

    @field_validator("seed")
    @classmethod
    def _seed_range(cls, value):
        seeds = value if isinstance(value, list) else [value]
        for seed in seeds:
            if seed is not None and not 0 <= seed <= MAX_SEED:
                raise ValueError(f"seed must be between 0 and 2**64-1, got {quote(seed)}")
        return value

    @field_validator("scheduler")
    @classmethod
    def _known_scheduler(cls, value):
        if value is not None and value not in SCHEDULER_NAMES:
            raise ValueError(f"unknown scheduler {quote(value)}; choose one of: {', '.join(SCHEDULER_NAMES)}")
        return value

    @field_validator("prompt", "negative_prompt")
    @classmethod
    def _no_nul(cls, value: str):
        # Control characters never reach the tokenizer as anything meaningful; NUL breaks PNG text chunks.
        return value.replace("\x00", "")

    @model_validator(mode="after")
    def _seeds_match_batch(self):
        if isinstance(self.seed, list):
            if len(self.seed) == 0:
                raise ValueError("seed list is empty")
            if len(self.seed) != self.batch_size:
                if self.batch_size != 1:
                    raise ValueError(
                        f"seed list has {len(self.seed)} seeds but batch_size is {self.batch_size}"
                    )
                # A list of seeds alone sets the batch size.
                object.__setattr__(self, "batch_size", len(self.seed))
                if self.batch_size > MAX_BATCH_SIZE:
                    raise ValueError(f"seed list of {len(self.seed)} seeds exceeds the batch limit {MAX_BATCH_SIZE}")
        return self

    def image_fields(self) -> dict[str, Any]:
        """The task's input images that are set, by field name."""
        return {name: getattr(self, name) for name in image_field_names(type(self)) if getattr(self, name) is not None}


def image_field(default, description: str):
    """A request field holding an input image: a path (CLI, batch, API) or a PIL image (Python API).
    Entry points find a task's images by this mark (`image_field_names`)."""
    return Field(default, description=description, json_schema_extra={"studio_image": True})


def image_field_names(request_type: type[BaseRequest]) -> tuple[str, ...]:
    """The input-image fields of a request class, in declaration order."""
    return tuple(
        name
        for name, info in request_type.model_fields.items()
        if isinstance(info.json_schema_extra, dict) and info.json_schema_extra.get("studio_image")
    )


MAX_PROBLEMS_CHARS = 400  # problems past this length of message are counted, not listed


def describe_validation_error(error: ValidationError, tags: tuple[str, ...] = ()) -> str:
    """One readable line per problem: `field: message (got value)`; long values are cut, many problems counted.
    `tags`: a tagged union's tags (the task names), which pydantic puts first in a field's location."""
    lines = [_describe_problem(item, tags) for item in error.errors()]
    shown = lines[:1]
    for line in lines[1:]:
        if len("; ".join(shown + [line])) > MAX_PROBLEMS_CHARS:
            break
        shown.append(line)
    more = len(lines) - len(shown)
    return "; ".join(shown) + (f"; and {more} more problem{'s' * (more > 1)}" if more else "")


def _describe_problem(item: dict, tags: tuple[str, ...]) -> str:
    loc = [str(part)[:QUOTE_CHARS] for part in item["loc"]]
    if loc and loc[0] in tags:  # the union's tag adds nothing for the reader
        loc = loc[1:]
    where = ".".join(loc) or "request"
    message = item["msg"].removeprefix("Value error, ")
    got = item.get("input")
    if item["type"] in ("value_error", "assertion_error") or isinstance(got, dict):
        return f"{where}: {message}"
    return f"{where}: {message} (got {quote(got)})"


def parse_request(data) -> BaseRequest:
    """A request of any built-in task from plain data (a batch line, PNG metadata, an API body)."""
    from .tasks import parse_request  # the tasks' modules declare their request classes

    return parse_request(data)


def seeds_for(request: BaseRequest, random_seed: int) -> list[int]:
    """One seed per image: the listed seeds, or seed, seed+1, ... (random_seed when seed is None)."""
    if isinstance(request.seed, list):
        return list(request.seed)
    first = random_seed if request.seed is None else request.seed
    return [(first + i) % (MAX_SEED + 1) for i in range(request.batch_size)]
