"""The background-removal service's settings."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from services.common.config import ServiceConfig, metrics_port_setting, port_setting, setting


@dataclass(frozen=True)
class BgRemovalConfig(ServiceConfig):
    bgremoval_port: int = port_setting("bgremoval")
    bgremoval_metrics_port: int = metrics_port_setting("bgremoval")
    model_dir: str = setting("./models", "folder the model files are loaded from")
    bgremoval_db: str = setting(
        str(Path.home() / ".local/share/imagemesh/bgremoval.sqlite3"),
        "SQLite file recording candidate runs and users' picks (when DATABASE_URL is empty)",
    )
    database_url: str = setting(
        "",
        "postgresql://user:password@host:port/db recording candidate runs and picks "
        "for every bgremoval replica; empty: the SQLite file BGREMOVAL_DB",
    )
    bgremoval_cache_bytes: int = setting(256 * 1024 * 1024, "result cache size (0: off)", minimum=0)
    bgremoval_cache_ttl_seconds: float = setting(3600.0, "how long a cached cut-out is kept", minimum=1)
    bgremoval_matting_max_pixels: int = setting(4_000_000, "largest image alpha_matting accepts", minimum=1)
    bgremoval_tile_size: int = setting(256, "output tile edge", minimum=16, maximum=4096)
    bgremoval_device: str = setting(
        "auto", "where models run: auto (CUDA when onnxruntime has it), cpu or cuda", choices=("auto", "cpu", "cuda")
    )
    bgremoval_threads: int = setting(0, "inference threads (0: the CPUs the container may use)", minimum=0)
