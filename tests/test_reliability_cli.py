"""Attacks from the security review on the CLI, the request schema, PNG metadata and model loading,
each as a test with the attack as its input; and property-based fuzzing of the parsers that take
untrusted data (request JSON, PNG metadata, A1111 text)."""

import json
import re
import math
import shutil
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from helpers import counting_http_server as loopback_server
import torch
from hypothesis import event, given
from hypothesis import strategies as st
from PIL import Image, PngImagePlugin

from studio import Studio
from studio import core as studio_core
from studio.cli import main
from studio.metadata import ImageRecord, parse_a1111_parameters, png_bytes, read_record, record_to_json
from studio.models import ModelError, ModelManager
from studio.requests import BaseRequest, StudioInputError, parse_request
from studio.settings import Settings
from studio.tasks import default_registry

REQUEST_TYPES = {task.name: task.request_type for task in default_registry()}
TASKS = default_registry().names
IMAGE_FIELDS = tuple(dict.fromkeys(name for task in default_registry() for name in task.image_fields))

MAX_MESSAGE_CHARS = 600  # "a few hundred characters": what any StudioInputError may run to


# -- helpers --------------------------------------------------------------------------------------


@pytest.fixture
def no_model_loads(monkeypatch):
    """Loading any model fails the test: the refusal must come before it."""

    def refuse(self, reference):
        raise AssertionError(f"a model was loaded ({reference!r}) before the input was refused")

    monkeypatch.setattr(ModelManager, "get", refuse)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err


def png_with_text(path: Path, studio_text: str | None = None, parameters: str | None = None) -> Path:
    info = PngImagePlugin.PngInfo()
    if parameters is not None:
        info.add_text("parameters", parameters)
    if studio_text is not None:
        info.add_itxt("studio", studio_text)
    Image.new("RGB", (8, 8), "white").save(path, pnginfo=info)
    return path


