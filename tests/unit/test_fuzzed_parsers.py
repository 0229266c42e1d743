"""Property-based fuzzing of what reads untrusted input: the decoder, the step and field parsers, the tile parser."""

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from imagemesh.v1 import common_pb2
from PIL import Image

from services.common import imageio, wire
from services.common.errors import ServiceError
from services.common.failures import HttpError
from services.common.fields import Fields
from services.common.steps import parse_steps
from support.images import encoded

LIMITS = dict(max_bytes=2_000_000, max_pixels=4_000_000)
SEEDS = [encoded(Image.new("RGB", (6, 5), "red"), fmt) for fmt in ("PNG", "JPEG", "WEBP", "GIF", "BMP")]


@settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.sampled_from(SEEDS),
    flips=st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), max_size=8),
    cut=st.integers(0, 400),
)
def test_decoder_only_ever_refuses_with_a_service_error(seed, flips, cut):
    data = bytearray(seed)
    for position, value in flips:
        if position < len(data):
            data[position] = value
    try:
        decoded = imageio.decode(bytes(data[: cut or None]), **LIMITS)
        assert decoded.pixels.ndim == 3 and decoded.mode in ("L", "LA", "RGB", "RGBA")
    except ServiceError:
        pass


@settings(max_examples=300, deadline=1000)
@given(st.binary(max_size=300))
def test_decoder_on_random_bytes(data):
    try:
        imageio.decode(data, **LIMITS)
    except ServiceError:
        pass


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**12), 10**12) | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(["op", "effect", "scale", "model", "params", "tile", "alpha", "bgcolor", "refine", "x"]),
            inner,
            max_size=5,
        )
    ),
    max_leaves=12,
)


@settings(max_examples=400, deadline=None)
@given(JSON)
def test_step_parser_only_ever_answers_400(value):
    try:
        parse_steps(Fields({"steps": value}))
    except HttpError as exc:
        assert exc.status == 400


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["scale", "tile", "format", "use_cache"]), JSON, max_size=4))
def test_field_reads_only_ever_answer_400(values):
    fields = Fields(values)
    for read in (
        lambda: fields.number("scale", 4.0),
        lambda: fields.number("tile", 0, integer=True, minimum=0),
        lambda: fields.text("format", "auto", ("auto", "png")),
        lambda: fields.boolean("use_cache"),
    ):
        try:
            read()
        except HttpError as exc:
            assert exc.status == 400


@settings(max_examples=300, deadline=None)
@given(
    x=st.integers(0, 2**32 - 1),
    y=st.integers(0, 2**32 - 1),
    w=st.integers(0, 2**32 - 1),
    h=st.integers(0, 2**32 - 1),
    halo=st.integers(0, 2**32 - 1),
    pixels=st.binary(max_size=200),
)
def test_tile_parser_only_ever_answers_invalid_argument(x, y, w, h, halo, pixels):
    info = wire.HeaderInfo(wire.header(64, 48, "RGB", np.uint8, tile_width=16, tile_height=16), 10**6)
    tile = common_pb2.Tile(x=x, y=y, width=w, height=h, halo_left=halo, pixels=pixels)
    try:
        rect, array = wire.tile_pixels(tile, info)
        assert array.shape == (rect.height, rect.width, 3)
    except ServiceError as exc:
        assert exc.code.name == "INVALID_ARGUMENT"
