"""Hostile input: a corpus of bad and odd images and bad requests through every
route, and property-based fuzzing of the decoders, the tile parser and the
request parsers. Never a 5xx, never a crash or a hang; the mesh keeps serving."""
import base64
import io
import struct
import zlib

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from imagemesh.v1 import common_pb2
from PIL import Image

from services.common import imageio, wire
from services.common.errors import ServiceError
from services.common.failures import HttpError
from services.common.fields import Fields
from services.common.steps import parse_steps

LIMITS = dict(max_bytes=2_000_000, max_pixels=4_000_000)


def save(img: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    img.save(out, format=fmt, **options)
    return out.getvalue()


def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_with(width: int, height: int, extra: bytes = b"", rows: int | None = None) -> bytes:
    """A PNG declaring width x height; `rows` limits the pixel data actually written."""
    raw = b"".join(b"\x00" + b"\x80" * (width * 3) for _ in range(height if rows is None else rows))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + extra
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def corpus():
    rng = np.random.default_rng(5)
    picture = Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8))
    good_png, good_jpeg = save(picture, "PNG"), save(picture, "JPEG")
    jpeg_huge = bytearray(good_jpeg)
    sof = jpeg_huge.find(b"\xff\xc0")
    jpeg_huge[sof + 5:sof + 9] = struct.pack(">HH", 65000, 65000)
    frames = [Image.fromarray(np.full((24, 32, 3), v, np.uint8)) for v in (0, 128, 255)]
    bad = {
        "truncated png": good_png[:60],
        "truncated jpeg": good_jpeg[: len(good_jpeg) // 2],
        "truncated webp": save(picture, "WEBP")[:40],
        "png signature, then garbage": b"\x89PNG\r\n\x1a\n" + bytes(rng.integers(0, 256, 300, dtype=np.uint8)),
        "gif magic, then garbage": b"GIF89a" + b"\x00" * 50,
        "a text file": b"name,value\nfoo,1\n",
        "empty": b"",
        "100000x100000 png": png_with(100000, 100000, rows=0),
        "65000x65000 jpeg": bytes(jpeg_huge),
        "zero-sized png": png_with(0, 0),
        "giant ICC profile": png_with(8, 8, chunk(b"iCCP", b"x\x00\x00" + zlib.compress(b"\x00" * 3_000_000))),
        "giant text chunk": png_with(8, 8, chunk(b"zTXt", b"comment\x00\x00" + zlib.compress(b"a" * 30_000_000))),
        "pdf": b"%PDF-1.4\n1 0 obj<<>>endobj\n",
    }
    cmyk = picture.convert("CMYK")
    sixteen = (rng.integers(0, 65536, (24, 32, 4), dtype=np.uint16))
    odd = {
        "cmyk jpeg": save(cmyk, "JPEG"),
        "16-bit rgba png": cv2.imencode(".png", sixteen)[1].tobytes(),
        "16-bit grey png": cv2.imencode(".png", sixteen[:, :, 0])[1].tobytes(),
        "animated gif": save(frames[0], "GIF", save_all=True, append_images=frames[1:]),
        "animated png": save(frames[0], "PNG", save_all=True, append_images=frames[1:]),
        "animated webp": save(frames[0], "WEBP", save_all=True, append_images=frames[1:]),
        "deep palette with transparency": save(picture.quantize(256), "PNG", transparency=7),
        "1-bit": save(picture.convert("1"), "PNG"),
        "grey + alpha": save(picture.convert("LA"), "PNG"),
        "tiff": save(picture, "TIFF"),
        "bmp": save(picture, "BMP"),
    }
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        odd[f"exif orientation {orientation}"] = save(picture, "JPEG", exif=exif)
    return bad, odd


BAD, ODD = corpus()
ROUTES = [
    ("/v1/upscale", {"scale": "1.5", "model": "lanczos"}),
    ("/v1/remove-background", {"model": "keyer"}),
    ("/v1/effects", {"effect": "invert"}),
    ("/v1/process", {"steps": '[{"op": "effect", "effect": "sepia"}, {"op": "upscale", "scale": 2, "model": "lanczos"}]'}),
    ("/v1/jobs", {"steps": '[{"op": "effect", "effect": "grayscale"}]'}),
    ("/upscale", {"scale": "2", "model": "lanczos"}),
    ("/remove-background", {"model": "keyer"}),
    ("/process", {"model": "keyer", "upscale_model": "lanczos", "scale": "2"}),
    ("/api/v2/process", {"effects": '["sepia"]'}),
]


def assert_clear_error(reply, case):
    assert 400 <= reply.status_code < 500, (case, reply.status_code, reply.text[:300])
    error = reply.json()["error"]
    assert error["code"] and error["message"] and error["request_id"], case
    assert "Traceback" not in reply.text


@pytest.mark.parametrize("route, fields", ROUTES, ids=[r for r, _ in ROUTES])
def test_bad_images_get_clear_4xx_on_every_route(http, route, fields):
    for case, data in BAD.items():
        assert_clear_error(http.post(route, files={"file": ("image.png", data)}, data=fields), f"{route}: {case}")
    assert http.get("/readyz").status_code == 200


@pytest.mark.parametrize("route, fields", ROUTES, ids=[r for r, _ in ROUTES])
def test_odd_but_valid_images_work_on_every_route(http, route, fields):
    for case, data in ODD.items():
        reply = http.post(route, files={"file": ("image", data)}, data=fields)
        expected = 202 if route == "/v1/jobs" else 200
        assert reply.status_code == expected, (route, case, reply.text[:300])


def test_bad_requests_get_clear_4xx(http):
    png = save(Image.new("RGB", (8, 8)), "PNG")
    b64 = base64.b64encode(png).decode()
    cases = [
        ("/v1/upscale", dict(json={"image_base64": b64, "scale": [4]})),
        ("/v1/upscale", dict(json={"image_base64": 12345})),
        ("/v1/upscale", dict(json={"scale": 2})),
        ("/v1/upscale", dict(json={"image_base64": "A" * 3_000_000})),
        ("/v1/upscale", dict(content=b'{"image_base64": "\xff\xfe\xfd"}', headers={"content-type": "application/json"})),
        ("/v1/upscale", dict(content=b"--xyz\r\nContent-Disposition: form-data; name=file\r\n\r\nabc",
                             headers={"content-type": "multipart/form-data; boundary=xyz"})),
        ("/v1/upscale", dict(content=b"\x00\x01garbage", headers={"content-type": "multipart/form-data"})),
        ("/v1/process", dict(json={"image_base64": b64, "steps": [{"op": "effect", "effect": "invert"}] * 1000})),
        ("/v1/process", dict(json={"image_base64": b64, "steps": [[[[[[[[]]]]]]]]})),
        ("/v1/process", dict(json={"image_base64": b64, "steps": "upscale"})),
        ("/v1/process", dict(json={"image_base64": b64, "steps": [{"op": "upscale", "scale": float("1e308")}]})),
        ("/v1/effects", dict(json={"image_base64": b64, "effect": "blur", "params": {"radius": "a lot"}})),
        ("/v1/effects", dict(json={"image_base64": b64, "effect": "blur", "params": [1, 2]})),
        ("/v1/remove-background", dict(json={"image_base64": b64, "models": {"a": 1}})),
        ("/v1/remove-background/choice", dict(content=b"\xff", headers={"content-type": "application/json"})),
        ("/api/v2/process", dict(files={"file": ("a.png", png)}, data={"effects": "not json ["})),
        ("/api/v2/process", dict(files={"file": ("a.png", png)}, data={"effects": '["sepia"]', "effect_params": "[]"})),
        ("/upscale", dict(content=b"{not json", headers={"content-type": "application/json"})),
    ]
    for route, kwargs in cases:
        assert_clear_error(http.post(route, **kwargs), f"{route} {str(kwargs)[:80]}")
    assert http.get("/readyz").status_code == 200


# --- property-based fuzzing -------------------------------------------------

SEEDS = [save(Image.new("RGB", (6, 5), "red"), fmt) for fmt in ("PNG", "JPEG", "WEBP", "GIF", "BMP")]


@settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.sampled_from(SEEDS), flips=st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), max_size=8),
       cut=st.integers(0, 400))
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