def bomb_png(path: Path, width: int = 100_000, height: int = 100_000) -> Path:
    """A tiny file whose header claims width x height pixels (PIL refuses it on open)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    return path


def studio_with(**settings) -> Studio:
    return Studio(Settings(**settings))


def render(argv: list[str], capsys) -> None:
    assert main([*argv, "--steps", "2", "--quiet"]) == 0, capsys.readouterr().err


# -- 1. --allow-pickle only adds pickles -----------------------------------------------------------


def test_allow_pickle_still_loads_and_renders_safetensors_models(sd15_folder):
    studio = studio_with(model=str(sd15_folder), allow_pickle=True)
    result = studio.text_to_image("a red circle", seed=1, num_inference_steps=1)
    assert np.asarray(result.images[0]).std() > 0
    embedded = ModelManager(Settings(allow_pickle=True)).get("embedded")
    assert embedded.ref.kind == "embedded"


# -- 2. the CLI never rewrites a finished file unless told to --------------------------------------


def test_generate_refuses_to_replace_an_existing_file_before_loading_a_model(tmp_path, monkeypatch, capsys, no_model_loads):
    (tmp_path / "a" / "b").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "a" / "b")
    escaped = tmp_path / "escaped.png"
    escaped.write_bytes(b"precious")
    assert main(["generate", "x", "-o", "../../escaped.png"]) == 2
    err = one_line_error(capsys)
    assert "../../escaped.png" in err and "--overwrite" in err
    assert escaped.read_bytes() == b"precious"


@pytest.mark.parametrize(
    "argv, existing",
    [
        (["sketch", "x", "--control-image", "sketch.png"], "out.png"),
        (["inpaint", "x", "--image", "in.png", "--mask-image", "mask.png"], "out.png"),
        (["style", "x", "--image", "in.png"], "out.png"),
        (["imagic", "x", "--image", "in.png"], "out.png"),
        (["generate", "x", "-b", "2"], "out-2.png"),  # the second of the numbered names
        (["generate", "x", "--seed", "5", "6"], "out-2.png"),
    ],
)
def test_every_render_command_refuses_an_existing_output(argv, existing, tmp_path, monkeypatch, capsys, no_model_loads):
    monkeypatch.chdir(tmp_path)
    Path(existing).write_bytes(b"precious")
    assert main([*argv, "-o", "out.png"]) == 2
    assert existing in one_line_error(capsys)
    assert Path(existing).read_bytes() == b"precious"


def test_overwrite_flag_replaces_the_file(sd15_folder, tmp_path, capsys):
    out = tmp_path / "out.png"
    out.write_bytes(b"old")
    render(["generate", "x", "--model", str(sd15_folder), "--seed", "3", "-o", str(out), "--overwrite"], capsys)
    assert "Seed: 3" in Image.open(out).text["parameters"]


def test_seed_in_the_name_is_checked_once_the_seed_is_drawn(sd15_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(studio_core.secrets, "randbelow", lambda limit: 5)
    existing = tmp_path / "x-5.png"
    existing.write_bytes(b"precious")
    assert main(["generate", "x", "--model", str(sd15_folder), "--steps", "1", "-o", str(tmp_path / "x-{seed}.png"), "--quiet"]) == 2
    assert "x-5.png" in one_line_error(capsys)
    assert existing.read_bytes() == b"precious"


def test_default_names_never_collide_with_existing_files(sd15_folder, tmp_path, monkeypatch, capsys):
    import time

    monkeypatch.setattr(time, "strftime", lambda *args: "20250101-000000")
    monkeypatch.setenv("STUDIO_OUTPUTS", str(tmp_path))
    (tmp_path / "20250101-000000-4.png").write_bytes(b"precious")
    render(["generate", "x", "--model", str(sd15_folder), "--seed", "3", "4"], capsys)
    assert (tmp_path / "20250101-000000-4.png").read_bytes() == b"precious"
    assert {path.name for path in tmp_path.glob("*-2.png")} == {"20250101-000000-3-2.png", "20250101-000000-4-2.png"}


def test_replay_refuses_an_existing_output_before_loading_a_model(studio, tmp_path, capsys, monkeypatch):
    png = studio.text_to_image("x", seed=1, num_inference_steps=1).save(tmp_path / "original.png")[0]
    existing = tmp_path / "again.png"
    existing.write_bytes(b"precious")
    monkeypatch.setattr(ModelManager, "get", lambda self, reference: pytest.fail("a model was loaded"))
    assert main(["replay", str(png), "-o", str(existing)]) == 2
    assert "again.png" in one_line_error(capsys) and existing.read_bytes() == b"precious"


# -- 3. forged PNGs: one-line errors, never a traceback --------------------------------------------

REQUEST = {"prompt": "x", "num_inference_steps": 1}
FORGED_PAYLOADS = {
    "no request": {"image_index": 0, "seed": 1},
    "a list": [1, 2, 3],
    "a string": "hello",
    "task is a list": {"request": {"task": ["x"]}},
    "image_index is a string": {"request": REQUEST, "image_index": "1"},
    "seed is a float": {"request": REQUEST, "seed": 1.5},
    "seed is a bool": {"request": REQUEST, "seed": True},
    "seed is negative": {"request": REQUEST, "seed": -1},
    "format is null": {"request": REQUEST, "format": None},
    "format is a string": {"request": REQUEST, "format": "1"},
    "image_index past the batch": {"request": {**REQUEST, "seed": [1, 2]}, "image_index": 2},
    "input_hashes is a list": {"request": REQUEST, "input_hashes": ["image"]},
    "input_hashes names a field the task lacks": {"request": REQUEST, "input_hashes": {"image": "0" * 64}},
    "an input hash is not a hash": {"request": {**REQUEST, "task": "style_transfer", "image": "a.png"}, "input_hashes": {"image": 5}},
    "model is a string": {"request": REQUEST, "model": "tiny"},
    "environment is a list": {"request": REQUEST, "environment": []},
    "image is a number": {"request": {**REQUEST, "task": "inpaint", "image": 5}},
}


@pytest.mark.parametrize("command", ["info", "replay"])
@pytest.mark.parametrize("case", FORGED_PAYLOADS)
def test_forged_studio_metadata_is_a_one_line_error(case, command, tmp_path, capsys, no_model_loads):
    png = png_with_text(tmp_path / "forged.png", studio_text=json.dumps(FORGED_PAYLOADS[case]))
    argv = ["info", str(png)] if command == "info" else ["replay", str(png), "-o", str(tmp_path / "out.png")]
    assert main(argv) == 2
    one_line_error(capsys)


@pytest.mark.parametrize(
    "forged",
    [
        lambda path: bomb_png(path),
        lambda path: png_with_text(path, studio_text="{not json"),
        lambda path: png_with_text(path, studio_text="[" * 100_000),  # nesting past the recursion limit
        lambda path: png_with_text(path, studio_text='{"request": {}, "seed": 1' + "0" * 5000 + "}"),  # past the digit limit
        lambda path: png_with_text(path, parameters="a cat\nSteps: lots, Seed: 1e5, CFG scale: high, Size: 5"),
        lambda path: png_with_text(path, parameters="a cat\nSteps: 20, Size: 64x64x64"),
        lambda path: png_with_text(path, parameters="a cat\nSteps: 20, Seed: " + "9" * 5000),
        lambda path: png_with_text(path, parameters="a cat\nSteps: 20, Size: " + "9" * 5000 + "x64"),
        lambda path: path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40),  # a damaged PNG
    ],
    ids=["bomb", "bad-json", "deep-json", "huge-number", "garbage-numbers", "bad-size", "huge-seed", "huge-size", "damaged"],
)
def test_forged_files_are_one_line_errors_for_info_and_replay(forged, tmp_path, capsys, no_model_loads):
    png = tmp_path / "forged.png"
    forged(png)
    assert main(["info", str(png)]) == 2
    one_line_error(capsys)
    assert main(["replay", str(png), "-o", str(tmp_path / "out.png")]) == 2
    one_line_error(capsys)


def test_image_index_beyond_the_batch_is_refused_before_rendering(tmp_path, capsys, no_model_loads):
    payload = {"request": {**REQUEST, "seed": [1, 2]}, "image_index": 7}
    png = png_with_text(tmp_path / "forged.png", studio_text=json.dumps(payload))
    assert main(["replay", str(png), "-o", str(tmp_path / "out.png")]) == 2
    assert "image_index" in one_line_error(capsys)


# -- 4. replay reads only the input files the PNG vouches for ---------------------------------------


def test_replay_names_its_inputs_and_refuses_unrecorded_ones(sd15_folder, tmp_path, capsys, monkeypatch):
    source = tmp_path / "in.png"
    Image.new("RGB", (64, 64), "red").save(source)
    styled = tmp_path / "styled.png"
    render(["style", "x", "--image", str(source), "--strength", "1", "--model", str(sd15_folder), "--seed", "1", "-o", str(styled)], capsys)

    # the genuine PNG: the input is announced, then read, and its hash matches
    assert main(["replay", str(styled), "-o", str(tmp_path / "again.png"), "--quiet"]) == 0
    assert f"reading image: {source}" in capsys.readouterr().err.splitlines()

    # a forged PNG naming a local file without its hash: refused, and the file is never opened
    payload = json.loads(Image.open(styled).text["studio"])
    payload["request"]["image"] = str(tmp_path / "secret.png")
    payload["input_hashes"] = {}
    Image.new("RGB", (64, 64), "blue").save(tmp_path / "secret.png")
    forged = png_with_text(tmp_path / "forged.png", studio_text=json.dumps(payload))
    opened = []
    monkeypatch.setattr(studio_core, "open_image", lambda source, **kw: opened.append(source) or pytest.fail("read"))
    assert main(["replay", str(forged), "-o", str(tmp_path / "stolen.png")]) == 2
    assert "--trust-inputs" in one_line_error(capsys) and opened == []
    monkeypatch.undo()

    # the explicit opt-in reads it, and says so
    assert main(["replay", str(forged), "-o", str(tmp_path / "trusted.png"), "--trust-inputs", "--quiet"]) == 0
    assert f"reading image: {tmp_path / 'secret.png'}" in capsys.readouterr().err

    # with a recorded hash, a different file is refused as before
    Image.new("RGB", (64, 64), "green").save(source)
    assert main(["replay", str(styled), "-o", str(tmp_path / "changed.png")]) == 2
    announced, error = capsys.readouterr().err.splitlines()
    assert announced == f"reading image: {source}" and error.startswith("error: ") and "differs" in error


# -- 5-7. the request schema -------------------------------------------------------------------------


@pytest.mark.parametrize("task", [["inpaint"], {"a": 1}, 5, None, True, 1.5])
def test_task_of_any_type_is_an_input_error_naming_it(task):
    with pytest.raises(StudioInputError, match="unknown task"):
        parse_request({"task": task})


def test_long_values_are_shortened_in_error_messages():
    attacks = [
        {"prompt": "x" * 200_001},
        {"scheduler": "y" * 200_000},
        {"width": "7" * 200_000},
        {"z" * 200_000: 1},
        {"task": "t" * 200_000},
        {f"extra{i}": i for i in range(1000)},
    ]
    for fields in attacks:
        with pytest.raises(StudioInputError) as error:
            parse_request(fields)
        assert len(str(error.value)) < MAX_MESSAGE_CHARS, str(error.value)[:1000]
    with pytest.raises(StudioInputError, match=r"\(200000 characters\)"):
        parse_request({"scheduler": "y" * 200_000})


def _number_fields(request_type) -> set[str]:
    numbers = set()
    for name, field in request_type.model_fields.items():
        if field.annotation in (int, float) or any(arg in (int, float) for arg in getattr(field.annotation, "__args__", ())):
            numbers.add(name)
    return numbers


def test_booleans_are_refused_for_every_number_field():
    required = {"sketch_to_image": {"control_image": "s.png"}, "inpaint": {"image": "a.png"},
                "style_transfer": {"image": "a.png"}, "imagic": {"image": "a.png"}}
    for task, request_type in REQUEST_TYPES.items():
        for name in _number_fields(request_type):
            for value in (True, False, [1, True]) if name == "seed" else (True, False):
                with pytest.raises(StudioInputError, match=f"{name} must be a number, got"):
                    parse_request({"task": task, **required.get(task, {}), name: value})


def test_integral_floats_and_digit_strings_stay_accepted():
    request = parse_request({"seed": 7.0, "num_inference_steps": 25.0, "width": "64", "batch_size": 2.0})
    assert (request.seed, request.num_inference_steps, request.width, request.batch_size) == (7, 25, 64, 2)
    assert parse_request({"task": "inpaint", "image": "a.png", "only_masked": True}).only_masked is True


# -- 8. the pickle refusal never advises weights_only=False -----------------------------------------

TORCH_ADVICE = ("weights_only=False", "set to `False`", "will likely succeed", "Re-running", "trusted source")


class _CreatesFileWhenUnpickled:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_single_file_pickle_refusal_passes_on_no_torch_advice(tmp_path):
    marker = tmp_path / "pwned"
    checkpoint = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": _CreatesFileWhenUnpickled(marker)}}, checkpoint)
    with pytest.raises(ModelError) as error:
        studio_with(allow_pickle=True).text_to_image("x", model=str(checkpoint), num_inference_steps=1)
    message = str(error.value)
    assert "GLOBAL" in message and not any(advice in message for advice in TORCH_ADVICE), message
    assert not marker.exists()


def test_folder_pickle_refusal_passes_on_no_torch_advice(sd15_folder, tmp_path):
    from safetensors.torch import load_file

    marker = tmp_path / "pwned"
    folder = tmp_path / "evil-model"
    shutil.copytree(sd15_folder, folder)
    weights = folder / "text_encoder" / "model.safetensors"
    state = dict(load_file(str(weights)), evil=_CreatesFileWhenUnpickled(marker))
    torch.save(state, folder / "text_encoder" / "pytorch_model.bin")
    weights.unlink()
    with pytest.raises(ModelError) as error:
        studio_with(allow_pickle=True).text_to_image("x", model=str(folder), num_inference_steps=1)
    message = str(error.value)
    assert "evil-model" in message and not any(advice in message for advice in TORCH_ADVICE), message
    assert not marker.exists()


# -- 9. malformed model_index.json --------------------------------------------------------------------


@pytest.mark.parametrize(
    "index",
    [
        {"_class_name": ["StableDiffusionPipeline"]},
        {"_class_name": 5},
        {},
        ["StableDiffusionPipeline"],
        "StableDiffusionPipeline",
        {"_class_name": "logging"},  # a diffusers attribute, but not a pipeline
        {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers"]},
        {"_class_name": "StableDiffusionPipeline", "unet": [["diffusers"], "UNet2DConditionModel"]},
        {"_class_name": "StableDiffusionPipeline", "unet": [1, 2]},
        {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel", "x"]},
    ],
)
def test_malformed_model_index_is_a_model_error_naming_the_folder(index, tmp_path):
    folder = tmp_path / "forged-model"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelError, match="forged-model"):
        ModelManager(Settings()).get(str(folder))


def test_undecodable_model_index_is_a_model_error(tmp_path):
    folder = tmp_path / "forged-model"
    folder.mkdir()
    (folder / "model_index.json").write_bytes(b"\xff\xfe{")
    with pytest.raises(ModelError, match="forged-model"):
        ModelManager(Settings()).get(str(folder))


# -- fuzzing ------------------------------------------------------------------------------------------

FIELD_NAMES = sorted({name for request_type in REQUEST_TYPES.values() for name in request_type.model_fields})
text = st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=20)  # PNG text chunks cannot hold surrogates
json_text = st.text(max_size=20)  # JSON can, as "\ud800" escapes
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.sampled_from([0, 1, 8, 64, 2**64 - 1, 2**64, -1, 10**30, 10**400])
    | st.floats()  # nan and inf included
    | json_text
)
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.sampled_from(FIELD_NAMES) | text, children, max_size=4),
    max_leaves=12,
)
# Values that some field accepts, so that many generated requests get past the first check.
plausible = (
    st.sampled_from([0, 1, 2, 8, 64, 0.5, 1.0, 7.5, "", "a.png", "a red circle", "euler", "auto", True, None])
    | st.integers(0, 64)
    | st.floats(0, 1)
)
tasks = st.sampled_from(TASKS) | json_values
request_data = st.builds(
    lambda task, fields: fields if task is None else {**fields, "task": task},
    st.none() | tasks,
    st.dictionaries(st.sampled_from(FIELD_NAMES) | text, plausible | json_values, max_size=6),
)
VALID = {"text_to_image": {}, "sketch_to_image": {"control_image": "s.png"}, "inpaint": {"image": "a.png"},
         "style_transfer": {"image": "a.png"}, "imagic": {"image": "a.png"}}
# A valid request of each task with one field set to anything: every field's own checks get their turn.
one_field_changed = st.sampled_from(TASKS).flatmap(
    lambda task: st.builds(
        lambda name, value: {"task": task, **VALID[task], name: value},
        st.sampled_from(sorted(REQUEST_TYPES[task].model_fields)),
        plausible | json_values,
    )
)


@given(st.one_of(one_field_changed, request_data, json_values))
def test_fuzz_parse_request_gives_a_request_or_a_short_input_error(data):
    try:
        request = parse_request(data)
    except StudioInputError as error:
        event("refused")
        assert len(str(error)) <= MAX_MESSAGE_CHARS, str(error)[:1000]
    else:
        event("accepted")
        assert isinstance(request, BaseRequest)


hex_digests = st.text(alphabet="0123456789abcdef", min_size=64, max_size=64)
payloads = st.fixed_dictionaries(
    {},
    optional={
        "request": st.one_of(one_field_changed, request_data, json_values),
        "image_index": st.integers(min_value=-2, max_value=20) | json_values,
        "seed": st.integers(min_value=-2, max_value=2**65) | json_values,
        "input_hashes": st.dictionaries(st.sampled_from(IMAGE_FIELDS) | text, hex_digests | json_values, max_size=3)
        | json_values,
        "model": st.fixed_dictionaries({}, optional={"name": json_values, "hash": json_values}) | json_values,
        "sampler": json_values,
        "environment": json_values,
    },
)
studio_chunks = st.none() | payloads.map(json.dumps) | json_values.map(json.dumps) | text
a1111_keys = st.sampled_from(["Steps", "Sampler", "CFG scale", "Seed", "Size", "Model hash", "Model", "Task"]) | text
a1111_values = (
    text
    | st.integers().map(str)
    | st.floats().map(str)
    | st.tuples(st.integers(-5, 5000), st.integers(-5, 5000)).map(lambda size: f"{size[0]}x{size[1]}")
    | text.map(json.dumps)
    | st.sampled_from(['"\\x"', "9" * 5000, "9" * 5000 + "x64", "1e5", "nan", "-inf", "-1", "0x0"])
)
a1111_texts = text | st.builds(
    lambda prompt, negative, first, rest: f"{prompt}\nNegative prompt: {negative}\nSteps: {first}, "
    + ", ".join(f"{key}: {value}" for key, value in rest),
    text,
    text,
    a1111_values,
    st.lists(st.tuples(a1111_keys, a1111_values), max_size=6),
)


@pytest.fixture(scope="module")
def fuzz_folder():
    with tempfile.TemporaryDirectory() as folder:
        yield Path(folder)


@given(studio_text=studio_chunks, parameters=st.none() | a1111_texts)
def test_fuzz_read_record_of_forged_png_metadata(fuzz_folder, studio_text, parameters):
    png = png_with_text(fuzz_folder / "forged.png", studio_text=studio_text, parameters=parameters)
    try:
        record = read_record(png)
    except StudioInputError as error:
        event("refused")
        assert len(str(error)) <= MAX_MESSAGE_CHARS + len(str(png)), str(error)[:1000]
    else:
        event("accepted")
        assert isinstance(record, ImageRecord)
        json.dumps(record_to_json(record))  # what `studio info` prints
        png_bytes(Image.new("RGB", (8, 8)), record)  # what `studio replay` writes
        assert 0 <= record.image_index < record.request.batch_size


@given(a1111_texts)
def test_fuzz_parse_a1111_parameters(parameters):
    try:
        record = parse_a1111_parameters(parameters)
    except StudioInputError as error:
        event("refused")
        assert len(str(error)) <= MAX_MESSAGE_CHARS
    else:
        event("accepted")
        assert isinstance(record.request, BaseRequest)
        assert math.isfinite(record.request.guidance_scale)


def test_png_text_is_read_without_decoding_the_pixels(tmp_path, monkeypatch):
    png = png_with_text(tmp_path / "a.png", parameters="a cat\nSteps: 20, Seed: 3")
    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", lambda self: pytest.fail("pixels decoded"))
    assert read_record(png).seed == 3


# == reliability-cases.md, case by case: attacks no test above sends =================================


from studio.requests import MAX_PROMPT_CHARS  # noqa: E402


@pytest.fixture
def cli_uses_session_studio(studio, monkeypatch):
    """`studio` commands run on the session's Studio (its tiny model already loaded) instead of building
    one from the flags: what is checked is the command's own behaviour (messages, exit codes, files)."""
    monkeypatch.setattr(studio_core, "Studio", lambda *args, **kwargs: studio)
    return studio


