"""The studio: text-to-image and image editing on diffusers, offline-first.

`from studio import Studio` is the Python API; heavy libraries load on first use.
"""

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy, so that `studio info` and the request schema do not import torch.
    if name in ("Studio", "Result"):
        from . import core

        return getattr(core, name)
    if name == "Settings":
        from .settings import Settings

        return Settings
    raise AttributeError(name)


__all__ = ["Studio", "Result", "Settings", "__version__"]
