"""Calibration: every candidate backend timed on one tile, the candidates in turn in
every round, and the fastest kept among those within MIN_PSNR_DB of fp32. It sits
beside the backends it measures; the registry (models.py) only asks it."""

from __future__ import annotations

import logging
import math
import time

import numpy as np
from PIL import Image

from services.common import logs
from services.common.contract import MIN_BACKEND_PSNR_DB

from .backends import Backend, Candidate

logger = logging.getLogger("imagemesh.upscaler.calibration")

MIN_PSNR_DB = MIN_BACKEND_PSNR_DB  # a faster backend must stay this close to fp32


def calibration_tile(size: int) -> np.ndarray:
    """A deterministic tile with smooth areas, texture and hard edges, like a photo's."""
    rng = np.random.default_rng(7)
    coarse = rng.random((size // 8 + 2, size // 8 + 2, 3)).astype(np.float32)
    smooth = np.stack(
        [
            np.asarray(Image.fromarray(coarse[:, :, c], "F").resize((size, size), Image.Resampling.BICUBIC))
            for c in range(3)
        ],
        axis=2,
    )
    tile = 0.7 * smooth + 0.15 * rng.random((size, size, 3), dtype=np.float32)
    tile[size // 4 : size // 2, size // 4 : 3 * size // 4] = (0.9, 0.2, 0.1)  # hard edges
    return np.clip(tile, 0, 1).transpose(2, 0, 1)[None].copy()


def psnr_db(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((np.clip(a, 0, 1) - np.clip(b, 0, 1)) ** 2))
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


def calibrate(
    candidates: list[Candidate], reference: np.ndarray, tile: np.ndarray, runs: int, native_scale: int = 4
) -> tuple[Backend | None, list[dict]]:
    """Time each candidate on the tile the way tiles will run (integer pixels in and
    out, its exact path), the candidates in turn in every round so that the
    machine's drift falls on all alike; keep the fastest within MIN_PSNR_DB of the reference."""
    pixels = tile.shape[2] * tile.shape[3]
    integer_tile = np.ascontiguousarray((tile[0].transpose(1, 2, 0) * 255).round().astype(np.uint8))
    whole = slice(0, tile.shape[2] * native_scale)
    ready = []  # (backend, its output, how one tile runs on it)
    for candidate in candidates:
        try:
            backend = candidate.make()
            out = backend(tile)  # warm-up, and the output compared

            def run(backend: Backend = backend) -> np.ndarray:
                return backend.render_exact(integer_tile, 1, native_scale, 1, whole, whole)

            run()
            ready.append((backend, out, run))
        except Exception as exc:  # a backend that cannot run here is skipped, not fatal
            logs.log(logger, logging.WARNING, "backend unavailable", backend=candidate.name, error=str(exc)[:300])
    times: dict[str, list[float]] = {backend.name: [] for backend, _, _ in ready}
    for _ in range(runs):
        for backend, _, run in ready:
            started = time.perf_counter()
            run()
            times[backend.name].append(time.perf_counter() - started)
    chosen, best, measurements = None, 0.0, []
    for backend, out, _ in ready:
        speed = pixels / min(times[backend.name]) / 1e6  # the best run: what it can do, less the machine's noise
        psnr = psnr_db(out, reference)
        eligible = psnr >= MIN_PSNR_DB
        measurements.append(
            {
                "backend": backend.name,
                "megapixels_per_second": round(speed, 4),
                "psnr_db": round(min(psnr, 999.0), 2),
                "eligible": eligible,
                "chosen": False,
            }
        )
        if eligible and speed > best:
            chosen, best = backend, speed
    for m in measurements:
        m["chosen"] = chosen is not None and m["backend"] == chosen.name
    return chosen, measurements
