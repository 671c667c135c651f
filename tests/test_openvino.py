"""The OpenVINO backend (--backend openvino): the UNet and VAE decoder run in OpenVINO with PyTorch's numbers,
the conversion is saved and read back, and whatever the converted copy cannot compute runs in PyTorch."""

from __future__ import annotations

import math

import numpy as np
import pytest

from studio import Settings, Studio

PROMPT = "a red circle"


@pytest.fixture(scope="module")
def backends(sd15_folder, tmp_path_factory):
    """(torch studio, OpenVINO studio, the OpenVINO conversions' folder) on the tiny SD1.5 model."""
    cache = tmp_path_factory.mktemp("openvino")
    outputs = tmp_path_factory.mktemp("outputs")
    torch_studio = Studio(Settings(model=str(sd15_folder), outputs_dir=outputs))
    openvino_studio = Studio(Settings(model=str(sd15_folder), outputs_dir=outputs, backend="openvino",
                                      compiled_cache=cache))
    return torch_studio, openvino_studio, cache


def render(studio: Studio, **fields) -> np.ndarray:
    fields = {"seed": 3, "num_inference_steps": 4, **fields}
    return np.asarray(studio.text_to_image(PROMPT, **fields).images[0], dtype=np.float64)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    error = np.mean((a - b) ** 2)
    return math.inf if error == 0 else 10 * math.log10(255**2 / error)


def torch_unet_calls(studio: Studio, **fields) -> int:
    """How often PyTorch's UNet really ran (its first convolution) during one request."""
    unet = studio.models.get(None).pipe.unet
    calls = []
    handle = unet.conv_in.register_forward_hook(lambda *args: calls.append(1))
    try:
        render(studio, **fields)
    finally:
        handle.remove()
    return len(calls)


def test_openvino_renders_what_pytorch_renders_without_running_pytorchs_unet(backends):
    torch_studio, openvino_studio, cache = backends
    render(openvino_studio)  # the first call converts (tracing runs PyTorch's UNet)
    assert torch_unet_calls(openvino_studio) == 0
    assert torch_unet_calls(torch_studio) == 4  # one per step
    for seed in (1, 2):
        assert psnr(render(torch_studio, seed=seed), render(openvino_studio, seed=seed)) > 35
    assert {p.name for p in next(cache.iterdir()).glob("*.xml")} == {"unet.xml", "vae_decoder.xml"}


def test_the_vae_decodes_in_openvino_and_the_unet_is_left_plain_after_a_call(backends):
    _, openvino_studio, _ = backends
    render(openvino_studio)
    pipe = openvino_studio.models.get(None).pipe
    calls = []
    handle = pipe.vae.decoder.conv_in.register_forward_hook(lambda *args: calls.append(1))
    try:
        render(openvino_studio)
    finally:
        handle.remove()
    assert calls == []  # PyTorch's decoder never ran
    assert "forward" not in vars(pipe.unet)  # LoRAs and fine-tuning see the plain module between calls


def test_a_saved_conversion_is_read_back_not_converted_again(backends, sd15_folder, monkeypatch):
    import openvino

    _, openvino_studio, cache = backends
    render(openvino_studio)  # converted and saved (if no earlier test did)

    def refuse(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(openvino, "convert_model", refuse)
    again = Studio(Settings(model=str(sd15_folder), backend="openvino", compiled_cache=cache))
    assert torch_unet_calls(again) == 0
    assert np.array_equal(render(again), render(openvino_studio))


@pytest.mark.parametrize("fields", [
    {"cache_interval": 2},  # step caching needs PyTorch's blocks
    {"width": 72, "height": 72},  # a latent side the traced graph does not cover
])
def test_what_openvino_cannot_compute_runs_in_pytorch(backends, fields):
    torch_studio, openvino_studio, _ = backends
    assert torch_unet_calls(openvino_studio, **fields) > 0
    assert psnr(render(torch_studio, **fields), render(openvino_studio, **fields)) > 35


def test_an_unknown_backend_or_openvino_with_compile_is_refused(sd15_folder):
    with pytest.raises(ValueError, match="'tensorrt'"):
        Studio(Settings(model=str(sd15_folder), backend="tensorrt")).text_to_image(PROMPT, num_inference_steps=1)
    with pytest.raises(ValueError, match="alternatives"):
        Studio(Settings(model=str(sd15_folder), backend="openvino", compile=True)).text_to_image(
            PROMPT, num_inference_steps=1)
