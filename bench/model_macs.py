"""Multiply-accumulates per inference of a .tflite model, from its convolution and dense layers.

The figure that scales a published latency of another network to this one (README,
"Devices": the Raspberry Pi estimate)::

    python bench/model_macs.py                      # the bundled model
    python bench/model_macs.py --model other.tflite [--out DIR]   # also OUT/model_macs.json

Counts CONV_2D, DEPTHWISE_CONV_2D, FULLY_CONNECTED and BATCH_MATMUL, which hold all but a
negligible share of the arithmetic of a convolutional network.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import common
import numpy as np
from ai_edge_litert.interpreter import Interpreter, OpResolverType

from capsedge.classifier import default_model_path


def count_macs(model: Path) -> Counter[str]:
    """Multiply-accumulates of one inference, by operator."""
    # Without the default delegate, so that every operator is listed as itself.
    interpreter = Interpreter(model_path=str(model),
                              experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    interpreter.allocate_tensors()
    shapes = {t["index"]: tuple(int(n) for n in t["shape"]) for t in interpreter.get_tensor_details()}
    macs: Counter[str] = Counter()
    for op in interpreter._get_ops_details():  # the public API lists tensors, not operators
        name, inputs = op["op_name"], [shapes[i] for i in op["inputs"] if i >= 0]
        outputs = int(np.prod(shapes[op["outputs"][0]]))
        if name == "CONV_2D":  # weights (out, kh, kw, in)
            macs[name] += outputs * int(np.prod(inputs[1][1:]))
        elif name == "DEPTHWISE_CONV_2D":  # weights (1, kh, kw, channels)
            macs[name] += outputs * inputs[1][1] * inputs[1][2]
        elif name in ("FULLY_CONNECTED", "BATCH_MATMUL"):
            macs[name] += outputs * inputs[0][-1]
    return macs


def main() -> None:
    parser = common.parser(__doc__, data=False)
    parser.add_argument("--model", type=Path, default=None, help="A .tflite file (default: the bundled one).")
    args = parser.parse_args()
    model = args.model or default_model_path()
    macs = count_macs(model)
    for name, count in macs.most_common():
        print(f"{name:18s} {count / 1e6:10.1f} M")
    total = sum(macs.values()) / 1e6
    print(f"{'total':18s} {total:10.1f} M multiply-accumulates per inference ({model.name})")
    common.save_json(args, "model_macs.json", {"model": model.name, "macs": dict(macs.most_common())})


if __name__ == "__main__":
    main()
