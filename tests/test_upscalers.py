"""Model upscalers for the hires fix: tiny RRDBNet files (nf=8, nb=1, gc=4) written in the real key layouts
(Real-ESRGAN's "new arch", ESRGAN's "old arch", Real-ESRGAN's `params_ema` .pth) into an A1111 models folder's
ESRGAN/ and beside it; the network checked against a transcription of Real-ESRGAN's RRDBNet module, then used by
the hires fix, listed, refused when it should be."""

import json

import numpy as np
import pytest
import torch
from helpers import pixels
from PIL import Image
from safetensors.torch import save_file
from torch import nn
from torch.nn import functional as F

from studio import Settings, Studio
from studio.requests import StudioInputError
from studio.upscalers import Layout, read_upscaler_file, rrdbnet, upscale_tensor

FAST = {"seed": 3, "num_inference_steps": 2}


def rrdbnet_state(doublings=2, unshuffle=1, nf=8, nb=1, gc=4, seed=0) -> dict:
    """A random RRDBNet state dict with Real-ESRGAN's key names (x4: 2 doublings, no unshuffle)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}

    def put(name, out_channels, in_channels):
        state[f"{name}.weight"] = torch.randn(out_channels, in_channels, 3, 3, generator=generator) * 0.1
        state[f"{name}.bias"] = torch.randn(out_channels, generator=generator) * 0.01

    put("conv_first", nf, 3 * unshuffle**2)
    for block in range(nb):
        for rdb in (1, 2, 3):
            for conv in range(1, 6):
                put(f"body.{block}.rdb{rdb}.conv{conv}", gc if conv < 5 else nf, nf + (conv - 1) * gc)
    put("conv_body", nf, nf)
    for index in range(1, doublings + 1):
        put(f"conv_up{index}", nf, nf)
    put("conv_hr", nf, nf)
    put("conv_last", 3, nf)
    return state


def old_arch(state: dict, nb=1, doublings=2) -> dict:
    """The same weights under the original ESRGAN's names (model.0, model.1.sub.N.RDBM.convK.0, model.3, ...)."""
    names = {"conv_first": "model.0", "conv_body": f"model.1.sub.{nb}"}
    names |= {f"conv_up{n}": f"model.{3 * n}" for n in range(1, doublings + 1)}
    names |= {"conv_hr": f"model.{3 * doublings + 2}", "conv_last": f"model.{3 * doublings + 4}"}
    renamed = {}
    for key, value in state.items():
        name, part = key.rsplit(".", 1)
        if name.startswith("body."):
            _, block, rdb, conv = name.split(".")
            renamed[f"model.1.sub.{block}.RDB{rdb[-1]}.{conv}.0.{part}"] = value
        else:
            renamed[f"{names[name]}.{part}"] = value
    return renamed


class ReferenceRDB(nn.Module):
    """Real-ESRGAN's (basicsr's) ResidualDenseBlock, as published."""

    def __init__(self, nf, gc):
        super().__init__()
        for index in range(1, 6):
            setattr(self, f"conv{index}", nn.Conv2d(nf + (index - 1) * gc, gc if index < 5 else nf, 3, 1, 1))
        self.lrelu = nn.LeakyReLU(negative_slope=0.2, inplace=True)

    def forward(self, x):
        x1 = self.lrelu(self.conv1(x))
        x2 = self.lrelu(self.conv2(torch.cat((x, x1), 1)))
        x3 = self.lrelu(self.conv3(torch.cat((x, x1, x2), 1)))
        x4 = self.lrelu(self.conv4(torch.cat((x, x1, x2, x3), 1)))
        x5 = self.conv5(torch.cat((x, x1, x2, x3, x4), 1))
        return x5 * 0.2 + x


class ReferenceRRDB(nn.Module):
    def __init__(self, nf, gc):
        super().__init__()
        self.rdb1, self.rdb2, self.rdb3 = ReferenceRDB(nf, gc), ReferenceRDB(nf, gc), ReferenceRDB(nf, gc)

    def forward(self, x):
        return self.rdb3(self.rdb2(self.rdb1(x))) * 0.2 + x


