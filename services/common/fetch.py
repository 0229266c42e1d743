"""Downloading model files, verified against published checksums. Used by
`make models`; never while serving."""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

DOWNLOAD_TIMEOUT_SECONDS = 60


class FetchError(Exception):
    pass


@dataclass(frozen=True)
class Download:
    model: str
    file: str
    url: str
    sha256: str = ""
    md5: str = ""  # what rembg publishes
    default: bool = True  # fetched by plain `make models` (large files are opt-in)
    at_start: bool = False  # fetched by `make run` when missing: a service's small default model
    accepted: tuple[str, ...] = ()  # other files in MODEL_DIR the model loads from instead

    def present_in(self, model_dir: Path) -> bool:
        return any((model_dir / name).is_file() for name in (self.file, *self.accepted))

    def expected(self) -> tuple[str, str]:
        return ("sha256", self.sha256) if self.sha256 else ("md5", self.md5) if self.md5 else ("", "")


def onnx_parameter_count(path: Path) -> int:
    """Weights stored in an ONNX file (its initializers)."""
    import numpy as np
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return int(sum(np.prod(t.dims, dtype=np.int64) for t in model.graph.initializer))


def file_digest(path: Path, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _open_source(item: Download, mirror: str | None, timeout: float):
    if mirror and "://" not in mirror:
        return open(Path(mirror) / item.file, "rb")
    url = f"{mirror.rstrip('/')}/{item.file}" if mirror else item.url
    return urllib.request.urlopen(url, timeout=timeout)


def fetch(
    item: Download,
    model_dir: Path,
    *,
    mirror: str | None = None,
    require_checksum: bool = False,
    timeout: float = DOWNLOAD_TIMEOUT_SECONDS,
) -> Path:
    """Download one file; it lands in model_dir only once verified."""
    algorithm, expected = item.expected()
    target = model_dir / item.file
    if target.is_file() and (not expected or file_digest(target, algorithm) == expected):
        return target
    if require_checksum and not expected:
        raise FetchError(f"{item.model}: no published checksum to verify against (drop --require-checksums to accept)")
    model_dir.mkdir(parents=True, exist_ok=True)
    digests = {name: hashlib.new(name) for name in ("sha256", "md5")}
    fd, tmp = tempfile.mkstemp(prefix=f".{item.file}.", dir=model_dir)
    try:
        with os.fdopen(fd, "wb") as out, _open_source(item, mirror, timeout) as source:
            for block in iter(lambda: source.read(1 << 20), b""):
                for digest in digests.values():
                    digest.update(block)
                out.write(block)
        if expected and digests[algorithm].hexdigest() != expected:
            raise FetchError(
                f"{item.model}: {algorithm} mismatch: expected {expected}, got "
                f"{digests[algorithm].hexdigest()}; file discarded"
            )
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
        if not expected:
            print(
                f"warning: {item.model}: no published checksum; downloaded file has sha256 "
                f"{digests['sha256'].hexdigest()}",
                file=sys.stderr,
            )
        return target
    except OSError as exc:
        raise FetchError(f"{item.model}: download failed: {exc}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
