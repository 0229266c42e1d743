"""python -m services.gateway: the REST/JSON gateway."""
import logging
import sys
from pathlib import Path

import uvicorn

from services.common import config as cfg
from services.common import imageio, logs

from .app import create_app

SETTINGS = cfg.COMMON_SETTINGS + cfg.ADDRESS_SETTINGS + [
    cfg.Setting("GATEWAY_PORT", int, 8080, "HTTP port", minimum=0, maximum=65535),
    cfg.Setting("MAX_UPLOAD_BYTES", int, 50 * 1024 * 1024, "largest accepted image file, in bytes", minimum=1),
    cfg.Setting("UPSTREAM_TIMEOUT_SECONDS", float, 600.0, "deadline of a call to a service", minimum=1),
    cfg.Setting("API_TOKENS", str, "", "comma-separated bearer tokens; empty: the gateway is open"),
    cfg.Setting("AUTH_REQUIRED", bool, False, "refuse to start without API_TOKENS"),
    cfg.Setting("RATE_LIMIT_PER_MINUTE", float, 120.0, "processing requests per token (or address) a minute; 0: off",
                minimum=0),
    cfg.Setting("RATE_LIMIT_BURST", int, 30, "requests allowed at once above the rate", minimum=1),
    cfg.Setting("GATEWAY_MAX_PIXEL_BYTES", int, 2 << 30,
                "bytes of decoded pixels the gateway holds at once (inputs being sent, outputs being assembled); "
                "a request past it is refused (429), a job waits", minimum=1 << 20),
    cfg.Setting("CLIENT_WRITE_TIMEOUT_SECONDS", float, 60.0,
                "an answer whose client reads nothing for this long is abandoned (its work cancelled)", minimum=1),
    cfg.Setting("TRUSTED_PROXIES", str, "", "comma-separated addresses/networks of proxies (Envoy) whose "
                "X-Forwarded-For names the client; empty: the peer is the client"),
    cfg.Setting("URL_FETCH_ENABLED", bool, True, "fetch images from image_url (false: only uploads and base64)"),
    cfg.Setting("URL_FETCH_TIMEOUT_SECONDS", float, 30.0, "time to fetch an image_url, redirects included", minimum=1),
    cfg.Setting("URL_FETCH_ALLOWLIST", str, "", "comma-separated addresses/networks image_url may reach even if "
                "private or loopback (for tests and internal sources)"),
    cfg.Setting("RESULT_DIR", str, str(Path.home() / ".cache/imagemesh/results"),
                "where job results and download files are kept"),
    cfg.Setting("RESULT_TTL_SECONDS", float, 3600.0, "how long results stay downloadable", minimum=1),
    cfg.Setting("UPSCALE_FANOUT", int, 0, "bands of one upscale run at once over the upscaler's replicas "
                "(0: one per address listed in UPSCALER_ADDRESS)", minimum=0, maximum=64),
    cfg.Setting("UPSCALE_BAND_ROWS", int, 512, "input rows per band when an upscale is spread over replicas",
                minimum=64, maximum=8192),
    cfg.Setting("PNG_COMPRESSION_LEVEL", int, imageio.DEFAULT_PNG_LEVEL,
                "deflate level of PNG answers: 0-3 ISA-L (fast), 4-9 zlib (smaller, slower)",
                minimum=min(imageio.PNG_LEVELS), maximum=max(imageio.PNG_LEVELS)),
    cfg.Setting("MAX_CONCURRENT_JOBS", int, 2, "jobs processed at once", minimum=1),
    cfg.Setting("JOB_QUEUE_SIZE", int, 32, "jobs waiting beyond those (in all replicas); past it, 429", minimum=0),
    cfg.Setting("REDIS_URL", str, "", "redis://host:port/db holding jobs, rate-limit buckets and results, shared by "
                "gateway replicas; empty: kept in this process (and RESULT_DIR), for a single gateway"),
    cfg.Setting("JOB_CLAIM_SECONDS", float, 30.0, "with Redis: a running job whose replica has not renewed it for "
                "this long (it stopped) is taken over by another replica", minimum=1),
]


def main() -> None:
    config = cfg.load_or_exit(SETTINGS)
    logs.setup("gateway", config.log_level)
    if not config.api_tokens.strip():
        if config.auth_required:
            print("imagemesh: AUTH_REQUIRED=true but API_TOKENS is empty; refusing to start", file=sys.stderr)
            raise SystemExit(2)
        logs.log(logging.getLogger("imagemesh.gateway"), logging.WARNING,
                 "AUTHENTICATION IS OFF: no API_TOKENS are set, anyone who can reach this gateway may use it")
    uvicorn.run(create_app(config), host=config.bind_host, port=config.gateway_port, log_config=None,
                access_log=False, timeout_graceful_shutdown=30)


if __name__ == "__main__":
    main()
