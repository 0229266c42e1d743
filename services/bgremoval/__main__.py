"""python -m services.bgremoval: the background-removal gRPC service."""

import asyncio
import sys
from pathlib import Path

import onnxruntime as ort
from imagemesh.v1 import bgremoval_pb2, bgremoval_pb2_grpc
from sqlalchemy.exc import SQLAlchemyError

from services.common import logs
from services.common.cache import ResultCache
from services.common.config import load_or_exit
from services.common.resources import available_cpus
from services.common.server import ServiceRuntime, serve

from . import engine
from .config import BgRemovalConfig
from .models import SegmenterRegistry
from .server import BackgroundRemovalServicer
from .store import ChoiceStore, database_url


def load(registry: SegmenterRegistry) -> None:
    """What requests need, ready before the service reports SERVING."""
    registry.load_all()
    engine.load_matting()


async def main() -> None:
    config = load_or_exit(BgRemovalConfig)
    logs.setup("bgremoval", config.log_level)
    runtime = ServiceRuntime(
        "bgremoval",
        bgremoval_pb2.DESCRIPTOR.services_by_name["BackgroundRemoval"],
        config,
        config.bgremoval_port,
        config.bgremoval_metrics_port,
    )
    gpu = "CUDAExecutionProvider" in ort.get_available_providers()
    if config.bgremoval_device == "cuda" and not gpu:
        raise SystemExit("imagemesh: BGREMOVAL_DEVICE=cuda but onnxruntime has no CUDA provider")
    device = "cuda" if config.bgremoval_device == "cuda" or (config.bgremoval_device == "auto" and gpu) else "cpu"
    registry = SegmenterRegistry(
        Path(config.model_dir), threads=config.bgremoval_threads or available_cpus(), device=device
    )
    try:
        store = ChoiceStore(database_url(config.database_url, Path(config.bgremoval_db)))
    except ValueError as exc:
        print(f"imagemesh: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except SQLAlchemyError as exc:  # unreachable for now: exit, to be restarted
        print(f"imagemesh: cannot open the picks database: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    cache = ResultCache(
        config.bgremoval_cache_bytes, config.bgremoval_cache_ttl_seconds, lambda c: c.nbytes, service="bgremoval"
    )
    servicer = BackgroundRemovalServicer(runtime, registry, store, cache)
    try:
        await serve(
            runtime,
            lambda server: bgremoval_pb2_grpc.add_BackgroundRemovalServicer_to_server(servicer, server),
            lambda: asyncio.get_running_loop().run_in_executor(None, load, registry),
        )
    finally:
        store.close()


if __name__ == "__main__":
    asyncio.run(main())
