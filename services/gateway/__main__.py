"""python -m services.gateway: the REST/JSON gateway."""

import logging
import sys

import uvicorn

from services.common import logs
from services.common.config import load_or_exit

from .app import create_app
from .config import GatewayConfig


def main() -> None:
    config = load_or_exit(GatewayConfig)
    logs.setup("gateway", config.log_level)
    if not config.api_tokens.strip():
        if config.auth_required:
            print("imagemesh: AUTH_REQUIRED=true but API_TOKENS is empty; refusing to start", file=sys.stderr)
            raise SystemExit(2)
        logs.log(
            logging.getLogger("imagemesh.gateway"),
            logging.WARNING,
            "AUTHENTICATION IS OFF: no API_TOKENS are set, anyone who can reach this gateway may use it",
        )
    uvicorn.run(
        create_app(config),
        host=config.bind_host,
        port=config.gateway_port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=30,
    )


if __name__ == "__main__":
    main()
