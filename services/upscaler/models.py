"""The upscaler's model registry: every model it knows by its official name,
where its file comes from, and loading from MODEL_DIR. A model whose file is
missing or broken is listed as not ready with the reason; nothing is ever
downloaded while serving (see fetch.py for `make models`)."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from services.common import logs, metrics
from services.common.fetch import file_digest, onnx_parameter_count
from services.common.registry import Registry

from .arch import ARCHITECTURES, SRVGGNetCompact
from .backends import CPU_ONLY, Backend, Candidate, OnnxBackend, OpenVinoBackend, export_onnx, torch_candidates
from .calibration import MIN_PSNR_DB, calibrate, calibration_tile, read_record, record_path, write_record
from .engine import UpscaleEngine, tile_ladder
from .lanes import InferenceLanes
from .ncnn_export import NcnnBackend, export_ncnn, exportable

logger = logging.getLogger("imagemesh.upscaler.models")

RELEASES = "https://github.com/xinntao/Real-ESRGAN/releases/download"
BSD3 = "BSD-3-Clause (xinntao/Real-ESRGAN)"
LANCZOS = "lanczos"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    architecture: str
    scale: int
    params: dict
    files: tuple[str, ...]  # accepted file names in MODEL_DIR, the official one first
    source_url: str
    sha256: str = ""  # of the official file, when published
    license: str = BSD3
    description: str = ""
    # Rough peak working memory per input pixel, to choose a tile size.
    bytes_per_input_pixel: int = 1200

    @property
    def official_file(self) -> str:
        return self.files[0]


SPECS = (
    ModelSpec(
        "realesr-general-x4v3",
        "SRVGGNetCompact",
        4,
        dict(num_in_ch=3, num_out_ch=3, num_feat=64, num_conv=32, upscale=4, act_type="prelu"),
        ("realesr-general-x4v3.pth", "realesr-general-x4v3.fp16-derived.pth", "realesr-general-x4v3_fp16.onnx"),
        f"{RELEASES}/v0.2.5.0/realesr-general-x4v3.pth",
        description="small, fast general-purpose 4x model for real photos",
    ),
    ModelSpec(
        "RealESRGAN_x4plus",
        "RRDBNet",
        4,
        dict(num_in_ch=3, num_out_ch=3, num_feat=64, num_block=23, num_grow_ch=32, scale=4),
        ("RealESRGAN_x4plus.pth",),
        f"{RELEASES}/v0.1.0/RealESRGAN_x4plus.pth",
        sha256="4fa0d38905f75ac06eb49a7951b426670021be3018265fd191d2125df9d682f1",
        description="large general 4x model, highest quality, slow on CPU",
        bytes_per_input_pixel=16000,
    ),
    ModelSpec(
        "RealESRGAN_x2plus",
        "RRDBNet",
        2,
        dict(num_in_ch=3, num_out_ch=3, num_feat=64, num_block=23, num_grow_ch=32, scale=2),
        ("RealESRGAN_x2plus.pth",),
        f"{RELEASES}/v0.2.1/RealESRGAN_x2plus.pth",
        description="large general 2x model",
        bytes_per_input_pixel=4000,
    ),
    ModelSpec(
        "realesr-animevideov3",
        "SRVGGNetCompact",
        4,
        dict(num_in_ch=3, num_out_ch=3, num_feat=64, num_conv=16, upscale=4, act_type="prelu"),
        ("realesr-animevideov3.pth",),
        f"{RELEASES}/v0.2.5.0/realesr-animevideov3.pth",
        sha256="b8a8376811077954d82ca3fcf476f1ac3da3e8a68a4f4d71363008000a18b75d",
        description="tiny 4x model for anime and video frames",
    ),
    ModelSpec(
        "RealESRGAN_x4plus_anime_6B",
        "RRDBNet",
        4,
        dict(num_in_ch=3, num_out_ch=3, num_feat=64, num_block=6, num_grow_ch=32, scale=4),
        ("RealESRGAN_x4plus_anime_6B.pth",),
        f"{RELEASES}/v0.2.2.4/RealESRGAN_x4plus_anime_6B.pth",
        description="4x model for anime illustrations",
        bytes_per_input_pixel=16000,
    ),
)
SPECS_BY_NAME = {spec.name: spec for spec in SPECS}
# What `auto` picks, best first, for photos: general models before anime ones.
AUTO_ORDER = (
    "realesr-general-x4v3",
    "RealESRGAN_x4plus",
    "RealESRGAN_x2plus",
    "realesr-animevideov3",
    "RealESRGAN_x4plus_anime_6B",
)


def sha256_of(path: Path) -> str:
    return file_digest(path, "sha256")


def load_state_dict(path: Path) -> dict:
    """An official Real-ESRGAN .pth: `params_ema` preferred, else `params`."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(checkpoint, dict):
        for key in ("params_ema", "params"):
            if key in checkpoint:
                return checkpoint[key]
        if all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
            return checkpoint
    raise ValueError("not a Real-ESRGAN checkpoint (no params_ema or params)")


