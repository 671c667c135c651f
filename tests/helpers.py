"""Small helpers shared by the task tests."""

import hashlib
import importlib.util
import sys
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


def load_app():
    """app.py lives at the repository root, outside the package; import it once as module `app`."""
    if "app" not in sys.modules:
        spec = importlib.util.spec_from_file_location("app", Path(__file__).resolve().parent.parent / "app.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["app"] = module
        spec.loader.exec_module(module)
    return sys.modules["app"]


def serve(studio, settings, **options):
    """The web app served on a free loopback port as `python app.py` serves it (not blocking)."""
    from studio.server import free_port

    app = load_app()
    settings = settings.with_(port=free_port())
    demo = app.build_app(studio, settings, queue_size=options.pop("queue_size", 8))
    _, url, _ = app.launch(demo, settings, block=False, quiet=True, **options)
    return SimpleNamespace(url=url, demo=demo, settings=settings, outputs=Path(settings.outputs_dir).resolve())


def client_for(url, tmp_path):
    from gradio_client import Client

    return Client(url, verbose=False, download_files=str(tmp_path), analytics_enabled=False)
