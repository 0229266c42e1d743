import pytest

from services.common.config import ConfigError, Setting, load

SETTINGS = [
    Setting("PORT", int, 8080, "port", minimum=0, maximum=65535),
    Setting("MODE", str, "auto", "mode", choices=("auto", "torch")),
    Setting("DEBUG", bool, False, "debug"),
    Setting("RATIO", float, 0.5, "ratio", minimum=0),
]


def test_defaults_and_parsing():
    config = load(SETTINGS, {"PORT": "9000", "DEBUG": "yes", "RATIO": ""})
    assert (config.port, config.mode, config.debug, config.ratio) == (9000, "auto", True, 0.5)


def test_every_bad_value_is_reported_at_once_with_its_variable():
    with pytest.raises(ConfigError) as info:
        load(SETTINGS, {"PORT": "eighty", "MODE": "cuda", "DEBUG": "maybe", "RATIO": "-1"})
    text = str(info.value)
    for fragment in ("PORT='eighty'", "MODE='cuda'", "DEBUG='maybe'", "RATIO=-1.0"):
        assert fragment in text


def test_a_service_with_bad_configuration_exits_with_a_clear_message():
    import os
    import subprocess
    import sys
    result = subprocess.run([sys.executable, "-m", "services.upscaler"], capture_output=True, text=True,
                            env={**os.environ, "UPSCALER_PORT": "99999", "UPSCALER_BACKEND": "tpu"}, timeout=60)
    assert result.returncode == 2
    assert "UPSCALER_PORT=99999" in result.stderr and "UPSCALER_BACKEND='tpu'" in result.stderr
    assert "Traceback" not in result.stderr