class ReferenceRRDBNet(nn.Module):
    """Real-ESRGAN's RRDBNet (basicsr.archs.rrdbnet_arch), as published: x4, x2 and x1 by pixel-unshuffle."""

    def __init__(self, scale=4, nf=8, nb=1, gc=4):
        super().__init__()
        self.scale = scale
        self.conv_first = nn.Conv2d(3 * {4: 1, 2: 4, 1: 16}[scale], nf, 3, 1, 1)
        self.body = nn.Sequential(*[ReferenceRRDB(nf, gc) for _ in range(nb)])
        self.conv_body = nn.Conv2d(nf, nf, 3, 1, 1)
        self.conv_up1 = nn.Conv2d(nf, nf, 3, 1, 1)
        self.conv_up2 = nn.Conv2d(nf, nf, 3, 1, 1)
        self.conv_hr = nn.Conv2d(nf, nf, 3, 1, 1)
        self.conv_last = nn.Conv2d(nf, 3, 3, 1, 1)
        self.lrelu = nn.LeakyReLU(negative_slope=0.2, inplace=True)

    def forward(self, x):
        feat = F.pixel_unshuffle(x, {4: 1, 2: 2, 1: 4}[self.scale]) if self.scale < 4 else x
        feat = self.conv_first(feat)
        feat = feat + self.conv_body(self.body(feat))
        feat = self.lrelu(self.conv_up1(F.interpolate(feat, scale_factor=2, mode="nearest")))
        feat = self.lrelu(self.conv_up2(F.interpolate(feat, scale_factor=2, mode="nearest")))
        return self.conv_last(self.lrelu(self.conv_hr(feat)))


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models-dir")
    (folder / "ESRGAN").mkdir()
    (folder / "RealESRGAN").mkdir()
    save_file(rrdbnet_state(), str(folder / "ESRGAN" / "tiny-x4.safetensors"))
    save_file(old_arch(rrdbnet_state()), str(folder / "ESRGAN" / "tiny-old.safetensors"))
    torch.save({"params_ema": rrdbnet_state()}, folder / "RealESRGAN" / "tiny-pth.pth")
    save_file(rrdbnet_state(doublings=2, unshuffle=2, seed=1), str(folder / "tiny-x2.safetensors"))  # flat layout
    save_file({"body.0.weight": torch.zeros(8, 3, 3, 3), "body.0.bias": torch.zeros(8)},
              str(folder / "ESRGAN" / "compact.safetensors"))  # Real-ESRGAN's SRVGGNetCompact: not supported
    save_file({**rrdbnet_state(), "conv_extra.weight": torch.zeros(8, 8, 3, 3)},
              str(folder / "ESRGAN" / "extra.safetensors"))
    return folder


@pytest.fixture(scope="module")
def hires_studio(sd15_folder, models_dir, tmp_path_factory):
    return Studio(Settings(model=str(sd15_folder), models_dirs=(models_dir,), outputs_dir=tmp_path_factory.mktemp("out")))


def render(studio, **fields):
    return studio.text_to_image("a red circle", **{**FAST, **fields})


