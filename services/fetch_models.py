"""`make models`: fetch the official model files of every service into
MODEL_DIR, verifying the published sha256 (or rembg's md5) where there is one.

    python -m services.fetch_models [--dir DIR] [--model NAME ...] [--all]
        [--mirror DIR_OR_URL] [--require-checksums] [--export]

Without --model it fetches every upscaler model and the smaller background-
removal models; --all adds the large ones (BiRefNet, BRIA, about 1 GB each).
--mirror takes files from a local folder (or another base URL) instead of the
official addresses, verified all the same. --export also converts the
upscaler's .pth files in ONNX_CACHE_DIR, as its first start would: to ONNX
(onnxruntime, OpenVINO) and, for the compact models, to ncnn.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from services.bgremoval.fetch import downloads as bgremoval_downloads
from services.common.fetch import Download, FetchError, fetch
from services.upscaler import fetch as upscaler_fetch
from services.upscaler.models import SPECS_BY_NAME as UPSCALER_SPECS

START_TIMEOUT_SECONDS = 15  # offline, `make run` should not wait long before starting


def available() -> list[Download]:
    return upscaler_fetch.downloads() + bgremoval_downloads()


def fetch_missing_at_start(model_dir: Path, mirror: str | None = None) -> str:
    """`make run`: fetch the small default models MODEL_DIR lacks, verified. Returns one
    line on what could not be fetched (empty when nothing failed); the first failure to
    reach the source ends the attempt, so an offline start does not wait per file."""
    missing = [item for item in available() if item.at_start and not item.present_in(model_dir)]
    for done, item in enumerate(missing):
        try:
            path = fetch(item, model_dir, mirror=mirror, timeout=START_TIMEOUT_SECONDS)
            print(f"imagemesh: fetched {item.model} into {path} ({item.expected()[0]} verified)", file=sys.stderr)
        except FetchError as exc:
            names = ", ".join(i.model for i in missing[done:])
            return (
                f"could not fetch {names} ({exc}); starting with the models in MODEL_DIR ({model_dir}); "
                "`make models` fetches them later"
            )
    return ""


def main(argv: list[str] | None = None) -> int:
    available_downloads = available()
    by_name = {item.model: item for item in available_downloads}
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=Path(os.environ.get("MODEL_DIR", "models")))
    parser.add_argument("--model", action="append", choices=sorted(by_name), help="only these (repeatable)")
    parser.add_argument("--all", action="store_true", help="include the large background-removal models")
    parser.add_argument("--mirror", help="local folder or base URL to fetch from instead of the official releases")
    parser.add_argument("--require-checksums", action="store_true", help="refuse files without a published checksum")
    parser.add_argument(
        "--export",
        "--export-onnx",
        dest="export",
        action="store_true",
        help="also convert upscaler models into ONNX_CACHE_DIR (ONNX, ncnn)",
    )
    args = parser.parse_args(argv)
    chosen = (
        [by_name[name] for name in args.model]
        if args.model
        else [item for item in available_downloads if item.default or args.all]
    )
    failures = 0
    for item in chosen:
        try:
            path = fetch(item, args.dir, mirror=args.mirror, require_checksum=args.require_checksums)
            algorithm, expected = item.expected()
            print(f"{item.model}: {path} ({f'{algorithm} verified' if expected else 'no published checksum'})")
            if args.export and item.model in UPSCALER_SPECS:
                for cached in upscaler_fetch.export_to_cache(
                    UPSCALER_SPECS[item.model], path, upscaler_fetch.default_onnx_cache()
                ):
                    print(f"{item.model}: converted to {cached}")
        except FetchError as exc:
            failures += 1
            print(f"error: {exc}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
