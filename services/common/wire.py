"""Numpy arrays <-> the protobuf image header and tiles."""

from __future__ import annotations

import numpy as np
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from imagemesh.v1 import common_pb2

from .contract import MAX_TILES_PER_IMAGE, MIN_TILE_EDGE
from .errors import InvalidArgument, LimitExceeded
from .tiles import MAX_TILE_BYTES, Rect, wire_tile_size


def as_json(message: Message) -> dict:
    """A message as JSON answers carry it (step reports, model listings): the
    .proto's field names, every field present even at its default."""
    return MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


MODE_CHANNELS = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4}
_MODE_TO_PROTO = {
    "L": common_pb2.COLOR_MODE_GRAY,
    "LA": common_pb2.COLOR_MODE_GRAY_ALPHA,
    "RGB": common_pb2.COLOR_MODE_RGB,
    "RGBA": common_pb2.COLOR_MODE_RGBA,
}
_PROTO_TO_MODE = {v: k for k, v in _MODE_TO_PROTO.items()}
# Little-endian on the wire whatever the host is.
_WIRE_DTYPE: dict[int, np.dtype] = {
    common_pb2.SAMPLE_TYPE_UINT8: np.dtype("u1"),
    common_pb2.SAMPLE_TYPE_UINT16: np.dtype("<u2"),
}


def header(
    width: int,
    height: int,
    mode: str,
    dtype: np.dtype,
    *,
    icc_profile: bytes = b"",
    source_format: str = "",
    tile_width: int = 0,
    tile_height: int = 0,
) -> common_pb2.ImageHeader:
    sample_type = common_pb2.SAMPLE_TYPE_UINT16 if np.dtype(dtype).itemsize == 2 else common_pb2.SAMPLE_TYPE_UINT8
    return common_pb2.ImageHeader(
        width=width,
        height=height,
        color_mode=_MODE_TO_PROTO[mode],
        sample_type=sample_type,
        icc_profile=icc_profile or b"",
        source_format=source_format,
        tile_width=tile_width,
        tile_height=tile_height,
    )


def grid_header(
    width: int,
    height: int,
    mode: str,
    dtype: np.dtype,
    *,
    icc_profile: bytes = b"",
    source_format: str = "",
    max_cell: int = 1 << 30,
) -> common_pb2.ImageHeader:
    """A header declaring the grid every sender of an image uses: square cells, at most
    `max_cell` pixels on a side, each under MAX_TILE_BYTES whatever the mode and depth."""
    cell = min(wire_tile_size(width, MODE_CHANNELS[mode] * np.dtype(dtype).itemsize), max_cell)
    return header(
        width,
        height,
        mode,
        dtype,
        icc_profile=icc_profile,
        source_format=source_format,
        tile_width=cell,
        tile_height=cell,
    )


def check_grid(width: int, height: int, tile_width: int, tile_height: int, bytes_per_pixel: int) -> None:
    """A declared tile grid within the contract: cells under MAX_TILE_BYTES, at least
    MIN_TILE_EDGE on a side (or the image's own edge), at most MAX_TILES_PER_IMAGE of them."""
    if tile_width * tile_height * bytes_per_pixel > MAX_TILE_BYTES:
        raise InvalidArgument(
            f"tiles of {tile_width}x{tile_height} exceed {MAX_TILE_BYTES} bytes; send smaller tiles",
            field="image.tile_width",
        )
    if tile_width < min(MIN_TILE_EDGE, width) or tile_height < min(MIN_TILE_EDGE, height):
        raise InvalidArgument(
            f"tiles of {tile_width}x{tile_height} are too small: at least {MIN_TILE_EDGE} pixels "
            "on a side (or the image's own edge)",
            field="image.tile_width",
        )
    cells = -(-width // tile_width) * -(-height // tile_height)
    if cells > MAX_TILES_PER_IMAGE:
        raise LimitExceeded(
            f"a {width}x{height} image is {cells} tiles of {tile_width}x{tile_height}; at most "
            f"{MAX_TILES_PER_IMAGE} (an image this long and thin is beyond the limit)",
            reason="too_many_tiles",
            field="image",
        )


class HeaderInfo:
    """A validated ImageHeader in numpy terms."""

    def __init__(self, msg: common_pb2.ImageHeader, max_pixels: int):
        if msg.color_mode not in _PROTO_TO_MODE:
            raise InvalidArgument("image.color_mode must be GRAY, GRAY_ALPHA, RGB or RGBA", field="image.color_mode")
        if msg.sample_type not in _WIRE_DTYPE:
            raise InvalidArgument("image.sample_type must be UINT8 or UINT16", field="image.sample_type")
        if msg.width == 0 or msg.height == 0:
            raise InvalidArgument("image width and height must be positive", field="image")
        if msg.width * msg.height > max_pixels:
            raise LimitExceeded(
                f"image is {msg.width}x{msg.height} = {msg.width * msg.height} pixels; the limit is {max_pixels}",
                reason="image_too_large",
                field="image",
            )
        self.msg = msg
        self.width, self.height = msg.width, msg.height
        self.mode = _PROTO_TO_MODE[msg.color_mode]
        self.channels = MODE_CHANNELS[self.mode]
        self.wire_dtype = _WIRE_DTYPE[msg.sample_type]
        self.dtype = self.wire_dtype.newbyteorder("=")
        if msg.tile_width and msg.tile_height:
            check_grid(msg.width, msg.height, msg.tile_width, msg.tile_height, self.channels * self.dtype.itemsize)


def tile(rect: Rect, pixels: np.ndarray) -> common_pb2.Tile:
    """A halo-free tile message from a (h, w, c) array."""
    wire = pixels.astype(pixels.dtype.newbyteorder("<"), copy=False)
    return common_pb2.Tile(x=rect.x0, y=rect.y0, width=rect.width, height=rect.height, pixels=wire.tobytes())


def tile_pixels(msg: common_pb2.Tile, info: HeaderInfo) -> tuple[Rect, np.ndarray]:
    """The core rect of a tile message and its pixels (halo stripped), validated."""
    full_w = msg.width + msg.halo_left + msg.halo_right
    full_h = msg.height + msg.halo_top + msg.halo_bottom
    expected = full_w * full_h * info.channels * info.dtype.itemsize
    if msg.width == 0 or msg.height == 0:
        raise InvalidArgument("a tile must not be empty", field="tile")
    pixels = msg.pixels  # each read of a bytes field copies it
    if len(pixels) != expected:
        raise InvalidArgument(
            f"tile at ({msg.x}, {msg.y}) has {len(pixels)} bytes of pixels, expected {expected}",
            field="tile.pixels",
        )
    if msg.x + msg.width > info.width or msg.y + msg.height > info.height:
        raise InvalidArgument(
            f"tile at ({msg.x}, {msg.y}) size {msg.width}x{msg.height} lies outside the "
            f"{info.width}x{info.height} image",
            field="tile",
        )
    full = np.frombuffer(pixels, info.wire_dtype).reshape(full_h, full_w, info.channels)
    core = full[msg.halo_top : msg.halo_top + msg.height, msg.halo_left : msg.halo_left + msg.width]
    return Rect(msg.x, msg.y, msg.x + msg.width, msg.y + msg.height), core.astype(info.dtype, copy=False)
