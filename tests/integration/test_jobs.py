"""Jobs: progress events, results, expiry and the bounded queue."""

import io
import json
import time

import httpx
import numpy as np
from PIL import Image

from support.clients import events
from support.images import png
from support.processes import start_gateway


def test_a_job_reports_progress_from_zero_to_done_and_its_result_downloads(http, photo):
    image = np.tile(photo, (3, 3, 1))  # 288 x 384
    steps = [{"op": "upscale", "scale": 2, "model": "lanczos", "tile": 32}, {"op": "effect", "effect": "sepia"}]
    reply = http.post("/v1/jobs", files={"file": ("p.png", png(image))}, data={"steps": json.dumps(steps)})
    assert reply.status_code == 202, reply.text
    job = reply.json()
    assert job["status_url"].endswith(f"/v1/jobs/{job['id']}") and reply.headers["location"] == job["status_url"]
    stream = events(http, job["id"])
    progress = [view["progress"]["tiles_done"] for name, view in stream if name == "progress"]
    final_event, final = stream[-1]
    assert final_event == "done" and final["status"] == "done"
    assert progress == sorted(progress) and final["progress"]["tiles_done"] == final["progress"]["tiles_total"] > 1
    status = http.get(f"/v1/jobs/{job['id']}").json()
    assert status["status"] == "done" and status["result_url"].endswith("/result") and status["expires_at"]
    assert [s["service"] for s in status["steps"]] == ["upscaler", "effects"]
    result = http.get(f"/v1/jobs/{job['id']}/result")
    assert result.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(result.content)).size == (768, 576)


def test_job_input_styles_and_failures(http, photo):
    import base64

    body = {
        "image_base64": base64.b64encode(png(photo)).decode(),
        "format": "webp",
        "steps": [{"op": "effect", "effect": "grayscale"}],
    }
    job = http.post("/v1/jobs", json=body).json()
    assert events(http, job["id"])[-1][0] == "done"
    assert http.get(f"/v1/jobs/{job['id']}/result").headers["content-type"] == "image/webp"
    running = http.post(
        "/v1/jobs", files={"file": ("p.png", png(photo))}, data={"steps": json.dumps([{"op": "upscale", "scale": 4}])}
    ).json()
    assert http.get(f"/v1/jobs/{running['id']}/result").status_code in (409, 200)  # 409 until it is done
    assert http.get("/v1/jobs/0123456789abcdef0123456789abcdef").status_code == 404
    assert http.post("/v1/jobs", files={"file": ("p.png", png(photo))}, data={"steps": "[]"}).status_code == 400


def test_results_expire_and_the_queue_is_bounded(tmp_path_factory, mesh, mesh_ports, photo):
    service = start_gateway(
        tmp_path_factory,
        mesh_ports,
        RATE_LIMIT_PER_MINUTE="0",
        RESULT_TTL_SECONDS="2",
        MAX_CONCURRENT_JOBS="1",
        JOB_QUEUE_SIZE="1",
    )
    try:
        with httpx.Client(base_url=service.url, timeout=120) as client:
            quick = client.post(
                "/v1/jobs",
                files={"file": ("p.png", png(photo))},
                data={"steps": json.dumps([{"op": "effect", "effect": "invert"}])},
            ).json()
            assert events(client, quick["id"])[-1][0] == "done"
            assert client.get(f"/v1/jobs/{quick['id']}/result").status_code == 200
            time.sleep(2.5)
            expired = client.get(f"/v1/jobs/{quick['id']}/result")
            assert expired.status_code == 404 and expired.json()["error"]["code"] == "result_expired"
            assert list(service.result_dir.iterdir()) == []  # the expired file is gone

            slow = {"file": ("p.png", png(np.tile(photo, (3, 3, 1))))}
            steps = {"steps": json.dumps([{"op": "upscale", "scale": 4, "model": "realesr-general-x4v3"}])}
            codes = [client.post("/v1/jobs", files=slow, data=steps).status_code for _ in range(3)]
            assert codes == [202, 202, 429]  # one running, one queued, the third refused
            refused = client.post("/v1/jobs", files=slow, data=steps)
            assert refused.status_code == 429 and refused.headers["retry-after"]
    finally:
        service.stop()


def test_a_job_tells_its_estimate_and_time_left(http, photo):
    steps = [{"op": "upscale", "scale": 4, "model": "realesr-general-x4v3"}]
    image = png(np.tile(photo, (2, 2, 1)))
    job = http.post("/v1/jobs", files={"file": ("p.png", image)}, data={"steps": json.dumps(steps)}).json()
    stream = events(http, job["id"])
    first, final = stream[0][1], stream[-1][1]
    assert first["estimated_seconds"] > 0  # from the upscaler's measured speed
    assert first["eta_seconds"] is not None and first["eta_seconds"] >= 0
    fractions = [view["progress"]["fraction"] for _, view in stream]
    assert fractions == sorted(fractions) and final["progress"]["fraction"] == 1.0 and final["eta_seconds"] == 0.0
    assert http.get(f"/v1/jobs/{job['id']}").json()["eta_seconds"] == 0.0
