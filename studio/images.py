"""Reading input images safely: size limits before decoding, modes normalised, EXIF rotation applied."""

from __future__ import annotations

import hashlib
import io
import warnings
from pathlib import Path

from PIL import Image, ImageOps

from .requests import StudioInputError

# Raster formats a user may hand the studio; anything else (SVG, HTML, ...) is refused.
ALLOWED_FORMATS = {"PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF"}


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def image_sha256(image: Image.Image) -> str:
    """Hash of an in-memory image's pixels (mode and size included), for metadata and replay checks."""
    digest = hashlib.sha256(f"{image.mode}:{image.width}x{image.height}:".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


def open_image(source, *, max_pixels: int, name: str = "image", keep_alpha: bool = False) -> Image.Image:
    """Open a path, bytes or PIL image as RGB (or RGBA with keep_alpha), refusing bombs and non-raster files.

    The pixel count is checked from the header, before any pixel is decoded.
    """
    if isinstance(source, Image.Image):
        image = source
        if image.width * image.height > max_pixels:
            raise StudioInputError(f"{name} is {image.width}x{image.height}, more than the limit of {max_pixels} pixels")
    else:
        if isinstance(source, bytes):
            data = source
            label = name
        else:
            if isinstance(source, str) and source.lower().startswith(("http://", "https://", "ftp://", "file://")):
                # URL fetching is off: it would let a request make the server reach internal addresses.
                raise StudioInputError(f"{name} {source!r} is a URL; the studio does not fetch URLs, pass a file")
            path = Path(source)
            label = f"{name} {str(path)!r}"
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                raise StudioInputError(f"{label} does not exist") from None
            except IsADirectoryError:
                raise StudioInputError(f"{label} is a folder, not an image") from None
            except OSError as error:
                raise StudioInputError(f"{label} cannot be read: {error.strerror}") from None
        image = check_image_header(data, max_pixels=max_pixels, name=label)
        try:
            image.seek(0)  # animated images: the first frame
            image.load()
        except (OSError, SyntaxError, ValueError) as error:
            raise StudioInputError(f"{label} is damaged: {error}") from None
        image = ImageOps.exif_transpose(image)
    return normalise_mode(image, keep_alpha=keep_alpha)


def check_image_header(source, *, max_pixels: int, name: str = "image") -> Image.Image:
    """Open a path or bytes reading only the header: a raster format, at most max_pixels, else StudioInputError.

    `name` starts every message. Returns the image with no pixel decoded yet (load or close it).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    except Exception:  # PIL's errors for non-images, damaged headers and decompression bombs
        raise StudioInputError(f"{name} is not a readable raster image (or it is too large)") from None
    if image.format not in ALLOWED_FORMATS:
        image.close()
        raise StudioInputError(f"{name} has format {image.format!r}; use PNG, JPEG, WEBP, BMP, GIF or TIFF")
    if image.width * image.height > max_pixels:
        image.close()
        raise StudioInputError(f"{name} is {image.width}x{image.height}, more than the limit of {max_pixels} pixels")
    return image


def normalise_mode(image: Image.Image, *, keep_alpha: bool = False) -> Image.Image:
    """RGB (or RGBA) from any mode: palette, CMYK, 16-bit grey, LA, ..."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: scale to 8 bits instead of clipping to white.
        import numpy as np

        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") else max(float(array.max()), 1.0)
        image = Image.fromarray((array / peak * 255.0).clip(0, 255).astype("uint8"), mode="L")
    has_alpha = image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)
    if keep_alpha and has_alpha:
        return image.convert("RGBA")
    if has_alpha:
        # Transparent areas become white, as drawing apps show them.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")
