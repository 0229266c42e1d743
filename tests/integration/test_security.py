"""Auth, rate limits, upload limits and image_url fetching. Every connection
goes to loopback; guards against other addresses are tested at the
address-check layer only."""

import base64
import io
import os
import subprocess
import sys

import httpx
import pytest
from PIL import Image

from support.clients import png_bytes
from support.processes import start_gateway

TOKENS = ("tok-alpha-123", "tok-beta-456")


@pytest.fixture(scope="module")
def secure(tmp_path_factory, mesh, mesh_ports):
    service = start_gateway(
        tmp_path_factory,
        mesh_ports,
        API_TOKENS=",".join(TOKENS),
        RATE_LIMIT_PER_MINUTE="0",
        URL_FETCH_ALLOWLIST="127.0.0.1/32",
        MAX_UPLOAD_BYTES="200000",
        MAX_INPUT_PIXELS="100000",
    )
    with httpx.Client(base_url=service.url, timeout=60) as client:
        yield client
    service.stop()


def bearer(token):
    return {"Authorization": f"Bearer {token}"}


def test_tokens_guard_processing_routes(secure):
    files = {"file": ("a.png", png_bytes())}
    missing = secure.post("/v1/upscale", files=files, data={"model": "lanczos", "scale": "2"})
    assert missing.status_code == 401 and missing.headers["www-authenticate"].startswith("Bearer")
    assert missing.json()["error"]["code"] == "unauthenticated"
    wrong = secure.post("/v1/upscale", files=files, data={"model": "lanczos"}, headers=bearer("tok-alpha-124"))
    assert wrong.status_code == 401
    for token in TOKENS:
        ok = secure.post("/v1/upscale", files=files, data={"model": "lanczos", "scale": "2"}, headers=bearer(token))
        assert ok.status_code == 200, ok.text
    for path in (
        "/v1/process",
        "/v1/effects",
        "/v1/remove-background",
        "/v1/jobs",
        "/upscale",
        "/upscale-base64",
        "/remove-background",
        "/process",
        "/api/v2/process",
    ):
        assert secure.post(path, files=files).status_code == 401, path
    for path in ("/v1/jobs/0123", "/v1/remove-background/stats", "/stats"):
        assert secure.get(path).status_code == 401, path


def test_public_routes_stay_public(secure):
    for path in (
        "/healthz",
        "/readyz",
        "/docs",
        "/openapi.json",
        "/static/app.js",
        "/static/style.css",
        "/health",
        "/v1/models",
        "/v1/effects",
        "/models",
        "/model-info",
    ):
        assert secure.get(path).status_code == 200, path
    page = secure.get("/", headers={"Accept": "text/html"})
    assert page.status_code == 200 and "<title>imagemesh</title>" in page.text
    info = secure.get("/").json()
    assert info["auth_required"] is True
    by_path = {(e["method"], e["path"]): e["auth"] for e in info["endpoints"]}
    assert by_path[("POST", "/v1/upscale")] and not by_path[("GET", "/healthz")]
    assert secure.get("/openapi.json").json()["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"


def test_rate_limit_answers_429_with_retry_after(tmp_path_factory, mesh, mesh_ports):
    service = start_gateway(tmp_path_factory, mesh_ports, RATE_LIMIT_PER_MINUTE="6", RATE_LIMIT_BURST="3")
    try:
        with httpx.Client(base_url=service.url, timeout=60) as client:
            codes = [
                client.post("/v1/effects", files={"file": ("a.png", png_bytes())}, data={"effect": "invert"})
                for _ in range(4)
            ]
            assert [r.status_code for r in codes] == [200, 200, 200, 429]
            assert 1 <= int(codes[3].headers["retry-after"]) <= 10
            assert codes[3].json()["error"]["code"] == "rate_limited"
            assert client.get("/healthz").status_code == 200  # health is not limited
        assert "AUTHENTICATION IS OFF" in service.logs()
    finally:
        service.stop()


def test_auth_required_without_tokens_refuses_to_start():
    result = subprocess.run(
        [sys.executable, "-m", "services.gateway"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "AUTH_REQUIRED": "true", "API_TOKENS": "", "GATEWAY_PORT": "0"},
    )
    assert result.returncode == 2 and "API_TOKENS is empty" in result.stderr


def test_upload_and_pixel_limits_apply_to_every_input_style(secure, image_server):
    headers = bearer(TOKENS[0])
    big = os.urandom(300_000)
    assert secure.post("/v1/upscale", files={"file": ("a.png", big)}, headers=headers).status_code == 413
    assert (
        secure.post("/v1/upscale", json={"image_base64": base64.b64encode(big).decode()}, headers=headers).status_code
        == 413
    )
    out = io.BytesIO()
    Image.new("RGB", (400, 400), "white").save(out, "PNG")
    many_pixels = out.getvalue()  # a few hundred bytes, but 160000 pixels; the limit here is 100000
    reply = secure.post("/v1/upscale", files={"file": ("a.png", many_pixels)}, headers=headers)
    assert reply.status_code == 413 and reply.json()["error"]["code"] == "image_too_large"
    url = f"http://127.0.0.1:{image_server.server_port}/big.png"
    assert secure.post("/v1/upscale", json={"image_url": url}, headers=headers).status_code == 413


# --- the address check, as a pure function (no connections) --------------


# --- image_url end to end, against a loopback server ----------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "[::1]", "localhost"])
def test_loopback_urls_are_refused_without_an_allowlist(http, image_server, host):
    hits = len(image_server.hits)
    reply = http.post("/v1/upscale", json={"image_url": f"http://{host}:{image_server.server_port}/photo.png"})
    assert reply.status_code == 400 and reply.json()["error"]["code"] == "url_not_allowed"
    assert len(image_server.hits) == hits  # refused before any connection


def test_allowlisted_url_works_and_redirects_are_checked(secure, image_server):
    base = f"http://127.0.0.1:{image_server.server_port}"
    headers = bearer(TOKENS[0])
    ok = secure.post(
        "/v1/upscale",
        json={"image_url": f"{base}/photo.png", "model": "lanczos", "scale": 2},
        headers={**headers, "Accept": "application/json"},
    )
    assert ok.status_code == 200, ok.text
    assert (ok.json()["width"], ok.json()["height"]) == (64, 48)
    via_form = secure.post(
        "/v1/effects", data={"image_url": f"{base}/redirect-here", "effect": "invert"}, headers=headers
    )
    assert via_form.status_code == 200, via_form.text
    elsewhere = secure.post("/v1/upscale", json={"image_url": f"{base}/redirect-elsewhere"}, headers=headers)
    assert elsewhere.status_code == 400 and "127.0.0.2" in elsewhere.json()["error"]["message"]
    text = secure.post("/v1/upscale", json={"image_url": f"{base}/text"}, headers=headers)
    assert text.status_code == 422 and text.json()["error"]["code"] == "undecodable_image"
    missing = secure.post("/v1/upscale", json={"image_url": f"{base}/missing"}, headers=headers)
    assert missing.status_code == 422 and "HTTP 404" in missing.json()["error"]["message"]
    hits = len(image_server.hits)
    loop = secure.post("/v1/upscale", json={"image_url": f"{base}/loop/0"}, headers=headers)
    assert loop.status_code == 422 and "more than 5" in loop.json()["error"]["message"]
    assert len(image_server.hits) - hits == 6  # the first request and five redirects, no more
