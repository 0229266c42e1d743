"""No request takes a service down: each step's output is checked before any work,
and chains through the same service (or crossing ones) never wait on themselves."""
import concurrent.futures
import io
import json
import time

import httpx
import numpy as np
import pytest
from PIL import Image


def png(array) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, "PNG")
    return out.getvalue()


def rss_mb(service) -> float:
    for line in open(f"/proc/{service.process.pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


POPART_GROWTH = [{"op": "effect", "effect": "popart", "params": {"grid": "2x2"}}] * 16


@pytest.mark.parametrize("route", ["/v1/process", "/v1/jobs"])
def test_a_chain_growing_past_the_output_limit_is_refused_before_any_work(http, mesh, photo, route):
    """Sixteen 2x2 pop-art grids double both sides sixteen times: 413 at once, memory unmoved."""
    before = rss_mb(mesh["effects"])
    started = time.monotonic()
    reply = http.post(route, files={"file": ("p.png", png(np.ascontiguousarray(photo[:64, :64])))},
                      data={"steps": json.dumps(POPART_GROWTH)}, timeout=60)
    assert reply.status_code == 413, reply.text
    assert "limit" in reply.json()["error"]["message"] and "step 8" in reply.json()["error"]["message"]
    assert time.monotonic() - started < 30
    assert rss_mb(mesh["effects"]) - before < 50
    assert http.post("/v1/effects", files={"file": ("p.png", png(photo))}, data={"effect": "invert"}).status_code == 200


UPSCALE_1 = {"op": "upscale", "scale": 1, "model": "lanczos"}
KEYER = {"op": "remove_background", "model": "keyer"}
INVERT = {"op": "effect", "effect": "invert"}
CHAINS = {
    "ten hops on the upscaler": [UPSCALE_1] * 10,
    "ten hops on background removal": [KEYER] * 10,
    "upscale, effect, upscale, effect, upscale": [UPSCALE_1, INVERT, UPSCALE_1, INVERT, UPSCALE_1],
    "alternating over all three, twelve steps": [UPSCALE_1, INVERT, KEYER] * 4,
}


@pytest.mark.parametrize("name", list(CHAINS))
def test_chains_through_the_same_service_never_wait_on_themselves(http, photo, name):
    """With two compute slots per service, three or more hops of one request on one
    service used to wait for each other for ever; four such requests at once now."""
    data = png(np.ascontiguousarray(photo[:48, :64]))

    def one(_):
        return http.post("/v1/process", files={"file": ("p.png", data)},
                         data={"steps": json.dumps(CHAINS[name])}, timeout=120).status_code
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        codes = list(pool.map(one, range(4)))
    assert codes == [200] * 4, codes  # four requests are well within a service's open limit (18)
