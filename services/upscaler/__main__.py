"""python -m services.upscaler: the upscaler gRPC service."""

import asyncio
from pathlib import Path

from imagemesh.v1 import upscaler_pb2, upscaler_pb2_grpc

from services.common import logs
from services.common.config import load_or_exit
from services.common.resources import available_cpus, keep_freed_memory_for_reuse
from services.common.server import ServiceRuntime, serve

from .backends import resolve_device
from .config import UpscalerConfig
from .models import ModelRegistry
from .server import UpscalerServicer


async def main() -> None:
    keep_freed_memory_for_reuse()
    config = load_or_exit(UpscalerConfig)
    logs.setup("upscaler", config.log_level)
    runtime = ServiceRuntime(
        "upscaler",
        upscaler_pb2.DESCRIPTOR.services_by_name["Upscaler"],
        config,
        config.upscaler_port,
        config.upscaler_metrics_port,
    )
    try:
        device = resolve_device(config.upscaler_device)
    except RuntimeError as exc:
        raise SystemExit(f"imagemesh: {exc}") from None
    registry = ModelRegistry(
        Path(config.model_dir),
        backend=config.upscaler_backend,
        device=device,
        onnx_cache_dir=Path(config.onnx_cache_dir) if config.onnx_cache_dir else None,
        threads=config.upscaler_threads or available_cpus(),
        lanes=config.inference_lanes,
        halo=config.upscaler_tile_halo,
        calibration_tile=config.upscaler_calibration_tile,
        tile=config.upscaler_tile,
    )
    servicer = UpscalerServicer(runtime, registry)
    await serve(
        runtime,
        lambda server: upscaler_pb2_grpc.add_UpscalerServicer_to_server(servicer, server),
        lambda: asyncio.get_running_loop().run_in_executor(None, registry.load_all),
    )


if __name__ == "__main__":
    asyncio.run(main())
