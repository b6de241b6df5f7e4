"""Where a full-integer int8 file loses its answers: parts of the network kept float, one at a time.

For a fold of `capsedge train --folds K`, converts the fold's classifier to int8 (calibrated
as `bench/heldout_int8.py` does, on up to 200 of its training images) with TensorFlow's
quantization debugger leaving chosen operations float (`denylisted_nodes`), and prints each
variant's top-1 agreement with the float model and accuracy on the fold's held-out images,
one view and the average of the four flips. Operations are chosen by the Lite0 trunk's layer
names: the stem, `lite0_blockN_*`, and everything after the frozen stages.

Usage:
    python bench/archive/int8_where.py --fold runs/cv512f5/fold-0 [--data DIR] [--frozen-blocks 10]
"""

from __future__ import annotations

import re
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: common
import common  # noqa: E402


def block_of(name: str) -> int | None:
    """The trunk block an operation belongs to (-1 for the stem and input scaling), else None."""
    if "lite0_stem" in name or "input_normalization" in name:
        return -1
    found = re.search(r"lite0_block(\d+)_", name)
    return int(found.group(1)) if found else None


def main() -> None:
    parser = common.parser(__doc__, out=False)
    parser.add_argument("--fold", type=Path, required=True)
    parser.add_argument("--frozen-blocks", type=int, default=10,
                        help="the last block of the frozen trunk (10: --freeze-stages 5)")
    args = parser.parse_args()

    import tensorflow as tf

    from capsedge.backends import LiteRTBackend
    from capsedge.export.converter import set_full_integer, write_saved_model
    from capsedge.export.run import load_run
    from capsedge.preprocess import preprocess
    from capsedge.train.trainer import calibration_indices
    from capsedge.views import orientations
    from capsedge.workshop.dataset import read_dataset

    trained = load_run(args.fold)
    dataset = read_dataset(common.data_folder(args))
    held = np.load(args.fold / "holdout_indices.npy")
    training = np.setdiff1d(np.arange(len(dataset.paths)), held)
    calibration = [preprocess(dataset.paths[i], trained.preprocessing) for i in calibration_indices(training)]
    images = [preprocess(dataset.paths[i], trained.preprocessing) for i in held]
    truth = dataset.targets[held]
    float_views = np.load(args.fold / "holdout_probabilities_views.npy")
    classes = float_views.shape[2]

    def convert(folder: str, denylist: list[str] | None) -> bytes:
        converter = tf.lite.TFLiteConverter.from_saved_model(folder)
        representative = set_full_integer(converter, lambda: iter(calibration))
        if denylist is None:
            return converter.convert()
        options = tf.lite.experimental.QuantizationDebugOptions(denylisted_nodes=denylist)
        debugger = tf.lite.experimental.QuantizationDebugger(
            converter=converter, debug_dataset=representative, debug_options=options)
        return debugger.get_nondebug_quantized_model()

    def score(flatbuffer: bytes) -> str:
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "m.tflite"
            path.write_bytes(flatbuffer)
            backend = LiteRTBackend(path)
            views = np.array([[backend.run(v[np.newaxis])[:classes] for v in orientations(image, 4)]
                              for image in images])
        parts = []
        for n in (1, 4):
            answers, reference = views[:, :n].mean(1).argmax(1), float_views[:, :n].mean(1).argmax(1)
            parts.append(f"{n} view{'s' if n > 1 else ''}: agreement {np.mean(answers == reference):.1%}, "
                         f"accuracy {np.mean(answers == truth):.1%}")
        return "; ".join(parts)

    with tempfile.TemporaryDirectory(prefix="capsedge-where-") as saved_model:
        write_saved_model(trained.classifier, saved_model)
        plain = convert(saved_model, None)
        interpreter = tf.lite.Interpreter(model_content=plain)
        names = {t["index"]: t["name"] for t in interpreter.get_tensor_details()}
        operations = [(op["op_name"], [names[i] for i in op["outputs"]])
                      for op in interpreter._get_ops_details()]  # noqa: SLF001 - the only listing of op outputs

        def outputs(chosen: Callable[[int | None], bool]) -> list[str]:
            return [name for kind, out in operations if kind not in ("QUANTIZE", "DEQUANTIZE")
                    for name in out if chosen(block_of(name))]

        last = args.frozen_blocks
        variants: dict[str, list[str] | None] = {
            "all int8": None,
            "stem and block 0 float": outputs(lambda b: b is not None and b <= 0),
            "stem to block 2 float": outputs(lambda b: b is not None and b <= 2),
            "stem to block 4 float": outputs(lambda b: b is not None and b <= 4),
            f"blocks 5-{last} float": outputs(lambda b: b is not None and 5 <= b <= last),
            f"frozen trunk (stem to block {last}) float": outputs(lambda b: b is not None and b <= last),
            "everything above the frozen trunk float": outputs(lambda b: b is None or b > last),
        }
        print(f"{args.fold}: {len(images)} held-out images, float accuracy "
              f"{np.mean(float_views[:, 0].argmax(1) == truth):.1%} (1 view), "
              f"{np.mean(float_views[:, :4].mean(1).argmax(1) == truth):.1%} (4 views)")
        for name, denylist in variants.items():
            flatbuffer = plain if denylist is None else convert(saved_model, denylist)
            print(f"{name}: {score(flatbuffer)}", flush=True)


if __name__ == "__main__":
    main()
