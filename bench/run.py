"""`make bench`: imagemesh against references, side by side in one script.

Machines are noisy, so each comparison alternates the contenders round by
round and reports medians and ratios. Writes bench/RESULTS.md (the GPU
section, written by bench/gpu.py on a GPU machine, is kept).

    .venv/bin/python -m bench.run [--models DIR] [--rounds N] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import functools
import io
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Iterable

import grpc
import httpx
import numpy as np
import onnxruntime as ort
import skimage.data
import torch
from imagemesh.v1 import pipeline_pb2
from PIL import Image

from bench.gpu import conv_flops_per_input_pixel
from bench.scratch import run_scratch
from services.bgremoval import engine as bg_engine
from services.bgremoval.models import SegmenterRegistry
from services.common import imageio, wire
from services.common.config import load as load_config
from services.common.resources import available_cpus, cpu_model_and_flags, keep_freed_memory_for_reuse
from services.common.tiles import grid
from services.effects import engine as fx_engine
from services.effects import registry as fx_registry
from services.effects.server import EffectsOp
from services.upscaler.calibration import MIN_PSNR_DB, calibration_tile
from services.upscaler.calibration import psnr_db as calibration_psnr
from services.upscaler.config import UpscalerConfig
from services.upscaler.engine import UpscaleEngine
from services.upscaler.models import SPECS_BY_NAME, ModelRegistry, build_module

ROOT = Path(__file__).resolve().parent.parent
SERVICE_LANES = load_config(UpscalerConfig, {}).inference_lanes  # as a service started with its defaults runs
RESULTS = ROOT / "bench" / "RESULTS.md"
GPU_MARK = "<!-- GPU section: written by `python -m bench.gpu` on a GPU machine; bench/run.py keeps it -->"


def photo(width: int, height: int) -> np.ndarray:
    """The same real photograph throughout, at the size asked for."""
    return np.asarray(Image.fromarray(skimage.data.astronaut()).resize((width, height), Image.LANCZOS))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def timed(fn):
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


def in_turn(contenders: dict, rounds: int) -> tuple[dict, dict]:
    """Every contender in turn, round by round: each one's median seconds and last result."""
    times: dict = {key: [] for key in contenders}
    results: dict = {}
    for _ in range(rounds):
        for key, contender in contenders.items():
            times[key].append((seconds := timed(contender))[0])
            results[key] = seconds[1]
    return {key: statistics.median(values) for key, values in times.items()}, results


def alternately(first, second, rounds: int) -> tuple[float, float, object, object]:
    """Both contenders in turn, round by round: their median seconds, and each one's last result."""
    seconds, results = in_turn({"first": first, "second": second}, rounds)
    return seconds["first"], seconds["second"], results["first"], results["second"]


DEFAULT_MODELS = Path(os.environ.get("IMAGEMESH_BENCH_MODELS", ROOT.parent / "shared" / "models"))


