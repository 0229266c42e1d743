"""The one way an onnxruntime session is made: the thread count given, and idle
threads that sleep instead of spinning (spinning ones would take the cores from the
image work around each run)."""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort


def onnx_session(path: Path, threads: int, providers: list[str]) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=providers)
