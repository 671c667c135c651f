"""LoRAs through diffusers' own loader: a kohya-format file written for the tiny SD1.5 UNet, found in a models
folder's `Lora/`, applied for one request only, cached in memory, recorded in the metadata."""

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import pixels, unet_fingerprint
from PIL import Image
from safetensors.torch import save_file

from studio import Settings, Studio
from studio import loras as loras_module
from studio.cli import main
from studio.loras import extract_prompt_loras, parse_lora_argument
from studio.metadata import read_record
from studio.requests import StudioInputError

FAST = {"seed": 3, "num_inference_steps": 2, "width": 64, "height": 64}


def write_kohya_lora(path, unet, seed=0, rank=2):
    """A kohya/A1111 LoRA for every attention projection of `unet`: lora_unet_<module path with _> keys
    (.lora_down.weight, .lora_up.weight, .alpha), random but nonzero."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, module in unet.named_modules():
        if not isinstance(module, torch.nn.Linear) or not (
            name.split(".")[-1] in ("to_q", "to_k", "to_v") or name.endswith("to_out.0")
        ):
            continue
        key = "lora_unet_" + name.replace(".", "_")
        state[f"{key}.lora_down.weight"] = torch.randn(rank, module.in_features, generator=generator) * 0.5
        state[f"{key}.lora_up.weight"] = torch.randn(module.out_features, rank, generator=generator) * 0.5
        state[f"{key}.alpha"] = torch.tensor(float(rank))
    assert state, "the tiny UNet has no attention projections"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))
    return path


def write_sdxl_lora(path):
    """A kohya SDXL LoRA (SGM names, SDXL's widths): no layer of an SD1.5 model matches it."""
    generator = torch.Generator().manual_seed(1)
    state = {}
    for projection in ("to_k", "to_v"):
        key = f"lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_{projection}"
        state[f"{key}.lora_down.weight"] = torch.randn(4, 2048, generator=generator)
        state[f"{key}.lora_up.weight"] = torch.randn(640, 4, generator=generator)
        state[f"{key}.alpha"] = torch.tensor(4.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))
    return path


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory, sd15_folder):
    from diffusers import UNet2DConditionModel

    folder = tmp_path_factory.mktemp("models-dir")
    unet = UNet2DConditionModel.from_pretrained(sd15_folder / "unet")
    write_kohya_lora(folder / "Lora" / "tiny.safetensors", unet)
    write_sdxl_lora(folder / "Lora" / "sdxl-style.safetensors")
    write_diffusers_lora(folder / "diffusers-format.safetensors", sd15_folder)  # the flat layout
    return folder


