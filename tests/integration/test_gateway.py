"""End to end: HTTP -> gateway -> gRPC upscaler, real processes on loopback."""

import base64
import io
import time

import cv2
import numpy as np
import pytest
from PIL import Image

from support.images import fp32_untiled, png, psnr


def jpeg(array: np.ndarray, **options) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="JPEG", quality=92, **options)
    return out.getvalue()


def upscale(http, data: bytes, name="image.png", **fields):
    return http.post("/v1/upscale", files={"file": (name, data)}, data={k: str(v) for k, v in fields.items()})


def test_multipart_photo_is_upscaled_4x_by_the_general_model(http, photo):
    reply = upscale(http, jpeg(photo), "photo.jpg", scale=4)
    assert reply.status_code == 200, reply.text
    assert reply.headers["content-type"] == "image/jpeg"
    assert reply.headers["x-imagemesh-model"] == "realesr-general-x4v3"
    chosen = {m["name"]: m["backend"] for m in http.get("/v1/models").json()["models"]}
    assert reply.headers["x-imagemesh-backend"] == chosen["realesr-general-x4v3"]
    assert reply.headers["x-imagemesh-size"] == "512x384"
    assert Image.open(io.BytesIO(reply.content)).size == (512, 384)


def test_mesh_output_matches_an_untiled_fp32_run(http, photo, model_dir):
    reply = upscale(http, png(photo), scale=4, format="png", tile=32)
    assert reply.status_code == 200, reply.text
    mesh = np.asarray(Image.open(io.BytesIO(reply.content)).convert("RGB"))
    assert psnr(mesh, fp32_untiled(model_dir, photo)) >= 45


def test_json_in_json_out(http, photo):
    reply = http.post(
        "/v1/upscale",
        headers={"Accept": "application/json"},
        json={"image_base64": base64.b64encode(png(photo)).decode(), "scale": 2, "model": "lanczos"},
    )
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert (body["width"], body["height"], body["format"], body["model"], body["backend"], body["scale"]) == (
        256,
        192,
        "png",
        "lanczos",
        "lanczos",
        2.0,
    )
    assert {"decode", "mesh", "first_tile", "encode", "total"} <= set(body["timings_ms"])
    assert body["steps"][0]["op"] == "upscale" and body["steps"][0]["compute_ms"] > 0
    assert Image.open(io.BytesIO(base64.b64decode(body["image_base64"]))).size == (256, 192)


def test_rgba_in_rgba_out_with_its_alpha(http, photo):
    alpha = np.zeros(photo.shape[:2], np.uint8)
    alpha[20:70, 30:100] = 255
    reply = upscale(http, png(np.dstack([photo, alpha]), "RGBA"), scale=4)
    out = Image.open(io.BytesIO(reply.content))
    assert reply.headers["content-type"] == "image/png" and out.mode == "RGBA"
    out_alpha = np.asarray(out)[:, :, 3]
    assert out_alpha[100:260, 140:380].min() == 255 and out_alpha[:60].max() == 0


def test_16bit_rgba_stays_16bit(http, photo):
    rgba16 = np.dstack([photo, np.full(photo.shape[:2], 255, np.uint8)]).astype(np.uint16) * 257
    rgba16[..., 0] += 100  # values that 8 bits cannot hold
    ok, data = cv2.imencode(".png", cv2.cvtColor(rgba16, cv2.COLOR_RGBA2BGRA))
    reply = upscale(http, data.tobytes(), scale=2, model="lanczos")
    assert reply.status_code == 200, reply.text
    out = cv2.imdecode(np.frombuffer(reply.content, np.uint8), cv2.IMREAD_UNCHANGED)
    assert out.dtype == np.uint16 and out.shape == (192, 256, 4)
    assert len(np.unique(out % 257)) > 1


def test_grayscale_stays_grayscale(http, photo):
    grey = np.asarray(Image.fromarray(photo).convert("L"))
    reply = upscale(http, png(grey), scale=2)
    assert Image.open(io.BytesIO(reply.content)).mode == "L"


def test_exif_rotated_jpeg_comes_out_upright(http, photo):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated; viewers turn it 90 degrees clockwise
    stored = np.ascontiguousarray(np.rot90(photo, 1))
    reply = upscale(http, jpeg(stored, exif=exif), "rotated.jpg", scale=2, model="lanczos", format="png")
    out = np.asarray(Image.open(io.BytesIO(reply.content)).convert("RGB"))
    upright = np.asarray(
        Image.open(
            io.BytesIO(upscale(http, jpeg(photo), "p.jpg", scale=2, model="lanczos", format="png").content)
        ).convert("RGB")
    )
    assert out.shape == upright.shape == (192, 256, 3)
    assert psnr(out, upright) > 30  # same picture, same way up (only JPEG noise differs)


def _bomb() -> bytes:
    import struct
    import zlib

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", 100000, 100000, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"\0" * 100))
        + chunk(b"IEND", b"")
    )


