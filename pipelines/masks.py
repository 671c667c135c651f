"""Mask preprocessing for inpainting and outpainting: pure numpy/PIL, no model, cheap enough to run twice.

Conventions (the same for the CLI, batch lines, the UI and the Python API):

- A mask image without transparency: white (grey >= 128) = repaint, black = keep.
- A mask image with transparency (RGBA whose alpha is not all 255), as browser editors export a paint
  layer: the painted area (alpha > 0) is repainted, whatever its colour; the transparent area is kept.
- No mask image and an input image with transparency (erased with an eraser tool): the area that is not
  fully opaque (alpha < 255) is repainted. The image itself is flattened onto white (`toolbox.flatten`).
- Outpainting: the added canvas is always repainted.

Geometry is Chebyshev (square) distance throughout, so every radius is exact and cheap:
- `grow_mask(mask, n)`: n > 0 dilates by n pixels, n < 0 erodes (the image border never erodes a mask
  that touches it).
- `feather(mask, r)`: a soft mask in [0, 1], 0.5 on the mask's edge, exactly 0 farther than r pixels
  outside the mask and exactly 1 farther than r pixels inside it (two box blurs of radii r//2 and
  r - r//2, done in integer arithmetic so "exactly 0" really is 0).
- `composite(original, generated, m)`: original * (1 - m) + generated * m, and pixels where m == 0 are
  the original's bytes.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from .toolbox import flatten, has_transparency

MASK_THRESHOLD = 128  # grey mask values >= this are "repaint"


# -- reading masks ------------------------------------------------------------------------------------


def mask_from_image(mask_image: Image.Image) -> np.ndarray:
    """bool (H, W), True = repaint: alpha > 0 for a mask with transparency, else grey >= 128."""
    if has_transparency(mask_image):
        return np.asarray(mask_image.getchannel("A")) > 0
    return np.asarray(flatten(mask_image).convert("L")) >= MASK_THRESHOLD


def mask_from_transparency(image: Image.Image) -> np.ndarray:
    """bool (H, W), True where the image is not fully opaque (the erased area)."""
    return np.asarray(image.getchannel("A")) < 255


# -- geometry -------------------------------------------------------------------------------------------


def _box_sum(values: np.ndarray, radius: int) -> np.ndarray:
    """Sum over the (2r+1)^2 square around each pixel, edges replicated; integers in, exact integers out."""
    if radius <= 0:
        return values.astype(np.int64)
    out = values.astype(np.int64)
    for axis in (0, 1):
        pad = [(0, 0), (0, 0)]
        pad[axis] = (radius + 1, radius)
        padded = np.pad(out, pad, mode="edge")
        csum = np.cumsum(padded, axis=axis)
        n = out.shape[axis]
        upper = np.take(csum, np.arange(2 * radius + 1, 2 * radius + 1 + n), axis=axis)
        lower = np.take(csum, np.arange(0, n), axis=axis)
        out = upper - lower
    return out


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Every pixel within `radius` (Chebyshev) of the mask."""
    if radius <= 0:
        return mask.copy()
    return _box_sum(mask.astype(np.uint8), radius) > 0


def erode(mask: np.ndarray, radius: int) -> np.ndarray:
    """The pixels whose whole `radius` square is in the mask (the border counts as continuing the mask)."""
    if radius <= 0:
        return mask.copy()
    return ~dilate(~mask, radius)


def grow_mask(mask: np.ndarray, pixels: int) -> np.ndarray:
    """Grow (pixels > 0) or shrink (pixels < 0) the mask."""
    return dilate(mask, pixels) if pixels >= 0 else erode(mask, -pixels)


def feather(mask: np.ndarray, radius: int) -> np.ndarray:
    """A soft float64 mask in [0, 1]; nonzero only within `radius` pixels of the mask."""
    if radius <= 0:
        return mask.astype(np.float64)
    small, large = radius // 2, radius - radius // 2
    sums = _box_sum(_box_sum(mask.astype(np.uint8), small), large)
    return sums / float((2 * small + 1) ** 2 * (2 * large + 1) ** 2)


def feather_inside(mask: np.ndarray, radius: int) -> np.ndarray:
    """A soft mask that is 0 everywhere outside `mask` and ramps up inside it (for outpainting seams)."""
    if radius <= 0:
        return mask.astype(np.float64)
    return np.clip(2.0 * feather(mask, radius) - 1.0, 0.0, 1.0) * mask