def build_module(spec: ModelSpec, path: Path) -> torch.nn.Module:
    module = ARCHITECTURES[spec.architecture](**spec.params)
    module.load_state_dict(load_state_dict(path), strict=True)
    return module.eval()


def cache_stem(path: Path, digest: str) -> str:
    """What a model file's conversions are named after: its name and its content."""
    return f"{path.stem}-{digest[:16]}"


def cached_onnx(module: torch.nn.Module, cache_dir: Path, stem: str) -> Path:
    """The module exported to ONNX once, then read back from the cache."""
    cached = cache_dir / f"{stem}.onnx"
    return cached if cached.is_file() else export_onnx(module, cached)


def cached_ncnn(module: SRVGGNetCompact, cache_dir: Path, stem: str) -> Path:
    """The module written as an ncnn network once (its .param; the .bin beside it)."""
    param = cache_dir / "ncnn" / f"{stem}.param"
    if not (param.is_file() and param.with_suffix(".bin").is_file()):
        export_ncnn(module, param)
    return param


@dataclass
class LoadedModel:
    spec: ModelSpec | None  # None for lanczos
    name: str
    ready: bool = False
    reason: str = ""
    backend: str = ""
    file_name: str = ""
    sha256_matches: bool = False
    parameters: int = 0
    file_bytes: int = 0
    calibration: list[dict] = field(default_factory=list)
    tile_speeds: dict[int, float] = field(default_factory=dict)  # the chosen backend's, per tile edge timed
    engine: UpscaleEngine | None = field(default=None, repr=False)

    @property
    def preferred_tile(self) -> int:
        """The tile edge calibration found fastest, or UPSCALER_TILE (timed there); 0 where tiles were
        not timed (a GPU's follow its memory)."""
        return next((m["tile"] for m in self.calibration if m["chosen"]), 0) if self.tile_speeds else 0

    def info(self) -> dict:
        spec = self.spec
        return {
            "name": self.name,
            "architecture": spec.architecture if spec else "lanczos",
            "scale": float(spec.scale) if spec else 0.0,
            "ready": self.ready,
            "not_ready_reason": self.reason,
            "backend": self.backend,
            "file_name": self.file_name or (spec.official_file if spec else ""),
            "sha256": spec.sha256 if spec else "",
            "sha256_matches": self.sha256_matches,
            "license": spec.license if spec else "n/a (no weights)",
            "source_url": spec.source_url if spec else "",
            "accepted_files": list(spec.files) if spec else [],
            "description": spec.description if spec else "Lanczos resampling with a light unsharp mask; always ready",
            "parameters": self.parameters,
            "file_bytes": self.file_bytes,
            "calibration": self.calibration,
            "preferred_tile": self.preferred_tile,
        }


