"""Hostile input: a corpus of bad and odd images and bad requests through every
route, and property-based fuzzing of the decoders, the tile parser and the
request parsers. Never a 5xx, never a crash or a hang; the mesh keeps serving."""

import base64
import struct
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image

from support.images import encoded


def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_with(width: int, height: int, extra: bytes = b"", rows: int | None = None) -> bytes:
    """A PNG declaring width x height; `rows` limits the pixel data actually written."""
    raw = b"".join(b"\x00" + b"\x80" * (width * 3) for _ in range(height if rows is None else rows))
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + extra
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def corpus():
    rng = np.random.default_rng(5)
    picture = Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8))
    good_png, good_jpeg = encoded(picture, "PNG"), encoded(picture, "JPEG")
    jpeg_huge = bytearray(good_jpeg)
    sof = jpeg_huge.find(b"\xff\xc0")
    jpeg_huge[sof + 5 : sof + 9] = struct.pack(">HH", 65000, 65000)
    frames = [Image.fromarray(np.full((24, 32, 3), v, np.uint8)) for v in (0, 128, 255)]
    bad = {
        "truncated png": good_png[:60],
        "truncated jpeg": good_jpeg[: len(good_jpeg) // 2],
        "truncated webp": encoded(picture, "WEBP")[:40],
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
    sixteen = rng.integers(0, 65536, (24, 32, 4), dtype=np.uint16)
    odd = {
        "cmyk jpeg": encoded(cmyk, "JPEG"),
        "16-bit rgba png": cv2.imencode(".png", sixteen)[1].tobytes(),
        "16-bit grey png": cv2.imencode(".png", sixteen[:, :, 0])[1].tobytes(),
        "animated gif": encoded(frames[0], "GIF", save_all=True, append_images=frames[1:]),
        "animated png": encoded(frames[0], "PNG", save_all=True, append_images=frames[1:]),
        "animated webp": encoded(frames[0], "WEBP", save_all=True, append_images=frames[1:]),
        "deep palette with transparency": encoded(picture.quantize(256), "PNG", transparency=7),
        "1-bit": encoded(picture.convert("1"), "PNG"),
        "grey + alpha": encoded(picture.convert("LA"), "PNG"),
        "tiff": encoded(picture, "TIFF"),
        "bmp": encoded(picture, "BMP"),
    }
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        odd[f"exif orientation {orientation}"] = encoded(picture, "JPEG", exif=exif)
    return bad, odd


BAD, ODD = corpus()
ROUTES = [
    ("/v1/upscale", {"scale": "1.5", "model": "lanczos"}),
    ("/v1/remove-background", {"model": "keyer"}),
    ("/v1/effects", {"effect": "invert"}),
    (
        "/v1/process",
        {"steps": '[{"op": "effect", "effect": "sepia"}, {"op": "upscale", "scale": 2, "model": "lanczos"}]'},
    ),
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
    png = encoded(Image.new("RGB", (8, 8)), "PNG")
    b64 = base64.b64encode(png).decode()
    cases = [
        ("/v1/upscale", dict(json={"image_base64": b64, "scale": [4]})),
        ("/v1/upscale", dict(json={"image_base64": 12345})),
        ("/v1/upscale", dict(json={"scale": 2})),
        ("/v1/upscale", dict(json={"image_base64": "A" * 3_000_000})),
        (
            "/v1/upscale",
            dict(content=b'{"image_base64": "\xff\xfe\xfd"}', headers={"content-type": "application/json"}),
        ),
        (
            "/v1/upscale",
            dict(
                content=b"--xyz\r\nContent-Disposition: form-data; name=file\r\n\r\nabc",
                headers={"content-type": "multipart/form-data; boundary=xyz"},
            ),
        ),
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
