"""Keras model to ``.tflite`` bytes: float32, float16, dynamic-range or full-integer int8.

Used by export (which writes the files) and by training (``--int8-trunk`` trains above the
int8 trunk an export produces). The conversion goes through a SavedModel with one batch-1
endpoint (a static input shape, so every routing step and recurrent step is unrolled in the
graph). Keras 3's ``from_keras_model`` path is unreliable, and a bare
``from_concrete_functions`` leaves the weights as resource variables (READ_VARIABLE ops that
full-integer calibration cannot run). TensorFlow is imported inside the functions.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["keras_to_tflite", "set_full_integer", "strip_names", "write_saved_model"]


def keras_to_tflite(model: Any, mode: str = "float32",
                    calibration: Callable[[], Iterable[np.ndarray]] | None = None, *,
                    float_io: bool = False, keep_names: bool = False) -> bytes:
    """Convert a Keras model with one ``(None, H, W, C)`` input to TFLite flatbuffer bytes.

    Args:
        model: the Keras model.
        mode: ``"float32"``, ``"float16"`` (float16 weights), ``"dynamic"`` (int8 weights,
            float activations) or ``"int8"`` (full integer, int8 in and out).
        calibration: for ``"int8"``: returns an iterable of preprocessed ``(H, W, C)`` images.
        float_io: for ``"int8"``: float input and output around the integer graph (what a
            translation to ONNX needs).
        keep_names: keep the tensor names (:func:`strip_names` drops them otherwise).
    """
    import tensorflow as tf

    if mode == "int8" and calibration is None:
        raise ValueError("int8 conversion needs calibration images")
    with tempfile.TemporaryDirectory(prefix="capsedge-export-") as saved_model:
        write_saved_model(model, saved_model)
        converter = tf.lite.TFLiteConverter.from_saved_model(saved_model)
        flatbuffer = _convert(converter, mode, calibration, float_io)
    return flatbuffer if keep_names else strip_names(flatbuffer)


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


def _convert(converter: Any, mode: str, calibration: Callable[[], Iterable[np.ndarray]] | None,
             float_io: bool = False) -> bytes:
    import tensorflow as tf

    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if mode == "float16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif mode == "dynamic":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    elif mode == "int8":
        set_full_integer(converter, calibration)
        if not float_io:
            converter.inference_input_type = tf.int8
            converter.inference_output_type = tf.int8
    elif mode != "float32":
        raise ValueError(f"unknown quantization mode {mode!r}")
    return converter.convert()


def set_full_integer(converter: Any, calibration: Callable[[], Iterable[np.ndarray]]) -> Callable[[], Any]:
    """Set a ``TFLiteConverter`` to full-integer int8 operations calibrated on ``calibration``
    (float input and output unless the caller sets them); returns its representative dataset,
    which TensorFlow's quantization debugger also takes."""
    import tensorflow as tf

    def representative() -> Iterable[list[np.ndarray]]:
        for image in calibration():
            yield [np.asarray(image, np.float32)[np.newaxis]]

    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    return representative
