"""SRVGGNetCompact as an ncnn network (.param and .bin), written straight from
its weights: a plain list of layers, so no converter (pnnx declares an
unpinned torch dependency) is needed. ncnn runs its 3x3 convolutions with
Winograd, the one way past the CPU's fp32 matrix-multiply rate."""

from __future__ import annotations

from pathlib import Path
from typing import TypeGuard

import numpy as np
import torch

from services.common.files import write_atomically

from .arch import SRVGGNetCompact
from .backends import ArrayBackend

INPUT, OUTPUT = "in0", "out0"
MAGIC = 7767517  # ncnn's .param header
# ncnn layer parameter ids: Convolution 0=num_output 1=kernel 4=pad 5=bias_term 6=weight_size;
# PReLU 0=num_slope; PixelShuffle 0=upscale_factor; Interp 0=resize_type(1 nearest) 1,2=scales; BinaryOp 0=op(0 add)
NEAREST, ADD = 1, 0


def exportable(module: torch.nn.Module) -> TypeGuard[SRVGGNetCompact]:
    return isinstance(module, SRVGGNetCompact) and all(
        isinstance(layer, (torch.nn.Conv2d, torch.nn.PReLU)) for layer in module.body
    )


def export_ncnn(module: SRVGGNetCompact, param_path: Path) -> tuple[Path, Path]:
    """Write `<name>.param` and `<name>.bin`, each atomically (a half-written cache is never loaded)."""
    lines, weights = [], bytearray()
    blobs = 0

    def blob() -> str:
        nonlocal blobs
        blobs += 1
        return f"b{blobs}"

    lines.append(f"Input {INPUT} 0 1 {INPUT}")
    lines.append(f"Split split0 1 2 {INPUT} x_body x_skip")
    current = "x_body"
    for index, layer in enumerate(module.body):
        out = blob()
        if isinstance(layer, torch.nn.Conv2d):
            if layer.bias is None:
                raise ValueError("ncnn export expects every convolution of the body to have a bias")
            weight = layer.weight.detach().float().numpy()
            bias = layer.bias.detach().float().numpy()
            lines.append(f"Convolution conv{index} 1 1 {current} {out} 0={weight.shape[0]} 1=3 4=1 5=1 6={weight.size}")
            weights += np.zeros(1, np.uint32).tobytes() + weight.tobytes() + bias.tobytes()  # flag 0: raw fp32
        elif isinstance(layer, torch.nn.PReLU):
            slope = layer.weight.detach().float().numpy()
            lines.append(f"PReLU prelu{index} 1 1 {current} {out} 0={slope.size}")
            weights += slope.tobytes()
        else:
            raise ValueError(f"ncnn export cannot write a {type(layer).__name__} layer")
        current = out
    shuffled = blob()
    lines.append(f"PixelShuffle shuffle 1 1 {current} {shuffled} 0={module.upscale}")
    base = blob()
    lines.append(f"Interp upsample 1 1 x_skip {base} 0={NEAREST} 1={float(module.upscale)} 2={float(module.upscale)}")
    lines.append(f"BinaryOp add 2 1 {shuffled} {base} {OUTPUT} 0={ADD}")
    blob_count = blobs + 4  # in0, x_body, x_skip, out0
    text = f"{MAGIC}\n{len(lines)} {blob_count}\n" + "\n".join(lines) + "\n"
    bin_path = param_path.with_suffix(".bin")
    write_atomically(bin_path, bytes(weights))
    write_atomically(param_path, text.encode())
    return param_path, bin_path


class NcnnBackend(ArrayBackend):
    """ncnn networks for every tile size: one of `threads` threads, and one of
    `narrow_threads` for calls that share the cores (InferenceLanes); ncnn's Winograd
    convolution keeps the thread count it was loaded with. An extractor per call
    (safe across threads). With `bf16` the activations are stored as bfloat16 between
    layers (computed in fp32): half the memory traffic, about 57 dB against fp32."""

    def __init__(self, param_path: Path, threads: int, narrow_threads: int = 0, bf16: bool = False):
        import ncnn

        self.ncnn = ncnn
        self.threads = threads
        self.bf16 = bf16
        self.nets = {width: self._load(param_path, width) for width in {threads, narrow_threads or threads}}
        self.adapts_threads = len(self.nets) > 1
        self.name = "ncnn-bf16" if bf16 else "ncnn"

    def _load(self, param_path: Path, threads: int):
        net = self.ncnn.Net()
        net.opt.use_winograd_convolution = True
        net.opt.use_fp16_storage = net.opt.use_fp16_arithmetic = False
        net.opt.use_bf16_storage = self.bf16
        net.opt.num_threads = threads
        net.opt.openmp_blocktime = 0  # idle threads that spin would take the cores from the image work around
        if net.load_param(str(param_path)) or net.load_model(str(param_path.with_suffix(".bin"))):
            raise ValueError(f"ncnn could not load {param_path.name}")
        return net

    def __call__(self, batch: np.ndarray, threads: int = 0) -> np.ndarray:
        net = self.nets.get(threads, self.nets[self.threads])
        outputs = []
        for image in np.ascontiguousarray(batch, np.float32):
            extractor = net.create_extractor()
            extractor.input(INPUT, self.ncnn.Mat(image))
            status, out = extractor.extract(OUTPUT)
            if status:
                raise RuntimeError(f"ncnn failed ({status})")
            outputs.append(np.array(out))
        return np.stack(outputs)
