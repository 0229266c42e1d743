"""Configuration read once from environment variables and validated at start.

A service declares its settings as a list of `Setting`s; `load` reads them all
and reports every bad value at once, so a misconfigured pod fails fast with a
message that names the variable."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from .topology import BY_NAME, SERVICES


class ConfigError(Exception):
    pass


def _parse_bool(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected true or false, got {raw!r}")


_PARSERS: dict[type, Callable[[str], Any]] = {int: int, float: float, str: str, bool: _parse_bool}


@dataclass(frozen=True)
class Setting:
    env: str
    type: type
    default: Any
    help: str
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] | None = None

    @property
    def key(self) -> str:
        return self.env.lower()

    def parse(self, raw: str) -> Any:
        try:
            value = _PARSERS[self.type](raw.strip())
        except ValueError as exc:
            raise ConfigError(f"{self.env}={raw!r}: not a valid {self.type.__name__} ({exc})") from None
        self.check(value)
        return value

    def check(self, value: Any) -> None:
        if self.minimum is not None and value < self.minimum:
            raise ConfigError(f"{self.env}={value!r}: must be at least {self.minimum:g}")
        if self.maximum is not None and value > self.maximum:
            raise ConfigError(f"{self.env}={value!r}: must be at most {self.maximum:g}")
        if self.choices is not None and value not in self.choices:
            raise ConfigError(f"{self.env}={value!r}: must be one of {', '.join(self.choices)}")


class Config:
    """Attribute access to validated settings: config.model_dir for MODEL_DIR."""

    def __init__(self, values: dict[str, Any]):
        self._values = values

    def __getattr__(self, key: str) -> Any:
        try:
            return self._values[key]
        except KeyError:
            raise AttributeError(key) from None

    def as_dict(self) -> dict[str, Any]:
        return dict(self._values)


def load(settings: list[Setting], environ: Mapping[str, str] | None = None) -> Config:
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    problems: list[str] = []
    for setting in settings:
        raw = environ.get(setting.env)
        try:
            values[setting.key] = setting.default if raw is None or raw == "" else setting.parse(raw)
        except ConfigError as exc:
            problems.append(str(exc))
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))
    return Config(values)


def load_or_exit(settings: list[Setting]) -> Config:
    try:
        return load(settings)
    except ConfigError as exc:
        print(f"imagemesh: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


# Settings the gateway and every service share.
COMMON_SETTINGS = [
    Setting("BIND_HOST", str, "127.0.0.1", "address the servers listen on (0.0.0.0 in containers)"),
    Setting("LOG_LEVEL", str, "INFO", "log level", choices=("DEBUG", "INFO", "WARNING", "ERROR")),
    Setting("MAX_INPUT_PIXELS", int, 40_000_000, "largest input image, in pixels", minimum=1),
    Setting("MAX_OUTPUT_PIXELS", int, 67_108_864, "largest output image, in pixels", minimum=1),
]

# Where each step's service is: the gateway calls them, and a service forwards
# a pipeline's remaining steps to the next one.
ADDRESS_SETTINGS = [Setting(service.address_setting.upper(), str, service.default_address,
                            f"host:port of the {service.description} gRPC service") for service in SERVICES]


def port_settings(name: str) -> list[Setting]:
    """A service's gRPC and metrics ports, defaults from the services table."""
    service = BY_NAME[name]
    return [Setting(f"{name.upper()}_PORT", int, service.port, "gRPC port", minimum=0, maximum=65535),
            Setting(f"{name.upper()}_METRICS_PORT", int, service.metrics_port, "Prometheus /metrics port (0: off)",
                    minimum=0, maximum=65535)]

# Settings of every gRPC service.
SERVICE_SETTINGS = COMMON_SETTINGS + ADDRESS_SETTINGS + [
    Setting("MAX_CONCURRENT_REQUESTS", int, 2, "requests processed at once per service", minimum=1),
    Setting("MAX_QUEUED_REQUESTS", int, 16, "requests waiting for a slot before RESOURCE_EXHAUSTED", minimum=0),
    Setting("DRAIN_SECONDS", float, 30.0, "grace period for in-flight streams on SIGTERM", minimum=0),
    Setting("STREAM_START_TIMEOUT_SECONDS", float, 10.0,
            "a stream whose StreamStart has not arrived this long after it opened is refused", minimum=0.1),
    Setting("STREAM_IDLE_TIMEOUT_SECONDS", float, 60.0,
            "a stream that sends nothing (not even a heartbeat) for this long is ended", minimum=15),
]
