"""onnx-int8 against float ONNX when the first convolutions stay float: top-1 agreement.

Quantizes a float ``.onnx`` export (as ``capsedge export --formats onnx`` writes it) the way
the ``onnx-int8`` format does, keeping the first K convolutions float for each K asked,
and prints each variant's top-1 agreement with the float file on every image of the
data folder (calibrated on 16 of them, evenly spaced).

Usage:
    python bench/onnx_int8_float_first.py --onnx exported/effcaps_ncp_lite0_512_onnx.onnx \\
        [--data DIR] [--keep 0,2,4]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "shoulder-implants"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--onnx", type=Path, required=True, help="a float .onnx export")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--keep", default="0,2,4", help="comma-separated counts of float first convolutions")
    args = parser.parse_args()

    import onnx

    from capsedge.backends import OnnxBackend
    from capsedge.export.onnx_format import quantize_qdq
    from capsedge.folders import image_files
    from capsedge.metadata import read_metadata
    from capsedge.preprocess import preprocess

    config = read_metadata(args.onnx).preprocessing
    classes = len(read_metadata(args.onnx).labels)
    images = [preprocess(path, config) for path in sorted(image_files(args.data))]
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
