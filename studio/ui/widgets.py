"""Widgets from the request schema, the checks on what they hand over, and the images an editor holds."""

from __future__ import annotations

import types
import typing

import gradio as gr
import numpy as np
from PIL import Image, ImageChops
from studio_pipelines.masks import mask_from_image

from studio import server
from studio.images import check_image_header, open_image
from studio.requests import BaseRequest, StudioInputError

# Options for a quick event whose progress nobody needs to see: no loading state on any component. The page
# keeps one for each progress target (by default each output) of every event that has run, and re-renders
# them all on each later status message of any event, a layout's with all its children: the 66 widgets that
# follow the model cost each Run 50 ms of the page's time, a "send to" (the tabs among its outputs) tripled
# a Run's for the rest of the page's life.
NO_PROGRESS = {"show_progress": "hidden", "show_progress_on": []}


# -- what a widget hands over: checked by the schema, uploads only, headers before decoding --------


def schema_checked(component):
    """Let the request schema, not the widget, check the value: an out-of-range API value then gets an
    error naming the field (`num_inference_steps: ... (got 0)`) instead of gradio's anonymous bounds
    message. (Set on the instance: a Component subclass would make gradio write an app.pyi file.)"""
    precision = getattr(component, "precision", None)

    def preprocess(payload):
        if precision == 0 and isinstance(payload, float) and payload.is_integer():
            return int(payload)
        return payload

    component.preprocess = preprocess
    return component


def uploaded_file(component):
    """An image input that hands over the uploaded file itself, undecoded: `open_image` then checks it
    (pixel count from the header before any decoding, raster formats only) with a readable message.
    Gradio's own preprocessing would decode it first, and fail on a non-image with an anonymous error."""
    original = component.preprocess

    def preprocess(payload):
        if payload is not None and payload.path and not (payload.url or "").startswith("data:"):
            _require_uploaded(payload.path, component.label)
            return payload.path
        return _readable(original, payload, component.label)

    component.preprocess = preprocess
    return component


def uploaded_files(component):
    """A gr.File input that accepts only files uploaded to this server (never a path on its disk)."""
    original = component.preprocess

    def preprocess(payload):
        items = getattr(payload, "root", None) if payload is not None else None
        for item in items if isinstance(items, list) else [payload]:
            if item is not None and getattr(item, "path", None):
                _require_uploaded(item.path, component.label)
        return original(payload)

    component.preprocess = preprocess
    return component


def checked_editor(component, max_pixels: int):
    """An ImageEditor whose uploads are checked from their headers (`check_image_header`, as `open_image`
    does) before gradio decodes them."""
    original = component.preprocess

    def preprocess(payload):
        if payload is not None and getattr(payload, "id", None) is None:
            for item in [payload.background, payload.composite, *(payload.layers or [])]:
                if item is not None and item.path:
                    _require_uploaded(item.path, component.label)
                    try:
                        check_image_header(item.path, max_pixels=max_pixels, name=_what(component.label)).close()
                    except StudioInputError as error:
                        raise gr.Error(str(error), print_exception=False) from None
        value = _readable(original, payload, component.label)
        if value and payload.background is not None and payload.background.path:
            # The uploaded image decoded as the rest of the studio decodes images (EXIF rotation, 16-bit
            # greys scaled), not by gradio's plain convert("RGBA"); flattened on white, as gradio does.
            try:
                value["background"] = open_image(payload.background.path, max_pixels=max_pixels, name="image")
            except StudioInputError as error:
                raise gr.Error(str(error).replace(repr(payload.background.path), "the upload"), print_exception=False) from None
        return value

    component.preprocess = preprocess
    return component


def _require_uploaded(path: str, label) -> None:
    """RequestGuard already refuses file inputs that are not uploads; this holds even where a route
    bypasses it. The message is the same whether or not the path exists: it tells nothing of the disk."""
    from gradio.utils import get_upload_folder

    if not server.is_inside(path, get_upload_folder()):
        raise gr.Error(f"{_what(label)}: upload the file; paths on the server are not accepted", print_exception=False)


def _what(label) -> str:
    return str(label or "image").split(":")[0]


def _readable(preprocess, payload, label):
    try:
        return preprocess(payload)
    except gr.Error:
        raise
    except Exception:  # PIL's errors for non-images, damaged files and decompression bombs
        raise gr.Error(
            f"{_what(label)}: not a readable raster image (or it is too large)", print_exception=False
        ) from None


# -- a widget per request field --------------------------------------------------------------------


