import io
import struct
import time
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image, ImageCms

from services.common import imageio
from services.common.errors import InvalidArgument, LimitExceeded, UndecodableImage
from support.images import encoded

LIMITS = dict(max_bytes=10_000_000, max_pixels=10_000_000)


def test_rgba_png_keeps_alpha(photo):
    rgba = np.dstack([photo, np.linspace(0, 255, photo.shape[1], dtype=np.uint8)[None].repeat(photo.shape[0], 0)])
    decoded = imageio.decode(encoded(Image.fromarray(rgba, "RGBA"), "PNG"), **LIMITS)
    assert decoded.mode == "RGBA" and np.array_equal(decoded.pixels, rgba)


def test_16bit_rgba_png_round_trips_at_16_bits():
    rng = np.random.default_rng(1)
    rgba16 = rng.integers(0, 65536, (23, 31, 4), dtype=np.uint16)
    ok, png = cv2.imencode(".png", cv2.cvtColor(rgba16, cv2.COLOR_RGBA2BGRA))
    decoded = imageio.decode(png.tobytes(), **LIMITS)
    assert decoded.mode == "RGBA" and decoded.pixels.dtype == np.uint16
    assert np.array_equal(decoded.pixels, rgba16)
    # Our encoder writes it back losslessly, and OpenCV agrees on what it wrote.
    again = imageio.decode(imageio.encode(decoded.pixels, "RGBA", "png"), **LIMITS)
    assert np.array_equal(again.pixels, rgba16)


@pytest.mark.parametrize("mode", ["L", "LA", "RGB"])
def test_16bit_png_modes(mode):
    channels = {"L": 1, "LA": 2, "RGB": 3}[mode]
    pixels = np.random.default_rng(2).integers(0, 65536, (9, 13, channels), dtype=np.uint16)
    decoded = imageio.decode(imageio.encode_png(pixels, mode), **LIMITS)
    assert decoded.mode == mode and np.array_equal(decoded.pixels, pixels)


@pytest.mark.parametrize("level", [0, 1, 3, 4, 9])  # ISA-L's levels, then zlib's
@pytest.mark.parametrize("mode", ["L", "LA", "RGB", "RGBA"])
def test_png_written_band_by_band_is_lossless_at_every_level(photo, mode, level):
    channels = len(mode)
    pixels = np.ascontiguousarray(np.dstack([photo] * 2)[:, :, :channels])
    writer = imageio.PngWriter(pixels.shape[1], pixels.shape[0], mode, 8, level=level)
    bands = [writer.rows(pixels[top : top + 37]) for top in range(0, pixels.shape[0], 37)]
    png = writer.start() + b"".join(bands) + writer.finish()
    assert Image.open(io.BytesIO(png)).mode == mode  # Pillow's decoder agrees with ours
    decoded = imageio.decode(png, **LIMITS)
    assert decoded.mode == mode and np.array_equal(decoded.pixels, pixels)


def test_every_png_chunk_carries_the_crc_the_format_defines():
    """Pillow skips IDAT's CRC; libpng and other strict decoders refuse a wrong one."""
    noise = np.random.default_rng(3).integers(0, 256, (400, 300, 3), dtype=np.uint8)  # deflates band by band
    writer = imageio.PngWriter(noise.shape[1], noise.shape[0], "RGB", 8, icc_profile=b"a profile")
    bands = [writer.rows(noise[top : top + 50]) for top in range(0, noise.shape[0], 50)]
    png = writer.start() + b"".join(bands) + writer.finish()
    offset, kinds = 8, []
    while offset < len(png):
        (length,) = struct.unpack(">I", png[offset : offset + 4])
        kind, body = png[offset + 4 : offset + 8], png[offset + 8 : offset + 8 + length]
        (crc,) = struct.unpack(">I", png[offset + 8 + length : offset + 12 + length])
        assert crc == zlib.crc32(kind + body), kind
        kinds.append(kind)
        offset += 12 + length
    assert kinds[:2] == [b"IHDR", b"iCCP"] and kinds[-1] == b"IEND" and kinds.count(b"IDAT") > 1


def test_png_levels_outside_zero_to_nine_are_refused():
    for level in (-1, 10):
        with pytest.raises(ValueError):
            imageio.PngWriter(4, 4, "RGB", 8, level=level)


def test_grayscale_stays_grayscale(photo):
    grey = np.asarray(Image.fromarray(photo).convert("L"))
    decoded = imageio.decode(encoded(Image.fromarray(grey), "JPEG"), **LIMITS)
    assert decoded.mode == "L" and decoded.pixels.shape == grey.shape + (1,)