def _write_jobs(path: Path, lines: list) -> Path:
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return path


# -- reliability-cases.md #1, #3: `studio batch` lines whose paths try to leave --------------------------------


def test_case_1_3_studio_batch_keeps_every_path_inside_without_loading_a_model(tmp_path, capsys, no_model_loads):
    folder = tmp_path / "jobs"
    folder.mkdir()
    Image.new("RGB", (64, 64), "blue").save(tmp_path / "secret.png")
    style = {"task": "style_transfer", "prompt": "x", "num_inference_steps": 1}
    images = ["../secret.png", "..\\..\\secret.png", str(tmp_path / "secret.png"), "/etc/passwd", "x\u0000.png"]
    outputs = ["../../x.png", "..\\..\\x", "/etc/x.png", "C:\\x.png", "x\u0000"]
    lines = [{**style, "image": image} for image in images] + [{"prompt": "x", "output": out} for out in outputs]
    out = tmp_path / "out"
    assert main(["batch", str(_write_jobs(folder / "jobs.jsonl", lines)), "--out", str(out), "--quiet"]) == 1
    printed = capsys.readouterr()
    assert "0 rendered, 0 already done, 10 failed" in printed.out
    failed = printed.err.splitlines()
    assert [line.split(":")[0] for line in failed] == [f"line {n}" for n in range(1, 11)]
    assert not any("a model was loaded" in line or "Traceback" in line for line in failed), failed
    assert sorted(path.name for path in tmp_path.iterdir()) == ["jobs", "out", "secret.png"]
    assert [path.name for path in out.iterdir()] == ["manifest.jsonl"]


