"""python -m services.gateway: the REST/JSON gateway."""
import uvicorn

from services.common import config as cfg
from services.common import logs

from .app import create_app

SETTINGS = cfg.COMMON_SETTINGS + cfg.ADDRESS_SETTINGS + [
    cfg.Setting("GATEWAY_PORT", int, 8080, "HTTP port", minimum=0, maximum=65535),
    cfg.Setting("MAX_UPLOAD_BYTES", int, 50 * 1024 * 1024, "largest accepted image file, in bytes", minimum=1),
    cfg.Setting("UPSTREAM_TIMEOUT_SECONDS", float, 600.0, "deadline of a call to a service", minimum=1),
]


def main() -> None:
    config = cfg.load_or_exit(SETTINGS)
    logs.setup("gateway", config.log_level)
    uvicorn.run(create_app(config), host=config.bind_host, port=config.gateway_port, log_config=None,
                access_log=False, timeout_graceful_shutdown=30)


if __name__ == "__main__":
    main()
