"""Small helpers shared by the task tests."""

import hashlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from PIL import Image


def pixels(image):
    return np.asarray(image, dtype=np.int16)


def noise_image(seed: int, size=(64, 64)) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(size[1], size[0], 3) * 255).astype("uint8"))


def unet_fingerprint(unet) -> tuple:
    """Every parameter's bytes, dtype and flags, and which processor object sits in every attention layer."""
    digest = hashlib.sha256()
    for name, param in unet.named_parameters():
        digest.update(f"{name}:{param.dtype}:{param.requires_grad}:{param.grad is None}".encode())
        digest.update(param.detach().cpu().numpy().tobytes())
    return digest.hexdigest(), {name: (type(p).__name__, id(p)) for name, p in unet.attn_processors.items()}


def serve(studio, settings, **options):
    """The web app served on a free loopback port as `python app.py` serves it (not blocking)."""
    from studio.server import free_port
    from studio.ui import build_app, launch

    settings = settings.with_(port=free_port())
    demo = build_app(studio, settings, queue_size=options.pop("queue_size", 8))
    _, url, _ = launch(demo, settings, block=False, quiet=True, **options)
    return SimpleNamespace(url=url, demo=demo, settings=settings, outputs=Path(settings.outputs_dir).resolve())


def client_for(url, tmp_path):
    from gradio_client import Client

    return Client(url, verbose=False, download_files=str(tmp_path), analytics_enabled=False)
