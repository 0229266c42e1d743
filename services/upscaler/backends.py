"""Inference backends behind one call: float32 NCHW in [0, 1] -> float32 NCHW.

torch runs the project's own module in one of several precisions and memory
formats; onnxruntime and OpenVINO run an .onnx file (one that came as such, or
one exported from a .pth with dynamic height and width); ncnn runs the
SRVGGNetCompact models written as its own network (ncnn_export.py). Which one
serves a model is measured at start (calibration.py), not assumed."""

from __future__ import annotations

import copy
import functools
import logging
import os
import tempfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch

from services.common.onnx import onnx_session
from services.common.resources import cpu_model_and_flags


class Backend(Protocol):
    """What the engine and calibration use of a backend."""

    name: str
    # Whether a call may ask for fewer threads than the backend was built with (InferenceLanes).
    adapts_threads: bool
    device: str  # "cpu" or "cuda": whose memory the tiles take (the tile size follows it)

    def __call__(self, batch: np.ndarray, threads: int = 0) -> np.ndarray:
        """float32 NCHW RGB in [0, 1] -> the same at the network's native scale."""
        ...

    def render_exact(
        self,
        pixels: np.ndarray,
        passes: int,
        native: int,
        pad_multiple: int,
        rows: slice,
        cols: slice,
        threads: int = 0,
    ) -> np.ndarray:
        """A tile's integer RGB pixels (h, w, 3) through `passes` of the network, each
        output clamped to [0, 1], then cropped to `rows` and `cols` of the result and
        quantised back to the input's type: a tile whose scale needs no resampling."""
        ...


def run_passes(
    network: Callable[[np.ndarray], np.ndarray], x: np.ndarray, passes: int, native: int, pad_multiple: int
) -> np.ndarray:
    """float32 NCHW through `network` `passes` times, padded to its multiple and cropped back."""
    for _ in range(passes):
        height, width = x.shape[2:]
        pad_h, pad_w = -height % pad_multiple, -width % pad_multiple
        if pad_h or pad_w:
            x = np.pad(x, ((0, 0), (0, 0), (0, pad_h), (0, pad_w)), mode="edge")
        x = np.clip(network(x)[:, :, : height * native, : width * native], 0.0, 1.0)
    return x


class ArrayBackend:
    """A backend whose network runs on numpy arrays in host memory: a tile's pixels go
    through it as float32 (onnxruntime, OpenVINO, ncnn, or a plain function)."""

    name = "array"
    adapts_threads = False
    device = "cpu"

    def __call__(self, batch: np.ndarray, threads: int = 0) -> np.ndarray:
        raise NotImplementedError

    def render_exact(
        self,
        pixels: np.ndarray,
        passes: int,
        native: int,
        pad_multiple: int,
        rows: slice,
        cols: slice,
        threads: int = 0,
    ) -> np.ndarray:
        maximum = float(np.iinfo(pixels.dtype).max)
        x = np.ascontiguousarray(pixels.transpose(2, 0, 1)[None], np.float32) / maximum
        out = run_passes(lambda batch: self(batch, threads), x, passes, native, pad_multiple)
        return np.rint(out[0, :, rows, cols].transpose(1, 2, 0) * maximum).astype(pixels.dtype)


class FunctionBackend(ArrayBackend):
    """A plain function of a float32 NCHW batch as a backend (tests, tools): it runs on
    every thread it was given, so it never shares the cores in lanes."""

    def __init__(self, network: Callable[[np.ndarray], np.ndarray], name: str = "function"):
        self.network = network
        self.name = name

    def __call__(self, batch: np.ndarray, threads: int = 0) -> np.ndarray:
        return self.network(batch)


def resolve_device(requested: str) -> str:
    """`auto` means CUDA when torch sees a GPU."""
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("UPSCALER_DEVICE=cuda but torch sees no CUDA device")
    return requested