def machine() -> dict:
    model, flags = cpu_model_and_flags()
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8", "amx_tile")
    return {
        "cpu": model,
        "flags": " ".join(f for f in wanted if f in flags) or "none of note",
        "cores": available_cpus(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def single_model_dir(model_dir: Path, file: str) -> Path:
    directory = Path(tempfile.mkdtemp(prefix="bench-models-"))
    (directory / file).symlink_to((model_dir / file).resolve())
    return directory


# --- 1. engine vs RealESRGANer ------------------------------------------------

REFERENCE_MODELS = (
    ("realesr-general-x4v3", "realesr-general-x4v3.fp16-derived.pth", 32),
    ("realesr-animevideov3", "realesr-animevideov3.pth", 16),
)


def cpu_matmul_gflops(dtype: torch.dtype, n: int = 2048, runs: int = 5) -> float:
    """The CPU's matrix-multiply rate in this precision: the ceiling a convolution engine can approach."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    return 2 * n**3 / min(timed(lambda: a @ b)[0] for _ in range(runs)) / 1e9


def cpu_conv_gflops(edge: int, precision: str = "bf16", runs: int = 10) -> float:
    """The network's own layer alone (64 -> 64 channels, 3x3, channels-last) on one tile: what
    oneDNN's best kernel reaches here, without the activations and data movement around it
    (`fp32` or `bf16`). `int8` runs it the way an int8 backend would (VNNI, quantised weights and input)."""
    conv = torch.nn.Conv2d(64, 64, 3, padding=1)
    x = torch.randn(1, 64, edge, edge)
    if precision == "int8":
        torch.backends.quantized.engine = "onednn"
        with warnings.catch_warnings():  # torch marks its quantised tensors deprecated; the rate is what counts
            warnings.simplefilter("ignore")
            scales = conv.weight.detach().abs().amax(dim=(1, 2, 3)) / 127
            quantised = torch.ao.nn.quantized.Conv2d(64, 64, 3, padding=1)
            quantised.set_weight_bias(
                torch.quantize_per_channel(
                    conv.weight.detach(), scales, torch.zeros(64, dtype=torch.long), 0, torch.qint8
                ),
                conv.bias.detach(),
            )
            quantised.scale, quantised.zero_point = 0.05, 0
            conv, x = quantised, torch.quantize_per_tensor(x, 0.05, 0, torch.quint8)
    elif precision == "bf16":
        conv, x = conv.to(torch.bfloat16), x.to(torch.bfloat16)
    x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        conv(x)
        return 2 * 64 * 64 * 9 * edge * edge / min(timed(lambda: conv(x))[0] for _ in range(runs)) / 1e9


def int8_psnr(module: torch.nn.Module, image: np.ndarray) -> float:
    """PSNR against fp32 of the network as an int8 backend would run it: every convolution's weights
    rounded to 8 bits per output channel, its input to 8 bits per tensor over the range it takes on
    this very image (calibrated on what it is measured on: int8's best case)."""
    module = copy.deepcopy(module).float().eval()
    x = torch.from_numpy(image.transpose(2, 0, 1)[None].astype(np.float32) / 255)
    convs = [layer for layer in module.modules() if isinstance(layer, torch.nn.Conv2d)]
    ranges = {}

    def record_range(conv, inputs):
        ranges[conv] = inputs[0].aminmax()

    hooks = [conv.register_forward_pre_hook(record_range) for conv in convs]
    with torch.inference_mode():
        exact = module(x)
        for hook in hooks:
            hook.remove()

        def quantise_input(conv, inputs):
            low, high = (float(v) for v in ranges[conv])
            step = max(high - low, 1e-8) / 255
            zero = round(-low / step)
            return ((inputs[0] / step).round() + zero).clamp(0, 255).sub(zero).mul(step)

        for conv in convs:
            step = conv.weight.abs().amax(dim=(1, 2, 3), keepdim=True).clamp(min=1e-12) / 127
            conv.weight.copy_((conv.weight / step).round() * step)
            conv.register_forward_pre_hook(quantise_input)
        approximate = module(x)

    def as_image(output: torch.Tensor) -> np.ndarray:
        return (output[0].clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()

    return psnr(as_image(approximate), as_image(exact))


def int8_quality(model_dir: Path, size: int) -> list[dict]:
    image = photo(size, size)
    return [
        {"model": name, "psnr": int8_psnr(build_module(SPECS_BY_NAME[name], model_dir / file), image)}
        for name, file, _ in REFERENCE_MODELS
    ]


def tiled_gflop(model_dir: Path, name: str, file: str, size: int, tile: int, halo: int) -> float:
    """Convolution work of one tiled upscale (every tile's context, halo included): the same for both sides."""
    per_pixel = conv_flops_per_input_pixel(build_module(SPECS_BY_NAME[name], model_dir / file))
    contexts = [rect.expand(halo, size, size) for rect in grid(size, size, tile, tile)]
    return per_pixel * sum(context.width * context.height for context in contexts) / 1e9


REFERENCE_TILES = (128, 256, 0)  # the reference's tile settings tried for its best (0: untiled, its default)


def engine_vs_reference(model_dir: Path, rounds: int, size: int, tile: int = 128, halo: int = 10) -> list[dict]:
    """Ours against the reference `RealESRGANer`: at the same tile and halo, and each at its
    best (ours as the service runs it, calibration's backend and tile with its own halo;
    the reference at the fastest of REFERENCE_TILES with its default tile_pad)."""
    from bench.reference import load

    ours_by_name = {}
    for name, file, _ in REFERENCE_MODELS:  # before the reference's stand-ins for torchvision exist
        registry = ModelRegistry(
            single_model_dir(model_dir, file),
            threads=available_cpus(),
            lanes=SERVICE_LANES,
            onnx_cache_dir=Path(tempfile.mkdtemp(prefix="bench-onnx-")),
        )
        registry.load_all()
        ours_by_name[name] = registry.resolve(name)
    RealESRGANer, SRVGGNetCompact = load()
    image = photo(size, size)
    bgr = np.ascontiguousarray(image[:, :, ::-1])
    rows = []
    for name, file, num_conv in REFERENCE_MODELS:

        def reference(reference_tile: int):
            upsampler = RealESRGANer(
                scale=4,
                model_path=str(model_dir / file),
                tile=reference_tile,
                tile_pad=halo,
                pre_pad=0,
                half=False,
                device=torch.device("cpu"),
                model=SRVGGNetCompact(
                    num_in_ch=3, num_out_ch=3, num_feat=64, num_conv=num_conv, upscale=4, act_type="prelu"
                ),
            )
            upsampler.enhance(bgr[:64, :64], outscale=4)  # warm
            return lambda: upsampler.enhance(bgr, outscale=4)[0]

        ours = ours_by_name[name]
        ours.engine.upscale(image[:64, :64], "RGB", 4, tile=tile, halo=halo)  # warm
        ref_s, ours_s, ref_out, our_out = alternately(
            reference(tile), lambda: ours.engine.upscale(image, "RGB", 4, tile=tile, halo=halo), rounds
        )
        # The reference's best setting: each tried in turn twice (its calls are unsteady), then alternated with ours.
        settings = {t: reference(t) for t in REFERENCE_TILES}
        trials = {t: [] for t in settings}
        for _ in range(2):
            for t, run in settings.items():
                trials[t].append(timed(run)[0])
        best_tile = min(trials, key=lambda t: min(trials[t]))
        best_ref_s, best_ours_s, best_ref_out, best_our_out = alternately(
            settings[best_tile], lambda: ours.engine.upscale(image, "RGB", 4), rounds
        )
        plan = ours.engine.plan(size, size, 4)
        megapixels, gflop = size * size / 1e6, tiled_gflop(model_dir, name, file, size, tile, halo)
        rows.append(
            {
                "model": name,
                "backend": ours.backend,
                "ours": megapixels / ours_s,
                "reference": megapixels / ref_s,
                "ratio": ref_s / ours_s,
                "ours_gflops": gflop / ours_s,
                "reference_gflops": gflop / ref_s,
                "psnr": psnr(our_out, np.ascontiguousarray(ref_out[:, :, ::-1])),
                "image": f"{size}x{size}",
                "tile": f"{tile}/{halo}",
                "best_ours_tile": f"{plan.tile}/{plan.halo}",
                "best_reference_tile": f"{best_tile or 'untiled'}/{halo}",
                "reference_trials": {t or "untiled": round(min(v), 2) for t, v in trials.items()},
                "best_ours": megapixels / best_ours_s,
                "best_reference": megapixels / best_ref_s,
                "best_ratio": best_ref_s / best_ours_s,
                "best_psnr": psnr(best_our_out, np.ascontiguousarray(best_ref_out[:, :, ::-1])),
            }
        )
    return rows


def cpu_peaks(machine: dict) -> dict:
    """The CPU's ceilings: fp32 always; bf16 and int8 only where the CPU runs them natively
    (emulated they take minutes and mean nothing)."""
    edge = 128 + 2 * 10
    peaks = {"fp32": cpu_matmul_gflops(torch.float32), "conv_fp32": cpu_conv_gflops(edge, "fp32")}
    if "avx512_bf16" in machine["flags"] or "amx_bf16" in machine["flags"]:
        peaks.update(bf16=cpu_matmul_gflops(torch.bfloat16), conv=cpu_conv_gflops(edge))
    if "avx512_vnni" in machine["flags"] or "amx_int8" in machine["flags"]:
        peaks["int8"] = cpu_conv_gflops(edge, "int8")
    return peaks


# --- 1b. every CPU backend, side by side --------------------------------------------

CPU_BACKENDS = ("torch-fp32", "torch-fp32-cl", "torch-bf16-cl", "onnxruntime", "openvino", "ncnn", "ncnn-bf16")


def conv_gflop(module: torch.nn.Module, height: int, width: int) -> float:
    """The network's convolutions, counted as a direct convolution computes them."""
    return (
        sum(
            2 * m.in_channels * m.out_channels * m.kernel_size[0] * m.kernel_size[1] * height * width
            for m in module.modules()
            if isinstance(m, torch.nn.Conv2d)
        )
        / 1e9
    )


def cpu_backends(model_dir: Path, rounds: int, tiles: tuple[int, ...] = (512, 256, 128)) -> list[dict]:
    """Each CPU candidate (the network alone, float NCHW in and out) on the same tile, one
    after the other in every round; medians. torch-fp32 is the reference's own precision and
    layout (RealESRGANer runs fp32 NCHW). `chosen`: what the upscaler's calibration picked."""
    rows = []
    for name, file, _ in REFERENCE_MODELS:
        directory, cache = single_model_dir(model_dir, file), Path(tempfile.mkdtemp(prefix="bench-cache-"))
        module = build_module(SPECS_BY_NAME[name], model_dir / file)
        # Calibration first, as at a service's start: with every backend below loaded, their
        # thread pools would take the cores from the one being timed.
        auto = ModelRegistry(directory, onnx_cache_dir=cache, threads=available_cpus())
        auto.load_all()
        chosen, chosen_tile = auto.models[name].backend, auto.models[name].preferred_tile
        del auto
        backends = {}
        for backend in CPU_BACKENDS:  # only each network is timed here: at a fixed tile, not at start as well
            registry = ModelRegistry(
                directory, backend=backend, onnx_cache_dir=cache, threads=available_cpus(), tile=max(tiles)
            )
            registry.load_all()
            if registry.models[name].ready:  # bf16 only where the CPU has it
                backends[backend] = registry.models[name].engine.model
        for edge in tiles:
            tile = calibration_tile(edge)
            with torch.inference_mode():
                reference = module(torch.from_numpy(tile)).numpy()
            times: dict[str, list[float]] = {b: [] for b in backends}
            outputs = {b: run(tile) for b, run in backends.items()}  # warm-up, and the output compared
            for _ in range(rounds):
                for backend, run in backends.items():
                    times[backend].append(timed(lambda run=run: run(tile))[0])
            medians = {b: statistics.median(t) for b, t in times.items()}
            gflop = conv_gflop(module, edge, edge)
            for backend, seconds in medians.items():
                rows.append(
                    {
                        "model": name,
                        "tile": edge,
                        "backend": backend,
                        "seconds": seconds,
                        "ratio": medians["torch-fp32"] / seconds,
                        "gflops": gflop / seconds,
                        "psnr": calibration_psnr(outputs[backend], reference),
                        "chosen": backend == chosen,
                        "chosen_tile": chosen_tile,
                    }
                )
    return rows


# --- 1c. throughput: requests at once on the same cores --------------------------

LANES_LABELS = {
    1: "1 lane: one network call at a time on all threads",
    2: "2 lanes (default): a request's tiles, and requests, two at a time on half the threads each",
}
THROUGHPUT_SETUPS = tuple((LANES_LABELS[lanes], lanes) for lanes in (1, 2))  # (label, UPSCALER_INFERENCE_LANES)


def engines_per_lanes(model_dir: Path, lanes_settings: Iterable[int]) -> tuple[dict[int, UpscaleEngine], str]:
    """realesr-general-x4v3's engine once per UPSCALER_INFERENCE_LANES setting, every one on the
    backend calibration chose for the first (calibrating on its own, another could pick another
    backend, and the comparison would be of backends); the engines, and that backend."""
    name, file, _ = REFERENCE_MODELS[0]
    directory, cache = single_model_dir(model_dir, file), Path(tempfile.mkdtemp(prefix="bench-cache-"))
    engines, backend = {}, "auto"
    for lanes in lanes_settings:
        registry = ModelRegistry(
            directory, backend=backend, lanes=lanes, threads=available_cpus(), onnx_cache_dir=cache
        )
        registry.load_all()
        model = registry.resolve(name)
        engines[lanes], backend = model.engine, model.backend
    return engines, backend


def process_cpu_seconds() -> float:
    """User and system CPU time this process (every thread) has used so far."""
    times = os.times()
    return times.user + times.system


def throughput(model_dir: Path, rounds: int, concurrencies=(1, 2, 4), size: int = 256, tile: int = 128) -> dict:
    """Images per minute with 1, 2 and 4 requests at once, computed as the service computes them:
    one thread per request (MAX_CONCURRENT_REQUESTS), each upscaling its images tile by tile
    through the engine. Every setup runs the backend calibration chose for one lane; the
    setups take turns in every round."""
    name = REFERENCE_MODELS[0][0]
    by_lanes, backend = engines_per_lanes(model_dir, (lanes for _, lanes in THROUGHPUT_SETUPS))
    engines = {label: by_lanes[lanes] for label, lanes in THROUGHPUT_SETUPS}
    image = photo(size, size)
    for engine in engines.values():
        engine.upscale(image[:64, :64], "RGB", 4, tile=tile)  # warm

    def images_per_minute(engine, concurrency: int) -> tuple[float, float, float, float]:
        """Images per minute, the median latency, and the process's CPU seconds per image and
        per second of the run: more CPU per image is contention, fewer busy cores idle time."""
        per_request = 2 if concurrency > 1 else 3
        latencies: list[float] = []

        def request():
            for _ in range(per_request):
                started = time.perf_counter()
                engine.upscale(image, "RGB", 4, tile=tile)
                latencies.append(time.perf_counter() - started)

        workers = [threading.Thread(target=request) for _ in range(concurrency)]
        cpu_before, started = process_cpu_seconds(), time.perf_counter()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        seconds, cpu = time.perf_counter() - started, process_cpu_seconds() - cpu_before
        images = concurrency * per_request
        return images * 60 / seconds, statistics.median(latencies), cpu / images, cpu / seconds

    measured: dict[tuple[str, int], list[tuple[float, float, float, float]]] = {}
    for _ in range(rounds):
        for concurrency in concurrencies:
            for label, engine in engines.items():
                measured.setdefault((label, concurrency), []).append(images_per_minute(engine, concurrency))
    rows = [
        {
            "setup": label,
            "concurrency": c,
            "images_per_minute": statistics.median(r[0] for r in runs),
            "latency": statistics.median(r[1] for r in runs),
            "cpu_per_image": statistics.median(r[2] for r in runs),
            "cores_busy": statistics.median(r[3] for r in runs),
        }
        for (label, c), runs in measured.items()
    ]
    return {
        "model": name,
        "backend": backend,
        "image": f"{size}x{size}",
        "tile": tile,
        "rows": rows,
        "threads": available_cpus(),
    }


def throughput_report(result: dict) -> list[str]:
    rows = result["rows"]
    one_lane = THROUGHPUT_SETUPS[0][0]
    lone = {r["setup"]: r["latency"] for r in rows if r["concurrency"] == 1}
    out = [
        "\n### Throughput: requests at once on the same cores\n",
        f"{result['model']} ({result['backend']}), a {result['image']} photo 4x in {result['tile']}-pixel tiles, "
        f"{result['threads']} threads; one thread per request, as the service's compute pool runs them "
        "(`python -m bench.run --only throughput`). Latency: one image, median; single-request latency is "
        "the latency at concurrency 1, against one lane's. CPU per image: the process's CPU time over the "
        "images (more with more requests at once is contention); cores busy: its CPU time over the run's "
        "wall time (fewer than the threads is idle time).\n",
        "| setup | requests at once | images per minute | vs the same setup at 1 | latency | single-request "
        "latency vs 1 lane | CPU per image | cores busy |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: ([s[0] for s in THROUGHPUT_SETUPS].index(r["setup"]), r["concurrency"])):
        at_one = next(x["images_per_minute"] for x in rows if x["setup"] == r["setup"] and x["concurrency"] == 1)
        out.append(
            f"| {r['setup']} | {r['concurrency']} | {r['images_per_minute']:.1f} | "
            f"**{r['images_per_minute'] / at_one:.2f}x** | {r['latency']:.2f} s | "
            f"{lone[r['setup']] / lone[one_lane]:.2f}x | {r['cpu_per_image']:.2f} s | {r['cores_busy']:.2f} |"
        )
    return out


# --- services as subprocesses --------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Process:
    def __init__(self, module: str, env: dict):
        self.process = subprocess.Popen(
            [sys.executable, "-m", module],
            cwd=ROOT,
            env={**os.environ, **env},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def peak_rss_mib(self) -> float:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(status.split("VmHWM:")[1].split()[0]) / 1024

    def cpu_seconds(self) -> float:
        """User and system CPU time the process has used so far."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()


def start_upscaler(model_dir: Path, backend: str, **env) -> tuple[Process, str]:
    port = free_port()
    process = Process(
        "services.upscaler",
        {
            "MODEL_DIR": str(model_dir),
            "UPSCALER_PORT": str(port),
            "UPSCALER_METRICS_PORT": "0",
            "UPSCALER_BACKEND": backend,
            "LOG_LEVEL": "WARNING",
            # Shared by the run's upscalers (the first one's exports and calibration serve the
            # rest) and removed with the run's scratch directory.
            "ONNX_CACHE_DIR": str(Path(tempfile.gettempdir()) / "upscaler-cache"),
            **env,
        },
    )
    address = f"127.0.0.1:{port}"
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for _ in range(600):
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                    return process, address
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise SystemExit("the upscaler did not start")


# --- 2. mesh overhead -------------------------------------------------------------


@contextlib.contextmanager
def running_mesh(model_dir: Path, backend: str, **upscaler_env):
    """An upscaler (on `backend`, its other settings the defaults but for `upscaler_env`) and a gateway
    on loopback; yields an HTTP client, the upscale URL and the gateway's process."""
    upscaler, address = start_upscaler(model_dir, backend, **upscaler_env)
    gateway_port = free_port()
    gateway = Process(
        "services.gateway",
        {
            "GATEWAY_PORT": str(gateway_port),
            "UPSCALER_ADDRESS": address,
            "RATE_LIMIT_PER_MINUTE": "0",
            "LOG_LEVEL": "WARNING",
            "RESULT_DIR": tempfile.mkdtemp(prefix="bench-results-"),
        },
    )
    try:
        with httpx.Client(timeout=600) as client:
            for _ in range(100):
                try:
                    client.get(f"http://127.0.0.1:{gateway_port}/healthz")
                    break
                except httpx.HTTPError:
                    time.sleep(0.1)
            yield client, f"http://127.0.0.1:{gateway_port}/v1/upscale", gateway
    finally:
        gateway.stop()
        upscaler.stop()


def upscale_through(client: httpx.Client, url: str, image: np.ndarray, fields: dict):
    """A function that sends `image` as PNG through the mesh and returns the answer's bytes, and the
    backend that served a first (warming) request."""
    upload = io.BytesIO()
    Image.fromarray(image).save(upload, "PNG")

    def through_mesh() -> bytes:
        reply = client.post(url, files={"file": ("photo.png", upload.getvalue())}, data=fields)
        reply.raise_for_status()
        through_mesh.backend = reply.headers.get("x-imagemesh-backend", "")
        return reply.content

    through_mesh()  # warm the path
    return through_mesh


def mesh_overhead(model_dir: Path, rounds: int, size: int = 1024, tile: int = 256) -> dict:
    """The mesh against the engine in-process, each with the service's default lanes (a request's
    tiles rendered together, one lane each) and with one lane (one tile at a time on every
    thread): all four in turn, round by round."""
    model = REFERENCE_MODELS[0][0]
    engines, backend = engines_per_lanes(model_dir, (SERVICE_LANES, 1))
    image = photo(size, size)
    fields = {"scale": "4", "model": model, "tile": str(tile), "format": "png"}
    with contextlib.ExitStack() as meshes:
        contenders, gateways = {}, {}
        for lanes, engine in engines.items():
            client, url, gateways[lanes] = meshes.enter_context(
                running_mesh(model_dir, backend, UPSCALER_INFERENCE_LANES=str(lanes))
            )
            contenders[lanes, "mesh"] = upscale_through(client, url, image, fields)
            contenders[lanes, "in_process"] = functools.partial(engine.upscale, image, "RGB", 4, tile=tile)
        gateway_cpu = gateways[SERVICE_LANES].cpu_seconds()  # it works only while a request goes through the mesh
        seconds, answers = in_turn(contenders, rounds)
        gateway_cpu = (gateways[SERVICE_LANES].cpu_seconds() - gateway_cpu) / rounds
    return {
        "backend": backend,
        "image": f"{size}x{size}",
        "rows": [
            {
                "lanes": lanes,
                "in_process": seconds[lanes, "in_process"],
                "mesh": seconds[lanes, "mesh"],
                "ratio": seconds[lanes, "mesh"] / seconds[lanes, "in_process"],
            }
            for lanes in engines
        ],
        "gateway_cpu": gateway_cpu,
        "cpus": available_cpus(),
        "png": png_encoders(np.asarray(Image.open(io.BytesIO(answers[SERVICE_LANES, "mesh"]))), rounds),
    }


def mesh_vs_reference(model_dir: Path, rounds: int, width: int = 492, height: int = 480) -> dict:
    """A photo 4x through the whole mesh (PNG in, PNG out, the upscaler's own tile choice) against
    the reference `RealESRGANer` in-process on the same pixels, untiled (its default and its fastest
    on an image this small)."""
    from bench.reference import load

    name, file, num_conv = REFERENCE_MODELS[0]
    directory = single_model_dir(model_dir, file)
    image = photo(width, height)
    with running_mesh(directory, "auto") as (client, url, _):
        through_mesh = upscale_through(client, url, image, {"scale": "4", "model": name, "format": "png"})
        RealESRGANer, SRVGGNetCompact = load()
        reference = RealESRGANer(
            scale=4,
            model_path=str(model_dir / file),
            tile=0,
            pre_pad=0,
            half=False,
            device=torch.device("cpu"),
            model=SRVGGNetCompact(
                num_in_ch=3, num_out_ch=3, num_feat=64, num_conv=num_conv, upscale=4, act_type="prelu"
            ),
        )
        bgr = np.ascontiguousarray(image[:, :, ::-1])
        reference.enhance(bgr[:64, :64], outscale=4)  # warm
        ref_s, mesh_s, ref_out, answer = alternately(
            lambda: reference.enhance(bgr, outscale=4)[0], through_mesh, rounds
        )
    ours = np.asarray(Image.open(io.BytesIO(answer)).convert("RGB"))
    return {
        "model": name,
        "backend": through_mesh.backend,
        "image": f"{width}x{height}",
        "reference": ref_s,
        "mesh": mesh_s,
        "ratio": ref_s / mesh_s,
        "psnr": psnr(ours, np.ascontiguousarray(ref_out[:, :, ::-1])),
    }


def png_encoders(pixels: np.ndarray, rounds: int) -> dict:
    """The answer's PNG as the gateway writes it against Pillow's PNG encoder at its defaults."""

    def pillow():
        out = io.BytesIO()
        Image.fromarray(pixels).save(out, "PNG")
        return out.getvalue()

    ours_s, pillow_s, ours, reference = alternately(lambda: imageio.encode(pixels, "RGB", "png"), pillow, rounds)
    return {
        "size": f"{pixels.shape[1]}x{pixels.shape[0]}",
        "ours_s": ours_s,
        "ours_mb": len(ours) / 1e6,
        "pillow_s": pillow_s,
        "pillow_mb": len(reference) / 1e6,
    }


# --- 3. upscaler memory ----------------------------------------------------------


def upscale_over_grpc(address: str, image: np.ndarray, tile: int) -> int:
    """Stream an image to the upscaler and drop the output tiles as they come; output bytes."""
    height, width = image.shape[:2]
    header = wire.header(width, height, "RGB", image.dtype, tile_width=256, tile_height=256)
    accepted = __import__("threading").Event()

    def requests():
        yield pipeline_pb2.StreamRequest(
            start=pipeline_pb2.StreamStart(
                image=header,
                steps=[
                    pipeline_pb2.Step(
                        upscale=pipeline_pb2.UpscaleOptions(model="realesr-general-x4v3", scale=4, tile_size=tile)
                    )
                ],
            )
        )
        accepted.wait(60)
        for rect in grid(width, height, 256, 256):
            yield pipeline_pb2.StreamRequest(tile=wire.tile(rect, image[rect.y0 : rect.y1, rect.x0 : rect.x1]))

    received = 0
    with grpc.insecure_channel(address) as channel:
        call = channel.stream_stream(
            "/imagemesh.v1.Upscaler/Upscale",
            request_serializer=pipeline_pb2.StreamRequest.SerializeToString,
            response_deserializer=pipeline_pb2.StreamResponse.FromString,
        )
        for reply in call(requests(), timeout=3600):
            accepted.set()
            if reply.WhichOneof("part") == "tile":
                received += len(reply.tile.pixels)
    return received


def upscaler_memory(model_dir: Path, backend: str, sizes=(1024, 4096), tile: int = 256) -> list[dict]:
    rows = []
    for size in sizes:
        process, address = start_upscaler(
            model_dir, backend, MAX_INPUT_PIXELS=str(20_000_000), MAX_OUTPUT_PIXELS=str(300_000_000)
        )
        try:
            idle = process.peak_rss_mib()
            seconds, received = timed(lambda: upscale_over_grpc(address, photo(size, size), tile))
            rows.append(
                {
                    "input": f"{size}x{size} ({size * size / 1e6:.0f} MP)",
                    "idle_mib": idle,
                    "peak_mib": process.peak_rss_mib(),
                    "output_mib": received / 2**20,
                    "seconds": seconds,
                }
            )
        finally:
            process.stop()
    return rows


# --- 4. background removal and effects -----------------------------------------------


def bgremoval_vs_plain(model_dir: Path, rounds: int, size: int = 1024) -> dict:
    """Ours (mask at model size, resized, cut out) against the way rembg does it:
    an onnxruntime session, Pillow resizes, putalpha."""
    registry = SegmenterRegistry(model_dir, threads=available_cpus())
    registry.load_all()
    segmenter = registry.resolve("mediapipe-selfie")
    spec = segmenter.spec
    session = ort.InferenceSession(str(model_dir / spec.file), providers=["CPUExecutionProvider"])  # as rembg makes it
    image = photo(size, size)
    options = bg_engine.RemovalOptions()

    def ours():
        cutout = bg_engine.compute_cutout(segmenter, image, "RGB", options)
        return bg_engine.cut_out(image, "RGB", cutout.mask, cutout.foreground, options)

    def plain():
        picture = Image.fromarray(image)
        x = np.asarray(picture.convert("RGB").resize((spec.size, spec.size), Image.LANCZOS), np.float32)[None] / 255
        mask = session.run(None, {session.get_inputs()[0].name: x})[0][0, :, :, 0]
        alpha = Image.fromarray((np.clip(mask, 0, 1) * 255).astype(np.uint8)).resize(picture.size, Image.LANCZOS)
        cut = picture.copy()
        cut.putalpha(alpha)
        return np.asarray(cut)

    ours(), plain()
    ours_s, plain_s, _, _ = alternately(ours, plain, 20 * rounds)  # a few milliseconds each: many rounds
    return {
        "model": "mediapipe-selfie",
        "image": f"{size}x{size}",
        "ours_ms": 1000 * ours_s,
        "plain_ms": 1000 * plain_s,
        "ratio": plain_s / ours_s,
    }


def effects_throughput(rounds: int, width: int = 1600, height: int = 1200) -> list[dict]:
    image = photo(width, height)
    rows = []
    for name, effect in fx_registry.EFFECTS.items():
        params, options = effect.resolve({}, {})
        chain = fx_engine.Chain([fx_engine.ChainStep(effect, params, options)], width, height, "RGB", image.dtype)

        def run():
            op = EffectsOp(chain, 256)  # as the service runs it, tile by tile
            if op.whole_image:
                op.prepare(image)
            for job in op.jobs:
                context = job if op.whole_image else op.context_rect(job)
                op.render(job, image if op.whole_image else image[context.y0 : context.y1, context.x0 : context.x1])

        times = [timed(run)[0] for _ in range(rounds)]
        rows.append({"effect": name, "mps": width * height / 1e6 / statistics.median(times)})
    return rows


# --- report -------------------------------------------------------------------------


def report(results: dict, command: str) -> str:
    m = results["machine"]
    out = [
        "# Benchmarks\n",
        f"Command: `{command}`  \nDate: {m['date']}  \nMachine: {m['cpu']}, {m['cores']} cores available, "
        f"CPU flags: {m['flags']}; torch {m['torch']}, Python {m['python']}\n",
        "Each comparison runs both sides alternately in one process and reports medians; ratios are what to "
        "compare between machines, absolute times drift.\n",
        "## 1. Upscaler engine vs the reference `RealESRGANer`\n",
        "Same weights, same image (skimage's astronaut photograph), same tile size and halo "
        "(`tile`/`tile_pad`), 4x. Input megapixels per second.\n",
        "| model | image | tile/halo | ours (backend) | reference (fp32) | ratio | PSNR ours vs reference |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results["engine"]:
        out.append(
            f"| {r['model']} | {r['image']} | {r['tile']} | {r['ours']:.3f} MP/s ({r['backend']}) | "
            f"{r['reference']:.3f} MP/s | **{r['ratio']:.2f}x** | {r['psnr']:.1f} dB |"
        )
    out += [
        "\nEach at its best tile: ours as the service runs a request that names no tile (the backend and tile "
        "calibration chose at start, its halo of 16), the reference at the fastest of tile "
        f"{', '.join(str(t or 'untiled') for t in REFERENCE_TILES)} (its tile_pad as above, each timed twice "
        "first: the best time in seconds in brackets).\n",
        "| model | ours: tile/halo | reference: tile/halo (trials) | ours (backend) | reference (fp32) | ratio "
        "| PSNR |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results["engine"]:
        trials = ", ".join(f"{t}: {s} s" for t, s in r["reference_trials"].items())
        out.append(
            f"| {r['model']} | {r['best_ours_tile']} | {r['best_reference_tile']} ({trials}) | "
            f"{r['best_ours']:.3f} MP/s ({r['backend']}) | {r['best_reference']:.3f} MP/s | "
            f"**{r['best_ratio']:.2f}x** | {r['best_psnr']:.1f} dB |"
        )
    peaks = results["peaks"]
    precision = "bf16" if "bf16" in peaks else "fp32"  # the fastest this CPU runs natively, int8 aside
    matmul, conv = (peaks["bf16"], peaks["conv"]) if precision == "bf16" else (peaks["fp32"], peaks["conv_fp32"])
    ceiling = max(matmul, conv)
    out += [
        "\nAgainst this CPU's ceiling, measured in the same run: convolution GFLOP/s achieved (every tile's "
        f"context counted, for both sides); a {precision} matrix multiply reaches {matmul:.0f} GFLOP/s (fp32: "
        f"{peaks['fp32']:.0f}), and one of the network's own convolutions alone, {precision} channels-last on a "
        f"148-pixel tile, {conv:.0f} GFLOP/s. No {precision} engine computing every multiplication can beat the "
        "reference by more than the higher of the two over the reference's rate (Winograd does fewer).\n",
        f"| model | ours | share of the ceiling | reference | ceiling / reference: the most a direct {precision} "
        "engine can reach |",
        "|---|---|---|---|---|",
    ]
    for r in results["engine"]:
        out.append(
            f"| {r['model']} | {r['ours_gflops']:.0f} GFLOP/s | {r['ours_gflops'] / ceiling:.0%} | "
            f"{r['reference_gflops']:.0f} GFLOP/s | {ceiling / r['reference_gflops']:.2f}x |"
        )
    slowest_reference = min(r["reference_gflops"] for r in results["engine"])
    out += cpu_backends_report(results["backends"], peaks) + throughput_report(results["throughput"])
    if "int8" not in peaks:
        return "\n".join(out + later_sections(results)) + "\n"
    out += [
        f"\nint8 (AVX-512 VNNI) is the one faster precision this CPU has: the same convolution in int8 reaches "
        f"{peaks['int8']:.0f} GFLOP/s, so even a perfect int8 engine would stay under "
        f"{peaks['int8'] / slowest_reference:.1f}x the reference. And it fails the quality bar every backend must "
        f"meet ({MIN_PSNR_DB:.0f} dB against fp32): the network with 8-bit weights (per output channel) and "
        "8-bit convolution inputs (per tensor, ranges calibrated on the very image measured, int8's best case), "
        "against fp32, same photo:\n",
        "| model | PSNR int8 vs fp32 |",
        "|---|---|",
    ]
    out += [f"| {r['model']} | {r['psnr']:.1f} dB |" for r in results["int8"]]
    return "\n".join(out + later_sections(results)) + "\n"


def mesh_overhead_report(mesh: dict) -> list[str]:
    return [
        "\n## 2. Mesh overhead\n",
        f"The same {mesh['image']} upscale 4x (realesr-general-x4v3, {mesh['backend']}): PNG upload through "
        "REST -> gateway -> gRPC -> upscaler -> streamed PNG answer, against the engine called in-process "
        "with the same lanes; the four in turn, round by round.\n",
        "| lanes | in-process | through the mesh | ratio |",
        "|---|---|---|---|",
        *(
            f"| {LANES_LABELS.get(row['lanes'], row['lanes'])} | {row['in_process']:.2f} s | {row['mesh']:.2f} s "
            f"| **{row['ratio']:.3f}x** |"
            for row in mesh["rows"]
        ),
        f"\nThe gateway's own CPU time per request (reading the upload, tiles in and out of protobuf, the PNG "
        f"answer's deflate): {mesh['gateway_cpu']:.2f} s. Where the network keeps every core busy (this machine "
        f"has {mesh['cpus']}), that work and the upscaler's own tile I/O take turns on the same cores with the "
        "network: one call on every thread waits at each layer's barrier for a thread the OS set aside, while "
        "tiles rendered together in lanes of their own lose only the time taken.",
    ]


def later_sections(results: dict) -> list[str]:
    mesh = results["mesh"]
    out = mesh_overhead_report(mesh)
    out += mesh_reference_report(results["mesh_reference"])
    png = mesh["png"]
    out += [
        f"\nThe {png['size']} answer's PNG, written as the gateway writes it (Up filter, ISA-L deflate at the "
        "default level 1) against Pillow's PNG encoder at its defaults (zlib level 6, adaptive filters):\n",
        "| ours | Pillow | Pillow time / ours |",
        "|---|---|---|",
        f"| {png['ours_s']:.2f} s, {png['ours_mb']:.1f} MB | {png['pillow_s']:.2f} s, {png['pillow_mb']:.1f} MB "
        f"| **{png['pillow_s'] / png['ours_s']:.1f}x** |",
    ]
    memory = results["memory"]
    out += [
        "\n## 3. Upscaler peak memory\n",
        "Peak resident memory (VmHWM) of a fresh upscaler process for one 4x upscale, streamed over gRPC "
        "(the client drops output tiles as they come).\n",
        "| input | after start | peak | output streamed | time |",
        "|---|---|---|---|---|",
    ]
    for r in memory:
        out.append(
            f"| {r['input']} | {r['idle_mib']:.0f} MiB | {r['peak_mib']:.0f} MiB | {r['output_mib']:.0f} MiB "
            f"| {r['seconds']:.1f} s |"
        )
    growth = memory[-1]["peak_mib"] / memory[0]["peak_mib"]
    out.append(f"\nPeak for the largest input / peak for the smallest: **{growth:.2f}x**")
    bg = results["bgremoval"]
    out += [
        "\n## 4. Background removal and effects\n",
        f"Background removal of a {bg['image']} photo with {bg['model']}: ours (engine, as the service runs it) "
        "against an in-process pipeline done the way rembg does it (onnxruntime session, Pillow resizes, putalpha).\n",
        "| ours | plain pipeline | speed ratio (plain time / ours) |",
        "|---|---|---|",
        f"| {bg['ours_ms']:.0f} ms | {bg['plain_ms']:.0f} ms | **{bg['ratio']:.2f}x** |",
        "\nEffects on a 1600x1200 photo, tile by tile as the service runs them (default parameters):\n",
        "| effect | MP/s |",
        "|---|---|",
    ]
    out += [f"| {r['effect']} | {r['mps']:.1f} |" for r in results["effects"]]
    return out


def mesh_reference_report(r: dict) -> list[str]:
    return [
        f"\nA {r['image']} photo 4x ({r['model']}) through the whole mesh as a user sends it (PNG upload, the "
        f"upscaler's own tile choice, {r['backend']}, PNG answer) against the reference `RealESRGANer` "
        "in-process on the same pixels, untiled (its default, and its fastest on an image this small):\n",
        "| reference in-process | ours through the mesh | reference time / ours | PSNR ours vs reference |",
        "|---|---|---|---|",
        f"| {r['reference']:.2f} s | {r['mesh']:.2f} s | **{r['ratio']:.2f}x** | {r['psnr']:.1f} dB |",
    ]


def cpu_backends_report(rows: list[dict], peaks: dict) -> list[str]:
    out = [
        "\n### Every CPU backend on one tile\n",
        "The network alone (float in, float out), each backend in turn in every round, medians; the ratio is "
        "against torch fp32 NCHW, what the reference runs. GFLOP/s counts a direct convolution's work, so "
        "Winograd (ncnn) can pass the CPU's matrix-multiply rate. PSNR against fp32. Chosen: what the "
        f"upscaler's calibration picked at start. This CPU in the same run: fp32 matrix multiply "
        f"{peaks['fp32']:.0f} GFLOP/s, the network's 64->64 3x3 convolution alone (fp32, channels-last) "
        f"{peaks['conv_fp32']:.0f} GFLOP/s.\n",
        "| model | tile | backend | s per tile | vs torch fp32 | GFLOP/s | PSNR | chosen |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        chosen = f"yes, {r['chosen_tile']} tiles" if r["chosen"] else ""
        out.append(
            f"| {r['model']} | {r['tile']} | {r['backend']} | {r['seconds']:.3f} | **{r['ratio']:.2f}x** | "
            f"{r['gflops']:.0f} | {min(r['psnr'], 999):.1f} dB | {chosen} |"
        )
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=DEFAULT_MODELS)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run, not for RESULTS.md)")
    parser.add_argument(
        "--only", choices=("backends", "throughput", "mesh"), help="one section alone, printed (RESULTS.md untouched)"
    )
    args = parser.parse_args(argv)
    args.models = args.models.resolve()
    keep_freed_memory_for_reuse()  # as the upscaler does: in-process runs (the reference too) as in it
    torch.set_num_threads(available_cpus())
    quick = args.quick
    results = {"machine": machine()}
    steps = [
        ("mesh", lambda: mesh_overhead(args.models, args.rounds, 256 if quick else 1024)),
        ("engine", lambda: engine_vs_reference(args.models, args.rounds, 128 if quick else 512)),
        ("mesh_reference", lambda: mesh_vs_reference(args.models, args.rounds, *((124, 120) if quick else (492, 480)))),
        ("peaks", lambda: cpu_peaks(results["machine"])),
        ("backends", lambda: cpu_backends(args.models, args.rounds, (128,) if quick else (512, 256, 128))),
        (
            "throughput",
            lambda: throughput(args.models, args.rounds, (1, 2) if quick else (1, 2, 4), 128 if quick else 256),
        ),
        ("int8", lambda: int8_quality(args.models, 128 if quick else 512) if "int8" in results["peaks"] else []),
        (
            "memory",
            lambda: upscaler_memory(args.models, results["mesh"]["backend"], (128, 512) if quick else (1024, 4096)),
        ),
        ("bgremoval", lambda: bgremoval_vs_plain(args.models, args.rounds)),
        ("effects", lambda: effects_throughput(args.rounds)),
    ]
    if args.only:
        steps = [
            step
            for step in steps
            if step[0]
            in {"backends": ("peaks", "backends"), "throughput": ("throughput",), "mesh": ("mesh", "mesh_reference")}[
                args.only
            ]
        ]
    for name, step in steps:
        started = time.perf_counter()
        results[name] = step()
        print(f"[{name}] done in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    if args.only:
        lines = {
            "backends": lambda: cpu_backends_report(results["backends"], results["peaks"]),
            "throughput": lambda: throughput_report(results["throughput"]),
            "mesh": lambda: mesh_overhead_report(results["mesh"]) + mesh_reference_report(results["mesh_reference"]),
        }[args.only]()
        print("\n".join(lines))
        return 0
    text = report(results, "make bench" + (" (--quick)" if quick else ""))
    print(text)
    if not quick:
        RESULTS.write_text(
            with_machine_section(RESULTS.read_text() if RESULTS.exists() else "", results["machine"], text)
        )
        print(f"written to {RESULTS.relative_to(ROOT)}", file=sys.stderr)
    return 0


MACHINE_MARK = "<!-- CPU section: "
RESULTS_HEADER = (
    "# Benchmarks\n\nOne section per kind of CPU, each written by `make bench` on such a machine (a run "
    "replaces its own machine's section and keeps the others); the GPU section by `python -m bench.gpu`.\n"
)


def with_machine_section(previous: str, machine: dict, text: str) -> str:
    """RESULTS.md with this machine's section (its CPU and flags) replaced or added, the others kept."""
    key = f"{machine['cpu']}, {machine['flags']}"
    gpu = previous[previous.index(GPU_MARK) :] if GPU_MARK in previous else GPU_MARK + "\n"
    body = previous[: previous.index(GPU_MARK)] if GPU_MARK in previous else previous
    sections = {}
    for chunk in body.split(MACHINE_MARK)[1:]:
        name, _, content = chunk.partition(" -->\n")
        sections[name] = content
    demoted = "\n".join("#" + line if line.startswith("#") else line for line in text.splitlines())
    sections[key] = demoted.replace("## Benchmarks", f"## CPU: {key}", 1).rstrip() + "\n\n"
    return (
        RESULTS_HEADER
        + "\n"
        + "".join(f"{MACHINE_MARK}{name} -->\n{content}" for name, content in sections.items())
        + gpu
    )


if __name__ == "__main__":
    with run_scratch():
        status = main()
    sys.exit(status)