JSON = st.recursive(st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats(allow_nan=True)
                    | st.text(max_size=20), lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.sampled_from(["op", "effect", "scale", "model", "params", "tile", "alpha",
                                                      "bgcolor", "refine", "x"]), inner, max_size=5), max_leaves=12)


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
    for read in (lambda: fields.number("scale", 4.0), lambda: fields.number("tile", 0, integer=True, minimum=0),
                 lambda: fields.text("format", "auto", ("auto", "png")), lambda: fields.boolean("use_cache")):
        try:
            read()
        except HttpError as exc:
            assert exc.status == 400


@settings(max_examples=300, deadline=None)
@given(x=st.integers(0, 2**32 - 1), y=st.integers(0, 2**32 - 1), w=st.integers(0, 2**32 - 1),
       h=st.integers(0, 2**32 - 1), halo=st.integers(0, 2**32 - 1), pixels=st.binary(max_size=200))
def test_tile_parser_only_ever_answers_invalid_argument(x, y, w, h, halo, pixels):
    info = wire.HeaderInfo(wire.header(64, 48, "RGB", np.uint8, tile_width=16, tile_height=16), 10**6)
    tile = common_pb2.Tile(x=x, y=y, width=w, height=h, halo_left=halo, pixels=pixels)
    try:
        rect, array = wire.tile_pixels(tile, info)
        assert array.shape == (rect.height, rect.width, 3)
    except ServiceError as exc:
        assert exc.code.name == "INVALID_ARGUMENT"