def cpu_has_bf16() -> bool:
    """AVX-512 bf16 or AMX: bf16 convolutions run natively (several times fp32's speed)."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_model_and_flags()[1])


def onnx_providers(device: str) -> list[str]:
    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]


def use_torch_threads(threads: int) -> None:
    """Give this thread's own torch calls `threads` threads (0: leave them as they are).
    With OpenMP, torch's thread count is the calling thread's own setting, made from the
    process-wide one on its first parallel call: that happens first, so a later change
    elsewhere cannot overwrite this one."""
    if threads and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


class TorchBackend:
    def __init__(
        self,
        name: str,
        module: torch.nn.Module,
        *,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        channels_last: bool = False,
        compiled: bool = False,
    ):
        self.name = name
        self.torch_device = torch.device(device)
        self.device = self.torch_device.type
        self.dtype = dtype
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.module: Callable[[torch.Tensor], torch.Tensor] = module.eval().to(device=self.torch_device, dtype=dtype)
        if channels_last:  # the 4-D weights laid out as the channels-last input (as Module.to(memory_format=) does)
            for parameter in module.parameters():
                if parameter.dim() == 4:
                    parameter.data = parameter.data.contiguous(memory_format=torch.channels_last)
        self.on_gpu = self.device == "cuda"
        # On CPU each calling thread has its own intra-op thread count (compiled kernels keep their own).
        self.adapts_threads = not self.on_gpu and not compiled
        if self.on_gpu:
            torch.backends.cudnn.benchmark = True  # the fastest convolution algorithm per shape
        if compiled:  # fuses each convolution's bias and activation into one kernel
            self.module = torch.compile(self.module, dynamic=True)

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        if not self.on_gpu:
            return tensor
        pinned = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)  # PyTorch caches these
        pinned.copy_(tensor)
        return pinned.to(self.torch_device, non_blocking=True)

    def _to_host(self, tensor: torch.Tensor) -> np.ndarray:
        if not self.on_gpu:
            return tensor.numpy()
        # Copies into pinned memory run at the bus's speed; into pageable memory, many times slower.
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        host.copy_(tensor, non_blocking=True)
        torch.cuda.current_stream(self.torch_device).synchronize()
        return host.numpy()

    def __call__(self, batch: np.ndarray, threads: int = 0) -> np.ndarray:
        use_torch_threads(threads)
        with torch.inference_mode():
            x = torch.from_numpy(batch).to(self.torch_device, self.dtype).contiguous(memory_format=self.memory_format)
            return self.module(x).float().cpu().numpy()

    def render_exact(
        self,
        pixels: np.ndarray,
        passes: int,
        native: int,
        pad_multiple: int,
        rows: slice,
        cols: slice,
        threads: int = 0,
    ) -> np.ndarray:
        """The whole tile on the backend's device: the integer pixels go there, the
        passes, clamping, cropping and quantising run there, and only the integer
        result comes back."""
        use_torch_threads(threads)
        maximum = float(np.iinfo(pixels.dtype).max)
        # torch warns on read-only arrays (tiles straight off the wire); copying one costs little.
        source = torch.from_numpy(
            np.require(pixels, requirements="W") if pixels.dtype == np.uint8 else pixels.astype(np.int32)
        )
        with torch.inference_mode():
            x = self._to_device(source).permute(2, 0, 1)[None].to(self.dtype) / maximum
            for _ in range(passes):
                height, width = x.shape[2:]
                pad_h, pad_w = -height % pad_multiple, -width % pad_multiple
                if pad_h or pad_w:
                    x = torch.nn.functional.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
                x = x.contiguous(memory_format=self.memory_format)
                x = self.module(x)[:, :, : height * native, : width * native].clamp_(0.0, 1.0)
            out = (x[0, :, rows, cols].float() * maximum).round_().permute(1, 2, 0)
            integer = self._to_host(out.to(torch.uint8 if pixels.dtype == np.uint8 else torch.int32).contiguous())
        return integer if integer.dtype == pixels.dtype else integer.astype(pixels.dtype)


class OnnxBackend(ArrayBackend):
    """onnxruntime on an .onnx file: a session of `threads` threads, and one of
    `narrow_threads` for calls that share the cores (InferenceLanes). On CUDA the
    session copies each batch in and out itself."""

    def __init__(self, path: Path, threads: int, device: str = "cpu", narrow_threads: int = 0):
        self.threads = threads
        self.sessions = {threads: onnx_session(path, threads, onnx_providers(device))}
        if device == "cpu" and 0 < narrow_threads < threads:
            self.sessions[narrow_threads] = onnx_session(path, narrow_threads, onnx_providers(device))
        session = self.sessions[threads]
        self.adapts_threads = len(self.sessions) > 1
        self.device = "cpu" if session.get_providers()[0] == "CPUExecutionProvider" else "cuda"
        self.name = "onnxruntime" if self.device == "cpu" else "onnxruntime-cuda"
        self.input_name = session.get_inputs()[0].name

    def __call__(self, batch: np.ndarray, threads: int = 0) -> np.ndarray:
        session = self.sessions.get(threads, self.sessions[self.threads])
        return session.run(None, {self.input_name: np.ascontiguousarray(batch, np.float32)})[0]


class OpenVinoBackend(ArrayBackend):
    """OpenVINO's CPU plugin on an .onnx file. Its compiled forms are kept in `cache_dir`,
    so a restart does not compile again. One stream of `threads` threads (the LATENCY
    hint) and, for `lanes` calls that share the cores (InferenceLanes), the THROUGHPUT
    hint with that many streams of threads // lanes each (the narrow calls share one
    compiled model: separate single-stream ones pinned their threads to the same cores).
    An inference request per calling thread and compiled form (a request serves one
    call at a time)."""

    def __init__(self, path: Path, threads: int, cache_dir: Path, lanes: int = 1):
        import openvino as ov

        core = ov.Core()
        cache_dir.mkdir(parents=True, exist_ok=True)
        core.set_property({"CACHE_DIR": str(cache_dir)})
        self.threads = threads
        self.compiled = {
            threads: core.compile_model(
                str(path), "CPU", {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads}
            )
        }
        lanes = min(lanes, threads)
        if lanes > 1:
            self.compiled[threads // lanes] = core.compile_model(
                str(path),
                "CPU",
                {"PERFORMANCE_HINT": "THROUGHPUT", "NUM_STREAMS": lanes, "INFERENCE_NUM_THREADS": threads},
            )
        self.adapts_threads = len(self.compiled) > 1
        self.name = "openvino"
        self._requests = threading.local()

    def __call__(self, batch: np.ndarray, threads: int = 0) -> np.ndarray:
        width = threads if threads in self.compiled else self.threads
        requests: dict[int, Any] | None = getattr(self._requests, "by_width", None)  # this thread's own
        if requests is None:
            requests = self._requests.by_width = {}
        if width not in requests:
            requests[width] = self.compiled[width].create_infer_request()
        # The output tensor is the request's own, overwritten by its next call: copied out.
        return requests[width].infer({0: np.ascontiguousarray(batch, np.float32)})[0].copy()


@dataclass(frozen=True)
class Candidate:
    name: str
    family: str  # "torch", "onnxruntime", "openvino", "ncnn" or "ncnn-bf16"
    make: Callable[[], Backend]


# (name, dtype, channels_last, compiled) per device; the first is the most exact.
TORCH_VARIANTS = {
    "cpu": (
        ("torch-fp32", torch.float32, False, False),
        ("torch-fp32-cl", torch.float32, True, False),
        ("torch-bf16-cl", torch.bfloat16, True, False),
    ),
    "cuda": (
        ("torch-cuda-fp32-cl", torch.float32, True, False),
        ("torch-cuda-fp16-cl", torch.float16, True, False),
        ("torch-cuda-bf16-cl", torch.bfloat16, True, False),
        ("torch-cuda-fp16-cl-compiled", torch.float16, True, True),
        ("torch-cuda-bf16-cl-compiled", torch.bfloat16, True, True),
    ),
}
BACKEND_CHOICES = ("auto", "torch", "onnxruntime", "openvino", "ncnn", "ncnn-bf16") + tuple(
    v[0] for vs in TORCH_VARIANTS.values() for v in vs
)
CPU_ONLY = ("openvino", "ncnn", "ncnn-bf16")


def torch_candidates(module: torch.nn.Module, device: str) -> list[Candidate]:
    variants = [v for v in TORCH_VARIANTS[device] if device != "cpu" or v[1] != torch.bfloat16 or cpu_has_bf16()]

    def make(name: str, dtype: torch.dtype, channels_last: bool, compiled: bool) -> Backend:
        return TorchBackend(
            name, copy.deepcopy(module), device=device, dtype=dtype, channels_last=channels_last, compiled=compiled
        )

    return [
        Candidate(name, "torch", functools.partial(make, name, dtype, cl, compiled))
        for name, dtype, cl, compiled in variants
    ]


def export_onnx(module: torch.nn.Module, path: Path, channels: int = 3) -> Path:
    """Export with dynamic height and width; written atomically so that a
    half-written cache file is never loaded."""
    path.parent.mkdir(parents=True, exist_ok=True)
    height, width = torch.export.Dim("height", min=2), torch.export.Dim("width", min=2)
    fd, tmp = tempfile.mkstemp(suffix=".onnx", dir=path.parent)
    os.close(fd)
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)  # torchvision ops
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                copy.deepcopy(module).eval().float().cpu(),
                (torch.rand(1, channels, 64, 64),),
                tmp,
                input_names=["input"],
                output_names=["output"],
                dynamo=True,
                verbose=False,
                dynamic_shapes={"x": {2: height, 3: width}},
                external_data=False,
            )
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
