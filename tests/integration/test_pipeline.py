"""Pipelines through real services on loopback, over gRPC and through the gateway."""

import base64
import io
import json
import time

import grpc
import numpy as np
import pytest
from imagemesh.v1 import pipeline_pb2
from PIL import Image

from services.common import wire
from services.common.tiles import grid
from support.clients import collect
from support.images import logo_on_white, png
from support.processes import EXACT_UPSCALER, free_ports, mesh_addresses, start_gateway, start_service


def stream_steps(address: str, image: np.ndarray, mode: str, steps, edge=64):
    """Send an image to the first step's service; returns (result, summary, output, first tile seconds)."""
    height, width = image.shape[:2]
    header = wire.header(width, height, mode, image.dtype, tile_width=edge, tile_height=edge)

    def requests():
        yield pipeline_pb2.StreamRequest(start=pipeline_pb2.StreamStart(image=header, steps=steps))
        for rect in grid(width, height, edge, edge):
            yield pipeline_pb2.StreamRequest(tile=wire.tile(rect, image[rect.y0 : rect.y1, rect.x0 : rect.x1]))

    kind = steps[0].WhichOneof("op")
    method = {
        "upscale": "/imagemesh.v1.Upscaler/Upscale",
        "effect": "/imagemesh.v1.Effects/ApplyEffects",
        "remove_background": "/imagemesh.v1.BackgroundRemoval/RemoveBackground",
    }[kind]
    started = time.perf_counter()
    first_tile = []

    def timed(replies):
        for reply in replies:
            if reply.WhichOneof("part") == "tile" and not first_tile:
                first_tile.append(time.perf_counter() - started)
            yield reply

    with grpc.insecure_channel(address) as channel:
        call = channel.stream_stream(
            method,
            request_serializer=pipeline_pb2.StreamRequest.SerializeToString,
            response_deserializer=pipeline_pb2.StreamResponse.FromString,
        )
        result, summary, _, out = collect(timed(call(requests(), timeout=300)))
    return result, summary, out, first_tile[0]


def upscale(scale, model="lanczos", tile=0):
    return pipeline_pb2.Step(upscale=pipeline_pb2.UpscaleOptions(model=model, scale=scale, tile_size=tile))


def effect(name, **params):
    return pipeline_pb2.Step(effect=pipeline_pb2.EffectOptions(effect=name, params=params))


def test_tiles_stream_through_the_services(mesh, photo):
    """The first output tile reaches the caller, through the effects service,
    before the upscaler has finished: tiles flow, not whole images."""
    image = np.tile(photo, (4, 3, 1))  # 384 x 384
    result, summary, out, first_tile = stream_steps(
        mesh["upscaler"].address, image, "RGB", [upscale(2, tile=32), effect("sepia"), effect("vignette")]
    )
    upscaler_report, effects_report = summary.steps
    assert (upscaler_report.service, effects_report.service) == ("upscaler", "effects")
    assert effects_report.name == "sepia+vignette"  # consecutive effects in one pass
    assert out.shape == (768, 768, 3) and result.image.width == 768
    assert first_tile * 1000 < upscaler_report.total_ms, (first_tile, upscaler_report.total_ms)
    assert upscaler_report.tiles == 144 and effects_report.tiles == 9


def test_pipeline_output_equals_the_steps_run_one_by_one(mesh, photo):
    steps = [upscale(2, tile=48), effect("blackwhite")]
    _, _, chained, _ = stream_steps(mesh["upscaler"].address, photo, "RGB", steps)
    _, _, upscaled, _ = stream_steps(mesh["upscaler"].address, photo, "RGB", steps[:1])
    _, _, separate, _ = stream_steps(mesh["effects"].address, upscaled, "RGB", steps[1:])
    assert np.array_equal(chained, separate)


def _peak_kib(service) -> int:
    status = open(f"/proc/{service.process.pid}/status").read()
    return int(status.split("VmHWM:")[1].split()[0])


def test_each_service_memory_stays_bounded_for_a_large_image(tmp_path_factory, model_dir):
    """A 2048x2048 photo upscaled 2x (48 MiB out) and toned: neither service
    grows by more than a fraction of the output, which they never hold whole."""
    ports = dict(zip(("upscaler", "bgremoval", "effects"), free_ports(3)))
    addresses = mesh_addresses(ports)
    services = {
        name: start_service(name, tmp_path_factory, model_dir, ports[name], addresses, **EXACT_UPSCALER)
        for name in ("upscaler", "effects")
    }
    try:
        small = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
        steps = [upscale(2, tile=128), effect("sepia")]
        stream_steps(services["upscaler"].address, small, "RGB", steps, edge=256)  # warm up both
        before = {name: _peak_kib(s) for name, s in services.items()}
        import skimage.data

        large = np.asarray(Image.fromarray(skimage.data.astronaut()).resize((2048, 2048), Image.LANCZOS))
        _, _, out, _ = stream_steps(services["upscaler"].address, large, "RGB", steps, edge=256)
        assert out.shape == (4096, 4096, 3)
        output_kib = out.nbytes // 1024
        for name, service in services.items():
            growth = _peak_kib(service) - before[name]
            print(f"{name}: peak memory grew {growth} KiB for a {output_kib} KiB output")
            assert growth < output_kib // 2, f"{name} grew by {growth} KiB for a {output_kib} KiB output"
    finally:
        for service in services.values():
            service.stop()