# -- reliability-cases.md #4: a pickle with code in it, as .ckpt, .bin or .png ----------------------------------


@pytest.mark.parametrize("name", ["evil.ckpt", "evil.bin", "evil.png"])
def test_case_4_studio_generate_refuses_a_pickle_model_and_never_runs_its_code(name, tmp_path, capsys):
    marker = tmp_path / "pwned"
    checkpoint = tmp_path / name
    torch.save({"state_dict": {"x": _CreatesFileWhenUnpickled(marker)}}, checkpoint)
    out = tmp_path / "out.png"
    assert main(["generate", "x", "--model", str(checkpoint), "-o", str(out), "--steps", "1", "--quiet"]) == 2
    assert "--allow-pickle" in one_line_error(capsys)
    assert main(["generate", "x", "--model", str(checkpoint), "-o", str(out), "--steps", "1", "--quiet",
                 "--allow-pickle"]) == 2
    err = one_line_error(capsys)
    assert "weights_only" in err and not any(advice in err for advice in TORCH_ADVICE)
    assert not marker.exists() and not out.exists()


# -- reliability-cases.md #5: models that need remote code ----------------------------------------------------


@pytest.mark.parametrize(
    "index, message",
    [
        ({"_class_name": "StableDiffusionPipeline", "unet": ["my_unet", "MyUNet"]}, "remote code"),
        ({"_class_name": "LongPromptWeightingPipeline"}, "custom pipeline"),
    ],
)
def test_case_5_studio_generate_refuses_a_model_needing_remote_code(index, message, tmp_path, capsys):
    folder = tmp_path / "remote-model"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps(index))
    (folder / "my_unet.py").write_text(f"open({str(tmp_path / 'pwned')!r}, 'w')\n")
    assert main(["generate", "x", "--model", str(folder), "-o", str(tmp_path / "out.png"), "--quiet"]) == 2
    assert message in one_line_error(capsys)
    assert not (tmp_path / "pwned").exists()