def FieldSlider(*args, **kwargs) -> gr.Slider:  # noqa: N802 - reads like the widget it makes
    return schema_checked(gr.Slider(*args, **kwargs))


def FieldNumber(*args, **kwargs) -> gr.Number:  # noqa: N802
    return schema_checked(gr.Number(*args, **kwargs))


def field_bounds(field) -> tuple[float | None, float | None]:
    """A request field's (lowest, highest) allowed value from its schema; None where unbounded."""
    low = high = None
    for item in field.metadata:
        for attr in ("ge", "gt"):
            if getattr(item, attr, None) is not None:
                low = getattr(item, attr)
        for attr in ("le", "lt"):
            if getattr(item, attr, None) is not None:
                high = getattr(item, attr)
    return low, high


def _zero_means_none(field) -> bool:
    low, _ = field_bounds(field)
    return low is not None and (low > 0 or any(getattr(item, "gt", None) == 0 for item in field.metadata))


def field_label(name: str) -> str:
    return name.replace("_", " ")


def _split_optional(annotation):
    """(inner type, optional?) for `X | None`."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [arg for arg in args if arg is not type(None)]
        return (rest[0] if len(rest) == 1 else annotation), True
    return annotation, False


def field_component(request_type: type[BaseRequest], name: str, **overrides) -> gr.components.Component:
    """A widget for one request field: its type, bounds, default and description come from the schema."""
    field = request_type.model_fields[name]
    default = None if field.is_required() else field.default
    task = request_type.model_fields["task"].default
    kwargs = {"label": field_label(name), "info": field.description, "value": default, "elem_id": f"{task}-{name}"}
    kind, optional = _split_optional(field.annotation)
    low, high = field_bounds(field)
    if typing.get_origin(kind) is typing.Literal:
        component = gr.Dropdown(choices=list(typing.get_args(kind)), **{**kwargs, **overrides})
    elif kind is bool:
        component = gr.Checkbox(**{**kwargs, **overrides})
    elif (
        kind in (int, float)
        and not optional
        and low is not None
        and high is not None
        and ((kind is int and high - low <= 512) or (kind is float and high - low <= 10 and not name.endswith("lr")))
    ):
        step = 1 if kind is int else 0.01
        component = FieldSlider(minimum=low, maximum=high, step=step, **{**kwargs, **overrides})
    elif kind in (int, float):
        if optional and _zero_means_none(field):
            kwargs["info"] = f"{field.description or ''} (0: not set)".strip()
        component = FieldNumber(precision=0 if kind is int else None, **{**kwargs, **overrides})
    else:
        component = gr.Textbox(lines=1, **{**kwargs, "value": default or ""} | overrides)
    return component


def request_value(request_type: type[BaseRequest], name: str, value):
    """A widget's value as the request field wants it (empty text or number -> None where None is allowed)."""
    field = request_type.model_fields[name]
    _, optional = _split_optional(field.annotation)
    if value is None and not optional and not field.is_required():
        return field.default  # an API client left the parameter out
    if optional and value == 0 and _zero_means_none(field):
        return None  # a number box cannot be empty: 0 stands for "not set" where 0 is not allowed
    if isinstance(value, str) and optional and not value.strip():
        return None
    if isinstance(value, float) and field.annotation is int and value.is_integer():
        return int(value)
    return value


# -- the images an ImageEditor holds ---------------------------------------------------------------


def editor_background(value) -> Image.Image | None:
    """The image under an ImageEditor's layers: what was uploaded (None when nothing was)."""
    if not value:
        return None
    if isinstance(value, dict):
        return value.get("background")
    return value


def editor_composite(value) -> Image.Image | None:
    """What an ImageEditor shows: background and strokes together."""
    if not value:
        return None
    if isinstance(value, dict):
        return value.get("composite") or value.get("background")
    return value


def editor_mask(value) -> Image.Image | None:
    """The painted area of an ImageEditor's layers as a white-on-black mask (None when nothing is painted).

    Each layer is read by the mask convention (`studio_pipelines.masks.mask_from_image`): strokes painted
    in the browser wherever there is paint; an opaque layer (an API client's mask image) where it is white.
    """
    if not isinstance(value, dict) or not value.get("layers"):
        return None
    mask = None
    for layer in value["layers"]:
        if layer is None:
            continue
        painted = Image.fromarray(mask_from_image(layer.convert("RGBA")).astype(np.uint8) * 255)  # mode L
        mask = painted if mask is None else ImageChops.lighter(mask, painted)
    if mask is None or mask.getbbox() is None:
        return None
    return mask
