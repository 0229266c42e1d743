"""The upscaler's settings."""

from __future__ import annotations

from dataclasses import dataclass

from services.common.config import ServiceConfig, metrics_port_setting, port_setting, setting
from services.common.contract import MAX_TILE_SIZE, MIN_TILE_SIZE

from .backends import BACKEND_CHOICES


@dataclass(frozen=True)
class UpscalerConfig(ServiceConfig):
    upscaler_port: int = port_setting("upscaler")
    upscaler_metrics_port: int = metrics_port_setting("upscaler")
    model_dir: str = setting("./models", "folder the model files are loaded from")
    upscaler_backend: str = setting(
        "auto",
        "auto (measured at start), torch, onnxruntime, openvino, ncnn, ncnn-bf16 (bf16 storage), or one torch variant",
        choices=BACKEND_CHOICES,
    )
    upscaler_calibration_tile: int = setting(
        128, "edge of the first tile backends are timed on at start, halo included", minimum=16, maximum=1024
    )
    upscaler_device: str = setting(
        "auto", "where models run: auto (CUDA when present), cpu or cuda", choices=("auto", "cpu", "cuda")
    )
    upscaler_tile: int = setting(
        0,
        "inference tile edge for requests that name no tile_size (0: chosen per image among the sizes timed "
        "at start that fit in memory); when set, candidates are timed on it alone, and a backend forced by name "
        "not at all",
        minimum=MIN_TILE_SIZE,
        maximum=MAX_TILE_SIZE,
        zero_means_auto=True,
    )
    upscaler_tile_halo: int = setting(16, "context pixels around each tile", minimum=1, maximum=256)
    upscaler_threads: int = setting(0, "inference threads (0: the CPUs the container may use)", minimum=0)
    upscaler_inference_lanes: int = setting(
        2,
        "network calls run at once, each on UPSCALER_THREADS / lanes threads, whenever more than one is "
        "wanted: several requests in flight, or several of a request's tiles ready to render (a tile alone uses "
        "every thread; at most UPSCALER_THREADS and MAX_CONCURRENT_REQUESTS)",
        minimum=1,
        maximum=64,
    )
    onnx_cache_dir: str = setting(
        "",
        "where .pth models exported to ONNX and ncnn, OpenVINO's compiled "
        "models and calibration's outcome are cached (default ~/.cache/imagemesh/onnx)",
    )

    @property
    def inference_lanes(self) -> int:
        """Lanes, at most one per compute slot: the tile size is chosen so that each slot's
        tile fits in its share of the memory (UpscaleEngine.memory_tile)."""
        return min(self.upscaler_inference_lanes, self.max_concurrent_requests)

    @property
    def renders_per_request(self) -> int:
        return self.inference_lanes  # a request's tiles render one per lane
