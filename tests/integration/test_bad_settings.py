"""A service started with bad settings exits at once and says which."""

import os
import subprocess
import sys


def test_a_service_with_bad_configuration_exits_with_a_clear_message():
    result = subprocess.run(
        [sys.executable, "-m", "services.upscaler"],
        capture_output=True,
        text=True,
        env={**os.environ, "UPSCALER_PORT": "99999", "UPSCALER_BACKEND": "tpu"},
        timeout=60,
    )
    assert result.returncode == 2
    assert "UPSCALER_PORT=99999" in result.stderr and "UPSCALER_BACKEND='tpu'" in result.stderr
    assert "Traceback" not in result.stderr
