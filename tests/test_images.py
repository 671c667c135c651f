"""Input images: bombs, non-raster files, odd modes and orientations."""

import io

import numpy as np
import pytest
from PIL import Image

from studio.images import image_sha256, open_image
from studio.requests import StudioInputError

LIMIT = 4096 * 4096


def png_bytes(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_decompression_bomb_is_refused_from_the_header(tmp_path):
    # A 1-bit 20000x20000 PNG is a few kB on disk and 400M pixels once decoded.
    bomb = tmp_path / "bomb.png"
    Image.new("1", (20000, 20000)).save(bomb, optimize=True)
    assert bomb.stat().st_size < 200_000
    with pytest.raises(StudioInputError, match="bomb.png"):
        open_image(bomb, max_pixels=LIMIT)


def test_svg_and_html_posing_as_png_are_refused(tmp_path):
    fake = tmp_path / "x.png"
    fake.write_text('<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>')
    with pytest.raises(StudioInputError, match="not a readable raster image"):
        open_image(fake, max_pixels=LIMIT)


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(StudioInputError, match="nope.png"):
        open_image(tmp_path / "nope.png", max_pixels=LIMIT)


def test_modes_are_normalised_to_rgb():
    cmyk = open_image(Image.new("CMYK", (4, 4), (0, 255, 255, 0)), max_pixels=LIMIT)  # red in CMYK
    assert cmyk.mode == "RGB" and cmyk.getpixel((0, 0))[0] > 200 and cmyk.getpixel((0, 0))[1] < 50
    deep = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    assert open_image(png_bytes(deep), max_pixels=LIMIT).getpixel((0, 0)) == (255, 255, 255)
    palette = Image.new("P", (1, 1))
    palette.putpalette([0, 0, 255] * 256)
    assert open_image(palette, max_pixels=LIMIT).getpixel((0, 0)) == (0, 0, 255)
    transparent = Image.new("RGBA", (2, 2), (255, 0, 0, 0))
    assert open_image(transparent, max_pixels=LIMIT).getpixel((0, 0)) == (255, 255, 255)  # onto white
    assert open_image(transparent, max_pixels=LIMIT, keep_alpha=True).mode == "RGBA"


def test_exif_rotation_is_applied():
    image = Image.new("RGB", (4, 2), (0, 0, 0))
    image.putpixel((0, 0), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise when shown
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", exif=exif)
    opened = open_image(buffer.getvalue(), max_pixels=LIMIT)
    assert opened.size == (2, 4)
    assert opened.getpixel((1, 0)) == (255, 0, 0)  # the top-left pixel moved to the top-right


def test_animated_image_gives_its_first_frame():
    frames = [Image.new("RGB", (4, 4), colour) for colour in [(255, 0, 0), (0, 0, 255)]]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    assert open_image(buffer.getvalue(), max_pixels=LIMIT).getpixel((0, 0))[0] > 200


def test_hash_depends_on_pixels():
    a = Image.new("RGB", (2, 2), (1, 2, 3))
    b = Image.new("RGB", (2, 2), (1, 2, 4))
    assert image_sha256(a) == image_sha256(a.copy()) != image_sha256(b)


@pytest.mark.parametrize("url", ["http://127.0.0.1:8080/x.png", "https://169.254.169.254/latest", "file:///etc/passwd"])
def test_urls_are_never_fetched(url):
    with pytest.raises(StudioInputError, match="does not fetch URLs"):
        open_image(url, max_pixels=LIMIT)
