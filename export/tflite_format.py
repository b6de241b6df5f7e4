"""Keras classifier to ``.tflite``: float32, float16, dynamic-range or full-integer int8.

The conversion goes through a SavedModel with one batch-1 endpoint (a static
input shape, so every routing step and recurrent step is unrolled in the
graph). Keras 3's ``from_keras_model`` path is unreliable, and a bare
``from_concrete_functions`` leaves the weights as resource variables
(READ_VARIABLE ops that full-integer calibration cannot run).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from capsedge.export.quantization import Quantization
from capsedge.metadata import ModelMetadata, embed_in_tflite, sidecar_path

__all__ = ["Quantization", "convert_to_tflite", "export_tflite", "write_saved_model"]


def convert_to_tflite(model: Any, quantization: Quantization) -> bytes:
    """Convert a Keras model with one ``(None, H, W, C)`` input to TFLite flatbuffer bytes."""
    import tensorflow as tf

    with tempfile.TemporaryDirectory(prefix="capsedge-export-") as saved_model:
        write_saved_model(model, saved_model)
        converter = tf.lite.TFLiteConverter.from_saved_model(saved_model)
        return strip_names(_convert(converter, quantization))


def strip_names(flatbuffer: bytes) -> bytes:
    """Drop tensor and signature names: the runtime addresses tensors by index.

    The unrolled routing and recurrent steps make about a thousand tensors, whose
    names take over a quarter of an int8 file; the arithmetic is untouched.
    """
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(flatbuffer))
    flatbuffer_utils.strip_strings(model)
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def write_saved_model(model: Any, directory: str | Path) -> None:
    """Write ``model`` as a SavedModel whose ``serve`` endpoint takes a batch of one."""
    import keras
    import tensorflow as tf

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        "serve",
        lambda x: model(x, training=False),
        input_signature=[tf.TensorSpec((1, *model.inputs[0].shape[1:]), tf.float32)],
    )
    archive.write_out(str(directory), verbose=False)


def _convert(converter: Any, quantization: Quantization) -> bytes:
    import tensorflow as tf

    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if quantization.mode == "float16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif quantization.mode == "dynamic":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    elif quantization.mode == "int8":
        calibration = quantization.calibration

        def representative() -> Iterable[list[np.ndarray]]:
            for image in calibration():
                yield [np.asarray(image, np.float32)[np.newaxis]]

        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = representative
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
    elif quantization.mode != "float32":
        raise ValueError(f"unknown quantization mode {quantization.mode!r}")
    return converter.convert()


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
    embed_in_tflite(path, metadata)
    sidecar_path(path).write_text(metadata.to_json() + "\n", encoding="utf-8")
    return path