def test_case_5_python_api_refuses_remote_code_options_before_loading(sd15_folder, no_model_loads):
    studio = studio_with(model=str(sd15_folder))
    for option in ({"custom_pipeline": "lpw_stable_diffusion"}, {"trust_remote_code": True}):
        with pytest.raises(StudioInputError, match=next(iter(option))):
            studio.text_to_image("x", **option)


# -- reliability-cases.md #6, #8, #9, #12: unusable input images on the command line ---------------------------


@pytest.fixture(scope="module")
def counting_http_server():
    with loopback_server() as (url, hits):
        yield url, hits


def test_case_6_8_9_12_unusable_images_are_one_line_errors_before_any_model_load(
    tmp_path, capsys, monkeypatch, no_model_loads, counting_http_server
):
    url, hits = counting_http_server
    monkeypatch.chdir(tmp_path)
    bomb_png(tmp_path / "bomb.png")
    Path("evil.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>')
    Path("page.png").write_text("<html><script>alert(1)</script></html>")
    Image.new("RGB", (64, 64), "gray").save("in.png")
    Image.new("RGB", (1, 1), "red").save("dot.png")
    Image.new("L", (48, 40), 255).save("small-mask.png")
    Image.new("L", (64, 64), 0).save("black-mask.png")
    attacks = [
        (["style", "x", "--image", "bomb.png"], "not a readable raster image"),
        (["sketch", "x", "--control-image", "bomb.png"], "not a readable raster image"),
        (["inpaint", "x", "--image", "in.png", "--mask-image", "bomb.png"], "not a readable raster image"),
        (["style", "x", "--image", "evil.svg"], "not a readable raster image"),
        (["imagic", "x", "--image", "page.png"], "not a readable raster image"),
        (["style", "x", "--image", url], "does not fetch URLs"),
        (["style", "x", "--image", "in.png", "--reference-image", url], "does not fetch URLs"),
        (["inpaint", "x", "--image", "http://169.254.169.254/latest"], "does not fetch URLs"),
        (["inpaint", "x", "--image", "in.png", "--mask-image", "small-mask.png"], "48x40"),
        (["inpaint", "x", "--image", "in.png", "--mask-image", "black-mask.png"], "nothing to repaint"),
        (["style", "x", "--image", "dot.png"], "1x1"),
        (["imagic", "x", "--image", "dot.png"], "1x1"),
    ]
    for argv, message in attacks:
        assert main([*argv, "-o", "out.png", "--quiet"]) == 2, argv
        assert message in one_line_error(capsys), argv
    assert hits == [] and not Path("out.png").exists()


# -- reliability-cases.md #10: every bad number, refused before any model load -----------------------------------


@pytest.mark.parametrize(
    "argv, quoted",
    [
        (["generate", "x", "-W", "0"], "(got 0)"),
        (["generate", "x", "-W=-8"], "(got -8)"),
        (["generate", "x", "-W", "100000"], "(got 100000)"),
        (["generate", "x", "-W", "100"], "(got 100)"),
        (["generate", "x", "-H=-8"], "(got -8)"),
        (["generate", "x", "--steps", "0"], "(got 0)"),
        (["generate", "x", "--steps=-1"], "(got -1)"),
        (["generate", "x", "--steps", "1000000"], "(got 1000000)"),
        (["generate", "x", "--cfg", "nan"], "got nan"),
        (["generate", "x", "--cfg", "inf"], "got inf"),
        (["generate", "x", "--cfg=-inf"], "got -inf"),
        (["generate", "x", "-b", "0"], "(got 0)"),
        (["generate", "x", "-b", "1000000"], "(got 1000000)"),
        (["generate", "x", "--seed", str(2**64)], str(2**64)),
        (["generate", "x", "--seed=-1"], "got -1"),
        (["generate", "x", "--seed", "1", str(2**64)], str(2**64)),
        (["style", "x", "--image", "in.png", "--strength=-0.1"], "(got -0.1)"),
        (["inpaint", "x", "--image", "in.png", "--strength", "1.5"], "(got 1.5)"),
    ],
)
def test_case_10_bad_numbers_are_one_line_errors_before_any_model_load(argv, quoted, tmp_path, monkeypatch, capsys,
                                                                     no_model_loads):
    monkeypatch.chdir(tmp_path)
    assert main([*argv, "-o", "out.png", "--quiet"]) == 2
    assert quoted in one_line_error(capsys)
    assert not Path("out.png").exists()


def test_case_10_python_api_refuses_bad_numbers_before_loading(sd15_folder, no_model_loads):
    studio = studio_with(model=str(sd15_folder))
    for fields in [{"width": 0}, {"height": -8}, {"width": 100_000}, {"num_inference_steps": 10**6},
                   {"guidance_scale": math.nan}, {"guidance_scale": -math.inf}, {"batch_size": 10**6},
                   {"seed": 2**64}, {"seed": [1, -1]}]:
        with pytest.raises(StudioInputError, match=next(iter(fields))):
            studio.text_to_image("x", **fields)
    for strength in (-0.1, 1.5):
        with pytest.raises(StudioInputError, match="strength"):
            studio.style_transfer("x", Image.new("RGB", (64, 64)), strength=strength)


# -- reliability-cases.md #11: a 100k-character prompt with control and RTL characters ------------------------


def test_case_11_studio_generate_warns_about_truncation_and_keeps_the_prompt_verbatim(
    tmp_path, capsys, cli_uses_session_studio
):
    prompt = "red " * 25_000 + "\u202eevil\u202c \u0627\u0644 \x07\x1b[31m {seed} %s $(id)\nSteps: 999, Seed: 7"
    out = tmp_path / "out.png"
    assert main(["generate", prompt, "--seed", "3", "-o", str(out), "--steps", "1", "--quiet"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and re.search(r"tokens long; only the first \d+ are used", warnings[0]), warnings
    assert main(["info", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["request"]["prompt"] == prompt and info["seed"] == 3  # verbatim: never evaluated or formatted
    assert len(prompt) < MAX_PROMPT_CHARS
    assert main(["generate", "x" * (MAX_PROMPT_CHARS + 1), "-o", str(tmp_path / "long.png")]) == 2
    assert "200000" in one_line_error(capsys)


# -- reliability-cases.md #14: non-finite latents or pixels ---------------------------------------------------


def test_case_14_non_finite_latents_are_refused_not_saved(studio, tmp_path, monkeypatch):
    from studio_pipelines.common import NonFiniteOutputError

    unet = studio.models.get(None).pipe.unet
    original = unet.forward

    def diverging(*args, **kwargs):
        output = original(*args, **kwargs)
        output[0].fill_(float("nan")) if isinstance(output, tuple) else output.sample.fill_(float("nan"))
        return output

    monkeypatch.setattr(unet, "forward", diverging)
    with pytest.raises(NonFiniteOutputError, match="NaN/inf latents"):
        studio.text_to_image("x", seed=1, num_inference_steps=1)


def test_case_14_fp16_overflow_in_the_decode_is_retried_in_fp32(studio):
    from diffusers.models.autoencoders.vae import DecoderOutput

    vae = studio.models.get(None).pipe.vae
    expected = studio.text_to_image("x", seed=1, num_inference_steps=1).images[0]
    original, dtypes = vae.decode, []

    def overflowing_in_half(latents, *args, **kwargs):  # what an fp16 VAE does on some images
        dtypes.append(latents.dtype)
        if latents.dtype == torch.float16:
            return DecoderOutput(sample=torch.full((1, 3, 64, 64), float("inf"), dtype=torch.float16))
        return original(latents, *args, **kwargs)

    upcast, weights = vae.config.force_upcast, {name: value.clone() for name, value in vae.state_dict().items()}
    vae.decode = overflowing_in_half
    vae.to(torch.float16)
    vae.register_to_config(force_upcast=False)  # a VAE said to be fp16-safe: decoded in fp16 first
    try:
        result = studio.text_to_image("x", seed=1, num_inference_steps=1)
        assert vae.dtype == torch.float16  # put back as it was
    finally:
        del vae.decode
        vae.to(torch.float32)
        vae.load_state_dict(weights)  # the session's model exactly as it was (fp16 rounded the weights)
        vae.register_to_config(force_upcast=upcast)
    assert all(torch.equal(value, weights[name]) for name, value in vae.state_dict().items())
    assert dtypes == [torch.float16, torch.float32]  # tried in fp16, overflowed, decoded again in fp32
    difference = np.abs(np.asarray(result.images[0], dtype=np.int16) - np.asarray(expected, dtype=np.int16))
    assert difference.max() <= 2  # the fp32 image (from fp16-rounded weights), not the overflowed one


def test_case_14_studio_generate_reports_a_non_finite_image_and_saves_nothing(
    tmp_path, capsys, monkeypatch, cli_uses_session_studio
):
    vae = cli_uses_session_studio.models.get(None).pipe.vae
    original = vae.decode

    def overflowing(*args, **kwargs):
        output = original(*args, **kwargs)
        output.sample.fill_(float("nan"))
        return output

    monkeypatch.setattr(vae, "decode", overflowing)
    out = tmp_path / "out.png"
    assert main(["generate", "x", "--seed", "1", "-o", str(out), "--steps", "1", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "NaN/inf" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []
