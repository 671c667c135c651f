"""A separate VAE: files written with the original (LDM) key names, as vae-ft-mse-840000-ema-pruned.safetensors is,
and as a diffusers folder, for the tiny SD1.5 model; used for one request by every task, the cached model keeping
its own; recorded in the metadata."""

import numpy as np
import pytest
import torch
from helpers import noise_image, pixels
from PIL import Image, ImageDraw
from safetensors.torch import save_file
from test_single_file import _vae_to_ldm
from tiny_models import _vae

from studio import Settings, Studio
from studio.cli import build_parser, main
from studio.metadata import read_record
from studio.requests import StudioInputError

FAST = {"seed": 3, "num_inference_steps": 2, "width": 64, "height": 64}


def write_ldm_vae(path, vae, prefix=""):
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({prefix + key: value.contiguous() for key, value in _vae_to_ldm(vae).items()}, str(path))
    return path


@pytest.fixture(scope="module")
def other_vae():
    return _vae(seed=5)  # the tiny model's architecture, other weights


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory, sd15_folder, other_vae):
    from diffusers import AutoencoderKL

    folder = tmp_path_factory.mktemp("models-dir")
    write_ldm_vae(folder / "VAE" / "other.safetensors", other_vae)
    write_ldm_vae(folder / "VAE" / "prefixed.vae.safetensors", other_vae, prefix="first_stage_model.")
    write_ldm_vae(folder / "VAE" / "own.safetensors", AutoencoderKL.from_pretrained(sd15_folder / "vae"))
    other_vae.save_pretrained(folder / "VAE" / "other-folder", safe_serialization=True)
    other_vae.save_pretrained(folder / "VAE" / "other-fp16", safe_serialization=True, variant="fp16")
    wide = AutoencoderKL(block_out_channels=(32, 64), norm_num_groups=8, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    write_ldm_vae(folder / "VAE" / "wide.safetensors", wide)
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, str(folder / "VAE" / "notavae.safetensors"))
    return folder


@pytest.fixture(scope="module")
def vae_studio(sd15_folder, models_dir, tmp_path_factory):
    return Studio(Settings(model=str(sd15_folder), models_dirs=(models_dir,), outputs_dir=tmp_path_factory.mktemp("out")))


def render(studio, prompt="a red circle", **fields):
    return studio.text_to_image(prompt, **FAST, **fields)


def test_a_vae_file_changes_the_decode_for_one_request(vae_studio, other_vae):
    base = render(vae_studio)
    cached_vae = vae_studio.models.get(None).pipe.vae
    other = render(vae_studio, vae="other")
    after = render(vae_studio)
    assert np.abs(pixels(other.images[0]) - pixels(base.images[0])).max() > 0
    assert np.array_equal(pixels(after.images[0]), pixels(base.images[0]))
    assert vae_studio.models.get(None).pipe.vae is cached_vae  # the cached model keeps its own
    (view,) = [v for key, v in vae_studio.models.vaes.entries.items() if key[2].endswith("other.safetensors")]
    loaded = view.pipe.vae.state_dict()
    assert all(torch.equal(loaded[key], value) for key, value in other_vae.state_dict().items())  # exact weights
    assert other.request.vae.name_or_path == "other.safetensors" and len(other.request.vae.hash) == 10


def test_the_models_own_vae_as_a_file_gives_the_base_pixels(vae_studio):
    """Written with the original key names and read back through the converter: nothing changes."""
    assert np.array_equal(pixels(render(vae_studio, vae="own").images[0]), pixels(render(vae_studio).images[0]))


def test_folder_prefixed_file_and_path_give_the_same_image(vae_studio, models_dir):
    by_name = render(vae_studio, vae="other")
    for vae in ("other-folder", "other-fp16", "prefixed", str(models_dir / "VAE" / "other.safetensors"), str(models_dir / "VAE" / "other-folder")):
        assert np.array_equal(pixels(render(vae_studio, vae=vae).images[0]), pixels(by_name.images[0])), vae
    loads = vae_studio.models.vaes.loads
    render(vae_studio, vae="other-folder")
    assert vae_studio.models.vaes.loads == loads  # loaded once, kept


def test_every_task_uses_the_requests_vae(vae_studio):
    image = noise_image(4)
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).rectangle((16, 16, 48, 48), fill=255)
    calls = {
        "inpaint": lambda **f: vae_studio.inpaint("a red circle", image, mask, strength=1.0, **f),
        "style_transfer": lambda **f: vae_studio.style_transfer("a red circle", image, method="prompt", **f),
        "sketch_to_image": lambda **f: vae_studio.sketch_to_image("a red circle", image, method="sdedit", strength=0.8, **f),
    }
    for task, call in calls.items():
        base = call(seed=3, num_inference_steps=2)
        other = call(seed=3, num_inference_steps=2, vae="other")
        assert np.abs(pixels(other.images[0]) - pixels(base.images[0])).max() > 0, task
        assert np.array_equal(pixels(call(seed=3, num_inference_steps=2).images[0]), pixels(base.images[0])), task


def test_bad_vaes_are_clear_errors(vae_studio, sd15_folder, models_dir):
    fresh = Studio(Settings(model=str(sd15_folder), models_dirs=(models_dir,)))
    with pytest.raises(StudioInputError, match=r"VAE 'nope' not found; looked in .*VAE for nope\{.safetensors,"):
        render(fresh, vae="nope")
    assert fresh.models.loaded_models() == []
    with pytest.raises(StudioInputError, match="no models folder is set"):
        render(Studio(Settings(model=str(sd15_folder))), vae="nope")
    with pytest.raises(StudioInputError, match=r"VAE 'wide.safetensors' does not fit model 'tiny-sd15'"):
        render(vae_studio, vae="wide")
    with pytest.raises(StudioInputError, match=r"VAE 'notavae.safetensors' does not fit model 'tiny-sd15'.* is it a VAE"):
        render(vae_studio, vae="notavae")
    with pytest.raises(StudioInputError, match="imagic .* not supported"):
        fresh.imagic("a red circle", noise_image(1), vae="other")
    with pytest.raises(StudioInputError, match="by name .* not by path"):
        render(Studio(fresh.settings.with_(lora_paths=False)), vae="/etc/passwd")


def test_metadata_names_the_vae_with_its_hash(vae_studio, tmp_path):
    result = render(vae_studio, vae="other")
    (path,) = result.save(tmp_path / "vae.png")
    text = Image.open(path).text["parameters"]
    assert f"VAE hash: {result.request.vae.hash}, VAE: other.safetensors" in text
    record = read_record(path)
    assert record.request.vae == result.request.vae
    assert np.array_equal(pixels(vae_studio.replay(path).images[0]), pixels(result.images[0]))


def test_cli_vae_flag_is_never_vae_tiling(sd15_folder, models_dir, tmp_path):
    args = build_parser().parse_args(["generate", "x", "--vae", "other"])
    assert args.vae == "other" and args.vae_tiling is None
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "x", "--vae-til"])  # no abbreviations
    from studio.server import build_parser as server_parser

    with pytest.raises(SystemExit):
        server_parser().parse_args(["--vae"])
    common = ["--model", str(sd15_folder), "--models-dir", str(models_dir), "--steps", "1", "--seed", "5"]
    common += ["-W", "64", "-H", "64", "--quiet"]
    assert main(["generate", "a red circle", "--vae", "other", "-o", str(tmp_path / "vae.png"), *common]) == 0
    assert "VAE: other.safetensors" in Image.open(tmp_path / "vae.png").text["parameters"]


def test_vae_embedding_and_lora_together_then_the_base_again(vae_studio, models_dir, sd15_folder):
    from diffusers import UNet2DConditionModel
    from test_loras import write_kohya_lora

    write_kohya_lora(models_dir / "Lora" / "tiny.safetensors", UNet2DConditionModel.from_pretrained(sd15_folder / "unet"))
    (models_dir / "embeddings").mkdir(exist_ok=True)
    vectors = torch.randn(1, 32, generator=torch.Generator().manual_seed(2)) * 2
    save_file({"emb_params": vectors}, str(models_dir / "embeddings" / "blobstyle.safetensors"))
    base = render(vae_studio, "a red circle blobstyle")
    assert [ref.name_or_path for ref in base.request.embeddings] == ["blobstyle"]
    plain = render(vae_studio)
    together = render(vae_studio, "a red circle blobstyle <lora:tiny:1>", vae="other")
    assert together.request.vae.name_or_path == "other.safetensors" and together.request.loras[0].name_or_path == "tiny"
    assert np.abs(pixels(together.images[0]) - pixels(base.images[0])).max() > 0
    assert np.array_equal(pixels(render(vae_studio).images[0]), pixels(plain.images[0]))


