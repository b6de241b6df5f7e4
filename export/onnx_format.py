"""Keras classifier to ``.onnx``: float32 (tf2onnx), or int8 in QDQ form (onnxruntime).

The float model comes from ``tf2onnx.convert.from_keras`` with a static
``(1, H, W, C)`` input named ``image``, so the recurrent head stays unrolled
(no ``Loop``). The int8 model is that float model passed through
``onnxruntime.quantization.quantize_static``: QuantizeLinear/DequantizeLinear
pairs around the convolutions (88 % of the implant model's parameters),
symmetric int8 activations and symmetric per-channel int8 weights, ranges from
the 99.999th percentile of real preprocessed calibration images. It still takes
and returns float32.

Why only the convolutions, and why percentiles: on the 95 held-out implant
images (effcaps_ncp_implant_128), quantizing every op with min-max ranges
agreed with Keras on 83 % of top-1 answers and gave a file 1.9x the float one
(a Q/DQ pair per tensor of the 16 unrolled NCP steps); min-max ranges on the
convolutions alone, 88 %; percentile ranges on every op, 96 %; percentile
ranges on the convolutions and Gemms, 100 % but 1.3x the float file;
percentile ranges on the convolutions alone, 100 % at 0.65x.

The first two convolutions (the stem and, in EfficientNet-Lite0, block 0's
depthwise one) stay float: they see the raw image, and the int8 errors there
carry through the whole trunk. On the bundled 512 px model that took top-1
agreement with the float ONNX file, over the 477 development images, from
81.6 % to 93.9 % (``python bench/onnx_int8_float_first.py``; figures in
docs/export.md).

onnxruntime's percentile calibrator keeps every calibrated tensor of every
image in memory before it builds its histograms (about 100 MB per image for a
512x512 Lite0 network: 200 images took 20 GB and the process was killed), so
the images are thinned, evenly, to what fits in ``CALIBRATION_MEMORY_BYTES``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
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
#: Operator types quantized to int8 (see the module docstring for why only these).
QUANTIZED_OP_TYPES = ("Conv",)
#: The first convolutions, in graph order, that stay float (see the module docstring).
FLOAT_FIRST_CONVOLUTIONS = 2
#: Memory the int8 calibration may fill with activations (see the module docstring).
CALIBRATION_MEMORY_BYTES = 4 * 1024**3


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


def activation_bytes(float_model: Any) -> int:
    """Bytes of the float32 activations the calibrator keeps per image: those into and out of
    the quantized operators (batch 1)."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(float_model)
    calibrated = {name for node in inferred.graph.node if node.op_type in QUANTIZED_OP_TYPES
                  for name in (*node.input, *node.output)}
    total = 0
    for value in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        tensor = value.type.tensor_type
        if value.name not in calibrated or tensor.elem_type != onnx.TensorProto.FLOAT:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else 1 for d in tensor.shape.dim]
        total += 4 * int(np.prod(dims, dtype=np.int64))
    return total


def calibration_count(float_model: Any, available: int) -> int:
    """How many of ``available`` calibration images fit in ``CALIBRATION_MEMORY_BYTES`` (at least 8)."""
    per_image = max(1, activation_bytes(float_model))
    return max(1, min(available, max(8, CALIBRATION_MEMORY_BYTES // per_image)))


def thin_evenly(images: list[np.ndarray], count: int) -> list[np.ndarray]:
    """``count`` of ``images``, evenly spaced from the first to the last (all when fewer)."""
    if count >= len(images):
        return images
    return [images[i] for i in np.linspace(0, len(images) - 1, count).round().astype(int)]


class _CalibrationReader:
    """Feeds preprocessed images to onnxruntime's calibrator, one batch of one at a time."""

    def __init__(self, input_name: str, images: Callable[[], Iterable[np.ndarray]]) -> None:
        self._input_name = input_name
        self._images = images
        self._iterator: Iterator[np.ndarray] | None = None

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._iterator is None:
            self._iterator = iter(self._images())
        image = next(self._iterator, None)
        if image is None:
            return None
        return {self._input_name: np.asarray(image, np.float32)[np.newaxis]}

    def rewind(self) -> None:
        self._iterator = None


def quantize_qdq(float_model: Any, calibration: Callable[[], Iterable[np.ndarray]],
                 float_first: int = FLOAT_FIRST_CONVOLUTIONS) -> Any:
    """int8 QDQ model from a float ``onnx.ModelProto``: symmetric activations, per-channel weights;
    the first ``float_first`` convolutions stay float.

    onnxruntime's calibrator logs its progress with ``print`` and ``logging``; neither is kept.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    with tempfile.TemporaryDirectory(prefix="capsedge-onnx-") as work:
        source, target = Path(work) / "float.onnx", Path(work) / "int8.onnx"
        onnx.save(float_model, source)
        images = list(calibration())
        images = thin_evenly(images, calibration_count(float_model, len(images)))
        convolutions = [node.name for node in float_model.graph.node if node.op_type in QUANTIZED_OP_TYPES]
        with contextlib.redirect_stdout(io.StringIO()), _quiet_logger("root"):
            quantize_static(
                str(source),
                str(target),
                _CalibrationReader(float_model.graph.input[0].name, lambda: iter(images)),
                quant_format=QuantFormat.QDQ,
                activation_type=QuantType.QInt8,
                weight_type=QuantType.QInt8,
                per_channel=True,
                op_types_to_quantize=list(QUANTIZED_OP_TYPES),
                nodes_to_exclude=convolutions[:float_first],
                calibrate_method=CalibrationMethod.Percentile,
                extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
            )
        return onnx.load(target)


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
        quantization: float32 (default) or int8 (QDQ); other modes are refused.

    Returns:
        The path written.
    """
    import onnx

    quantization = quantization or Quantization.for_float32()
    if quantization.mode not in ("float32", "int8"):
        raise ValueError(f"ONNX export supports float32 and int8, got {quantization.mode!r}")
    proto = convert_to_onnx(model)
    if quantization.mode == "int8":
        proto = quantize_qdq(proto, quantization.calibration)
    embed_in_onnx(proto, metadata)
    onnx.checker.check_model(proto)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, path)
    sidecar_path(path).write_text(metadata.to_json() + "\n", encoding="utf-8")
    return path
