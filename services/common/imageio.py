"""Image decoding and encoding.

Decoding applies EXIF orientation, keeps alpha, 16-bit depth, grayscale and the
ICC profile, turns palette images into RGB(A) and CMYK into RGB, and checks the
byte and pixel limits from the header before any pixel is decoded, so a
decompression bomb costs a header parse. Pixels are (height, width, channels)
uint8 or uint16 arrays with a mode of L, LA, RGB or RGBA."""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from dataclasses import dataclass

import cv2
import numpy as np
from isal import isal_zlib
from PIL import Image, ImageCms

from .errors import InvalidArgument, LimitExceeded, UndecodableImage, UnsupportedMediaType

# Our own pixel limit is checked before decoding; Pillow's global one would
# raise its own error type first.
Image.MAX_IMAGE_PIXELS = None

FORMATS = {"PNG": "png", "JPEG": "jpeg", "MPO": "jpeg", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff"}
OUTPUT_FORMATS = ("png", "jpeg", "webp")
# Real profiles are a few kilobytes; a bigger one would not fit the image header's message.
MAX_ICC_BYTES = 1 << 20
MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
_ORIENTATION_TAG = 0x0112


@dataclass
class DecodedImage:
    pixels: np.ndarray
    mode: str
    icc_profile: bytes
    format: str

    @property
    def width(self) -> int:
        return self.pixels.shape[1]

    @property
    def height(self) -> int:
        return self.pixels.shape[0]

    @property
    def has_alpha(self) -> bool:
        return self.mode in ("LA", "RGBA")


def check_pixels(width: int, height: int, max_pixels: int, what: str = "image") -> None:
    if width <= 0 or height <= 0:
        raise UndecodableImage(f"the {what} has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise LimitExceeded(
            f"the {what} is {width}x{height} = {width * height} pixels; the limit is {max_pixels}",
            reason="image_too_large",
        )


def decoded_bytes(data: bytes, max_pixels: int) -> int:
    """At most how many bytes `decode` will hold for these bytes, from the header alone
    (an image over `max_pixels` is refused here already)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data))
    except Exception:
        return len(data)  # not an image: decode will say so
    check_pixels(img.width, img.height, max_pixels)
    sample = (
        2
        if img.mode.startswith("I;16") or img.mode in ("I", "F") or img.format == "PNG" and _png_bit_depth(data) == 16
        else 1
    )
    return img.width * img.height * 4 * sample


def orient(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF orientation (1-8) so that the image comes out upright."""
    ops = {
        2: lambda a: a[:, ::-1],
        3: lambda a: a[::-1, ::-1],
        4: lambda a: a[::-1],
        5: lambda a: a.transpose(1, 0, 2),
        6: lambda a: np.rot90(a, -1),
        7: lambda a: a.transpose(1, 0, 2)[::-1, ::-1],
        8: lambda a: np.rot90(a, 1),
    }
    op = ops.get(orientation)
    return np.ascontiguousarray(op(pixels)) if op else pixels


def _png_bit_depth(data: bytes) -> int:
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and len(data) >= 26:
        return data[24]
    return 8


def _decode_16bit_png(data: bytes) -> tuple[np.ndarray, str]:
    # Pillow reads 16-bit RGB(A) PNGs as 8-bit; OpenCV keeps the 16 bits.
    decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if decoded is None or decoded.dtype != np.uint16:
        raise UndecodableImage("the 16-bit PNG is damaged or truncated")
    if decoded.ndim == 2:
        return decoded[:, :, None], "L"
    color_type = data[25]
    if decoded.shape[2] == 4:
        rgba = cv2.cvtColor(decoded, cv2.COLOR_BGRA2RGBA)
        if color_type == 4:  # grey + alpha, widened to BGRA by OpenCV
            return np.ascontiguousarray(rgba[:, :, [0, 3]]), "LA"
        return rgba, "RGBA"
    return cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB), "RGB"


def _normalise_mode(img: Image.Image, icc: bytes) -> tuple[Image.Image | np.ndarray, str, bytes]:
    """Pillow image -> (image or array, one of L/LA/RGB/RGBA, icc to keep)."""
    mode = img.mode
    if mode in ("L", "LA", "RGB", "RGBA"):
        return img, mode, icc
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        return np.clip(np.asarray(img), 0, 65535).astype(np.uint16), "L", icc
    if mode == "1":
        return img.convert("L"), "L", icc
    if mode in ("P", "PA"):
        target = "RGBA" if mode == "PA" or img.has_transparency_data else "RGB"
        return img.convert(target), target, icc
    if mode == "La":
        return img.convert("LA"), "LA", icc
    if mode == "RGBa":
        return img.convert("RGBA"), "RGBA", icc
    if mode == "CMYK":
        if icc:
            try:
                source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
                converted = ImageCms.profileToProfile(img, source, ImageCms.createProfile("sRGB"), outputMode="RGB")
                if converted is not None:  # None only when converting in place, which this does not ask for
                    return converted, "RGB", b""
            except (ImageCms.PyCMSError, OSError, ValueError):
                pass
        return img.convert("RGB"), "RGB", b""  # a CMYK profile does not describe RGB pixels
    return img.convert("RGB"), "RGB", icc


