"""The web UI's pickers for what the models folders hold: the VAE dropdown of every task tab that takes a VAE
(A1111's "SD VAE"), driven through the served app with gradio_client as a browser's API call is."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from helpers import client_for, pixels, serve
from PIL import Image

pytest.importorskip("gradio")
pytest.importorskip("gradio_client")

from test_vae import write_ldm_vae  # noqa: E402
from tiny_models import _vae  # noqa: E402

from studio import Settings, Studio  # noqa: E402
from studio.metadata import read_record  # noqa: E402

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


def test_the_vae_picker_lists_the_models_folders_vaes_by_name(served):
    blocks = _blocks(served)
    for task in ("text_to_image", "inpaint", "sketch_to_image", "style_transfer"):
        assert blocks[f"{task}-vae"].choices == [("Automatic", ""), ("other.safetensors", "other.safetensors")], task
        assert blocks[f"{task}-vae"].value == ""  # Automatic: the model's own
    assert "imagic-vae" not in blocks  # imagic refuses another VAE


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


def test_the_picker_takes_no_path(served, tmp_path):
    client = client_for(served.url, tmp_path)
    with pytest.raises(Exception, match="not in the list of choices"):
        _render(client, vae="/etc/passwd")
