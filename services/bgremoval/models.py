"""The background-removal registry: segmentation models by rembg's names (and
the portrait model in the shared folder), each with the way it is fed and
read, plus the model-free keyer. Files come from MODEL_DIR; a missing file
makes its model not ready, with the reason."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import onnxruntime as ort

from services.common import logs, metrics
from services.common.fetch import Download, file_digest, onnx_parameter_count
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
    size: int                     # square input edge
    normalisation: tuple = IMAGENET  # (mean, std) per channel, after dividing by the image maximum
    layout: str = "NCHW"
    activation: str = "minmax"    # "minmax" (rescale to 0..1), "sigmoid", or "none" (already a probability)
    divide_by_max: bool = True    # rembg divides by the image's maximum, not by 255
    kind: str = "general"
    license: str = "Apache-2.0"
    source_url: str = ""
    md5: str = ""
    sha256: str = ""
    description: str = ""


SPECS = (
    SegmenterSpec("birefnet-general", "BiRefNet-general-epoch_244.onnx", 1024, activation="sigmoid", license="MIT",
                  source_url=f"{REMBG}/BiRefNet-general-epoch_244.onnx", description="BiRefNet, best general quality"),
    SegmenterSpec("bria-rmbg", "bria-rmbg-2.0.onnx", 1024, activation="sigmoid",
                  license="CC BY-NC 4.0 (BRIA RMBG, non-commercial use only)",
                  source_url=f"{REMBG}/bria-rmbg-2.0.onnx", description="BRIA RMBG 2.0"),
    SegmenterSpec("isnet-general-use", "isnet-general-use.onnx", 1024, HALF, source_url=f"{REMBG}/isnet-general-use.onnx",
                  md5="fc16ebd8b0c10d971d3513d564d01e29", description="IS-Net (DIS), general objects"),
    SegmenterSpec("u2net", "u2net.onnx", 320, source_url=f"{REMBG}/u2net.onnx", md5="60024c5c889badc19c04ad937298a77b",
                  description="U^2-Net, general salient objects"),
    SegmenterSpec("birefnet-general-lite", "BiRefNet-general-bb_swin_v1_tiny-epoch_232.onnx", 1024,
                  activation="sigmoid", license="MIT",
                  source_url=f"{REMBG}/BiRefNet-general-bb_swin_v1_tiny-epoch_232.onnx", description="BiRefNet, lighter"),
    SegmenterSpec("silueta", "silueta.onnx", 320, source_url=f"{REMBG}/silueta.onnx",
                  md5="55e59e0d8062d2f5d013f4725ee84782", description="U^2-Net reduced to 43 MB"),
    SegmenterSpec("u2netp", "u2netp.onnx", 320, source_url=f"{REMBG}/u2netp.onnx", md5="8e83ca70e441ab06c318d82300c84806",
                  description="U^2-Net, 4.7 MB portable version"),
    SegmenterSpec("isnet-anime", "isnet-anime.onnx", 1024, HALF, kind="anime", source_url=f"{REMBG}/isnet-anime.onnx",
                  description="IS-Net for anime characters"),
    SegmenterSpec("u2net_human_seg", "u2net_human_seg.onnx", 320, kind="portrait",
                  source_url=f"{REMBG}/u2net_human_seg.onnx", description="U^2-Net trained on people"),
    SegmenterSpec("birefnet-portrait", "BiRefNet-portrait-epoch_150.onnx", 1024, activation="sigmoid", kind="portrait",
                  license="MIT", source_url=f"{REMBG}/BiRefNet-portrait-epoch_150.onnx", description="BiRefNet for people"),
    SegmenterSpec("mediapipe-selfie", "mediapipe_selfie_segmentation_256.onnx", 256, ((0, 0, 0), (1, 1, 1)),
                  layout="NHWC", activation="none", divide_by_max=False, kind="portrait",
                  sha256="1511ab5564cb0ae179cba9bcad6ad931003ccc71656f11fd270967023678c6a5",
                  source_url="https://storage.googleapis.com/mediapipe-assets/selfie_segmentation.tflite",
                  description="MediaPipe selfie segmentation (converted to ONNX), people only, fast"),
)
SPECS_BY_NAME = {spec.name: spec for spec in SPECS}
# `auto` picks the first ready general-purpose model; portrait and anime models only when asked for.
AUTO_ORDER = tuple(spec.name for spec in SPECS if spec.kind == "general")


# Files of 300 MB and more are fetched only when asked for by name (or with --all).
LARGE = {"birefnet-general", "bria-rmbg", "birefnet-general-lite", "birefnet-portrait"}


def downloads() -> list[Download]:
    """rembg's release files; the MediaPipe model is published as TFLite and
    converted, so it has no download here."""
    return [Download(spec.name, spec.file, spec.source_url, sha256=spec.sha256, md5=spec.md5,
                     default=spec.name not in LARGE)
            for spec in SPECS if spec.source_url.endswith(".onnx")]


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
    session: ort.InferenceSession | None = field(default=None, repr=False)

    def info(self) -> dict:
        spec = self.spec
        return {
            "name": self.name, "architecture": spec.file.rsplit(".", 1)[0] if spec else "keyer",
            "ready": self.ready, "not_ready_reason": self.reason, "backend": self.backend,
            "file_name": spec.file if spec else "", "sha256": spec.sha256 if spec else "",
            "md5": spec.md5 if spec else "", "sha256_matches": self.checksum_matches,
            "license": spec.license if spec else "n/a (no weights)",
            "source_url": spec.source_url if spec else "", "accepted_files": [spec.file] if spec else [],
            "kind": spec.kind if spec else "solid background",
            "parameters": self.parameters, "file_bytes": self.file_bytes, "input_size": spec.size if spec else 0,
            "description": spec.description if spec else
            "background colour from the border, connected region of similar colour, soft edge; always ready",
        }


class SegmenterRegistry(Registry):
    auto_order = AUTO_ORDER
    fallback = KEYER

    def __init__(self, model_dir: Path, threads: int = 1, device: str = "cpu"):
        super().__init__()
        self.model_dir = Path(model_dir)
        self.providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" \
            else ["CPUExecutionProvider"]
        self.threads = threads

    def load_all(self) -> None:
        for spec in SPECS:
            self.models[spec.name] = self._load(spec)
        self.models[KEYER] = Segmenter(None, KEYER, ready=True, backend=KEYER)
        for model in self.models.values():
            metrics.MODEL_READY.labels("bgremoval", model.name, model.backend or "none").set(int(model.ready))

    def _load(self, spec: SegmenterSpec) -> Segmenter:
        model = Segmenter(spec, spec.name)
        path = self.model_dir / spec.file
        if not path.is_file():
            model.reason = f"no model file in MODEL_DIR: expected {spec.file}"
            return model
        try:
            if spec.sha256:
                model.checksum_matches = file_digest(path, "sha256") == spec.sha256
            elif spec.md5:
                model.checksum_matches = file_digest(path, "md5") == spec.md5
            options = ort.SessionOptions()
            options.intra_op_num_threads = self.threads
            options.log_severity_level = 3
            # Idle threads that spin would take the cores from the image work around each run.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            model.session = ort.InferenceSession(str(path), options, providers=self.providers)
            model.parameters, model.file_bytes = onnx_parameter_count(path), path.stat().st_size
            on_gpu = model.session.get_providers()[0] == "CUDAExecutionProvider"
            model.backend, model.ready = "onnxruntime-cuda" if on_gpu else "onnxruntime", True
            logs.log(logger, logging.INFO, "model loaded", model=spec.name, file=spec.file)
        except Exception as exc:  # a broken file makes the model not ready, never the service
            model.reason = f"{spec.file} could not be loaded: {exc}"[:500]
            logs.log(logger, logging.WARNING, "model failed to load", model=spec.name, reason=model.reason)
        return model
