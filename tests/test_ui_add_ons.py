"""The web UI's pickers for what the models folders hold: the VAE dropdown of every task tab that takes a VAE
(A1111's "SD VAE") and the hires fix's upscaler dropdown, driven through the served app with gradio_client as a
browser's API call is."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from helpers import client_for, pixels, serve
from PIL import Image

pytest.importorskip("gradio")
pytest.importorskip("gradio_client")

from test_vae import write_ldm_vae
from tiny_models import _vae

from studio import Settings, Studio
from studio.metadata import read_record

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models-dir")
    write_ldm_vae(folder / "VAE" / "other.safetensors", _vae(seed=5))
    return folder


@pytest.fixture(scope="module")
def served(sd15_folder, models_dir, tmp_path_factory):
    studio = Studio(
        Settings(model=str(sd15_folder), models_dirs=(models_dir,), outputs_dir=tmp_path_factory.mktemp("outputs"))
    )
    server = serve(studio, studio.settings)
    yield server
    server.demo.close()


def _blocks(served) -> dict:
    return {getattr(block, "elem_id", None): block for block in served.demo.blocks.values()}


def _render(client, **fields) -> Path:
    fields = {"prompt": "a red circle", "seed": 5, "num_inference_steps": 2, **fields}
    gallery, _, _ = client.predict(**fields, api_name="/text_to_image")
    return Path(gallery[0]["image"])


def _on_focus(served, block):
    """What opening a dropdown gives it (its focus event's function, called as gradio calls it)."""
    (function,) = [fn for fn in served.demo.fns.values() if (block._id, "focus") in [tuple(t) for t in fn.targets]]
    return function.fn()


def test_the_vae_picker_lists_the_models_folders_vaes_by_name(served):
    blocks = _blocks(served)
    listed = [("Automatic", ""), ("other.safetensors", "other.safetensors")]
    for task in ("text_to_image", "inpaint", "sketch_to_image", "style_transfer"):
        picker = blocks[f"{task}-vae"]
        assert picker.value == ""  # Automatic: the model's own
        assert picker.choices == [("Automatic", "")]  # at page load: the listing needs torch, which loads later
        assert _on_focus(served, picker).constructor_args["choices"] == listed, task  # read when opened
    assert "imagic-vae" not in blocks  # imagic refuses another VAE


def test_the_hires_upscaler_picker_lists_the_models_folders_upscalers(served, models_dir):
    from safetensors.torch import save_file
    from test_upscalers import rrdbnet_state

    save_file(rrdbnet_state(), str(models_dir / "ESRGAN-like.safetensors"))  # the flat layout, told by its keys
    picker = _blocks(served)["text_to_image-hr_upscaler"]
    assert picker.choices == [(name, name) for name in ("lanczos", "nearest", "latent")] and picker.value == "lanczos"
    choices = _on_focus(served, picker).constructor_args["choices"]
    assert choices == ["lanczos", "nearest", "latent", "ESRGAN-like"]


def test_a_picked_vae_reaches_the_request_and_changes_the_image(served, tmp_path):
    client = client_for(served.url, tmp_path)
    automatic = _render(client, vae="")
    picked = _render(client, vae="other.safetensors")
    assert read_record(automatic).request.vae is None
    vae = read_record(picked).request.vae
    assert vae.name_or_path == "other.safetensors" and len(vae.hash) == 10
    assert f"VAE hash: {vae.hash}, VAE: other.safetensors" in Image.open(picked).text["parameters"]
    assert np.abs(pixels(Image.open(picked)) - pixels(Image.open(automatic))).max() > 0
    # Left out by an API client: the model's own, as before the picker existed.
    assert np.array_equal(pixels(Image.open(_render(client))), pixels(Image.open(automatic)))


def test_the_picker_takes_no_path_on_a_server(sd15_folder, models_dir, tmp_path):
    """A name typed or sent that the list lacks is the request's to check: a server takes names only."""
    settings = Settings(model=str(sd15_folder), models_dirs=(models_dir,), outputs_dir=tmp_path / "out", lora_paths=False)
    server = serve(Studio(settings), settings)
    try:
        client = client_for(server.url, tmp_path)
        with pytest.raises(Exception, match="takes VAEs by name"):
            _render(client, vae="/etc/passwd")
        with pytest.raises(Exception, match="VAE 'nope' not found"):
            _render(client, vae="nope")
    finally:
        server.demo.close()
