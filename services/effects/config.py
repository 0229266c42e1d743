"""The effects service's settings."""

from __future__ import annotations

from dataclasses import dataclass

from services.common.config import ServiceConfig, metrics_port_setting, port_setting, setting


@dataclass(frozen=True)
class EffectsConfig(ServiceConfig):
    effects_port: int = port_setting("effects")
    effects_metrics_port: int = metrics_port_setting("effects")
    effects_tile_size: int = setting(256, "tile edge for tileable effects", minimum=16, maximum=4096)