class ModelRegistry(Registry):
    auto_order = AUTO_ORDER
    fallback = LANCZOS

    def __init__(
        self,
        model_dir: Path,
        *,
        backend: str = "auto",
        onnx_cache_dir: Path | None = None,
        threads: int = 1,
        lanes: int = 1,
        halo: int = 16,
        device: str = "cpu",
        calibration_tile: int = 128,
        calibration_runs: int = 3,
        tile: int = 0,
    ):
        super().__init__()
        self.device = device
        self.calibration_tile, self.calibration_runs = calibration_tile, calibration_runs
        self.model_dir = Path(model_dir)
        self.backend = backend
        self.onnx_cache_dir = onnx_cache_dir or Path.home() / ".cache" / "imagemesh" / "onnx"
        self.threads = max(1, threads)
        self.lanes = InferenceLanes(self.threads, lanes)  # shared by every model's network calls
        self.narrow_threads = self.threads // self.lanes.lanes
        self.halo = halo
        self.tile = tile  # UPSCALER_TILE: every request's tile_size unless it names one (0: chosen per image)

    def load_all(self) -> None:
        torch.set_num_threads(self.threads)
        logs.log(logger, logging.INFO, "inference lanes", threads=self.threads, lanes=self.lanes.lanes)
        for spec in SPECS:
            self.models[spec.name] = self._load(spec)
        self.models[LANCZOS] = LoadedModel(
            None, LANCZOS, ready=True, backend=LANCZOS, engine=UpscaleEngine(None, 1, halo=8)
        )
        for model in self.models.values():
            metrics.MODEL_READY.labels("upscaler", model.name, model.backend or "none").set(int(model.ready))

    def _pick_file(self, spec: ModelSpec) -> Path | None:
        present = [self.model_dir / name for name in spec.files if (self.model_dir / name).is_file()]
        if self.backend.startswith(("torch", "ncnn")):
            present = [p for p in present if p.suffix == ".pth"]
        elif self.backend in ("onnxruntime", "openvino"):
            present.sort(key=lambda p: p.suffix != ".onnx")  # a ready .onnx before an export
        return present[0] if present else None

    def _onnx_candidates(self, onnx_path: Callable[[], Path]) -> list[Candidate]:
        """onnxruntime and OpenVINO on the same .onnx file (exported only when one is wanted)."""
        return [
            Candidate(
                "onnxruntime",
                "onnxruntime",
                lambda: OnnxBackend(onnx_path(), self.threads, self.device, self.narrow_threads),
            ),
            Candidate(
                "openvino",
                "openvino",
                lambda: OpenVinoBackend(
                    onnx_path(), self.threads, self.onnx_cache_dir / "openvino", lanes=self.lanes.lanes
                ),
            ),
        ]

    def _ncnn_candidates(self, module: SRVGGNetCompact, stem: str) -> list[Candidate]:
        """ncnn in fp32 and with bf16 storage, on the network written once from the weights."""

        def make(bf16: bool) -> Backend:
            param = cached_ncnn(module, self.onnx_cache_dir, stem)
            return NcnnBackend(param, self.threads, self.narrow_threads, bf16)

        variants = (("ncnn", False), ("ncnn-bf16", True))  # each its own family: UPSCALER_BACKEND=ncnn is fp32
        return [Candidate(name, name, functools.partial(make, bf16)) for name, bf16 in variants]

    def _wanted(self, candidate: Candidate) -> bool:
        return self.backend in ("auto", candidate.family, candidate.name)

    def _load(self, spec: ModelSpec) -> LoadedModel:
        model = LoadedModel(spec, spec.name)
        path = self._pick_file(spec)
        if path is None:
            wanted = " or ".join(p for p in spec.files if self.backend != "torch" or p.endswith(".pth"))
            model.reason = f"no model file in MODEL_DIR: expected {wanted} (run `make models`)"
            logs.log(logger, logging.INFO, "model not ready", model=spec.name, reason=model.reason)
            return model
        model.file_name = path.name
        try:
            digest = sha256_of(path)
            model.sha256_matches = bool(spec.sha256) and digest == spec.sha256
            model.file_bytes = path.stat().st_size
            run = self._choose_backend(spec, path, digest, model)
            model.engine = UpscaleEngine(
                run,
                spec.scale,
                halo=self.halo,
                pad_multiple=2 if spec.scale == 2 else 1,
                bytes_per_input_pixel=spec.bytes_per_input_pixel,
                lanes=self.lanes,
                tile_speeds=model.tile_speeds,
                default_tile=self.tile,
            )
            model.backend = run.name
            model.ready = True
            logs.log(
                logger,
                logging.INFO,
                "model loaded",
                model=spec.name,
                file=path.name,
                backend=run.name,
                official_file=model.sha256_matches,
                calibration=model.calibration,
            )
            for m in model.calibration:
                metrics.BACKEND_SPEED.labels("upscaler", spec.name, m["backend"]).set(m["megapixels_per_second"])
                metrics.BACKEND_CHOSEN.labels("upscaler", spec.name, m["backend"]).set(int(m["chosen"]))
        except Exception as exc:  # a broken file makes the model not ready, never the service
            model.reason = f"{path.name} could not be loaded: {exc}"[:500]
            logs.log(logger, logging.WARNING, "model failed to load", model=spec.name, reason=model.reason)
        return model

    def _choose_backend(self, spec: ModelSpec, path: Path, digest: str, model: LoadedModel) -> Backend:
        """The backend for this file: measured among the candidates UPSCALER_BACKEND allows,
        or what the same measurement chose on this machine before."""
        stem = cache_stem(path, digest)
        module: torch.nn.Module | None = None
        if path.suffix == ".onnx":
            model.parameters = onnx_parameter_count(path)
            candidates = self._onnx_candidates(lambda: path)
        else:
            module = build_module(spec, path)
            model.parameters = sum(p.numel() for p in module.parameters())
            candidates = torch_candidates(module, self.device) + self._onnx_candidates(
                lambda: cached_onnx(module, self.onnx_cache_dir, stem)
            )
            if exportable(module):
                candidates += self._ncnn_candidates(module, stem)
        candidates = [c for c in candidates if self._wanted(c) and (self.device == "cpu" or c.family not in CPU_ONLY)]
        if not candidates:
            raise ValueError(f"UPSCALER_BACKEND={self.backend} is not available for {path.name} on this {self.device}")
        ladder: tuple[int, ...] = ()
        if self.tile:  # timed on the tile every request will run at
            first = self.tile + 2 * self.halo
        elif self.device == "cpu":
            first, ladder = self.calibration_tile, tile_ladder(self.calibration_tile - 2 * self.halo)
        else:  # a GPU needs bigger tiles than a CPU to show its speed, and its tiles follow its memory
            first = max(self.calibration_tile, 512)
        forced = len(candidates) == 1  # asked for by name: timed only to size its tiles
        if forced and not ladder:
            return candidates[0].make()
        record = record_path(
            self.onnx_cache_dir / "calibration",
            file=stem,
            candidates=[c.name for c in candidates],
            device=torch.cuda.get_device_name() if self.device == "cuda" else "cpu",
            threads=(self.threads, self.narrow_threads),
            tile=first,
            runs=self.calibration_runs,
            halo=self.halo,
            ladder=ladder,
        )
        by_name = {c.name: c for c in candidates}
        earlier = read_record(record)
        if (
            earlier is not None
            and (name := next(m["backend"] for m in earlier["calibration"] if m["chosen"])) in by_name
        ):
            model.calibration, model.tile_speeds = earlier["calibration"], earlier["tile_speeds"]
            logs.log(logger, logging.INFO, "calibration reused", model=spec.name, backend=name, record=str(record))
            return by_name[name].make()
        tile = calibration_tile(first)
        if module is not None:
            with torch.inference_mode():  # the accuracy reference: fp32 on the CPU
                reference = module.float().cpu()(torch.from_numpy(tile)).numpy()
        else:  # onnxruntime's own output: nothing more exact is at hand
            reference = OnnxBackend(path, self.threads, self.device)(tile)
        chosen, model.calibration, tile_speeds = calibrate(
            candidates,
            reference,
            tile,
            self.calibration_runs,
            spec.scale,
            halo=self.halo,
            tile_ladder=ladder,
            forced=forced,
        )
        if chosen is None:
            raise ValueError(f"no backend ran within {MIN_PSNR_DB} dB of fp32: {model.calibration}")
        if ladder or self.tile:
            model.tile_speeds = tile_speeds
        write_record(record, model.calibration, model.tile_speeds)
        return chosen