def decode(data: bytes, *, max_bytes: int, max_pixels: int) -> DecodedImage:
    if not data:
        raise InvalidArgument("the image is empty (0 bytes)", reason="empty_image", field="file")
    if len(data) > max_bytes:
        raise LimitExceeded(f"the image is {len(data)} bytes; the limit is {max_bytes}", reason="upload_too_large")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data))
    except ValueError as exc:
        if "Decompressed data too large" in str(exc):  # Pillow's own bound on a PNG's ICC or text chunk
            raise LimitExceeded(
                f"the image's ICC profile or a text chunk is over {MAX_ICC_BYTES} bytes", reason="icc_profile_too_large"
            ) from None
        raise UndecodableImage(
            "the data is not an image in a supported format (PNG, JPEG, WebP, GIF, BMP or TIFF)"
        ) from None
    except Exception:  # Pillow raises many types for non-images
        raise UndecodableImage(
            "the data is not an image in a supported format (PNG, JPEG, WebP, GIF, BMP or TIFF)"
        ) from None
    fmt = FORMATS.get(img.format or "")
    if fmt is None:
        raise UnsupportedMediaType(f"{img.format} images are not supported; send PNG, JPEG, WebP, GIF, BMP or TIFF")
    check_pixels(img.width, img.height, max_pixels)
    try:
        orientation = int(img.getexif().get(_ORIENTATION_TAG, 1))
    except Exception:  # a damaged EXIF block must not sink a readable image
        orientation = 1
    icc = img.info.get("icc_profile") or b""
    if len(icc) > MAX_ICC_BYTES:
        raise LimitExceeded(
            f"the image's ICC profile is {len(icc)} bytes; at most {MAX_ICC_BYTES} are accepted",
            reason="icc_profile_too_large",
        )
    try:
        if fmt == "png" and _png_bit_depth(data) == 16:
            pixels, mode = _decode_16bit_png(data)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                img.load()
                normalised, mode, icc = _normalise_mode(img, icc)
            pixels = np.asarray(normalised)
            if pixels.ndim == 2:
                pixels = pixels[:, :, None]
    except (UndecodableImage, LimitExceeded):
        raise
    except Exception:
        raise UndecodableImage(f"the {fmt.upper()} image is damaged or truncated") from None
    return DecodedImage(orient(np.ascontiguousarray(pixels), orientation), mode, icc, fmt)


