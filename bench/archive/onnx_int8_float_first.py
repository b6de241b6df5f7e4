"""ONNX Runtime's static int8 quantization against float ONNX, the first convolutions float.

Quantizes a float ``.onnx`` export (as ``capsedge export --formats onnx`` writes it) the way
the ``onnx-int8`` format did in 0.2-0.5 (before it became the translation of the TFLite int8
file, ``bench/onnx_from_tflite_int8.py``): QuantizeLinear/DequantizeLinear pairs around the
convolutions, symmetric int8 activations and per-channel weights, ranges from the 99.999th
percentile, keeping the first K convolutions float for each K asked. Prints each variant's
top-1 agreement with the float file on every image of the data folder (calibrated on 16 of
them, evenly spaced: onnxruntime's percentile calibrator keeps every calibrated tensor of
every image in memory, about 100 MB per image at 512x512, so few images fit).

Usage:
    python bench/archive/onnx_int8_float_first.py --onnx exported/effcaps_ncp_lite0_512_onnx.onnx \\
        [--data DIR] [--keep 0,2,4]
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: common
import common  # noqa: E402

#: Operator types quantized to int8.
QUANTIZED_OP_TYPES = ("Conv",)


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


def quantize_qdq(float_model: Any, calibration: Callable[[], Iterable[np.ndarray]], float_first: int) -> Any:
    """int8 QDQ model from a float ``onnx.ModelProto``: symmetric activations, per-channel weights;
    the first ``float_first`` convolutions stay float."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    with tempfile.TemporaryDirectory(prefix="capsedge-onnx-") as work:
        source, target = Path(work) / "float.onnx", Path(work) / "int8.onnx"
        onnx.save(float_model, source)
        convolutions = [node.name for node in float_model.graph.node if node.op_type in QUANTIZED_OP_TYPES]
        logging.getLogger().setLevel(logging.ERROR)
        with contextlib.redirect_stdout(io.StringIO()):
            quantize_static(
                str(source), str(target),
                _CalibrationReader(float_model.graph.input[0].name, calibration),
                quant_format=QuantFormat.QDQ, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                per_channel=True, op_types_to_quantize=list(QUANTIZED_OP_TYPES),
                nodes_to_exclude=convolutions[:float_first], calibrate_method=CalibrationMethod.Percentile,
                extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
            )
        return onnx.load(target)


def main() -> None:
    parser = common.parser(__doc__, out=False)
    parser.add_argument("--onnx", type=Path, required=True, help="a float .onnx export")
    parser.add_argument("--keep", default="0,2,4", help="comma-separated counts of float first convolutions")
    args = parser.parse_args()

    import onnx

    from capsedge.backends import OnnxBackend
    from capsedge.folders import image_files
    from capsedge.metadata import read_metadata
    from capsedge.preprocess import preprocess

    config = read_metadata(args.onnx).preprocessing
    classes = len(read_metadata(args.onnx).labels)
    images = [preprocess(path, config) for path in sorted(image_files(common.data_folder(args)))]
    calibration = images[:: max(1, len(images) // 16)][:16]

    def answers(path: Path) -> np.ndarray:
        backend = OnnxBackend(path)
        return np.array([backend.run(image[np.newaxis])[:classes].argmax() for image in images])

    reference = answers(args.onnx)
    float_model = onnx.load(str(args.onnx))
    for keep in (int(k) for k in args.keep.split(",")):
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="capsedge-bench-") as folder:
            path = Path(folder) / "int8.onnx"
            onnx.save(quantize_qdq(float_model, lambda: iter(calibration), float_first=keep), str(path))
            agreement = float(np.mean(answers(path) == reference))
        print(json.dumps({"float_first_convolutions": keep, "images": len(images), "agreement": agreement,
                          "seconds": round(time.perf_counter() - start)}), flush=True)


if __name__ == "__main__":
    main()
