"""Where the int8 model departs from the float one, for the README's export section.

For a run folder, over every image of a data folder (calibrated, like
`python export/quantize.py`, on 200 of them):

1. top-1 agreement of the int8 TFLite classifier with the float TFLite one, the
   images whose answer flips and their float top-two margins;
2. the same agreement for each head converted on its own (`caps_probs`,
   `ncp_probs`);
3. what the two files are made of: operations, tensors, constant bytes, the
   rest of the graph, and the bytes of the quantization parameters;
4. TensorFlow's quantization debugger: each operation's int8 error as an RMSE
   in quantization steps (about 0.29 for pure rounding), the largest first;
5. with `--compare OLD.tflite`, the largest probability difference and the
   agreement between an earlier float file and the float file of this run.

Usage:
    python bench/int8_report.py --run RUN_DIR [--data DIR] [--compare OLD.tflite]

Prints only; writes nothing.
"""

from __future__ import annotations

import copy
from pathlib import Path

import common
import numpy as np


def runner(flatbuffer: bytes):  # noqa: ANN201 - a function of one image
    """Run a batch-1 TFLite model on float images, (de)quantizing where the file is int8."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=flatbuffer, num_threads=1)
    interpreter.allocate_tensors()
    source = interpreter.get_input_details()[0]
    outputs = interpreter.get_output_details()

    def run(image: np.ndarray) -> list[np.ndarray]:
        x = image[None]
        if source["dtype"] != np.float32:
            scale, zero = source["quantization"]
            x = np.clip(np.round(x / scale + zero), -128, 127).astype(source["dtype"])
        interpreter.set_tensor(source["index"], x)
        interpreter.invoke()
        results = []
        for out in outputs:
            y = interpreter.get_tensor(out["index"])[0].astype(np.float32)
            if out["dtype"] != np.float32:
                scale, zero = out["quantization"]
                y = (y - zero) * scale
            results.append(y)
        return results

    return run


def probabilities(flatbuffer: bytes, images: np.ndarray) -> np.ndarray:
    run = runner(flatbuffer)
    return np.stack([run(image)[0] for image in images])


def composition(flatbuffer: bytes) -> dict[str, int]:
    """Operations, tensors and where the bytes of a TFLite flatbuffer go."""
    import flatbuffers
    from tensorflow.lite.python import schema_py_generated as schema

    def packed(model: object) -> int:
        builder = flatbuffers.Builder(1024)
        builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
        return len(builder.Output())

    model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(flatbuffer, 0))
    graph = model.subgraphs[0]
    without_data = copy.deepcopy(model)
    for buffer in without_data.buffers:
        buffer.data = None
    without_quantization = copy.deepcopy(model)
    for tensor in without_quantization.subgraphs[0].tensors:
        tensor.quantization = None
    return {
        "bytes": len(flatbuffer),
        "operations": len(graph.operators),
        "tensors": len(graph.tensors),
        "constant_bytes": sum(len(b.data) for b in model.buffers if b.data is not None),
        "graph_bytes": packed(without_data),
        "quantization_bytes": packed(model) - packed(without_quantization),
    }


def debugger_errors(model: object, calibration: object) -> list[tuple[float, str, str]]:
    """(RMSE in quantization steps, op, tensor) for every quantized op, largest first."""
    import csv
    import io
    import tempfile

    import tensorflow as tf

    from capsedge.export.converter import set_full_integer, write_saved_model

    with tempfile.TemporaryDirectory() as saved_model:
        write_saved_model(model, saved_model)
        converter = tf.lite.TFLiteConverter.from_saved_model(saved_model)
        dataset = set_full_integer(converter, calibration)
        debugger = tf.lite.experimental.QuantizationDebugger(converter=converter, debug_dataset=dataset)
        debugger.run()
    table = io.StringIO()
    debugger.layer_statistics_dump(table)
    table.seek(0)
    rows = [row for row in csv.DictReader(table) if row["scale"] and float(row["scale"]) > 0]
    errors = [(float(r["mean_squared_error"]) ** 0.5 / float(r["scale"]), r["op_name"], r["tensor_name"])
              for r in rows]
    return sorted(errors, reverse=True)


def main() -> None:
    parser = common.parser(__doc__, out=False)
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--compare", type=Path)
    args = parser.parse_args()
    data = common.data_folder(args)

    import keras

    from capsedge.export.calibration import calibration_files, calibration_images
    from capsedge.export.quantization import Quantization
    from capsedge.export.run import load_run
    from capsedge.export.tflite_format import convert_to_tflite
    from capsedge.preprocess import preprocess
    from capsedge.workshop.dataset import ImageCache

    run = load_run(args.run)
    files = sorted(calibration_files(data))
    images = np.stack([preprocess(path, run.preprocessing) for path in files])
    int8 = Quantization.for_int8(calibration_images(data, ImageCache(run.preprocessing)))
    float32 = Quantization.for_float32()

    float_file = convert_to_tflite(run.classifier, float32)
    int8_file = convert_to_tflite(run.classifier, int8)
    reference, quantized = probabilities(float_file, images), probabilities(int8_file, images)
    top_two = np.sort(reference, axis=1)[:, -2:]
    margins = top_two[:, 1] - top_two[:, 0]
    flipped = reference.argmax(1) != quantized.argmax(1)
    print(f"images: {len(images)}")
    print(f"int8 agreement: {1 - flipped.mean():.2%} ({flipped.sum()} flips), "
          f"largest probability difference {np.abs(reference - quantized).max():.3f}")
    print(f"float top-two margin of the flipped images: at most {margins[flipped].max():.4f}"
          if flipped.any() else "no flips")
    print(f"images with a float top-two margin under 0.01: {(margins < 0.01).sum()}")

    for head in ("caps_probs", "ncp_probs"):
        if head not in {layer.name for layer in run.classifier.layers}:
            continue
        model = keras.Model(run.classifier.input, run.classifier.get_layer(head).output)
        a = probabilities(convert_to_tflite(model, float32), images)
        b = probabilities(convert_to_tflite(model, int8), images)
        print(f"{head} alone, int8 agreement: {(a.argmax(1) == b.argmax(1)).mean():.2%}")

    for name, flatbuffer in (("float32", float_file), ("int8", int8_file)):
        parts = composition(flatbuffer)
        print(f"{name}: " + ", ".join(f"{key} {value}" for key, value in parts.items()))

    errors = debugger_errors(run.classifier, int8.calibration)
    print(f"quantization debugger, {len(errors)} ops: median RMSE {np.median([e[0] for e in errors]):.2f} "
          "steps; largest: " + "; ".join(f"{op} {rmse:.2f} ({tensor.split('/')[1]})"
                                          for rmse, op, tensor in errors[:3]))

    if args.compare is not None:
        earlier = probabilities(args.compare.read_bytes(), images)
        print(f"{args.compare.name} vs this run's float file: largest difference "
              f"{np.abs(earlier - reference).max():.2g}, agreement "
              f"{(earlier.argmax(1) == reference.argmax(1)).mean():.2%}")


if __name__ == "__main__":
    common.quietly(main)
