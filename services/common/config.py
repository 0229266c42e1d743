"""Configuration read once from environment variables and validated at start.

A service declares its settings as a frozen dataclass whose fields are made by
`setting` (the variable is the field's name in upper case); `load` reads them
all and reports every bad value at once, so a misconfigured pod fails fast with
a message that names the variable."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Mapping, TypeVar, get_type_hints

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
    zero_means_auto: bool = False  # 0 is allowed besides the range: "choose for me"

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
        if self.zero_means_auto and value == 0:
            return
        if self.minimum is not None and value < self.minimum:
            raise ConfigError(f"{self.env}={value!r}: must be at least {self.minimum:g}")
        if self.maximum is not None and value > self.maximum:
            raise ConfigError(f"{self.env}={value!r}: must be at most {self.maximum:g}")
        if self.choices is not None and value not in self.choices:
            raise ConfigError(f"{self.env}={value!r}: must be one of {', '.join(self.choices)}")


def setting(
    default: Any,
    help: str,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    choices: tuple[str, ...] | None = None,
    zero_means_auto: bool = False,
) -> Any:
    """A field of a config dataclass, read from the variable of its name in upper case."""
    metadata = {"help": help, "minimum": minimum, "maximum": maximum, "choices": choices}
    return field(default=default, metadata={**metadata, "zero_means_auto": zero_means_auto})


def settings_of(config_class: type) -> list[Setting]:
    """The settings a config dataclass reads, in declaration order."""
    types = get_type_hints(config_class)
    return [Setting(f.name.upper(), types[f.name], f.default, **f.metadata) for f in fields(config_class)]


ConfigT = TypeVar("ConfigT")


def load(config_class: type[ConfigT], environ: Mapping[str, str] | None = None) -> ConfigT:
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    problems: list[str] = []
    for item in settings_of(config_class):
        raw = environ.get(item.env)
        try:
            values[item.key] = item.default if raw is None or raw == "" else item.parse(raw)
        except ConfigError as exc:
            problems.append(str(exc))
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))
    return config_class(**values)


def load_or_exit(config_class: type[ConfigT]) -> ConfigT:
    try:
        return load(config_class)
    except ConfigError as exc:
        print(f"imagemesh: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def address_setting(name: str) -> Any:
    service = BY_NAME[name]
    return setting(service.default_address, f"host:port of the {service.description} gRPC service")


def port_setting(name: str) -> Any:
    return setting(BY_NAME[name].port, "gRPC port", minimum=0, maximum=65535)


def metrics_port_setting(name: str) -> Any:
    return setting(BY_NAME[name].metrics_port, "Prometheus /metrics port (0: off)", minimum=0, maximum=65535)


@dataclass(frozen=True)
class CommonConfig:
    """Settings the gateway and every service share, and where each step's
    service is: the gateway calls them, and a service forwards a pipeline's
    remaining steps to the next one."""

    bind_host: str = setting("127.0.0.1", "address the servers listen on (0.0.0.0 in containers)")
    log_level: str = setting("INFO", "log level", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    max_input_pixels: int = setting(40_000_000, "largest input image, in pixels", minimum=1)
    max_output_pixels: int = setting(67_108_864, "largest output image, in pixels", minimum=1)
    upscaler_address: str = address_setting("upscaler")
    bgremoval_address: str = address_setting("bgremoval")
    effects_address: str = address_setting("effects")

    @property
    def addresses(self) -> dict[str, str]:
        """Each service's address by its name."""
        return {service.name: getattr(self, service.address_setting) for service in SERVICES}


@dataclass(frozen=True)
class ServiceConfig(CommonConfig):
    """Settings of every gRPC service."""

    max_concurrent_requests: int = setting(2, "requests processed at once per service", minimum=1)
    max_queued_requests: int = setting(16, "requests waiting for a slot before RESOURCE_EXHAUSTED", minimum=0)
    drain_seconds: float = setting(30.0, "grace period for in-flight streams on SIGTERM", minimum=0)
    stream_start_timeout_seconds: float = setting(
        10.0, "a stream whose StreamStart has not arrived this long after it opened is refused", minimum=0.1
    )
    stream_idle_timeout_seconds: float = setting(
        60.0, "a stream that sends nothing (not even a heartbeat) for this long is ended", minimum=15
    )

    @property
    def renders_per_request(self) -> int:
        """How many of one request's tiles may render at once (sharing its compute slot)."""
        return 1
