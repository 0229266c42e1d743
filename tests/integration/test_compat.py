"""The four earlier services' documented examples (../shared/seeds), run as
written against imagemesh on loopback: the same routes and fields."""

import base64
import io
import json
import os
import shutil
import subprocess

import httpx
import pytest
import requests
from PIL import Image

from support.processes import start_gateway

pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, photo):
    directory = tmp_path_factory.mktemp("seed")
    small = Image.fromarray(photo).resize((64, 48))
    for name in ("input_image.jpg", "input.jpg", "local.jpg", "test-image.jpg", "pet-photo.jpg"):
        small.save(directory / name, quality=92)
    return directory


def sh(command: str, cwd) -> subprocess.CompletedProcess:
    # The seeds' examples use macOS's base64, where -i names the input file and
    # nothing is wrapped; GNU base64 wraps lines, which the unquoted $(...) would split.
    shim = cwd / "bin"
    shim.mkdir(exist_ok=True)
    real = shutil.which("base64")
    (shim / "base64").write_text(f'#!/bin/sh\n[ "$1" = "-i" ] && exec {real} -w0 "$2"\nexec {real} "$@"\n')
    (shim / "base64").chmod(0o755)
    env = {**os.environ, "PATH": f"{shim}:{os.environ['PATH']}"}
    return subprocess.run(["bash", "-c", command], cwd=cwd, capture_output=True, timeout=300, env=env)


def as_json(result: subprocess.CompletedProcess) -> dict:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


# --- 000: the low-memory Real-ESRGAN API -----------------------------------


def test_first_seed_curl_examples(gateway, workdir):
    url = gateway.url
    health = as_json(sh(f"curl {url}/health", workdir))
    assert health["status"] == "healthy" and health["backend"] == "realesrgan"
    assert health["available_backends"]["pil"] and health["supported_scales"] == [2, 4, 8]
    assert health["backend_quality"] == "high" and health["max_file_size"].endswith("MB")
    assert as_json(sh(f"curl {url}/status", workdir))["services"]["upscaler"] == "SERVING"
    assert as_json(sh(f"curl {url}/models", workdir))["default"] == "realesr-general-x4v3"
    upload = as_json(
        sh(f'curl -X POST "{url}/upscale" -F "file=@input_image.jpg" -F "scale=4" -F "model=auto"', workdir)
    )
    for key in (
        "success",
        "original_size",
        "upscaled_size",
        "scale_used",
        "model_used",
        "backend",
        "format",
        "memory_used_mb",
        "processing_info",
        "base64_image",
    ):
        assert key in upload
    assert (upload["original_size"], upload["upscaled_size"], upload["scale_used"]) == ("64x48", "256x192", 4)
    assert upload["processing_info"]["original_format"] == "JPEG" and upload["format"] == "PNG"
    assert Image.open(io.BytesIO(base64.b64decode(upload["base64_image"]))).size == (256, 192)
    png = base64.b64encode((workdir / "input.jpg").read_bytes()).decode()
    body = as_json(
        sh(
            f'''curl -X POST "{url}/upscale-base64" -H "Content-Type: application/json" -d '{{
    "image_base64": "{png}", "scale": 2, "model": "auto", "format": "auto"}}' ''',
            workdir,
        )
    )
    assert body["success"] and body["upscaled_size"] == "128x96" and body["format"] == "JPEG"