def to_8bit(pixels: np.ndarray) -> np.ndarray:
    if pixels.dtype == np.uint8:
        return pixels
    return ((pixels.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)


def composite(pixels: np.ndarray, mode: str, background: tuple[int, int, int]) -> tuple[np.ndarray, str]:
    """Flatten alpha onto a background colour (for formats without alpha)."""
    if mode not in ("LA", "RGBA"):
        return pixels, mode
    maximum = float(np.iinfo(pixels.dtype).max)
    alpha = pixels[:, :, -1:].astype(np.float32) / maximum
    colour = pixels[:, :, :-1].astype(np.float32)
    if mode == "LA":
        bg = np.array([0.299 * background[0] + 0.587 * background[1] + 0.114 * background[2]], np.float32)
    else:
        bg = np.array(background, np.float32)
    bg = bg * (maximum / 255.0)
    flat = colour * alpha + bg * (1.0 - alpha)
    return np.clip(np.rint(flat), 0, maximum).astype(pixels.dtype), mode[:-1]


def choose_format(requested: str, source_format: str, has_alpha: bool) -> str:
    """`auto` keeps the input's format, unless that is not an output format or
    it would drop alpha; then PNG."""
    if requested != "auto":
        return requested
    if source_format in OUTPUT_FORMATS and not (source_format == "jpeg" and has_alpha):
        return source_format
    return "png"


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    crc = isal_zlib.crc32(body, isal_zlib.crc32(kind))  # zlib's checksum, several times faster
    return b"".join((struct.pack(">I", len(body)), kind, body, struct.pack(">I", crc)))


PNG_LEVELS = range(0, 10)
DEFAULT_PNG_LEVEL = 1


def deflate_compressor(level: int):
    """Levels 0-3: ISA-L's deflate (several times zlib's speed at zlib 3's size
    on photos); 4-9: zlib's, smaller and slower. Both write plain zlib streams."""
    if level not in PNG_LEVELS:
        raise ValueError(f"PNG compression level must be 0-9, not {level}")
    return isal_zlib.compressobj(level) if level <= isal_zlib.ISAL_BEST_COMPRESSION else zlib.compressobj(level)


class PngWriter:
    """A PNG written band by band (rows top to bottom), each band compressed
    and handed out as IDAT data at once: a whole image never needs to exist.
    Rows use the "Up" filter: cheap, vectorised, and good on photos."""

    COLOR_TYPES = {"L": 0, "LA": 4, "RGB": 2, "RGBA": 6}
    UP_FILTER = 2

    def __init__(
        self,
        width: int,
        height: int,
        mode: str,
        bit_depth: int,
        icc_profile: bytes = b"",
        level: int = DEFAULT_PNG_LEVEL,
    ):
        self.width, self.height, self.mode, self.bit_depth = width, height, mode, bit_depth
        self.icc_profile = icc_profile
        self._compressor = deflate_compressor(level)
        self._previous: np.ndarray | None = None
        self.rows_written = 0

    def start(self) -> bytes:
        out = [
            b"\x89PNG\r\n\x1a\n",
            _png_chunk(
                b"IHDR",
                struct.pack(">IIBBBBB", self.width, self.height, self.bit_depth, self.COLOR_TYPES[self.mode], 0, 0, 0),
            ),
        ]
        if self.icc_profile:
            out.append(_png_chunk(b"iCCP", b"ICC Profile\x00\x00" + zlib.compress(self.icc_profile)))
        return b"".join(out)

    def rows(self, pixels: np.ndarray) -> bytes:
        """The next rows, (h, width, channels) in the writer's depth; returns IDAT bytes (maybe empty)."""
        dtype = ">u2" if self.bit_depth == 16 else np.uint8
        raw = np.ascontiguousarray(pixels.astype(dtype, copy=False)).view(np.uint8).reshape(pixels.shape[0], -1)
        scanlines = np.empty((raw.shape[0], raw.shape[1] + 1), np.uint8)
        scanlines[:, 0] = self.UP_FILTER
        np.subtract(raw[1:], raw[:-1], out=scanlines[1:, 1:])
        if self._previous is None:
            scanlines[0, 1:] = raw[0]
        else:
            np.subtract(raw[0], self._previous, out=scanlines[0, 1:])
        self._previous = raw[-1].copy()
        self.rows_written += pixels.shape[0]
        data = self._compressor.compress(scanlines)
        return _png_chunk(b"IDAT", data) if data else b""

    def finish(self) -> bytes:
        if self.rows_written != self.height:
            raise ValueError(f"PNG got {self.rows_written} of {self.height} rows")
        return _png_chunk(b"IDAT", self._compressor.flush()) + _png_chunk(b"IEND", b"")


ENCODE_BAND_ROWS = 256


def encode_png(pixels: np.ndarray, mode: str, icc_profile: bytes = b"", level: int = DEFAULT_PNG_LEVEL) -> bytes:
    """A whole PNG, 8- or 16-bit by the pixels' type, with the ICC profile kept
    (Pillow cannot write 16-bit colour)."""
    writer = PngWriter(pixels.shape[1], pixels.shape[0], mode, 8 * pixels.dtype.itemsize, icc_profile, level)
    parts = [writer.start()]
    for top in range(0, pixels.shape[0], ENCODE_BAND_ROWS):  # no whole-image copy for the filtered rows
        parts.append(writer.rows(pixels[top : top + ENCODE_BAND_ROWS]))
    return b"".join(parts + [writer.finish()])


def encode(
    pixels: np.ndarray,
    mode: str,
    fmt: str,
    *,
    icc_profile: bytes = b"",
    quality: int = 92,
    background: tuple[int, int, int] = (255, 255, 255),
    png_level: int = DEFAULT_PNG_LEVEL,
) -> bytes:
    if fmt not in OUTPUT_FORMATS:
        raise InvalidArgument(f"format must be one of {', '.join(OUTPUT_FORMATS)}", field="format")
    if fmt == "png":
        return encode_png(pixels, mode, icc_profile, png_level)
    # One 8-bit copy for the encoder, filled band by band: compositing and depth
    # conversion never hold more than a band in float or 32-bit.
    out_mode = mode[:-1] if fmt == "jpeg" and mode in ("LA", "RGBA") else mode
    height, width = pixels.shape[:2]
    eight_bit = np.empty((height, width, len(out_mode)), np.uint8)
    for top in range(0, height, ENCODE_BAND_ROWS):
        band = pixels[top : top + ENCODE_BAND_ROWS]
        if out_mode != mode:
            band, _ = composite(band, mode, background)
        eight_bit[top : top + ENCODE_BAND_ROWS] = to_8bit(band)
    mode = out_mode
    img = Image.fromarray(eight_bit[:, :, 0] if mode == "L" else eight_bit, mode)
    options: dict = {"icc_profile": icc_profile} if icc_profile else {}
    if fmt == "jpeg":
        options.update(quality=quality, optimize=False)
    elif fmt == "webp":
        options.update(quality=quality, lossless=quality >= 100, method=4)
    out = io.BytesIO()
    img.save(out, format=fmt.upper(), **options)
    return out.getvalue()