def bounding_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """(left, top, right, bottom), right/bottom exclusive, of the True pixels; None when empty."""
    rows, cols = np.any(mask, axis=1), np.any(mask, axis=0)
    if not rows.any():
        return None
    top, bottom = np.argmax(rows), len(rows) - np.argmax(rows[::-1])
    left, right = np.argmax(cols), len(cols) - np.argmax(cols[::-1])
    return int(left), int(top), int(right), int(bottom)


def crop_box_for(mask: np.ndarray, padding: int, aspect: float, canvas: tuple[int, int]) -> tuple[int, int, int, int]:
    """The region "only masked" mode inpaints: the mask's box plus `padding`, widened (never narrowed)
    towards the working size's aspect ratio (width / height), kept inside the canvas (width, height)."""
    width, height = canvas
    left, top, right, bottom = bounding_box(mask)
    left, top, right, bottom = left - padding, top - padding, right + padding, bottom + padding
    box_w, box_h = right - left, bottom - top
    if box_w / box_h < aspect:
        box_w = min(width, int(np.ceil(box_h * aspect)))
    else:
        box_h = min(height, int(np.ceil(box_w / aspect)))
    box_w, box_h = min(max(box_w, right - left), width), min(max(box_h, bottom - top), height)
    cx, cy = (left + right) / 2, (top + bottom) / 2
    left = int(round(cx - box_w / 2))
    top = int(round(cy - box_h / 2))
    left = min(max(left, 0), width - box_w)
    top = min(max(top, 0), height - box_h)
    return left, top, left + box_w, top + box_h


def latent_cells(mask: np.ndarray, factor: int) -> np.ndarray:
    """The mask widened to whole factor x factor cells (the VAE's latent grid), so that the pipeline's
    nearest-neighbour downsampling cannot drop a thin stroke. Height and width must be multiples of factor."""
    if factor <= 1:
        return mask.copy()
    h, w = mask.shape
    cells = mask.reshape(h // factor, factor, w // factor, factor).any(axis=(1, 3))
    return np.repeat(np.repeat(cells, factor, axis=0), factor, axis=1)


# -- pixels -----------------------------------------------------------------------------------------


def mask_to_image(mask: np.ndarray) -> Image.Image:
    """A bool or [0, 1] mask as an "L" image (white = repaint)."""
    if mask.dtype == bool:
        return Image.fromarray(mask.astype(np.uint8) * 255, "L")
    return Image.fromarray((np.clip(mask, 0, 1) * 255).round().astype(np.uint8), "L")


def pad_edges(image: Image.Image, left: int, top: int, right: int, bottom: int) -> Image.Image:
    """The image on a larger canvas whose new pixels repeat the nearest edge pixel."""
    array = np.asarray(image)
    pad = [(top, bottom), (left, right)] + [(0, 0)] * (array.ndim - 2)
    return Image.fromarray(np.pad(array, pad, mode="edge"), image.mode)


def pad_mask(mask: np.ndarray, left: int, top: int, right: int, bottom: int, mode: str = "constant") -> np.ndarray:
    return np.pad(mask, [(top, bottom), (left, right)], mode=mode)


def resize_mask(mask: np.ndarray, size: tuple[int, int], any_pixel: bool = False) -> np.ndarray:
    """A bool mask resized to (width, height): majority (bilinear >= 0.5) or, with any_pixel, every
    pixel the mask touches at all."""
    if (mask.shape[1], mask.shape[0]) == tuple(size):
        return mask.copy()
    resized = np.asarray(mask_to_image(mask).resize(size, Image.BILINEAR))
    return resized > 0 if any_pixel else resized >= MASK_THRESHOLD


def composite(original: Image.Image, generated: Image.Image, soft_mask: np.ndarray) -> Image.Image:
    """original * (1 - m) + generated * m in pixel space; where m == 0 the original bytes are kept."""
    orig = np.asarray(original.convert("RGB"))
    gen = np.asarray(generated.convert("RGB"))
    m = soft_mask[..., None]
    blended = np.round(orig + (gen.astype(np.float64) - orig) * m).clip(0, 255).astype(np.uint8)
    return Image.fromarray(np.where(m > 0, blended, orig), "RGB")