def test_first_seed_python_examples(gateway, workdir, monkeypatch):
    monkeypatch.chdir(workdir)

    def upscale_image_file(api_url, image_path, scale=4):
        endpoint = f"{api_url}/upscale"
        with open(image_path, "rb") as f:
            files = {"file": f}
            data = {"scale": scale, "model": "auto"}
            response = requests.post(endpoint, files=files, data=data)
        if response.status_code == 200:
            result = response.json()
            image_data = base64.b64decode(result["base64_image"])
            with open("upscaled_output.png", "wb") as f:
                f.write(image_data)
            return {
                "success": True,
                "backend": result["backend"],
                "quality": result["backend_quality"],
                "processing_time": result.get("processing_time"),
                "memory_used": result["memory_used_mb"],
            }
        return {"success": False, "error": response.text}

    def upscale_image_base64(api_url, image_path, scale=4):
        endpoint = f"{api_url}/upscale-base64"
        with open(image_path, "rb") as f:
            image_base64 = base64.b64encode(f.read()).decode("utf-8")
        payload = {"image_base64": image_base64, "scale": scale, "model": "auto", "format": "png"}
        response = requests.post(endpoint, json=payload, headers={"Content-Type": "application/json"})
        if response.status_code == 200:
            result = response.json()
            image_data = base64.b64decode(result["base64_image"])
            with open("upscaled_output.png", "wb") as f:
                f.write(image_data)
            return result
        return {"error": response.text}

    first = upscale_image_file(gateway.url, "input.jpg", scale=4)
    assert first["success"] and first["backend"] == "realesrgan" and first["memory_used"] > 0
    assert Image.open(workdir / "upscaled_output.png").size == (256, 192)
    second = upscale_image_base64(gateway.url, "input.jpg", scale=2)
    assert second["success"] and second["format"] == "PNG"
    assert Image.open(workdir / "upscaled_output.png").format == "PNG"


# --- 001: the authenticated serverless upscaler ------------------------------


@pytest.fixture(scope="module")
def authed(tmp_path_factory, mesh, mesh_ports, image_server):
    service = start_gateway(
        tmp_path_factory, mesh_ports, API_TOKENS="token", URL_FETCH_ALLOWLIST="127.0.0.1/32", RATE_LIMIT_PER_MINUTE="0"
    )
    yield service, image_server
    service.stop()


def test_second_seed_curl_examples(authed, workdir):
    gateway, server = authed
    url = gateway.url
    body = as_json(
        sh(
            f'''curl -X POST "{url}/upscale" -H "Authorization: Bearer token" '''
            f"""-d '{{"image":"'$(base64 -i local.jpg)'","scale":4}}' """,
            workdir,
        )
    )
    for key in ("download_url", "file_id", "original_size", "upscaled_size", "expires_at", "output_format"):
        assert key in body
    assert (body["original_size"], body["upscaled_size"], body["output_format"]) == ([64, 48], [256, 192], "png")
    download = httpx.get(body["download_url"])
    assert download.status_code == 200 and Image.open(io.BytesIO(download.content)).size == (256, 192)
    image_url = f"http://127.0.0.1:{server.server_port}/photo.png"
    by_url = as_json(
        sh(
            f'''curl -X POST "{url}/upscale" -H "Authorization: Bearer token" '''
            f'''-d '{{"image_url":"{image_url}","scale":4}}' ''',
            workdir,
        )
    )
    assert by_url["upscaled_size"] == [128, 96]
    jpg = as_json(
        sh(
            f'''curl -X POST "{url}/upscale" -H "Authorization: Bearer token" '''
            f"""-d '{{"image":"'$(base64 -i local.jpg)'","scale":2,"output_ext":"jpg"}}' """,
            workdir,
        )
    )
    assert jpg["output_format"] == "jpg"
    assert httpx.get(jpg["download_url"]).headers["content-type"] == "image/jpeg"
    unauthorised = sh(
        f'''curl -s -o /dev/null -w "%{{http_code}}" -X POST "{url}/upscale" '''
        f"""-d '{{"image":"'$(base64 -i local.jpg)'","scale":4}}' """,
        workdir,
    )
    assert unauthorised.stdout == b"401"
    usage = httpx.get(f"{url}/upscale")
    assert usage.status_code == 405 and "usage" in usage.json() and usage.headers["allow"] == "POST"
    info = httpx.get(url + "/").json()
    assert (
        info["auth_required"]
        and {"method": "POST", "path": "/upscale"}.items()
        <= {
            k: v for e in info["endpoints"] if e["path"] == "/upscale" and e["method"] == "POST" for k, v in e.items()
        }.items()
    )
    assert httpx.get(f"{url}/download/{'0' * 32}").status_code == 404


