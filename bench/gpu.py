"""The upscaler on a CUDA GPU, against the GPU's own measured ceiling.

    python -m bench.gpu --models DIR [--size 2048] [--out FILE]

Measures a bf16 matrix multiply (the peak to compare with) in the same run,
then, per model: the calibration at start (every backend on a 512-pixel tile)
and the chosen backend on a large photo, in input megapixels per second and in
achieved TFLOP/s (convolution FLOPs counted from the network). Prints a
Markdown section for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import skimage.data
import torch
from PIL import Image

from bench.scratch import run_scratch
from services.upscaler.models import SPECS_BY_NAME, ModelRegistry, build_module

MODELS = (
    ("realesr-general-x4v3", "realesr-general-x4v3.fp16-derived.pth"),
    ("realesr-animevideov3", "realesr-animevideov3.pth"),
)


def matmul_tflops(n: int = 8192, runs: int = 10) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(runs):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * n**3 * runs / (start.elapsed_time(end) / 1000) / 1e12


def conv_flops_per_input_pixel(module: torch.nn.Module) -> float:
    """Multiply-adds of every convolution, counted on a small input, per input pixel."""
    total = 0

    def hook(layer, inputs, output):
        nonlocal total
        out_pixels = output.shape[2] * output.shape[3]
        total += (
            2
            * out_pixels
            * layer.out_channels
            * (layer.in_channels // layer.groups)
            * layer.kernel_size[0]
            * layer.kernel_size[1]
        )

    handles = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.inference_mode():
        module(torch.zeros(1, 3, 32, 32))
    for h in handles:
        h.remove()
    return total / (32 * 32)


def network_alone(backend, edge: int, flops_per_pixel: float, runs: int = 5) -> float:
    """TFLOP/s of the backend's network on one tile, timed on the GPU."""
    x = torch.rand(1, 3, edge, edge, device="cuda", dtype=backend.dtype).contiguous(memory_format=backend.memory_format)
    with torch.inference_mode():
        backend.module(x)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(runs):
            backend.module(x)
        end.record()
        torch.cuda.synchronize()
    return flops_per_pixel * edge * edge * runs / (start.elapsed_time(end) / 1000) / 1e12


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, required=True)
    parser.add_argument("--size", type=int, default=2048, help="edge of the square input photo")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench.gpu needs a CUDA device")
    peak = matmul_tflops()
    name = torch.cuda.get_device_name()
    image = np.asarray(Image.fromarray(skimage.data.astronaut()).resize((args.size, args.size), Image.LANCZOS))
    lines = [
        f"## GPU: {name}\n",
        f"Command: `python -m bench.gpu --models ../shared/models --size {args.size}` on the lent machine  \n"
        f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}; torch {torch.__version__}, "
        f"CUDA {torch.version.cuda}; bf16 matrix multiply (8192^3) measured in the same run: **{peak:.0f} TFLOP/s**\n",
    ]
    for model_name, file in MODELS:
        directory = Path(tempfile.mkdtemp())
        (directory / file).symlink_to((args.models / file).resolve())
        started = time.perf_counter()
        registry = ModelRegistry(directory, device="cuda", onnx_cache_dir=Path(tempfile.mkdtemp()), threads=8)
        registry.load_all()
        load_seconds = time.perf_counter() - started
        model = registry.resolve(model_name)
        flops = conv_flops_per_input_pixel(build_module(SPECS_BY_NAME[model_name], args.models / file))
        engine = model.engine
        plan = engine.plan(args.size, args.size, 4)
        engine.upscale(image[:256, :256], "RGB", 4)  # warm-up
        times = []
        for _ in range(args.rounds):
            torch.cuda.synchronize()
            t = time.perf_counter()
            engine.upscale(image, "RGB", 4)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        megapixels = args.size * args.size / 1e6
        speed = megapixels / statistics.median(times)
        # The halo makes the network see more pixels than the image has: count what it computes.
        computed = sum(plan.context_rect(r).width * plan.context_rect(r).height for r in plan.tiles)
        tflops = flops * computed / statistics.median(times) / 1e12
        lines += [
            f"\n### {model_name} ({flops / 1e6:.2f} MFLOP per input pixel; start with calibration "
            f"{load_seconds:.1f} s)\n",
            "| backend (512-pixel calibration tile) | MP/s | PSNR vs fp32 CPU | chosen |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {m['backend']} | {m['megapixels_per_second']:.2f} | {m['psnr_db']:.1f} dB | "
            f"{'yes' if m['chosen'] else ''} |"
            for m in model.calibration
        ]
        network_tflops = network_alone(engine.model, plan.tile + 2 * plan.halo, flops)
        lines += [
            f"\nThe network alone on one {plan.tile + 2 * plan.halo}-pixel tile (CUDA events): "
            f"{network_tflops:.0f} TFLOP/s = {100 * network_tflops / peak:.1f}% of the matrix-multiply rate; "
            "end to end, each tile also uploads its pixels and brings back its output, not yet overlapped "
            "with the next tile's compute."
        ]
        lines += [
            f"\n{args.size}x{args.size} photo upscaled 4x with {model.backend}, tile {plan.tile}, halo "
            f"{plan.halo}: **{speed:.1f} input MP/s** (median of {args.rounds}), {tflops:.0f} TFLOP/s "
            f"achieved = **{100 * tflops / peak:.1f}% of the measured bf16 matrix-multiply rate**.\n"
        ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    with run_scratch():
        status = main()
    sys.exit(status)
