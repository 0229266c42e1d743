"""Background removal's downloads (`make models`); the built-in model needs none (models.BUILTIN)."""

from __future__ import annotations

from services.common.fetch import Download

from .models import SPECS

# Files of 300 MB and more are fetched only when asked for by name (or with --all).
LARGE = {"birefnet-general", "bria-rmbg", "birefnet-general-lite", "birefnet-portrait"}


def downloads() -> list[Download]:
    """rembg's release files; the MediaPipe model is published as TFLite and
    converted, so it has no download here."""
    return [
        Download(
            spec.name, spec.file, spec.source_url, sha256=spec.sha256, md5=spec.md5, default=spec.name not in LARGE
        )
        for spec in SPECS
        if spec.source_url.endswith(".onnx")
    ]
