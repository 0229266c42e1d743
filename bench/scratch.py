"""One scratch directory per benchmark run."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def run_scratch() -> Iterator[Path]:
    """A directory that every `tempfile` call of the run (model links, ONNX and ncnn exports,
    calibration records, services' results) lands in, removed with everything in it when the
    run ends, however it ends."""
    with tempfile.TemporaryDirectory(prefix="imagemesh-bench-") as directory:
        previous, tempfile.tempdir = tempfile.tempdir, directory
        try:
            yield Path(directory)
        finally:
            tempfile.tempdir = previous
