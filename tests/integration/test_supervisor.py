"""make run's supervisor: a service that dies is restarted, the requests it was
serving fail clearly (a PNG already streaming ends as a failure, not a short 200),
and the mesh serves again without anyone restarting it."""

import io
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from support.processes import EXACT_UPSCALER, ROOT, free_ports


def child_pid(parent: int, module: str) -> int:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            except (OSError, IndexError, ValueError):
                continue
            if ppid == parent and module.encode() in cmdline:
                return int(entry.name)
    raise AssertionError(f"no {module} under {parent}")


def wait_ready(url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise AssertionError("the mesh did not become ready")


@pytest.fixture
def supervised(model_dir, tmp_path):
    ports = iter(free_ports(10))  # all different: a port taken twice would keep a process from starting
    env = {
        **os.environ,
        "MODEL_DIR": str(model_dir),
        "GATEWAY_PORT": str(next(ports)),
        "RATE_LIMIT_PER_MINUTE": "0",
        "RESULT_DIR": str(tmp_path / "results"),
        "BGREMOVAL_DB": str(tmp_path / "db.sqlite3"),
        "ONNX_CACHE_DIR": str(tmp_path / "onnx"),
        **EXACT_UPSCALER,
        "ENVOY_ADMIN_PORT": str(next(ports)),
        "MODEL_MIRROR": str(tmp_path / "mirror"),
    }  # never the network; MODEL_DIR lacks no default anyway
    for name in ("UPSCALER", "BGREMOVAL", "EFFECTS", "ENVOY"):
        env[f"{name}_PORT"], env[f"{name}_METRICS_PORT"] = str(next(ports)), str(next(ports))
    log = open(tmp_path / "run.log", "wb")
    run = subprocess.Popen([sys.executable, "-m", "services.run"], cwd=ROOT, env=env, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{env['GATEWAY_PORT']}"
    try:
        wait_ready(url)
        yield run, url, tmp_path / "run.log"
    finally:
        run.send_signal(signal.SIGTERM)
        run.wait(60)
        log.close()


def test_a_dead_service_is_restarted_and_a_cut_stream_fails_clearly(supervised, photo):
    run, url, log = supervised
    out = io.BytesIO()
    Image.fromarray(np.tile(photo, (3, 3, 1))).save(out, "PNG")
    outcome = {}
    first_bytes = threading.Event()

    def upscale():
        try:
            with httpx.stream(
                "POST",
                f"{url}/v1/upscale",
                files={"file": ("p.png", out.getvalue())},
                data={"scale": "4", "model": "realesr-general-x4v3", "tile": "32", "format": "png"},
                timeout=300,
            ) as reply:
                outcome["status"] = reply.status_code
                for _ in reply.iter_bytes():
                    first_bytes.set()
                outcome["complete"] = True
        except httpx.HTTPError as exc:
            outcome["error"] = type(exc).__name__
        finally:
            first_bytes.set()

    thread = threading.Thread(target=upscale)
    thread.start()
    assert first_bytes.wait(120)
    os.kill(child_pid(run.pid, "services.upscaler"), signal.SIGKILL)
    thread.join(120)
    # Either refused before any byte (a clear 5xx) or cut: never a complete 200 of a partial image.
    assert not outcome.get("complete") or outcome.get("status", 200) >= 500, outcome
    wait_ready(url)  # restarted by the supervisor
    assert run.poll() is None
    again = httpx.post(
        f"{url}/v1/upscale",
        files={"file": ("p.png", out.getvalue())},
        data={"scale": "2", "model": "lanczos"},
        timeout=120,
    )
    assert again.status_code == 200
    text = log.read_text()
    assert "upscaler" in text and "restarting in" in text
