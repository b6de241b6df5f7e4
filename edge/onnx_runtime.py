"""onnxruntime, the runtime of ``.onnx`` models (the ``onnx`` extra), imported only when an ONNX
model is opened or its metadata read."""

from __future__ import annotations

from typing import Any

from .extras import require


def onnxruntime_options() -> tuple[Any, Any]:
    """onnxruntime and session options that log errors only (its warnings would break the
    CLI's one-line output), for running a model or reading its metadata.

    Raises:
        RuntimeMissingError: onnxruntime (the ``onnx`` extra) is not installed.
    """
    ort = require("onnxruntime", extra="onnx", needed_by="an ONNX model")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort, options
