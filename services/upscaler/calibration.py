"""Calibration: every candidate backend timed on one tile, the candidates in turn in
every round, and the fastest kept among those within MIN_PSNR_DB of fp32; on the
CPU the fastest few are then timed on bigger tiles, for the tile size too. It sits
beside the backends it measures; the registry (models.py) only asks it."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from services.common import logs
from services.common.contract import MIN_BACKEND_PSNR_DB
from services.common.files import write_atomically
from services.common.resources import cpu_model_and_flags

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


LADDER_CONTENDERS = 3  # the fastest on the first tile are timed on bigger ones (the order can change there)
LADDER_RUNS = 2
# A backend stops climbing when a bigger tile is clearly slower per pixel than its best so far;
# within this of it, the run-to-run noise of a busy 2-core machine could be all there is.
LADDER_GIVE_UP = 0.85
MEASUREMENT_KEYS = ("backend", "megapixels_per_second", "tile", "psnr_db", "eligible", "chosen")
BACKEND_LIBRARIES = ("torch", "onnxruntime", "openvino", "ncnn")


@dataclass(frozen=True)
class _Speed:
    core: int  # tile edge before the halo: the pixels a tile delivers
    context: int  # the edge the network runs on, halo included
    seconds: float

    @property
    def core_rate(self) -> float:
        return self.core * self.core / self.seconds

    @property
    def context_rate(self) -> float:
        """Input megapixels per second, halo included (what estimates of a request's time use)."""
        return self.context * self.context / self.seconds / 1e6


def _time_in_turn(
    backends: list[Backend], tile: np.ndarray, native_scale: int, runs: int, warm_up: bool = True
) -> dict[str, float]:
    """Best time per backend for one tile on its exact path (after a warm-up call each when
    asked: a backend's first call sets it up), the backends in turn in every round so that
    the machine's drift falls on all alike."""
    integer_tile = np.ascontiguousarray((tile[0].transpose(1, 2, 0) * 255).round().astype(np.uint8))
    whole = slice(0, tile.shape[2] * native_scale)
    calls = {b.name: (lambda b=b: b.render_exact(integer_tile, 1, native_scale, 1, whole, whole)) for b in backends}
    for call in calls.values() if warm_up else ():
        call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(runs):
        for name, call in calls.items():
            started = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - started)
    return {name: min(t) for name, t in times.items()}  # the best run: what it can do, less the machine's noise


