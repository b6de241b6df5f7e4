"""Keras classifier to a ``.tflite`` file with its metadata: float32, float16, dynamic-range or
full-integer int8 (the conversion itself is
:mod:`capsedge.export.converter`, which training uses too)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from capsedge.export.converter import keras_to_tflite, strip_names, write_saved_model
from capsedge.export.quantization import Quantization
from capsedge.metadata import ModelMetadata, embed_in_tflite, sidecar_path

__all__ = ["Quantization", "convert_to_tflite", "export_tflite", "stamp_tflite", "strip_names",
           "write_saved_model"]


def convert_to_tflite(model: Any, quantization: Quantization) -> bytes:
    """Convert a Keras model with one ``(None, H, W, C)`` input to TFLite flatbuffer bytes
    (:func:`capsedge.export.converter.keras_to_tflite` with ``quantization``'s settings)."""
    return keras_to_tflite(model, quantization.mode, quantization.calibration)


def export_tflite(
    model: Any,
    path: str | Path,
    metadata: ModelMetadata,
    *,
    quantization: Quantization | None = None,
) -> Path:
    """Write ``model`` as a ``.tflite`` file with its metadata embedded and in a sidecar JSON.

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(convert_to_tflite(model, quantization or Quantization.for_float32()))
    stamp_tflite(path, metadata)
    return path


def stamp_tflite(path: Path, metadata: ModelMetadata) -> None:
    """Embed ``metadata`` in the ``.tflite`` file at ``path`` (replacing any) and write its sidecar."""
    embed_in_tflite(path, metadata)
    sidecar_path(path).write_text(metadata.to_json() + "\n", encoding="utf-8")