def test_a_downstream_error_reaches_the_caller_with_its_code(mesh, photo):
    with pytest.raises(grpc.RpcError) as info:
        stream_steps(mesh["upscaler"].address, photo, "RGB", [upscale(2), effect("nope")])
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "valid effects" in info.value.details()


# --- through the gateway ---------------------------------------------------


def test_process_remove_background_upscale_blackwhite(http):
    logo = logo_on_white()
    steps = [
        {"op": "remove_background", "model": "keyer"},
        {"op": "upscale", "scale": 4, "model": "lanczos"},
        {"op": "effect", "effect": "blackwhite"},
    ]
    reply = http.post("/v1/process", files={"file": ("logo.png", png(logo))}, data={"steps": json.dumps(steps)})
    assert reply.status_code == 200, reply.text
    out = Image.open(io.BytesIO(reply.content))
    assert out.size == (960, 560) and out.mode == "LA"  # black and white, with the cut-out's alpha
    alpha = np.asarray(out)[:, :, 1]
    assert alpha[:20].max() == 0 and alpha[240:260, 240:260].min() == 255
    assert (
        reply.headers["x-imagemesh-steps"]
        == "remove_background=keyer/keyer, upscale=lanczos/lanczos, effect=blackwhite/numpy"
    )


def test_process_json_body_and_json_answer(http, photo):
    reply = http.post(
        "/v1/process",
        headers={"Accept": "application/json"},
        json={
            "image_base64": base64.b64encode(png(photo)).decode(),
            "steps": [
                {"op": "effect", "effect": "popart", "params": {"grid": "2x2", "levels": 3}},
                {"op": "upscale", "scale": 1.5, "model": "lanczos"},
            ],
        },
    )
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert (body["width"], body["height"]) == (384, 288)
    assert [s["service"] for s in body["steps"]] == ["effects", "upscaler"]


def test_remove_background_single_model_png_and_jpeg(http):
    logo = logo_on_white()
    reply = http.post("/v1/remove-background", files={"file": ("logo.png", png(logo))}, data={"model": "keyer"})
    assert reply.status_code == 200 and Image.open(io.BytesIO(reply.content)).mode == "RGBA"
    jpeg = http.post(
        "/v1/remove-background", files={"file": ("logo.png", png(logo))}, data={"format": "jpeg", "quality": "95"}
    )
    # no model named: auto, the built-in general model
    assert jpeg.headers["content-type"] == "image/jpeg" and jpeg.headers["x-imagemesh-model"] == "u2netp"
    assert np.asarray(Image.open(io.BytesIO(jpeg.content)))[:10].min() > 245  # composited on white
    mask = http.post(
        "/v1/remove-background",
        files={"file": ("logo.png", png(logo))},
        data={"only_mask": "true", "post_process": "true"},
    )
    assert Image.open(io.BytesIO(mask.content)).mode == "L"


def test_candidates_choice_and_stats_survive_a_restart(tmp_path_factory, model_dir, portrait):
    """Several models in one request; the pick is recorded durably."""
    import httpx

    db = tmp_path_factory.mktemp("choices") / "bg.sqlite3"
    ports = dict(zip(("upscaler", "bgremoval", "effects"), free_ports(3)))

    def start_bgremoval():
        return start_service(
            "bgremoval", tmp_path_factory, model_dir, ports["bgremoval"], mesh_addresses(ports), BGREMOVAL_DB=str(db)
        )

    bgremoval = start_bgremoval()
    gateway = start_gateway(tmp_path_factory, ports)
    client = httpx.Client(base_url=gateway.url, timeout=60)
    try:
        reply = client.post(
            "/v1/remove-background", files={"file": ("p.png", png(portrait))}, data={"models": "keyer,mediapipe-selfie"}
        )
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert [c["model"] for c in body["candidates"]] == ["keyer", "mediapipe-selfie"]
        for candidate in body["candidates"]:
            assert candidate["compute_ms"] > 0 and candidate["format"] == "png"
            assert Image.open(io.BytesIO(base64.b64decode(candidate["image_base64"]))).mode == "RGBA"
        choice = client.post(
            "/v1/remove-background/choice", json={"request_id": body["request_id"], "model": "mediapipe-selfie"}
        )
        assert choice.status_code == 200, choice.text
        wrong = client.post("/v1/remove-background/choice", json={"request_id": body["request_id"], "model": "u2net"})
        assert wrong.status_code == 400 and "candidates: " in wrong.json()["error"]["message"]
        unknown = client.post("/v1/remove-background/choice", json={"request_id": "nope", "model": "keyer"})
        assert unknown.status_code == 404

        bgremoval.stop()
        bgremoval = start_bgremoval()
        stats = client.get("/v1/remove-background/stats").json()
        by_model = {m["model"]: m for m in stats["models"]}
        assert stats["choices"] == 1 and by_model["mediapipe-selfie"]["picks"] == 1
        assert by_model["mediapipe-selfie"]["share"] == 1.0 and by_model["keyer"]["offered"] == 1
        assert by_model["keyer"]["mean_ms"] > 0
    finally:
        client.close()
        gateway.stop()
        bgremoval.stop()