def calibrate(
    candidates: list[Candidate],
    reference: np.ndarray,
    tile: np.ndarray,
    runs: int,
    native_scale: int = 4,
    *,
    halo: int = 0,
    tile_ladder: tuple[int, ...] = (),
    forced: bool = False,
) -> tuple[Backend | None, list[dict], dict[int, float]]:
    """Time each candidate on the tile the way tiles will run (integer pixels in and
    out, its exact path), the candidates in turn in every round so that the
    machine's drift falls on all alike; keep the fastest within MIN_PSNR_DB of the reference.

    With a `tile_ladder` (tile edges before the halo, ascending), the LADDER_CONTENDERS
    fastest eligible candidates are then timed on ever bigger tiles, each until a bigger
    tile is clearly slower per pixel, twice over: per-pixel speed changes with the tile (caches, the halo's share),
    and not alike for every backend. Each measurement says the tile it was fastest at; the
    chosen backend's speed (input pixels per second, halo included) at every tile edge it
    was timed on comes back too, for the engine to size each image's tiles.

    `forced`: the one candidate was asked for by name; it is chosen and timed on the
    ladder whatever its accuracy (still measured and reported), and its failure is raised."""
    ready = []  # (backend, its output on the tile)
    for candidate in candidates:
        try:
            backend = candidate.make()
            ready.append((backend, backend(tile)))  # warm-up, and the output compared
        except Exception as exc:  # a backend that cannot run here is skipped, not fatal
            if forced:
                raise
            logs.log(logger, logging.WARNING, "backend unavailable", backend=candidate.name, error=str(exc)[:300])
    backends = [backend for backend, _ in ready]
    edge = tile.shape[2]
    core = max(1, edge - 2 * halo)
    first = _time_in_turn(backends, tile, native_scale, runs)
    fastest = {name: _Speed(core, edge, seconds) for name, seconds in first.items()}
    timed = {name: [speed] for name, speed in fastest.items()}  # every tile each was timed on
    measurements = []
    for backend, out in ready:
        psnr = psnr_db(out, reference)
        measurements.append(
            {"backend": backend.name, "psnr_db": round(min(psnr, 999.0), 2), "eligible": psnr >= MIN_PSNR_DB}
        )
    eligible = backends if forced else [b for b, m in zip(backends, measurements) if m["eligible"]]
    climbing = sorted(eligible, key=lambda b: fastest[b.name].core_rate, reverse=True)[:LADDER_CONTENDERS]
    for bigger in (e for e in tile_ladder if e > core):
        if not climbing:
            break
        context = bigger + 2 * halo
        step = calibration_tile(context)

        def clearly_slower(name: str, speed: _Speed) -> bool:
            return speed.core_rate < LADDER_GIVE_UP * fastest[name].core_rate

        # Warm already: a new tile size costs at most its first call more, and the best of the runs is kept.
        times = _time_in_turn(climbing, step, native_scale, LADDER_RUNS, warm_up=False)
        speeds = {name: _Speed(bigger, context, seconds) for name, seconds in times.items()}
        # Timed once more before giving up: a burst of load from elsewhere on a shared machine
        # slows every backend in the round for a few seconds, and passes.
        if doubtful := [b for b in climbing if clearly_slower(b.name, speeds[b.name])]:
            again = _time_in_turn(doubtful, step, native_scale, LADDER_RUNS, warm_up=False)
            for name, seconds in again.items():
                speeds[name] = _Speed(bigger, context, min(seconds, times[name]))
        for backend in list(climbing):
            speed = speeds[backend.name]
            timed[backend.name].append(speed)
            if speed.core_rate > fastest[backend.name].core_rate:
                fastest[backend.name] = speed
            elif clearly_slower(backend.name, speed):
                climbing.remove(backend)
    chosen = max(eligible, key=lambda b: fastest[b.name].core_rate, default=None)
    for backend, m in zip(backends, measurements):
        speed = fastest[backend.name]
        m.update(megapixels_per_second=round(speed.context_rate, 4), tile=speed.core, chosen=backend is chosen)
    tile_speeds = {speed.core: speed.context_rate * 1e6 for speed in timed[chosen.name]} if chosen else {}
    return chosen, [{k: m[k] for k in MEASUREMENT_KEYS} for m in measurements], tile_speeds


def _installed_version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return ""


def record_path(directory: Path, **settings: object) -> Path:
    """Where calibration's outcome for these settings (the model file, the candidates,
    threads, halo, device...) is kept: named after everything else the outcome depends
    on too (the CPU, the backend libraries' versions, this module's code), so a restart
    on the same machine reuses it and any change measures again."""
    cpu, flags = cpu_model_and_flags()
    identity = {
        **settings,
        "cpu": cpu,
        "flags": sorted(flags),
        "libraries": {name: _installed_version(name) for name in BACKEND_LIBRARIES},
        "method": hashlib.sha256(Path(__file__).read_bytes()).hexdigest(),
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()
    return directory / f"{digest[:32]}.json"


def read_record(path: Path) -> dict | None:
    """A stored outcome: every measurement (the chosen one with its tile) and the chosen backend's speed per
    tile; None when there is none (or it cannot be read: then it is measured again)."""
    try:
        record = json.loads(path.read_text())
        chosen = [m for m in record["calibration"] if m["chosen"]]
        if len(chosen) == 1 and set(MEASUREMENT_KEYS) <= set(chosen[0]):
            record["tile_speeds"] = {int(edge): float(speed) for edge, speed in record["tile_speeds"].items()}
            return record
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def write_record(path: Path, measurements: list[dict], tile_speeds: dict[int, float]) -> None:
    record = {"calibration": measurements, "tile_speeds": tile_speeds}
    write_atomically(path, json.dumps(record).encode())
