"""The upscaler's downloads, and converting fetched .pth files into the cache (ONNX, ncnn)."""

from __future__ import annotations

import os
from pathlib import Path

from services.common.fetch import Download

from .models import SPECS, ModelSpec, build_module, cache_stem, cached_ncnn, cached_onnx, sha256_of
from .ncnn_export import exportable

# The compact models (a few MB each, fast on a CPU) that `make run` fetches when missing.
AT_START = ("realesr-general-x4v3", "realesr-animevideov3")


def downloads() -> list[Download]:
    return [
        Download(
            spec.name,
            spec.official_file,
            spec.source_url,
            sha256=spec.sha256,
            at_start=spec.name in AT_START,
            accepted=tuple(spec.files),
        )
        for spec in SPECS
    ]


def default_onnx_cache() -> Path:
    configured = os.environ.get("ONNX_CACHE_DIR")
    return Path(configured) if configured else Path.home() / ".cache" / "imagemesh" / "onnx"


def export_to_cache(spec: ModelSpec, path: Path, cache_dir: Path) -> list[Path]:
    """The conversions the registry would make at its first start (ONNX, and ncnn where
    the architecture allows), made now under the names it looks for."""
    module = build_module(spec, path)
    stem = cache_stem(path, sha256_of(path))
    made = [cached_onnx(module, cache_dir, stem)]
    if exportable(module):
        made.append(cached_ncnn(module, cache_dir, stem))
    return made