def test_palette_with_transparency_becomes_rgba_and_cmyk_becomes_rgb(photo):
    palette = Image.fromarray(photo).convert("P", palette=Image.ADAPTIVE, colors=16)
    palette.info["transparency"] = 0
    assert imageio.decode(encoded(palette, "PNG", transparency=0), **LIMITS).mode == "RGBA"
    assert imageio.decode(encoded(Image.fromarray(photo).quantize(16), "GIF"), **LIMITS).mode == "RGB"
    cmyk = imageio.decode(encoded(Image.fromarray(photo).convert("CMYK"), "JPEG"), **LIMITS)
    assert cmyk.mode == "RGB" and cmyk.pixels.shape == photo.shape


# Pillow transposition that undoes each EXIF orientation, inverted here to make the stored image.
_STORED = {
    1: lambda im: im,
    2: lambda im: im.transpose(Image.FLIP_LEFT_RIGHT),
    3: lambda im: im.transpose(Image.ROTATE_180),
    4: lambda im: im.transpose(Image.FLIP_TOP_BOTTOM),
    5: lambda im: im.transpose(Image.TRANSPOSE),
    6: lambda im: im.transpose(Image.ROTATE_90),
    7: lambda im: im.transpose(Image.TRANSVERSE),
    8: lambda im: im.transpose(Image.ROTATE_270),
}


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_comes_out_upright(orientation):
    upright = np.zeros((20, 30, 3), np.uint8)
    upright[:5, :10] = (255, 0, 0)  # a red block top-left when upright
    stored = _STORED[orientation](Image.fromarray(upright))
    exif = Image.Exif()
    exif[0x0112] = orientation
    decoded = imageio.decode(encoded(stored, "PNG", exif=exif), **LIMITS)
    assert np.array_equal(decoded.pixels, upright)


def test_icc_profile_is_kept_through_decode_and_encode(photo):
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    decoded = imageio.decode(encoded(Image.fromarray(photo), "JPEG", icc_profile=icc), **LIMITS)
    assert decoded.icc_profile == icc
    for fmt in ("png", "jpeg", "webp"):
        assert (
            Image.open(io.BytesIO(imageio.encode(decoded.pixels, "RGB", fmt, icc_profile=icc))).info.get("icc_profile")
            == icc
        )
    png16 = imageio.encode_png(decoded.pixels.astype(np.uint16) * 257, "RGB", icc)
    assert imageio.decode(png16, **LIMITS).icc_profile == icc


def _png_declaring(width: int, height: int) -> bytes:
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"\0" * 1000))
        + chunk(b"IEND", b"")
    )


def test_decompression_bomb_is_refused_from_the_header():
    started = time.perf_counter()
    with pytest.raises(LimitExceeded, match="100000x100000"):
        imageio.decode(_png_declaring(100000, 100000), **LIMITS)
    assert time.perf_counter() - started < 1.0  # refused before decoding 30 GB of pixels


@pytest.mark.parametrize(
    "data, error",
    [
        (b"", InvalidArgument),
        (b"hello, I am a text file\n", UndecodableImage),
    ],
)
def test_non_images(data, error):
    with pytest.raises(error):
        imageio.decode(data, **LIMITS)


def test_truncated_images_are_undecodable(photo):
    for fmt in ("JPEG", "PNG", "WEBP"):
        data = encoded(Image.fromarray(photo), fmt)
        with pytest.raises(UndecodableImage):
            imageio.decode(data[: len(data) // 2], **LIMITS)


def test_byte_limit():
    with pytest.raises(LimitExceeded):
        imageio.decode(b"x" * 101, max_bytes=100, max_pixels=100)


def test_jpeg_output_composites_alpha_on_white():
    rgba = np.zeros((8, 8, 4), np.uint8)  # fully transparent black
    out = Image.open(io.BytesIO(imageio.encode(rgba, "RGBA", "jpeg", quality=95)))
    assert out.mode == "RGB" and np.asarray(out).min() >= 250


def test_auto_format_choice():
    assert imageio.choose_format("auto", "jpeg", False) == "jpeg"
    assert imageio.choose_format("auto", "jpeg", True) == "png"
    assert imageio.choose_format("auto", "webp", True) == "webp"
    assert imageio.choose_format("auto", "bmp", False) == "png"
    assert imageio.choose_format("webp", "png", True) == "webp"