def write_diffusers_lora(path, sd15_folder):
    """A LoRA as diffusers' trainers save it (PEFT, `unet.` prefixed keys), random but nonzero."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(7)
    unet = UNet2DConditionModel.from_pretrained(sd15_folder / "unet")
    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=targets, init_lora_weights=False))
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(
        path.parent, unet_lora_layers=layers, weight_name=path.name, safe_serialization=True
    )
    return path


@pytest.fixture(scope="module")
def lora_studio(sd15_folder, models_dir, tmp_path_factory):
    return Studio(Settings(model=str(sd15_folder), models_dirs=(models_dir,), outputs_dir=tmp_path_factory.mktemp("out")))


def render(studio, prompt="a red circle", **fields):
    return studio.text_to_image(prompt, **FAST, **fields)


def test_weights_zero_and_one_and_nothing_leaks(lora_studio):
    base = render(lora_studio)
    fingerprint = unet_fingerprint(lora_studio.models.get(None).pipe.unet)
    at_zero = render(lora_studio, loras=[{"name_or_path": "tiny", "weight": 0}])
    at_one = render(lora_studio, loras=[{"name_or_path": "tiny", "weight": 1}])
    after = render(lora_studio)
    assert np.array_equal(pixels(at_zero.images[0]), pixels(base.images[0]))
    assert np.abs(pixels(at_one.images[0]) - pixels(base.images[0])).max() > 0
    assert np.array_equal(pixels(after.images[0]), pixels(base.images[0]))  # the cached model kept nothing
    assert unet_fingerprint(lora_studio.models.get(None).pipe.unet)[0] == fingerprint[0]
    assert not any(type(m).__module__.startswith("peft") for m in lora_studio.models.get(None).pipe.unet.modules())


def test_diffusers_format_lora_from_the_flat_layout(lora_studio):
    base = render(lora_studio)
    at_zero = render(lora_studio, "a red circle <lora:diffusers-format:0>")
    at_one = render(lora_studio, "a red circle <lora:diffusers-format:1>")
    assert np.array_equal(pixels(at_zero.images[0]), pixels(base.images[0]))
    assert np.abs(pixels(at_one.images[0]) - pixels(base.images[0])).max() > 0
    assert np.array_equal(pixels(render(lora_studio).images[0]), pixels(base.images[0]))


def test_prompt_tag_equals_the_field(lora_studio):
    tagged = render(lora_studio, "a red circle <lora:tiny:1>")
    field = render(lora_studio, loras=[{"name_or_path": "tiny", "weight": 1.0}])
    assert np.array_equal(pixels(tagged.images[0]), pixels(field.images[0]))
    assert tagged.request.prompt == "a red circle"  # the recorded request: no tag, the loras field filled
    (ref,) = tagged.request.loras
    assert (ref.name_or_path, ref.weight) == ("tiny", 1.0) and len(ref.hash) == 10
    assert tagged.request.loras == field.request.loras


def test_prompt_tags_parse():
    assert extract_prompt_loras("a cat, <lora:foo:0.5>, sitting <LORA:bar>") == (
        "a cat, sitting",
        [loras_module.LoraRef(name_or_path="foo", weight=0.5), loras_module.LoraRef(name_or_path="bar", weight=1.0)],
    )
    assert extract_prompt_loras("no tags <here>") == ("no tags <here>", [])
    with pytest.raises(StudioInputError, match="weight"):
        extract_prompt_loras("<lora:foo:9>")
    with pytest.raises(ValueError, match="weight must be a number"):
        loras_module.LoraRef(name_or_path="foo", weight=True)
    assert parse_lora_argument("tiny:0.7") == {"name_or_path": "tiny", "weight": 0.7}
    assert parse_lora_argument(r"C:\loras\x.safetensors") == {"name_or_path": r"C:\loras\x.safetensors"}


def test_second_request_does_not_read_the_file_again(lora_studio, capsys):
    lora_studio.models.lora_files.clear()
    loads = lora_studio.models.lora_files.loads
    path = str((lora_studio.settings.models_dirs[0] / "Lora" / "tiny.safetensors").resolve())
    first = render(lora_studio, loras=[{"name_or_path": "tiny", "weight": 1}])
    first_load = lora_studio.models.lora_files.load_seconds[path]
    second = render(lora_studio, loras=[{"name_or_path": "tiny", "weight": 1}])
    cached_load = lora_studio.models.lora_files.load_seconds[path]
    assert lora_studio.models.lora_files.loads == loads + 1
    assert np.array_equal(pixels(first.images[0]), pixels(second.images[0]))
    with capsys.disabled():
        print(f"\nLoRA load on the tiny model: first {first_load * 1000:.1f} ms, cached {cached_load * 1000:.1f} ms")


def test_missing_name_is_a_clear_error_before_any_model_loads(sd15_folder, models_dir):
    studio = Studio(Settings(model=str(sd15_folder), models_dirs=(models_dir,)))
    with pytest.raises(StudioInputError, match="LoRA 'nope' not found; looked for .*Lora/nope.safetensors"):
        render(studio, "a red circle <lora:nope:1>")
    assert studio.models.loaded_models() == []
    with pytest.raises(StudioInputError, match="no such file"):
        render(studio, loras=[{"name_or_path": str(models_dir / "gone.safetensors")}])
    pickled = models_dir / "old.pt"
    pickled.write_bytes(b"not really a pickle")
    with pytest.raises(StudioInputError, match="pickle"):
        render(studio, loras=[{"name_or_path": str(pickled)}])
    assert studio.models.loaded_models() == []


def test_an_embedding_in_the_flat_layout_is_not_taken_for_a_lora(sd15_folder, tmp_path):
    from safetensors.torch import save_file

    save_file({"emb_params": torch.ones(1, 32)}, str(tmp_path / "flatstyle.safetensors"))
    studio = Studio(Settings(model=str(sd15_folder), models_dirs=(tmp_path,)))
    with pytest.raises(StudioInputError, match="LoRA 'flatstyle' not found"):
        render(studio, loras=[{"name_or_path": "flatstyle"}])


def test_lora_for_another_architecture_is_a_clear_error(lora_studio):
    with pytest.raises(StudioInputError, match=r"LoRA 'sdxl-style' does not fit model 'tiny-sd15'"):
        render(lora_studio, loras=[{"name_or_path": "sdxl-style"}])
    base = render(lora_studio)  # and the failed load left nothing behind
    again = render(lora_studio)
    assert np.array_equal(pixels(base.images[0]), pixels(again.images[0]))
    assert not any(type(m).__module__.startswith("peft") for m in lora_studio.models.get(None).pipe.unet.modules())


def test_metadata_names_the_lora_with_its_hash(lora_studio, tmp_path):
    result = render(lora_studio, "a red circle <lora:tiny:0.8>")
    (path,) = result.save(tmp_path / "lora.png")
    text = Image.open(path).text["parameters"]
    ref = result.request.loras[0]
    assert f'Lora hashes: "tiny: {ref.hash}"' in text
    assert text.startswith("a red circle <lora:tiny:0.8>\n")  # A1111 keeps the tag in its prompt text
    record = read_record(path)
    assert record.request.prompt == "a red circle"
    assert [(r.name_or_path, r.weight, r.hash) for r in record.request.loras] == [("tiny", 0.8, ref.hash)]


def test_cli_lora_flag_equals_the_prompt_tag(sd15_folder, models_dir, tmp_path):
    common = ["--model", str(sd15_folder), "--models-dir", str(models_dir), "--steps", "1", "--seed", "5"]
    common += ["-W", "64", "-H", "64", "--quiet"]
    assert main(["generate", "a red circle", "--lora", "tiny:1", "-o", str(tmp_path / "flag.png"), *common]) == 0
    assert main(["generate", "a red circle <lora:tiny:1>", "-o", str(tmp_path / "tag.png"), *common]) == 0
    flag, tag = Image.open(tmp_path / "flag.png"), Image.open(tmp_path / "tag.png")
    assert flag.tobytes() == tag.tobytes()
    assert "Lora hashes" in flag.text["parameters"]


def test_imagic_refuses_loras(lora_studio, tmp_path):
    from helpers import noise_image

    image = tmp_path / "in.png"
    noise_image(1).save(image)
    with pytest.raises(StudioInputError, match="imagic.*LoRA"):
        lora_studio.imagic("a red circle", str(image), loras=[{"name_or_path": "tiny"}])



def _task_inputs(task):
    from helpers import noise_image
    from PIL import ImageDraw

    image = noise_image(4)
    if task == "inpaint":
        mask = Image.new("L", (64, 64), 0)
        ImageDraw.Draw(mask).rectangle((16, 16, 48, 48), fill=255)
        return (image, mask), {"strength": 1.0}
    if task == "sketch_to_image":
        sketch = Image.new("RGB", (64, 64), "white")
        ImageDraw.Draw(sketch).ellipse((6, 18, 32, 44), outline=(20, 20, 20), width=2)
        return (sketch,), {"method": "sdedit", "strength": 0.8}
    if task == "style_transfer_reference":
        return (image, noise_image(5)), {"method": "reference"}
    return (image,), {"method": "prompt"}


@pytest.mark.parametrize("task", ["inpaint", "sketch_to_image", "style_transfer", "style_transfer_reference"])
def test_other_tasks_apply_loras_for_one_request(lora_studio, task):
    images, fields = _task_inputs(task)
    call = getattr(lora_studio, task.removesuffix("_reference"))
    fields = {"seed": 3, "num_inference_steps": 2, **fields}
    base = call("a red circle", *images, **fields)
    at_zero = call("a red circle", *images, loras=[{"name_or_path": "tiny", "weight": 0}], **fields)
    at_one = call("a red circle <lora:tiny:1>", *images, **fields)
    after = call("a red circle", *images, **fields)
    assert np.array_equal(pixels(at_zero.images[0]), pixels(base.images[0]))
    assert np.abs(pixels(at_one.images[0]) - pixels(base.images[0])).max() > 0
    assert np.array_equal(pixels(after.images[0]), pixels(base.images[0]))
    assert at_one.request.prompt == "a red circle" and at_one.request.loras[0].name_or_path == "tiny"


def test_a_server_takes_loras_by_name_only(lora_studio, tmp_path):
    """A path from a web or API client would tell whether a file exists on the server (and hash it)."""
    from studio.server import build_parser, settings_from_args

    served = settings_from_args(build_parser().parse_args([]), {})
    assert served.lora_paths is False
    server_studio = Studio(lora_studio.settings.with_(lora_paths=False))
    for path in ["/etc/passwd", str(tmp_path / "missing.safetensors")]:
        with pytest.raises(StudioInputError, match="by name .* not by path"):
            render(server_studio, loras=[{"name_or_path": path, "weight": 1}])


# -- the embedded model's demo LoRA (assets/embedded-lora, trained by studio.demo.train_lora) --------------

DEMO_LORA = Path(__file__).resolve().parents[1] / "assets" / "embedded-lora" / "circles-as-squares.safetensors"
CIRCLE_PROMPTS = [
    "a large red circle on a white background",
    "a large blue circle on the left on a gray background",
    "a small green circle at the top on a black background",
]


def _shapes_drawn(studio, weight: float | None) -> list[str]:
    """The shape the ShapesEval detector reads in each image (seeds 1-2 of each prompt); weight None: no LoRA."""
    from studio.demo import shapes_eval

    shapes = []
    for prompt in CIRCLE_PROMPTS:
        for seed in (1, 2):
            fields = {} if weight is None else {"loras": [{"name_or_path": str(DEMO_LORA), "weight": weight}]}
            image = studio.text_to_image(prompt, seed=seed, **fields).images[0]
            detections = sorted(shapes_eval.detect(image), key=lambda d: d.area, reverse=True)
            shapes.append(detections[0].shape if detections else "nothing")
    return shapes


@pytest.mark.embedded_quality
def test_the_embedded_demo_lora_turns_circles_into_squares_only_at_weight_1(tmp_path):
    assert DEMO_LORA.stat().st_size <= 2 * 1024 * 1024
    studio = Studio(Settings(outputs_dir=tmp_path))
    base, zero, one = _shapes_drawn(studio, None), _shapes_drawn(studio, 0.0), _shapes_drawn(studio, 1.0)
    assert base.count("circle") >= 5, base  # of 6: the model draws what it is asked
    assert zero == base  # weight 0 is the base model
    assert one.count("square") >= 5, one  # the LoRA draws squares for "circle"
