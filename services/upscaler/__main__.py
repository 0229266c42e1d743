"""python -m services.upscaler: the upscaler gRPC service."""
import asyncio
from pathlib import Path

from imagemesh.v1 import upscaler_pb2, upscaler_pb2_grpc

from services.common import config as cfg
from services.common import logs
from services.common.resources import available_cpus
from services.common.server import ServiceRuntime, serve

from .backends import BACKEND_CHOICES, resolve_device
from .models import ModelRegistry
from .server import UpscalerServicer

SETTINGS = cfg.SERVICE_SETTINGS + cfg.port_settings("upscaler") + [
    cfg.Setting("MODEL_DIR", str, "./models", "folder the model files are loaded from"),
    cfg.Setting("UPSCALER_BACKEND", str, "auto", "auto (measured at start), torch, onnxruntime, openvino, ncnn, "
                "or one torch variant", choices=BACKEND_CHOICES),
    cfg.Setting("UPSCALER_CALIBRATION_TILE", int, 128, "edge of the tile backends are timed on at start",
                minimum=16, maximum=1024),
    cfg.Setting("UPSCALER_DEVICE", str, "auto", "where models run: auto (CUDA when present), cpu or cuda",
                choices=("auto", "cpu", "cuda")),
    cfg.Setting("UPSCALER_TILE_HALO", int, 16, "context pixels around each tile", minimum=1, maximum=256),
    cfg.Setting("UPSCALER_THREADS", int, 0, "inference threads (0: the CPUs the container may use)", minimum=0),
    cfg.Setting("UPSCALER_INFERENCE_LANES", int, 2, "network calls run at once when several requests are in "
                "flight, each on UPSCALER_THREADS / lanes threads; a lone request's calls always use every thread "
                "(at most UPSCALER_THREADS and MAX_CONCURRENT_REQUESTS)", minimum=1, maximum=64),
    cfg.Setting("ONNX_CACHE_DIR", str, "", "where .pth models exported to ONNX and ncnn, and OpenVINO's compiled "
                "models, are cached (default ~/.cache/imagemesh/onnx)"),
]


async def main() -> None:
    config = cfg.load_or_exit(SETTINGS)
    logs.setup("upscaler", config.log_level)
    runtime = ServiceRuntime("upscaler", upscaler_pb2.DESCRIPTOR.services_by_name["Upscaler"], config,
                             config.upscaler_port, config.upscaler_metrics_port)
    try:
        device = resolve_device(config.upscaler_device)
    except RuntimeError as exc:
        raise SystemExit(f"imagemesh: {exc}") from None
    registry = ModelRegistry(Path(config.model_dir), backend=config.upscaler_backend, device=device,
                             onnx_cache_dir=Path(config.onnx_cache_dir) if config.onnx_cache_dir else None,
                             threads=config.upscaler_threads or available_cpus(),
                             lanes=min(config.upscaler_inference_lanes, config.max_concurrent_requests),
                             halo=config.upscaler_tile_halo,
                             calibration_tile=config.upscaler_calibration_tile)
    servicer = UpscalerServicer(runtime, registry)
    await serve(runtime, lambda server: upscaler_pb2_grpc.add_UpscalerServicer_to_server(servicer, server),
                lambda: asyncio.get_running_loop().run_in_executor(None, registry.load_all))


if __name__ == "__main__":
    asyncio.run(main())
