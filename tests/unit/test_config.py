import dataclasses
from dataclasses import dataclass

import pytest

from services.common.config import CommonConfig, ConfigError, load, setting
from services.common.topology import SERVICES


@dataclass(frozen=True)
class ExampleConfig:
    port: int = setting(8080, "port", minimum=0, maximum=65535)
    mode: str = setting("auto", "mode", choices=("auto", "torch"))
    debug: bool = setting(False, "debug")
    ratio: float = setting(0.5, "ratio", minimum=0)
    tile: int = setting(0, "tile (0: automatic)", minimum=16, maximum=2048, zero_means_auto=True)


def test_defaults_and_parsing_into_a_frozen_typed_config():
    config = load(ExampleConfig, {"PORT": "9000", "DEBUG": "yes", "RATIO": ""})
    assert config == ExampleConfig(port=9000, mode="auto", debug=True, ratio=0.5, tile=0)
    assert load(ExampleConfig, {"TILE": "0"}).tile == 0 and load(ExampleConfig, {"TILE": "16"}).tile == 16
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.port = 1


def test_every_service_address_is_a_setting():
    config = load(CommonConfig, {"EFFECTS_ADDRESS": "127.0.0.1:6000"})
    assert config.addresses == {
        service.name: "127.0.0.1:6000" if service.name == "effects" else service.default_address for service in SERVICES
    }


def test_every_bad_value_is_reported_at_once_with_its_variable():
    with pytest.raises(ConfigError) as info:
        load(ExampleConfig, {"PORT": "eighty", "MODE": "cuda", "DEBUG": "maybe", "RATIO": "-1", "TILE": "8"})
    text = str(info.value)
    for fragment in ("PORT='eighty'", "MODE='cuda'", "DEBUG='maybe'", "RATIO=-1.0", "TILE=8: must be at least 16"):
        assert fragment in text