# --- 003 and 004: background removal and effects -----------------------------


def test_fourth_seed_curl_examples(gateway, workdir):
    url = gateway.url
    result = sh(
        f'curl -X POST {url}/remove-background -F "file=@test-image.jpg" -F "output_format=png" --output result.png',
        workdir,
    )
    assert result.returncode == 0
    assert Image.open(workdir / "result.png").mode == "RGBA"
    effects = as_json(
        sh(
            f"""curl -X POST {url}/api/v2/process -F "file=@pet-photo.jpg" -F 'effects=["blackwhite"]' """
            f"""-F 'effect_params={{"blackwhite": {{"contrast_boost": 1.15}}}}' """,
            workdir,
        )
    )
    assert effects["success"] and effects["effects_applied"] == ["blackwhite"]
    assert effects["effect_params"]["blackwhite.contrast_boost"] == "1.15"
    assert Image.open(io.BytesIO(base64.b64decode(effects["image"]))).mode == "L"
    health = as_json(sh(f"curl {url}/health", workdir))
    assert {"status", "system_memory", "model_loaded"} <= set(health)
    info = as_json(sh(f"curl {url}/model-info", workdir))
    assert {"status", "total_parameters", "model_size_mb", "target_size"} <= set(info)
    stats = as_json(sh(f"curl {url}/stats", workdir))
    assert {"requests_total", "cache_hit_rate", "active_requests", "model_memory_mb"} <= set(stats)
    assert stats["requests_total"] > 0
    assert "imagemesh_http_requests_total" in sh(f"curl {url}/metrics", workdir).stdout.decode()


def test_third_seed_shotgun_and_pipeline(gateway, workdir):
    url = gateway.url
    shotgun = as_json(sh(f'curl -X POST {url}/remove-background -F "file=@test-image.jpg" -F "shotgun=true"', workdir))
    # every ready general model (here the built-in u2netp), then the keyer
    assert [c["model"] for c in shotgun["candidates"]] == ["u2netp", "keyer"]
    assert shotgun["request_id"]
    picked = httpx.post(
        f"{url}/v1/remove-background/choice", json={"request_id": shotgun["request_id"], "model": "keyer"}
    )
    assert picked.status_code == 200
    result = sh(
        f'curl -X POST {url}/process -F "file=@test-image.jpg" -F "model=keyer" -F "upscale_model=lanczos" '
        f"--output processed.png",
        workdir,
    )
    assert result.returncode == 0
    out = Image.open(workdir / "processed.png")
    assert out.mode == "RGBA" and out.size == (256, 192)


def test_openapi_describes_every_route(gateway):
    spec = httpx.get(f"{gateway.url}/openapi.json").json()
    paths = spec["paths"]
    for path, method in (
        ("/v1/upscale", "post"),
        ("/v1/remove-background", "post"),
        ("/v1/effects", "post"),
        ("/v1/process", "post"),
        ("/v1/jobs", "post"),
        ("/v1/jobs/{job_id}/events", "get"),
        ("/upscale", "post"),
        ("/upscale-base64", "post"),
        ("/remove-background", "post"),
        ("/process", "post"),
        ("/api/v2/process", "post"),
        ("/health", "get"),
        ("/status", "get"),
        ("/models", "get"),
        ("/model-info", "get"),
        ("/stats", "get"),
        ("/download/{file_id}", "get"),
        ("/", "get"),
    ):
        assert method in paths.get(path, {}), (path, method)
    upscale_body = paths["/upscale"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "application/json"} <= set(upscale_body)
    assert (
        "image_url"
        in paths["/v1/process"]["post"]["requestBody"]["content"]["application/json"]["schema"]["properties"]
    )
