"""Small helpers shared by the task tests."""

import contextlib
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


@contextlib.contextmanager
def counting_http_server():
    """A server on loopback that redirects to a link-local address, recording every request it gets:
    yields (a URL on it, the list of paths requested). The studio must never fetch it."""
    import http.server
    import threading

    hits = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the handler's API
            hits.append(self.path)
            self.send_response(302)
            self.send_header("Location", "http://169.254.169.254/latest/meta-data/")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/x.png", hits
    finally:
        server.shutdown()
        server.server_close()