def test_cached_result_is_reused(http, photo):
    data = {"model": "mediapipe-selfie", "refine": "true"}
    first = http.post(
        "/v1/remove-background",
        files={"file": ("p.png", png(photo))},
        data=data,
        headers={"Accept": "application/json"},
    ).json()
    again = http.post(
        "/v1/remove-background",
        files={"file": ("p.png", png(photo))},
        data=data,
        headers={"Accept": "application/json"},
    ).json()
    assert not first["steps"][0]["cache_hit"] and again["steps"][0]["cache_hit"]
    assert first["image_base64"] == again["image_base64"]
    bypass = http.post(
        "/v1/remove-background",
        files={"file": ("p.png", png(photo))},
        data={**data, "use_cache": "false"},
        headers={"Accept": "application/json"},
    ).json()
    assert not bypass["steps"][0]["cache_hit"]
    stats = http.get("/v1/remove-background/stats").json()
    assert stats["cache_hits"] >= 1 and 0 < stats["cache_hit_rate"] <= 1


def test_effects_route_params_as_fields_or_json(http, photo):
    fields = http.post(
        "/v1/effects",
        files={"file": ("p.png", png(photo))},
        data={"effect": "pixel8bit", "block": "4", "palette": "gameboy"},
    )
    assert fields.status_code == 200, fields.text
    as_json = http.post(
        "/v1/effects",
        json={
            "image_base64": base64.b64encode(png(photo)).decode(),
            "effect": "pixel8bit",
            "params": {"block": 4, "palette": "gameboy"},
        },
    )
    assert as_json.content == fields.content
    listing = {e["name"]: e for e in http.get("/v1/effects").json()["effects"]}
    assert {"blackwhite", "dither", "popart", "pixel8bit", "sepia", "posterize", "sharpen"} <= set(listing)
    assert listing["dither"]["whole_image"]


@pytest.mark.parametrize(
    "route, kwargs, status, text",
    [
        ("/v1/effects", dict(data={"effect": "nope"}), 400, "valid effects: blackwhite"),
        ("/v1/effects", dict(data={"effect": "blackwhite", "grain_strength": "7"}), 400, "between 0 and 1"),
        ("/v1/effects", dict(data={"effect": "sepia", "tone": "warm"}), 400, "valid options"),
        ("/v1/effects", dict(data={}), 400, "effect is required"),
        ("/v1/remove-background", dict(data={"model": "nope"}), 404, "unknown model"),
        ("/v1/remove-background", dict(data={"model": "u2net"}), 503, "not ready"),
        ("/v1/remove-background", dict(data={"bgcolor": "blurple"}), 400, "not a colour"),
        ("/v1/remove-background", dict(data={"models": "keyer,nope"}), 404, "unknown model"),
        ("/v1/process", dict(data={"steps": '{"op": "upscale"}'}), 400, "non-empty JSON list"),
        ("/v1/process", dict(data={"steps": "not json"}), 400, "not valid JSON"),
        ("/v1/process", dict(data={"steps": '[{"op": "teleport"}]'}), 400, "steps[0].op must be one of"),
        (
            "/v1/process",
            dict(data={"steps": json.dumps([{"op": "effect", "effect": "invert"}] * 17)}),
            400,
            "at most 16",
        ),
        ("/v1/process", dict(data={"steps": '[{"op": "upscale", "scale": "x"}]'}), 400, "steps[0].scale"),
        (
            "/v1/process",
            dict(data={"steps": '[{"op": "upscale", "scale": 9}]'}),
            400,
            "scale must be at least 1 and at most 8",
        ),
    ],
)
def test_bad_requests_get_clear_4xx(http, photo, route, kwargs, status, text):
    reply = http.post(route, files={"file": ("p.png", png(photo[:32, :32]))}, **kwargs)
    assert reply.status_code == status, reply.text
    assert text in reply.json()["error"]["message"]
    assert http.get("/readyz").status_code == 200
