"""The upscaler's downloads, and exporting fetched .pth files to the ONNX cache."""
from __future__ import annotations

import os
from pathlib import Path

from services.common.fetch import Download

from .backends import export_onnx
from .models import SPECS, ModelSpec, build_module, sha256_of


def downloads() -> list[Download]:
    return [Download(spec.name, spec.official_file, spec.source_url, sha256=spec.sha256) for spec in SPECS]


def default_onnx_cache() -> Path:
    configured = os.environ.get("ONNX_CACHE_DIR")
    return Path(configured) if configured else Path.home() / ".cache" / "imagemesh" / "onnx"


def export_to_cache(spec: ModelSpec, path: Path, cache_dir: Path) -> Path:
    """The same cache name the registry looks for."""
    cached = cache_dir / f"{path.stem}-{sha256_of(path)[:16]}.onnx"
    if not cached.is_file():
        export_onnx(build_module(spec, path), cached)
    return cached
