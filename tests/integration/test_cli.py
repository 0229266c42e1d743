"""The installed `imagemesh` command against real services on loopback."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from support.processes import free_port, start_gateway

IMAGEMESH = str(Path(sys.executable).with_name("imagemesh"))


@pytest.fixture
def photo_file(tmp_path, photo):
    path = tmp_path / "in.png"
    Image.fromarray(photo).save(path)
    return path


def cli(*args, url=None):
    base = [IMAGEMESH] + (["--url", url] if url else [])
    return subprocess.run(base + [str(a) for a in args], capture_output=True, text=True, timeout=300)


def test_upscale_shows_progress_and_writes_the_file(gateway, photo_file, tmp_path):
    out = tmp_path / "out.png"
    result = cli("upscale", photo_file, "-s", 2, "-m", "lanczos", "-o", out, url=gateway.url)
    assert result.returncode == 0, result.stderr
    assert Image.open(out).size == (256, 192)
    assert "tiles" in result.stderr and "[" in result.stderr and "upscale lanczos (lanczos)" in result.stderr


def test_every_command(gateway, photo_file, tmp_path):
    bw = tmp_path / "bw.jpg"
    assert (
        cli("effect", photo_file, "blackwhite", "-p", "grain_strength=0.2", "-o", bw, url=gateway.url).returncode == 0
    )
    assert Image.open(bw).format == "JPEG" and Image.open(bw).mode == "L"
    steps = json.dumps(
        [{"op": "remove_background", "model": "keyer"}, {"op": "upscale", "scale": 2, "model": "lanczos"}]
    )
    piped = tmp_path / "piped.png"
    assert cli("process", photo_file, "--steps", steps, "-o", piped, url=gateway.url).returncode == 0
    assert Image.open(piped).mode == "RGBA" and Image.open(piped).size == (256, 192)
    result = cli(
        "remove-bg", photo_file, "--models", "keyer,mediapipe-selfie", "-o", tmp_path / "cut.png", url=gateway.url
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "cut.keyer.png").is_file() and (tmp_path / "cut.mediapipe-selfie.png").is_file()
    assert "request_id" in result.stderr
    models = cli("models", url=gateway.url)
    assert models.returncode == 0 and "realesr-general-x4v3" in models.stdout and "mediapipe-selfie" in models.stdout
    assert "blackwhite" in cli("effects", url=gateway.url).stdout


def test_straight_over_grpc(mesh, photo_file, tmp_path):
    out = tmp_path / "out.webp"
    result = subprocess.run(
        [
            IMAGEMESH,
            "--grpc",
            "--upscaler",
            mesh["upscaler"].address,
            "--effects",
            mesh["effects"].address,
            "process",
            str(photo_file),
            "--steps",
            '[{"op": "upscale", "scale": 2, "model": "lanczos"}, {"op": "effect", "effect": "sepia"}]',
            "-o",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert Image.open(out).format == "WEBP" and Image.open(out).size == (256, 192)
    assert "tiles" in result.stderr


def test_the_grpc_client_runs_the_mesh_without_the_gateway(mesh, photo_file):
    """The client library uses the mesh's own client (services.common), never the gateway's code."""
    script = f"""
import sys
from imagemesh_client import GrpcClient
client = GrpcClient(upscaler={mesh["upscaler"].address!r}, effects={mesh["effects"].address!r})
result = client.process(open({str(photo_file)!r}, "rb").read(), [{{"op": "effect", "effect": "invert"}}])
print(result.width, result.height, sorted(m for m in sys.modules if m.startswith("services.gateway")))
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["128", "96", "[]"]


def test_exit_codes_scripts_can_rely_on(gateway, photo_file, tmp_path, tmp_path_factory, mesh, mesh_ports):
    assert cli("upscale", tmp_path / "missing.png", url=gateway.url).returncode == 3
    assert cli("upscale", photo_file, "-m", "nope", "-o", tmp_path / "x.png", url=gateway.url).returncode == 4
    (tmp_path / "text.png").write_text("not an image")
    assert cli("upscale", tmp_path / "text.png", url=gateway.url).returncode == 4
    assert cli("upscale", photo_file, "-m", "RealESRGAN_x4plus", url=gateway.url).returncode == 6  # not ready: 503
    assert cli("upscale", photo_file, url=f"http://127.0.0.1:{free_port()}").returncode == 8
    assert cli("frobnicate", photo_file).returncode == 2
    secured = start_gateway(tmp_path_factory, mesh_ports, API_TOKENS="right-token")
    try:
        assert cli("--token", "wrong-token", "upscale", photo_file, url=secured.url).returncode == 5
        ok = cli(
            "--token",
            "right-token",
            "upscale",
            photo_file,
            "-s",
            2,
            "-m",
            "lanczos",
            "-o",
            tmp_path / "t.png",
            url=secured.url,
        )
        assert ok.returncode == 0, ok.stderr
    finally:
        secured.stop()


def test_a_batch_keeps_going_past_a_broken_file_and_says_so(gateway, photo, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        Image.fromarray(photo[:, i * 10 :]).save(photos / f"p{i}.png")
    (photos / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (photos / "notes.txt").write_text("not an image, not matched by the glob")
    out = tmp_path / "out"
    result = cli("upscale", photos / "*.png", "-s", 2, "-m", "lanczos", "-o", out, "-j", 2, url=gateway.url)
    assert result.returncode == 4, result.stderr  # the broken file's refusal (a 4xx)
    for i in range(3):
        assert Image.open(out / f"p{i}.png").size == (2 * (128 - i * 10), 192)
    assert not (out / "broken.png").exists()
    assert "3 done, 1 failed, of 4 files" in result.stderr
    assert f"failed  {photos / 'broken.png'}" in result.stderr and "4/4 files" in result.stderr
    folder = cli("effect", photos, "sepia", "-o", tmp_path / "sepia", url=gateway.url)  # a folder is a batch too
    assert folder.returncode == 4 and sorted(p.name for p in (tmp_path / "sepia").iterdir()) == [
        "p0.png",
        "p1.png",
        "p2.png",
    ]
    every_good = cli("upscale", photos / "p0.png", photos / "p1.png", "-s", 2, "-m", "lanczos", url=gateway.url)
    assert every_good.returncode == 0 and (photos / "p1.upscale.png").is_file()  # beside the inputs without -o
