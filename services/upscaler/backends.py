"""Inference backends behind one call: float32 NCHW in [0, 1] -> float32 NCHW.

torch runs the project's own module; onnxruntime runs an .onnx file, either
one that came as such or one exported from a .pth (dynamic height and width).
The torch backend already takes a dtype, device and memory format so that a
bf16/channels_last or CUDA path slots in without touching the engine."""
from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch


def resolve_device(requested: str) -> str:
    """`auto` means CUDA when torch sees a GPU."""
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("UPSCALER_DEVICE=cuda but torch sees no CUDA device")
    return requested


def onnx_providers(device: str) -> list[str]:
    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]


class TorchBackend:
    def __init__(self, module: torch.nn.Module, *, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 channels_last: bool = False):
        self.name = "torch" if device == "cpu" else f"torch-{device}"
        self.device = torch.device(device)
        self.dtype = dtype
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.module = module.eval().to(device=self.device, dtype=dtype, memory_format=self.memory_format)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            x = torch.from_numpy(batch).to(self.device, self.dtype).contiguous(memory_format=self.memory_format)
            return self.module(x).float().cpu().numpy()


class OnnxBackend:
    def __init__(self, path: Path, threads: int, device: str = "cpu"):
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), options, providers=onnx_providers(device))
        self.name = "onnxruntime" if self.session.get_providers()[0] == "CPUExecutionProvider" else "onnxruntime-cuda"
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: np.ascontiguousarray(batch, np.float32)})[0]


def export_onnx(module: torch.nn.Module, path: Path, channels: int = 3) -> Path:
    """Export with dynamic height and width; written atomically so that a
    half-written cache file is never loaded."""
    path.parent.mkdir(parents=True, exist_ok=True)
    height, width = torch.export.Dim("height", min=2), torch.export.Dim("width", min=2)
    fd, tmp = tempfile.mkstemp(suffix=".onnx", dir=path.parent)
    os.close(fd)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module.eval().float(), (torch.rand(1, channels, 64, 64),), tmp,
                              input_names=["input"], output_names=["output"], dynamo=True, verbose=False,
                              dynamic_shapes={"x": {2: height, 3: width}}, external_data=False)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