def bad_requests(photo):
    good = png(photo[:32, :32])
    return {
        "truncated": (dict(files={"file": ("a.png", png(photo)[:300])}), 422, "undecodable_image"),
        "text named .png": (dict(files={"file": ("a.png", b"just some text\n")}), 422, "undecodable_image"),
        "empty upload": (dict(files={"file": ("a.png", b"")}), 400, "empty_image"),
        "100000x100000 png": (dict(files={"file": ("a.png", _bomb())}), 413, "image_too_large"),
        "scale 0": (dict(files={"file": ("a.png", good)}, data={"scale": "0"}), 400, "invalid_argument"),
        "scale -1": (dict(files={"file": ("a.png", good)}, data={"scale": "-1"}), 400, "invalid_argument"),
        "scale 100": (dict(files={"file": ("a.png", good)}, data={"scale": "100"}), 400, "invalid_argument"),
        "scale abc": (dict(files={"file": ("a.png", good)}, data={"scale": "abc"}), 400, "invalid_argument"),
        "unknown model": (dict(files={"file": ("a.png", good)}, data={"model": "nope"}), 404, "model_not_found"),
        "model not ready": (
            dict(files={"file": ("a.png", good)}, data={"model": "RealESRGAN_x4plus"}),
            503,
            "model_not_ready",
        ),
        "bad format": (dict(files={"file": ("a.png", good)}, data={"format": "tiff"}), 400, "invalid_argument"),
        "no file field": (dict(data={"scale": "2"}, files={"other": ("a.png", good)}), 400, "invalid_argument"),
        "bad base64": (dict(json={"image_base64": "***"}), 400, "invalid_argument"),
        "json not an object": (dict(json=[1, 2]), 400, "invalid_argument"),
        "json scale wrong type": (
            dict(json={"image_base64": base64.b64encode(good).decode(), "scale": [4]}),
            400,
            "invalid_argument",
        ),
        "plain text body": (
            dict(content=b"hello", headers={"content-type": "text/plain"}),
            415,
            "unsupported_media_type",
        ),
    }


@pytest.mark.parametrize("case", list(bad_requests(np.zeros((64, 64, 3), np.uint8))))
def test_bad_input_gets_a_clear_4xx_and_the_mesh_keeps_serving(http, photo, case):
    kwargs, status, code = bad_requests(photo)[case]
    reply = http.post("/v1/upscale", **kwargs)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["code"] == code and error["message"] and error["request_id"] == reply.headers["x-request-id"]
    assert "Traceback" not in reply.text
    if status == 503:
        assert reply.headers["retry-after"]
    assert http.get("/readyz").status_code == 200
    assert upscale(http, png(photo[:16, :16]), scale=2, model="lanczos").status_code == 200


def test_models_health_docs_and_unknown_routes(http):
    models = http.get("/v1/models").json()
    assert models["defaults"] == {"upscaler": "realesr-general-x4v3", "bgremoval": "u2netp"}
    by_name = {m["name"]: m for m in models["models"]}
    assert by_name["u2netp"]["origin"].startswith("built-in") and by_name["u2netp"]["license"] == "Apache-2.0"
    assert by_name["realesr-animevideov3"]["ready"] and by_name["realesr-animevideov3"]["sha256_matches"]
    general = by_name["realesr-general-x4v3"]  # the backend chosen at start, and its figures
    chosen = [m for m in general["calibration"] if m["chosen"]]
    assert len(chosen) == 1 and chosen[0]["backend"] == general["backend"] and chosen[0]["psnr_db"] >= 45
    assert general["preferred_tile"] == chosen[0]["tile"] > 0
    assert "make models" in by_name["RealESRGAN_x2plus"]["not_ready_reason"]
    assert http.get("/healthz").json() == {"status": "ok"}
    assert http.get("/readyz").json()["upstreams"] == {
        "upscaler": "SERVING",
        "bgremoval": "SERVING",
        "effects": "SERVING",
    }
    spec = http.get("/openapi.json").json()
    body = spec["paths"]["/v1/upscale"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "application/json"} <= set(body)
    assert http.get("/docs").status_code == 200
    missing = http.get("/no/such/route")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


def test_gateway_metrics_move_after_a_request(http, photo):
    def count():
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in http.get("/metrics").text.splitlines()
            if line.startswith("imagemesh_http_requests_total{") and 'route="/v1/upscale"' in line
        )

    before = count()
    upscale(http, png(photo[:16, :16]), scale=2, model="lanczos")
    # Counted once the answer's last byte is sent, which can be just after the client has it.
    deadline = time.monotonic() + 10
    while count() == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert count() == before + 1


def test_request_id_travels_to_the_service_logs(http, upscaler, photo):
    reply = http.post(
        "/v1/upscale",
        files={"file": ("a.png", png(photo[:16, :16]))},
        data={"model": "nope"},
        headers={"X-Request-ID": "trace-me-123"},
    )
    assert reply.json()["error"]["request_id"] == "trace-me-123"
    assert '"request_id": "trace-me-123"' in upscaler.logs()


def test_png_answers_stream_band_by_band_and_equal_the_whole_image(http, photo):
    image = np.tile(photo, (3, 3, 1))
    fields = {"scale": "2", "model": "lanczos", "format": "png"}
    with http.stream("POST", "/v1/upscale", files={"file": ("p.png", png(image))}, data=fields) as reply:
        assert reply.status_code == 200 and "content-length" not in reply.headers  # chunked, written as it goes
        streamed = b"".join(reply.iter_bytes())
    whole = http.post(
        "/v1/upscale", files={"file": ("p.png", png(image))}, data=fields, headers={"Accept": "application/json"}
    ).json()
    expected = np.asarray(Image.open(io.BytesIO(base64.b64decode(whole["image_base64"]))))
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(streamed))), expected)
    sixteen = image.astype(np.uint16) * 257
    ok, data = cv2.imencode(".png", cv2.cvtColor(sixteen, cv2.COLOR_RGB2BGR))
    deep = http.post("/v1/upscale", files={"file": ("p.png", data.tobytes())}, data=fields)
    decoded = cv2.imdecode(np.frombuffer(deep.content, np.uint8), cv2.IMREAD_UNCHANGED)
    assert decoded.dtype == np.uint16 and decoded.shape == (576, 768, 3)