@pytest.mark.parametrize("scale", [4, 2, 1])
def test_the_network_is_real_esrgans_rrdbnet(scale, tmp_path):
    unshuffle = {4: 1, 2: 2, 1: 4}[scale]
    state = rrdbnet_state(unshuffle=unshuffle, seed=scale)
    reference = ReferenceRRDBNet(scale)
    reference.load_state_dict(state, strict=True)  # the same key names
    save_file(state, str(tmp_path / "model.safetensors"))
    layout, weights = read_upscaler_file(tmp_path / "model.safetensors")
    assert layout == Layout(blocks=1, doublings=2, unshuffle=unshuffle) and layout.scale == scale
    image = torch.rand(1, 3, 12, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(image)
    got = rrdbnet(image, weights, layout)
    assert got.shape == (1, 3, 12 * scale, 16 * scale)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_old_arch_names_load_the_same_weights(models_dir):
    new_layout, new = read_upscaler_file(models_dir / "ESRGAN" / "tiny-x4.safetensors")
    old_layout, old = read_upscaler_file(models_dir / "ESRGAN" / "tiny-old.safetensors")
    assert old_layout == new_layout and old.keys() == new.keys()
    assert all(torch.equal(old[key], new[key]) for key in new)


def test_tiles_give_the_whole_image_when_the_overlap_covers_what_the_network_sees(models_dir):
    layout, weights = read_upscaler_file(models_dir / "ESRGAN" / "tiny-x4.safetensors")
    image = torch.rand(1, 3, 40, 36, generator=torch.Generator().manual_seed(1))
    whole = upscale_tensor(image, weights, layout, tile=None)
    tiles = []
    tiled = upscale_tensor(image, weights, layout, tile=16, overlap=24, before_tile=lambda: tiles.append(1))
    assert len(tiles) == 9  # 3 x 3 tiles, each after a cancel check; the network sees about 19 px around
    torch.testing.assert_close(tiled, whole, rtol=1e-4, atol=1e-4)
    seams = upscale_tensor(image, weights, layout, tile=16, overlap=0)  # A1111's small overlap: close, not equal
    assert 0 < (seams - whole).abs().max() and (seams - whole).abs().mean() < 0.05
    # x2 by pixel-unshuffle, on odd sides and odd tiles
    layout2, weights2 = read_upscaler_file(models_dir / "tiny-x2.safetensors")
    odd = torch.rand(1, 3, 27, 21, generator=torch.Generator().manual_seed(2))
    assert upscale_tensor(odd, weights2, layout2, tile=None).shape == (1, 3, 54, 42)
    torch.testing.assert_close(
        upscale_tensor(odd, weights2, layout2, tile=11, overlap=24), upscale_tensor(odd, weights2, layout2, tile=None),
        rtol=1e-4, atol=1e-4,
    )


def test_hires_with_a_model_upscaler_is_the_models_upscale_then_lanczos(hires_studio, models_dir):
    base = render(hires_studio).images[0]
    lanczos = render(hires_studio, hr_scale=1.5, hr_denoising_strength=0)
    model = render(hires_studio, hr_scale=1.5, hr_denoising_strength=0, hr_upscaler="tiny-x4")
    layout, weights = read_upscaler_file(models_dir / "ESRGAN" / "tiny-x4.safetensors")
    x = torch.from_numpy(np.asarray(base, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    by_hand = (upscale_tensor(x, weights, layout)[0].clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    expected = Image.fromarray(by_hand).resize((96, 96), Image.LANCZOS)  # 4x by the model, then to the target
    assert model.images[0].size == (96, 96)
    assert np.array_equal(pixels(model.images[0]), pixels(expected))
    assert np.abs(pixels(model.images[0]) - pixels(lanczos.images[0])).mean() > 1.0
    ref = model.request.hr_upscaler
    assert ref.name == "tiny-x4" and len(ref.hash) == 10
    refined = render(hires_studio, hr_scale=2, hr_steps=2, hr_upscaler="tiny-x4")  # and the refining pass runs on it
    assert refined.images[0].size == (128, 128)
    assert np.abs(pixels(refined.images[0]) - pixels(render(hires_studio, hr_scale=2, hr_steps=2).images[0])).max() > 0
    loads = hires_studio.models.upscaler_files.loads
    render(hires_studio, hr_scale=1.5, hr_denoising_strength=0, hr_upscaler="tiny-x4")
    assert hires_studio.models.upscaler_files.loads == loads  # read once per file version


def test_a_model_smaller_than_the_target_runs_again_as_in_a1111(hires_studio, models_dir):
    """An x2 model for hr_scale 4: two passes (64 -> 128 -> 256), each written to 8-bit pixels, then the target."""
    base = render(hires_studio).images[0]
    result = render(hires_studio, hr_scale=4, hr_denoising_strength=0, hr_upscaler="tiny-x2")
    layout, weights = read_upscaler_file(models_dir / "tiny-x2.safetensors")
    image = base
    for _ in range(2):
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[None]
        out = upscale_tensor(x, weights, layout)[0].clamp(0, 1).permute(1, 2, 0).numpy()
        image = Image.fromarray((out * 255).round().astype(np.uint8))
    assert image.size == result.images[0].size == (256, 256)
    assert np.array_equal(pixels(result.images[0]), pixels(image))


def test_metadata_names_the_upscaler_with_its_hash_and_replays(hires_studio, tmp_path):
    result = render(hires_studio, hr_scale=1.5, hr_steps=2, hr_upscaler="tiny-old")
    (path,) = result.save(tmp_path / "esrgan.png")
    text = Image.open(path).text["parameters"]
    assert f"Hires upscaler: tiny-old, Hires upscaler hash: {result.request.hr_upscaler.hash}" in text
    replayed = hires_studio.replay(path)
    assert replayed.request.hr_upscaler == result.request.hr_upscaler
    assert np.array_equal(pixels(replayed.images[0]), pixels(result.images[0]))
    from studio.metadata import parse_a1111_parameters

    assert parse_a1111_parameters(text).request.hr_upscaler.name == "tiny-old"  # A1111 text read back keeps it


def test_a_pickle_needs_the_opt_in(hires_studio, models_dir):
    with pytest.raises(StudioInputError, match=r"upscaler 'tiny-pth' \(.*tiny-pth.pth\) is a pickle \(.pth\).*--allow-pickle"):
        render(hires_studio, hr_scale=1.5, hr_upscaler="tiny-pth")
    opted = Studio(hires_studio.settings.with_(allow_pickle=True))
    from_pickle = render(opted, hr_scale=1.5, hr_denoising_strength=0, hr_upscaler="tiny-pth")  # params_ema unwrapped
    from_safetensors = render(hires_studio, hr_scale=1.5, hr_denoising_strength=0, hr_upscaler="tiny-x4")
    assert np.array_equal(pixels(from_pickle.images[0]), pixels(from_safetensors.images[0]))


def test_bad_upscalers_are_clear_errors(hires_studio, models_dir, sd15_folder):
    fresh = Studio(Settings(model=str(sd15_folder), models_dirs=(models_dir,)))
    with pytest.raises(StudioInputError, match=r"hr_upscaler 'nope' is not lanczos, nearest, latent, nor an upscaler model; looked in .*ESRGAN"):
        render(fresh, hr_scale=1.5, hr_upscaler="nope")
    assert fresh.models.loaded_models() == []  # found missing before any model loads
    with pytest.raises(StudioInputError, match="not a path"):
        render(fresh, hr_scale=1.5, hr_upscaler=str(models_dir / "ESRGAN" / "tiny-x4.safetensors"))
    with pytest.raises(StudioInputError, match="no models folder is set"):
        render(Studio(Settings(model=str(sd15_folder))), hr_scale=1.5, hr_upscaler="tiny-x4")
    with pytest.raises(StudioInputError, match=r"upscaler 'compact' \(.*compact.safetensors\) is not an ESRGAN/Real-ESRGAN RRDBNet model"):
        render(hires_studio, hr_scale=1.5, hr_upscaler="compact")
    with pytest.raises(StudioInputError, match=r"upscaler 'extra' .* unknown keys \(conv_extra.weight\)"):
        render(hires_studio, hr_scale=1.5, hr_upscaler="extra")


def test_listed_in_studio_models_the_ui_and_the_a1111_api(hires_studio, models_dir, tmp_path, capsys):
    from test_api import make_client, make_ui

    from studio.cli import main
    from studio.ui.models_tab import upscaler_choices

    assert main(["models", "--models-dir", str(models_dir), "--no-hash"]) == 0
    rows = {row.split()[1]: row.split() for row in capsys.readouterr().out.splitlines()[1:]}
    assert rows["tiny-x4"][0] == "upscaler" and rows["tiny-x4"][2] == "esrgan-x4" and rows["tiny-x4"][-1] == "tiny-x4"
    assert rows["tiny-x2"][:3] == ["upscaler", "tiny-x2", "esrgan-x2"]  # the flat layout, told by its keys
    assert rows["tiny-pth"][0] == "upscaler"  # a pickle: listed, not opened
    choices = upscaler_choices(hires_studio.settings)
    assert choices[:3] == ["lanczos", "nearest", "latent"] and {"tiny-x4", "tiny-old", "tiny-pth", "tiny-x2"} <= set(choices)
    api = make_client(make_ui(hires_studio, tmp_path))
    listed = {entry["name"]: entry for entry in api.get("/sdapi/v1/upscalers").json()}
    assert listed["tiny-x2"]["scale"] == 2 and listed["tiny-x4"]["scale"] == 4 and "Lanczos" in listed
    body = {"prompt": "a red circle", "steps": 2, "width": 64, "height": 64, "seed": 3, "enable_hr": True,
            "hr_scale": 1.5, "hr_upscaler": "tiny-x4", "denoising_strength": 0.6, "hr_second_pass_steps": 2}
    answer = api.post("/sdapi/v1/txt2img", json=body)
    assert answer.status_code == 200, answer.text
    info = json.loads(answer.json()["info"])
    assert "Hires upscaler: tiny-x4" in info["infotexts"][0] and not info.get("warnings")


def test_the_cli_takes_an_upscaler_by_name(sd15_folder, models_dir, tmp_path):
    from studio.cli import main

    common = ["--model", str(sd15_folder), "--models-dir", str(models_dir), "--steps", "2", "--seed", "3", "--quiet"]
    common += ["-W", "64", "-H", "64", "--hr-scale", "1.5", "--hr-denoising-strength", "0"]
    assert main(["generate", "a red circle", "--hr-upscaler", "tiny-x4", "-o", str(tmp_path / "model.png"), *common]) == 0
    assert main(["generate", "a red circle", "-o", str(tmp_path / "lanczos.png"), *common]) == 0
    model, lanczos = Image.open(tmp_path / "model.png"), Image.open(tmp_path / "lanczos.png")
    assert model.size == lanczos.size == (96, 96) and model.tobytes() != lanczos.tobytes()
    assert "Hires upscaler: tiny-x4, Hires upscaler hash: " in model.text["parameters"]
    assert main(["generate", "a red circle", "--hr-upscaler", "nope", "-o", str(tmp_path / "nope.png"), *common]) != 0
