"""LoRAs: A1111's `<lora:NAME:WEIGHT>` prompt syntax, finding LoRA files in the models folders, and applying
them to a loaded model for one call through diffusers' own loader (`load_lora_weights`, PEFT backend).

Light to import (no torch at the top): `prepare_loras` runs in `Studio.run` step 0, before any model loads;
`loras_applied` runs in the task, around the sampling call, and always takes the LoRAs out again.
"""

from __future__ import annotations

import contextlib
import re
import time
from pathlib import Path

from .add_on_files import NO_MODELS_FOLDER, FileCache, looks_like_path, refuse_paths_on_a_server, refuse_pickle
from .requests import BaseRequest, LoraRef, StudioInputError, quote
from .settings import Settings

LORA_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".pt", ".ckpt", ".bin", ".pth")

# <lora:NAME>, <lora:NAME:WEIGHT> or A1111's <lora:NAME:TE_WEIGHT:UNET_WEIGHT> (the first weight is used).
LORA_TAG = re.compile(r"<lora:([^:<>]+)(?::([^:<>]*))?(?::[^<>]*)?>", re.IGNORECASE)

# Tasks whose pipelines cannot take LoRAs, with the reason.
LORA_REFUSED_TASKS = {"imagic": "imagic fine-tunes its own copy of the UNet; LoRAs are not supported there"}


def extract_prompt_loras(prompt: str) -> tuple[str, list[LoraRef]]:
    """The prompt without its `<lora:NAME:WEIGHT>` tags (CLIP never sees them), and one LoraRef per tag."""
    found = []

    def take(match: re.Match) -> str:
        name, weight = match.group(1).strip(), (match.group(2) or "").strip()
        try:
            value = float(weight) if weight else 1.0
        except ValueError:
            raise StudioInputError(f"LoRA tag {quote(match.group(0))}: weight {quote(weight)} is not a number") from None
        try:
            found.append(LoraRef(name_or_path=name, weight=value))
        except ValueError as error:  # pydantic's ValidationError: the weight's bounds
            raise StudioInputError(f"LoRA tag {quote(match.group(0))}: weight must be between -4 and 4") from error
        return " "

    if "<" not in prompt:
        return prompt, []
    text = LORA_TAG.sub(take, prompt)
    if not found:
        return prompt, []
    text = re.sub(r"[ \t]{2,}", " ", text)
    text = re.sub(r"\s+,", ",", text)
    text = re.sub(r"(,\s*){2,}", ", ", text)
    return text.strip().strip(",").strip(), found


def parse_lora_argument(value: str) -> dict:
    """`--lora NAME_OR_PATH[:WEIGHT]` as a `loras` entry (a Windows drive's colon is not a weight)."""
    head, sep, tail = value.rpartition(":")
    if sep and head:
        try:
            return {"name_or_path": head, "weight": float(tail)}
        except ValueError:
            pass
    return {"name_or_path": value}


def _looks_like_path(value: str) -> bool:
    return looks_like_path(value, LORA_SUFFIXES + PICKLE_SUFFIXES)


def resolve_lora(name_or_path: str, settings: Settings) -> Path:
    """The LoRA file a reference points at: a path that must exist, or a name looked up as
    `<models_dir>/Lora/<name>.safetensors` then `<models_dir>/<name>.safetensors` (when its keys are a LoRA's)
    in each models folder."""
    value = name_or_path.strip()
    if _looks_like_path(value):
        refuse_paths_on_a_server(value, settings, "LoRA", "LoRAs")
        path = Path(value).expanduser()
        if not path.is_file():
            raise StudioInputError(f"LoRA {quote(value)} not found: no such file")
        refuse_pickle(path, settings, "LoRA", value, PICKLE_SUFFIXES)
        if path.suffix.lower() not in LORA_SUFFIXES + PICKLE_SUFFIXES:
            raise StudioInputError(f"LoRA {quote(value)} is not a .safetensors file")
        return path.resolve()
    from .models import flat_layout_file

    looked = []
    for root in settings.models_dirs:
        root = Path(root).expanduser()
        in_folder, flat = root / "Lora" / f"{value}.safetensors", root / f"{value}.safetensors"
        looked += [str(in_folder), str(flat)]
        if in_folder.is_file():
            return in_folder.resolve()
        if flat_layout_file(root, value, "lora"):  # only when its keys say LoRA (not an embedding beside it)
            return flat.resolve()
    where = "; looked for " + ", ".join(looked) if looked else NO_MODELS_FOLDER
    raise StudioInputError(f"LoRA {quote(value)} not found{where}")


def lora_hash(path: Path, settings: Settings) -> str:
    """The file's short SHA-256 (10 hex digits, like the model hash); cached by path, size and mtime."""
    from .models import ModelRef, weights_hash

    return weights_hash(ModelRef("single_file", str(path), path.stem), settings.hash_cache)


