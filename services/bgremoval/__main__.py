"""python -m services.bgremoval: the background-removal gRPC service."""
import asyncio
import sys
from pathlib import Path

import onnxruntime as ort
from imagemesh.v1 import bgremoval_pb2, bgremoval_pb2_grpc
from sqlalchemy.exc import SQLAlchemyError

from services.common import config as cfg
from services.common import logs
from services.common.cache import ResultCache
from services.common.resources import available_cpus
from services.common.server import ServiceRuntime, serve

from .models import SegmenterRegistry
from .server import BackgroundRemovalServicer
from .store import ChoiceStore, database_url

SETTINGS = cfg.SERVICE_SETTINGS + cfg.port_settings("bgremoval") + [
    cfg.Setting("MODEL_DIR", str, "./models", "folder the model files are loaded from"),
    cfg.Setting("BGREMOVAL_DB", str, str(Path.home() / ".local/share/imagemesh/bgremoval.sqlite3"),
                "SQLite file recording candidate runs and users' picks (when DATABASE_URL is empty)"),
    cfg.Setting("DATABASE_URL", str, "", "postgresql://user:password@host:port/db recording candidate runs and "
                "picks for every bgremoval replica; empty: the SQLite file BGREMOVAL_DB"),
    cfg.Setting("BGREMOVAL_CACHE_BYTES", int, 256 * 1024 * 1024, "result cache size (0: off)", minimum=0),
    cfg.Setting("BGREMOVAL_CACHE_TTL_SECONDS", float, 3600.0, "how long a cached cut-out is kept", minimum=1),
    cfg.Setting("BGREMOVAL_MATTING_MAX_PIXELS", int, 4_000_000, "largest image alpha_matting accepts", minimum=1),
    cfg.Setting("BGREMOVAL_TILE_SIZE", int, 256, "output tile edge", minimum=16, maximum=4096),
    cfg.Setting("BGREMOVAL_DEVICE", str, "auto", "where models run: auto (CUDA when onnxruntime has it), cpu or cuda",
                choices=("auto", "cpu", "cuda")),
    cfg.Setting("BGREMOVAL_THREADS", int, 0, "inference threads (0: the CPUs the container may use)", minimum=0),
]


async def main() -> None:
    config = cfg.load_or_exit(SETTINGS)
    logs.setup("bgremoval", config.log_level)
    runtime = ServiceRuntime("bgremoval", bgremoval_pb2.DESCRIPTOR.services_by_name["BackgroundRemoval"], config,
                             config.bgremoval_port, config.bgremoval_metrics_port)
    gpu = "CUDAExecutionProvider" in ort.get_available_providers()
    if config.bgremoval_device == "cuda" and not gpu:
        raise SystemExit("imagemesh: BGREMOVAL_DEVICE=cuda but onnxruntime has no CUDA provider")
    device = "cuda" if config.bgremoval_device == "cuda" or (config.bgremoval_device == "auto" and gpu) else "cpu"
    registry = SegmenterRegistry(Path(config.model_dir), threads=config.bgremoval_threads or available_cpus(),
                                 device=device)
    try:
        store = ChoiceStore(database_url(config.database_url, Path(config.bgremoval_db)))
    except ValueError as exc:
        print(f"imagemesh: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except SQLAlchemyError as exc:  # unreachable for now: exit, to be restarted
        print(f"imagemesh: cannot open the picks database: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    cache = ResultCache(config.bgremoval_cache_bytes, config.bgremoval_cache_ttl_seconds, lambda c: c.nbytes,
                        service="bgremoval")
    servicer = BackgroundRemovalServicer(runtime, registry, store, cache)
    try:
        await serve(runtime, lambda server: bgremoval_pb2_grpc.add_BackgroundRemovalServicer_to_server(
            servicer, server), lambda: asyncio.get_running_loop().run_in_executor(None, registry.load_all))
    finally:
        store.close()


if __name__ == "__main__":
    asyncio.run(main())
