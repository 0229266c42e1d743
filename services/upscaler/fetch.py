"""`make models`: fetch the official model files into MODEL_DIR, verifying
their sha256 where it is published. Never run while serving.

    python -m services.upscaler.fetch --dir models [--model NAME ...]
        [--mirror DIR_OR_URL] [--require-checksums] [--export-onnx]

--mirror takes files from a local folder (or another base URL) instead of the
official release addresses; the checksums are verified all the same.
--export-onnx also converts each .pth to ONNX (dynamic height and width) into
the ONNX cache, so that UPSCALER_BACKEND=onnxruntime starts without exporting.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
import urllib.request
from pathlib import Path

from .backends import export_onnx
from .models import SPECS, SPECS_BY_NAME, ModelSpec, build_module, sha256_of

DOWNLOAD_TIMEOUT_SECONDS = 60


class FetchError(Exception):
    pass


def _open_source(spec: ModelSpec, mirror: str | None):
    if mirror and "://" not in mirror:
        return open(Path(mirror) / spec.official_file, "rb")
    url = f"{mirror.rstrip('/')}/{spec.official_file}" if mirror else spec.source_url
    return urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_SECONDS)


def fetch(spec: ModelSpec, model_dir: Path, *, mirror: str | None = None, require_checksum: bool = False) -> Path:
    """Download one model's official file; it lands in model_dir only once verified."""
    target = model_dir / spec.official_file
    if target.is_file() and (not spec.sha256 or sha256_of(target) == spec.sha256):
        return target
    if require_checksum and not spec.sha256:
        raise FetchError(f"{spec.name}: no published sha256 to verify against (drop --require-checksums to accept)")
    model_dir.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(prefix=f".{spec.official_file}.", dir=model_dir)
    try:
        with os.fdopen(fd, "wb") as out, _open_source(spec, mirror) as source:
            for block in iter(lambda: source.read(1 << 20), b""):
                digest.update(block)
                out.write(block)
        actual = digest.hexdigest()
        if spec.sha256 and actual != spec.sha256:
            raise FetchError(f"{spec.name}: sha256 mismatch: expected {spec.sha256}, got {actual}; file discarded")
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
        if not spec.sha256:
            print(f"warning: {spec.name}: no published checksum; downloaded file has sha256 {actual}", file=sys.stderr)
        return target
    except OSError as exc:
        raise FetchError(f"{spec.name}: download failed: {exc}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def default_onnx_cache() -> Path:
    configured = os.environ.get("ONNX_CACHE_DIR")
    return Path(configured) if configured else Path.home() / ".cache" / "imagemesh" / "onnx"


def export_to_cache(spec: ModelSpec, path: Path, cache_dir: Path) -> Path:
    """The same cache name the registry looks for."""
    cached = cache_dir / f"{path.stem}-{sha256_of(path)[:16]}.onnx"
    if not cached.is_file():
        export_onnx(build_module(spec, path), cached)
    return cached


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=Path(os.environ.get("MODEL_DIR", "models")))
    parser.add_argument("--model", action="append", choices=sorted(SPECS_BY_NAME), help="only these (repeatable)")
    parser.add_argument("--mirror", help="local folder or base URL to fetch from instead of the official releases")
    parser.add_argument("--require-checksums", action="store_true", help="refuse models without a published sha256")
    parser.add_argument("--export-onnx", action="store_true", help="also export each model to the ONNX cache")
    args = parser.parse_args(argv)
    specs = [SPECS_BY_NAME[name] for name in args.model] if args.model else list(SPECS)
    failures = 0
    for spec in specs:
        try:
            path = fetch(spec, args.dir, mirror=args.mirror, require_checksum=args.require_checksums)
            verified = "sha256 verified" if spec.sha256 else "no published sha256"
            print(f"{spec.name}: {path} ({verified})")
            if args.export_onnx:
                print(f"{spec.name}: exported to {export_to_cache(spec, path, default_onnx_cache())}")
        except FetchError as exc:
            failures += 1
            print(f"error: {exc}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
