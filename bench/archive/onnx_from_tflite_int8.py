"""ONNX int8 translated from the full-integer TFLite file, against the float model.

capsedge's `onnx-int8` export quantizes the float ONNX graph with ONNX Runtime (symmetric
QDQ, for TensorRT). This measures another route: convert the run to the same full-integer
TFLite file as `tflite-int8` but with float input and output (tensor names kept, which
tf2onnx needs), translate it with tf2onnx (its int8 scales and zero points become
QuantizeLinear/DequantizeLinear pairs), and run it with ONNX Runtime on the CPU. Prints
top-1 agreement with the Keras model and with the TFLite int8 file over the images, and the
median ONNX Runtime latency (one thread).

Usage:
    python bench/archive/onnx_from_tflite_int8.py --run runs/cv512q5/final [--data DIR] [--limit N]
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: common
import common  # noqa: E402


def main() -> None:
    parser = common.parser(__doc__, out=False)
    parser.add_argument("--run", type=Path, required=True, help="a capsedge train run folder")
    parser.add_argument("--limit", type=int, default=None, help="first N images only")
    args = parser.parse_args()

    import onnxruntime as ort
    from ai_edge_litert.interpreter import Interpreter

    from capsedge.export.calibration import calibration_images
    from capsedge.export.converter import keras_to_tflite
    from capsedge.export.onnx_format import tflite_to_onnx
    from capsedge.export.run import load_run
    from capsedge.folders import image_files
    from capsedge.preprocess import preprocess
    from capsedge.workshop.dataset import ImageCache

    run = load_run(args.run)
    files = image_files(common.data_folder(args))[: args.limit]
    images = np.array([preprocess(path, run.preprocessing) for path in files])
    reference = run.classifier.predict(images, batch_size=16, verbose=0).argmax(axis=1)
    # the export's onnx-int8 route (capsedge.export.onnx_format.translate_tflite_int8), keeping
    # the TFLite file it translates to run beside it
    calibration = calibration_images(common.data_folder(args), ImageCache(run.preprocessing))
    flatbuffer = keras_to_tflite(run.classifier, "int8", calibration,
                                 float_io=True, keep_names=True)
    interpreter = Interpreter(model_content=flatbuffer)
    interpreter.allocate_tensors()
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(tflite_to_onnx(flatbuffer).SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    tflite_in, tflite_out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    onnx_input = session.get_inputs()[0].name
    onnx_answers, tflite_answers, latencies = [], [], []
    for image in images:
        batch = image[np.newaxis].astype(np.float32)
        start = time.perf_counter()
        (onnx_output,) = session.run(None, {onnx_input: batch})
        latencies.append(time.perf_counter() - start)
        interpreter.set_tensor(tflite_in["index"], batch)
        interpreter.invoke()
        onnx_answers.append(int(np.argmax(onnx_output)))
        tflite_answers.append(int(np.argmax(interpreter.get_tensor(tflite_out["index"]))))
    onnx_answers, tflite_answers = np.array(onnx_answers), np.array(tflite_answers)
    print(json.dumps({
        "images": len(files),
        "onnx_input_type": session.get_inputs()[0].type,
        "onnx_agreement_with_keras": round(float(np.mean(onnx_answers == reference)), 4),
        "tflite_int8_agreement_with_keras": round(float(np.mean(tflite_answers == reference)), 4),
        "onnx_agreement_with_tflite_int8": round(float(np.mean(onnx_answers == tflite_answers)), 4),
        "onnx_median_ms_one_thread": round(1000 * float(np.median(latencies)), 2),
    }, indent=2))


if __name__ == "__main__":
    main()