def lora_display_name(ref: LoraRef) -> str:
    """What A1111's `Lora hashes` and `<lora:...>` call a LoRA: its file name without the suffix."""
    return Path(ref.name_or_path).stem if _looks_like_path(ref.name_or_path) else ref.name_or_path


def prepare_loras(request: BaseRequest, settings: Settings) -> BaseRequest:
    """Step 0 of a request: `<lora:...>` tags moved from the prompt into `loras`, each LoRA found (a clear error
    naming it and where it looked when it is not), and its hash filled in; nothing is loaded."""
    prompt, tagged = extract_prompt_loras(request.prompt)
    loras = list(request.loras) + tagged
    if not loras:
        return request
    refused = LORA_REFUSED_TASKS.get(request.task)
    if refused:
        raise StudioInputError(f"{refused} (asked for {', '.join(quote(ref.name_or_path) for ref in loras)})")
    resolved = []
    for ref in loras:
        path = resolve_lora(ref.name_or_path, settings)
        name_or_path = ref.name_or_path if not _looks_like_path(ref.name_or_path) else str(path)
        resolved.append(ref.model_copy(update={"name_or_path": name_or_path, "hash": lora_hash(path, settings)}))
    return request.model_copy(update={"prompt": prompt, "loras": resolved})


# -- loading --------------------------------------------------------------------------------------------

MAX_CACHED_LORAS = 8  # state dicts kept in memory (a LoRA is a few to a few hundred MB)


class LoraFiles(FileCache):
    """LoRA files' tensors, read once per file version; the last few kept in memory."""

    def __init__(self, capacity: int = MAX_CACHED_LORAS):
        super().__init__(read_lora_file, capacity)
        self.load_seconds: dict[str, float] = {}  # the last load time of each file (reading + applying)

    def state_dict(self, path: Path, allow_pickle: bool = False) -> dict:
        return self.get(path, allow_pickle)


def read_lora_file(path: Path, allow_pickle: bool = False) -> dict:
    """The LoRA's tensors from disk (safetensors; a pickle only with the opt-in, with weights_only)."""
    if path.suffix.lower() in LORA_SUFFIXES:
        from safetensors.torch import load_file

        return load_file(str(path))
    if not allow_pickle:
        raise StudioInputError(f"LoRA {quote(str(path))} is a pickle; opt in with --allow-pickle")
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


@contextlib.contextmanager
def loras_applied(loaded, loras: list[LoraRef], settings: Settings, files: LoraFiles):
    """Load `loras` into the loaded model's base pipeline (whose UNet and text encoders every derived pipeline
    shares) with their weights, and take them all out again on exit: the cached model is left as it was."""
    if not loras:
        yield
        return
    pipe = loaded.pipe
    names = []
    attempted = False
    # PEFT freezes every parameter of the models it touches; the cached model gets its flags back on exit.
    flags = [(param, param.requires_grad) for module in _modules(pipe) for param in module.parameters()]
    try:
        for index, ref in enumerate(loras):
            started = time.perf_counter()
            path = resolve_lora(ref.name_or_path, settings)
            state = dict(files.state_dict(path, settings.allow_pickle))  # the loader may pop keys: a shallow copy
            name = f"studio_lora_{index}"
            display = lora_display_name(ref)
            attempted = True
            try:
                pipe.load_lora_weights(state, adapter_name=name)
            except (ValueError, RuntimeError, KeyError, IndexError, TypeError, AttributeError) as error:
                raise StudioInputError(
                    f"LoRA {quote(display)} does not fit model {quote(loaded.ref.name)} "
                    f"({type(pipe).__name__}): {_short(error)}"
                ) from None
            adapters = pipe.get_list_adapters() if hasattr(pipe, "get_list_adapters") else {}
            if not any(name in found for found in adapters.values()):
                raise StudioInputError(
                    f"LoRA {quote(display)} does not fit model {quote(loaded.ref.name)} ({type(pipe).__name__}): "
                    "none of its keys match the model's layers (a LoRA for another architecture?)"
                )
            names.append(name)
            files.load_seconds[str(path)] = time.perf_counter() - started
        pipe.set_adapters(names, [ref.weight for ref in loras])
        yield
    finally:
        if attempted:
            try:
                pipe.unload_lora_weights()  # the PEFT layers out again: the base modules, weights untouched
            finally:
                for param, requires_grad in flags:
                    param.requires_grad_(requires_grad)


def _modules(pipe) -> list:
    import torch

    return [module for module in pipe.components.values() if isinstance(module, torch.nn.Module)]


def _short(error: Exception, limit: int = 300) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[:limit] + "…"
