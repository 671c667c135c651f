"""What a model recommends for the request fields a user leaves unset.

A model folder may carry `studio.json`, its own recommended settings:

    {"defaults": {"guidance_scale": 5.0, "num_inference_steps": 20},
     "tasks": {"imagic": {"eta": 1.5}}}

Without one, a preset for the model's family applies (SD 1.x, 2.x, SDXL, Turbo, LCM), told from the
folder's configs without loading anything. A field the request sets is never changed (a batch line,
an API body or a Python call sets only what it names), and the image's metadata records the value used.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .requests import BaseRequest, StudioInputError, describe_validation_error

RECOMMENDATIONS_FILE = "studio.json"

# The schema's own defaults are SD 1.x's (25 steps, CFG 7); a family differs where its authors say so.
FAMILY_PRESETS: dict[str, dict] = {
    "sd1": {},
    "sd2": {},
    "sdxl": {"guidance_scale": 6.0, "num_inference_steps": 30},
    "turbo": {"guidance_scale": 0.0, "num_inference_steps": 2},  # SD/SDXL-Turbo: 1-4 steps, no CFG
    "lcm": {"guidance_scale": 1.5, "num_inference_steps": 6, "scheduler": "lcm"},  # LCM: 4-8 steps, low CFG
}


@dataclass(frozen=True)
class Recommendations:
    source: str = ""  # where they come from: "studio.json", "the sdxl preset", or "" (none)
    defaults: dict = field(default_factory=dict)  # field -> value, for every task
    tasks: dict = field(default_factory=dict)  # task -> {field -> value}, over the defaults

    def for_task(self, task: str) -> dict:
        return {**self.defaults, **self.tasks.get(task, {})}


def recommendations_for(folder: Path | None, name: str = "") -> Recommendations:
    """The recommendations of a diffusers model folder (None: a single file or an uncached model: none)."""
    if folder is None:
        return Recommendations()
    own = folder / RECOMMENDATIONS_FILE
    if own.is_file():
        return _read_file(own, name)
    family = model_family(folder, name)
    preset = FAMILY_PRESETS.get(family, {})
    return Recommendations(f"the {family} preset", preset) if preset else Recommendations()


def recommendations_for_reference(reference: str | None) -> Recommendations:
    """The recommendations of "embedded" or a local diffusers folder, found without importing torch (the UI
    reads them as it builds its widgets); other references (hub ids, single files): none."""
    from .settings import EMBEDDED_MODEL_DIR

    folder = EMBEDDED_MODEL_DIR if reference in (None, "embedded") else Path(reference).expanduser()
    if not (folder / "model_index.json").is_file():
        return Recommendations()
    try:
        return recommendations_for(folder, "embedded" if folder == EMBEDDED_MODEL_DIR else folder.name)
    except StudioInputError:  # a broken studio.json: the UI starts at the schema's defaults, the run reports it
        return Recommendations()


def model_family(folder: Path, name: str = "") -> str:
    """sd1, sd2, sdxl, turbo or lcm, from the folder's configs and the model's name."""
    lowered = (name or folder.name).lower()
    scheduler = _json(folder / "scheduler" / "scheduler_config.json").get("_class_name", "")
    if scheduler == "LCMScheduler" or "lcm" in lowered:
        return "lcm"
    if "turbo" in lowered:
        return "turbo"
    if "XL" in str(_json(folder / "model_index.json").get("_class_name", "")):
        return "sdxl"
    return "sd2" if _json(folder / "unet" / "config.json").get("cross_attention_dim") == 1024 else "sd1"


def apply_recommendations(request: BaseRequest, recommendations: Recommendations) -> tuple[BaseRequest, dict]:
    """The request with the recommended value of every field it leaves unset; returns it and what changed."""
    fields = type(request).model_fields
    unset = {
        name: value
        for name, value in recommendations.for_task(request.task).items()
        if name in fields and name not in request.model_fields_set and getattr(request, name) != value
    }
    if not unset:
        return request, {}
    from pydantic import ValidationError

    try:
        return type(request).model_validate({**request.model_dump(), **unset}), unset
    except ValidationError as error:
        raise StudioInputError(
            f"the model's recommended settings ({recommendations.source}) are not valid: "
            f"{describe_validation_error(error)}"
        ) from None


def _read_file(path: Path, name: str) -> Recommendations:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise StudioInputError(f"{RECOMMENDATIONS_FILE} of model {name!r} cannot be read: {error}") from None
    defaults = data.get("defaults", {}) if isinstance(data, dict) else None
    tasks = data.get("tasks", {}) if isinstance(data, dict) else None
    if not isinstance(defaults, dict) or not isinstance(tasks, dict) or not all(isinstance(v, dict) for v in tasks.values()):
        raise StudioInputError(
            f"{RECOMMENDATIONS_FILE} of model {name!r} should hold {{'defaults': {{field: value}}, "
            "'tasks': {task: {field: value}}}"
        )
    return Recommendations(RECOMMENDATIONS_FILE, defaults, tasks)


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
