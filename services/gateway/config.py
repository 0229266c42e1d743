"""The gateway's settings."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from services.common import imageio
from services.common.config import CommonConfig, setting


@dataclass(frozen=True)
class GatewayConfig(CommonConfig):
    gateway_port: int = setting(8080, "HTTP port", minimum=0, maximum=65535)
    max_upload_bytes: int = setting(50 * 1024 * 1024, "largest accepted image file, in bytes", minimum=1)
    upstream_timeout_seconds: float = setting(600.0, "deadline of a call to a service", minimum=1)
    api_tokens: str = setting("", "comma-separated bearer tokens; empty: the gateway is open")
    auth_required: bool = setting(False, "refuse to start without API_TOKENS")
    rate_limit_per_minute: float = setting(
        120.0, "processing requests per token (or address) a minute; 0: off", minimum=0
    )
    rate_limit_burst: int = setting(30, "requests allowed at once above the rate", minimum=1)
    gateway_max_pixel_bytes: int = setting(
        2 << 30,
        "bytes of decoded pixels the gateway holds at once (inputs being sent, outputs being assembled); "
        "a request past it is refused (429), a job waits",
        minimum=1 << 20,
    )
    client_write_timeout_seconds: float = setting(
        60.0, "an answer whose client reads nothing for this long is abandoned (its work cancelled)", minimum=1
    )
    trusted_proxies: str = setting(
        "",
        "comma-separated addresses/networks of proxies (Envoy) whose "
        "X-Forwarded-For names the client; empty: the peer is the client",
    )
    url_fetch_enabled: bool = setting(True, "fetch images from image_url (false: only uploads and base64)")
    url_fetch_timeout_seconds: float = setting(30.0, "time to fetch an image_url, redirects included", minimum=1)
    url_fetch_allowlist: str = setting(
        "",
        "comma-separated addresses/networks image_url may reach even if "
        "private or loopback (for tests and internal sources)",
    )
    result_dir: str = setting(
        str(Path.home() / ".cache/imagemesh/results"), "where job results and download files are kept"
    )
    result_ttl_seconds: float = setting(3600.0, "how long results stay downloadable", minimum=1)
    upscale_fanout: int = setting(
        0,
        "bands of one upscale run at once over the upscaler's replicas (0: one per address listed in UPSCALER_ADDRESS)",
        minimum=0,
        maximum=64,
    )
    upscale_band_rows: int = setting(
        512, "input rows per band when an upscale is spread over replicas", minimum=64, maximum=8192
    )
    png_compression_level: int = setting(
        imageio.DEFAULT_PNG_LEVEL,
        "deflate level of PNG answers: 0-3 ISA-L (fast), 4-9 zlib (smaller, slower)",
        minimum=min(imageio.PNG_LEVELS),
        maximum=max(imageio.PNG_LEVELS),
    )
    max_concurrent_jobs: int = setting(2, "jobs processed at once", minimum=1)
    job_queue_size: int = setting(32, "jobs waiting beyond those (in all replicas); past it, 429", minimum=0)
    redis_url: str = setting(
        "",
        "redis://host:port/db holding jobs, rate-limit buckets and results, shared by "
        "gateway replicas; empty: kept in this process (and RESULT_DIR), for a single gateway",
    )
    job_claim_seconds: float = setting(
        30.0,
        "with Redis: a running job whose replica has not renewed it for "
        "this long (it stopped) is taken over by another replica",
        minimum=1,
    )
