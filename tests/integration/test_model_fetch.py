"""make run fetches the missing small default models over HTTP (a loopback server) and then starts offline."""

import functools
import http.server
import os
import shutil
import threading

from services import fetch_models
from services.upscaler.models import SPECS_BY_NAME, sha256_of
from support.processes import free_port


def test_make_run_fetches_the_missing_small_defaults_over_http_and_starts_offline(model_dir, tmp_path):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    shutil.copy(model_dir / "realesr-animevideov3.pth", mirror)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(mirror))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        models = tmp_path / "models"
        models.mkdir()  # the general model is there in a form it also loads from: only the anime one is missing
        os.symlink(model_dir / "realesr-general-x4v3_fp16.onnx", models / "realesr-general-x4v3_fp16.onnx")
        assert fetch_models.fetch_missing_at_start(models, f"http://127.0.0.1:{server.server_port}") == ""
        assert sha256_of(models / "realesr-animevideov3.pth") == SPECS_BY_NAME["realesr-animevideov3"].sha256
    finally:
        server.shutdown()
        server.server_close()
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens: as good as offline
    line = fetch_models.fetch_missing_at_start(tmp_path / "empty", closed)
    assert "could not fetch realesr-general-x4v3, realesr-animevideov3" in line and "\n" not in line
    assert not (tmp_path / "empty").exists() or not any((tmp_path / "empty").iterdir())