def test_an_sdxl_model_takes_a_vae_file_too(sdxl_folder, models_dir):
    studio = Studio(Settings(model=str(sdxl_folder), models_dirs=(models_dir,)))
    base = render(studio)
    other = render(studio, vae="other")
    assert np.abs(pixels(other.images[0]) - pixels(base.images[0])).max() > 0
    assert np.array_equal(pixels(render(studio).images[0]), pixels(base.images[0]))
    view = next(iter(studio.models.vaes.entries.values()))
    assert type(view.pipe).__name__ == "StableDiffusionXLPipeline" and view.pipe.vae is not studio.models.get(None).pipe.vae


def test_the_a1111_api_lists_add_ons_and_takes_sd_vae_by_name(vae_studio, models_dir, sd15_folder, tmp_path):
    import base64
    import io

    from diffusers import UNet2DConditionModel
    from test_api import make_client, make_ui
    from test_loras import write_kohya_lora

    write_kohya_lora(models_dir / "Lora" / "tiny.safetensors", UNet2DConditionModel.from_pretrained(sd15_folder / "unet"))
    (models_dir / "embeddings").mkdir(exist_ok=True)
    save_file({"emb_params": torch.ones(1, 32)}, str(models_dir / "embeddings" / "blobstyle.safetensors"))
    api = make_client(make_ui(vae_studio, tmp_path))
    vaes = {entry["model_name"] for entry in api.get("/sdapi/v1/sd-vae").json()}
    assert {"other.safetensors", "own.safetensors", "other-folder"} <= vaes  # as A1111 names them, with the suffix
    assert "tiny" in {entry["name"] for entry in api.get("/sdapi/v1/loras").json()}
    assert "blobstyle" in api.get("/sdapi/v1/embeddings").json()["loaded"]

    def txt2img(**overrides):
        body = {"prompt": "a red circle", "seed": 3, "steps": 2, "width": 64, "height": 64, **overrides}
        response = api.post("/sdapi/v1/txt2img", json=body)
        assert response.status_code == 200, response.text
        return pixels(Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0]))))

    base = txt2img()
    assert np.array_equal(base, txt2img(override_settings={"sd_vae": "Automatic"}))
    assert np.abs(txt2img(override_settings={"sd_vae": "other"}) - base).max() > 0
    refused = api.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1, "override_settings": {"sd_vae": "/etc/passwd"}})
    assert refused.status_code == 422, refused.text


def test_a_flat_layout_vae_resolves_by_name(vae_studio, models_dir, other_vae, sd15_folder):
    """A1111's flat layout: a VAE beside the sub-folders, told by its keys as `studio models` lists it."""
    from diffusers import UNet2DConditionModel
    from test_loras import write_kohya_lora

    from studio.models import list_local_models

    write_ldm_vae(models_dir / "flatvae.safetensors", other_vae)
    write_kohya_lora(models_dir / "flatlora.safetensors", UNet2DConditionModel.from_pretrained(sd15_folder / "unet"))
    by_name = render(vae_studio, vae="flatvae")
    assert by_name.request.vae.name_or_path == "flatvae.safetensors" and len(by_name.request.vae.hash) == 10
    for vae in ("flatvae.safetensors", "other", str(models_dir / "flatvae.safetensors")):
        assert np.array_equal(pixels(render(vae_studio, vae=vae).images[0]), pixels(by_name.images[0])), vae
    listed = {entry["name"]: entry for entry in list_local_models(vae_studio.settings, add_ons=True)}
    assert (listed["flatvae.safetensors"]["type"], listed["flatvae.safetensors"]["reference"]) == ("vae", "flatvae.safetensors")
    # A LoRA beside it is not a VAE by name: not found, and the message says where a flat one is looked for.
    with pytest.raises(StudioInputError, match=r"VAE 'flatlora' not found; .* and for a VAE .safetensors of that name beside"):
        render(vae_studio, vae="flatlora")
