"""Keras classifier to ``.onnx``: float32 (tf2onnx), or int8 translated from the TFLite int8 file.

The float model comes from ``tf2onnx.convert.from_keras`` with a static
``(1, H, W, C)`` input named ``image``, so the recurrent head stays unrolled
(no ``Loop``). The int8 model is the full-integer TFLite conversion of the same
classifier (calibrated as ``tflite-int8`` is, with float input and output around
the integer graph), translated by ``tf2onnx.convert.from_tflite``: every TFLite
scale and zero point becomes a QuantizeLinear/DequantizeLinear pair (per-channel
int8 weights, int8 activations with TFLite's zero points), so ONNX Runtime
computes what LiteRT computes. It takes and returns float32.

Why not ONNX Runtime's own static quantization of the float graph (what 0.2-0.5
did: symmetric QDQ on the convolutions, percentile ranges): on the bundled
512 px model it agreed with the float model on 93.9-95.2 % of the 477
development images, the translation on 99.2 % (and on 100 % with the TFLite int8
file), at 41 ms against 56 ms per inference on one thread
(``bench/onnx_from_tflite_int8.py``, ``bench/onnx_int8_float_first.py``; figures
in docs/export.md). TensorRT accepts only symmetric activations (zero point 0):
on a Jetson, run ``onnx`` (float) through TensorRT instead.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from capsedge.errors import ModelError
from capsedge.export.quantization import Quantization
from capsedge.metadata import ONNX_METADATA_KEY, ModelMetadata, sidecar_path

#: ONNX opset of the exported graph.
OPSET = 17
INPUT_NAME = "image"


@contextlib.contextmanager
def _quiet_logger(name: str) -> Iterator[None]:
    """Keep only errors from a library's logger while converting.

    (tf2onnx logs every optimizer it cannot apply with a traceback: its einsum
    optimizer rejects equations with an ellipsis, which the capsule routing uses;
    the ``Einsum`` node then stays as it is, which onnxruntime runs.)
    """
    logger = logging.getLogger(name if name != "root" else None)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def convert_to_onnx(model: Any, opset: int = OPSET) -> Any:
    """Convert a Keras model with one ``(None, H, W, C)`` input to an ``onnx.ModelProto``."""
    import tensorflow as tf
    import tf2onnx

    if len(model.inputs) != 1:
        raise ModelError(f"expected a model with one input, got {len(model.inputs)}")
    shape = (1, *model.inputs[0].shape[1:])
    signature = (tf.TensorSpec(shape, tf.float32, name=INPUT_NAME),)
    with _quiet_logger("tf2onnx"):
        proto, _ = tf2onnx.convert.from_keras(model, input_signature=signature, opset=opset)
    return proto


def translate_tflite_int8(model: Any, calibration: Callable[[], Iterable[np.ndarray]],
                          opset: int = OPSET) -> Any:
    """The full-integer TFLite conversion of ``model`` (float input and output), translated to
    an ``onnx.ModelProto`` in QDQ form (:func:`tflite_to_onnx`)."""
    from capsedge.export.converter import keras_to_tflite

    return tflite_to_onnx(keras_to_tflite(model, "int8", calibration, float_io=True, keep_names=True), opset)


def tflite_to_onnx(flatbuffer: bytes, opset: int = OPSET) -> Any:
    """A TFLite flatbuffer with its tensor names, translated by tf2onnx to an ``onnx.ModelProto``
    whose input is named ``image``."""
    import tf2onnx

    with tempfile.TemporaryDirectory(prefix="capsedge-onnx-") as work:
        source = Path(work) / "int8.tflite"
        source.write_bytes(flatbuffer)
        with (_quiet_logger("tf2onnx"), contextlib.redirect_stdout(io.StringIO()),
              warnings.catch_warnings()):
            warnings.simplefilter("ignore")  # tf2onnx reads shapes with tf.lite.Interpreter, which warns
            proto, _ = tf2onnx.convert.from_tflite(str(source), opset=opset)
    _rename_input(proto, INPUT_NAME)
    return proto


def _rename_input(proto: Any, name: str) -> None:
    old = proto.graph.input[0].name
    proto.graph.input[0].name = name
    for node in proto.graph.node:
        node.input[:] = [name if value == old else value for value in node.input]


def embed_in_onnx(model: Any, metadata: ModelMetadata) -> None:
    """Store the metadata in ``model.metadata_props`` (replacing an earlier entry)."""
    kept = [p for p in model.metadata_props if p.key != ONNX_METADATA_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    entry = model.metadata_props.add()
    entry.key, entry.value = ONNX_METADATA_KEY, metadata.to_json()
    model.doc_string = f"capsedge {metadata.name} {metadata.version}"


def export_onnx(
    model: Any,
    path: str | Path,
    metadata: ModelMetadata,
    *,
    quantization: Quantization | None = None,
) -> Path:
    """Write ``model`` as an ``.onnx`` file with its metadata embedded and in a sidecar JSON.

    Args:
        model: a Keras classifier with one image input.
        path: the file to write.
        metadata: labels, preprocessing, version and provenance to store.
        quantization: float32 (default) or int8 (QDQ, translated from the TFLite int8 file); other
            modes are refused.

    Returns:
        The path written.
    """

    quantization = quantization or Quantization.for_float32()
    if quantization.mode not in ("float32", "int8"):
        raise ValueError(f"ONNX export supports float32 and int8, got {quantization.mode!r}")
    if quantization.mode == "int8":
        proto = translate_tflite_int8(model, quantization.calibration)
    else:
        proto = convert_to_onnx(model)
    return save_onnx(proto, Path(path), metadata)


def save_onnx(proto: Any, path: Path, metadata: ModelMetadata) -> Path:
    """Embed ``metadata`` in ``proto`` (replacing any), check it, and write it and its sidecar."""
    import onnx

    embed_in_onnx(proto, metadata)
    onnx.checker.check_model(proto)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, path)
    sidecar_path(path).write_text(metadata.to_json() + "\n", encoding="utf-8")
    return path
