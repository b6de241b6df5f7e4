"""Coral Edge TPU: a full-integer int8 ``.tflite``, compiled when ``edgetpu_compiler`` is installed.

Without the compiler (it runs on x86-64 Linux only), :func:`edgetpu_mapping`
predicts from the int8 model's op list which operations would stay on the
CPU, and why, against Coral's table of supported operations
(https://coral.ai/docs/edgetpu/models-intro/#supported-operations). The
compiler maps one contiguous part of the graph: from the first operation it
cannot run, everything after it runs on the CPU, supported or not.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from capsedge.errors import CapsedgeError
from capsedge.export.graph import tflite_graph
from capsedge.export.quantization import Quantization
from capsedge.export.tflite_format import export_tflite, stamp_tflite
from capsedge.metadata import ModelMetadata

COMPILER = "edgetpu_compiler"

#: TFLite builtin ops the Edge TPU runs (Coral's table, compiler 16), with their limits.
EDGETPU_OPS: dict[str, str] = {
    "ADD": "",
    "AVERAGE_POOL_2D": "no fused activation",
    "CONCATENATION": "no fused activation; a constant input must be all zeros",
    "CONV_2D": "",
    "DEPTHWISE_CONV_2D": "",
    "EXPAND_DIMS": "",
    "FULLY_CONNECTED": "default weight format only",
    "L2_NORMALIZATION": "",
    "LOGISTIC": "",
    "UNIDIRECTIONAL_SEQUENCE_LSTM": "unidirectional only",
    "MAXIMUM": "",
    "MAX_POOL_2D": "no fused activation",
    "MEAN": "reduction along x and/or y only",
    "MINIMUM": "",
    "MUL": "",
    "PACK": "",
    "PAD": "padding along x and/or y only",
    "PRELU": "",
    "QUANTIZE": "",
    "REDUCE_MAX": "",
    "REDUCE_MIN": "",
    "RELU": "",
    "RELU6": "",
    "RELU_N1_TO_1": "",
    "RESHAPE": "",
    "RESIZE_BILINEAR": "3-D input/output",
    "RESIZE_NEAREST_NEIGHBOR": "3-D input/output",
    "RSQRT": "",
    "SLICE": "",
    "SOFTMAX": "1-D input, at most 16,000 elements",
    "SPACE_TO_DEPTH": "",
    "SPLIT": "",
    "SQUARED_DIFFERENCE": "",
    "SQUEEZE": "",
    "STRIDED_SLICE": "",
    "SUB": "",
    "SUM": "",
    "TANH": "",
    "TRANSPOSE": "",
    "TRANSPOSE_CONV": "",
}

#: Why common ops of this project's graphs are not in the table.
WHY_NOT: dict[str, str] = {
    "BATCH_MATMUL": "no batched matrix product (the Edge TPU multiplies in FULLY_CONNECTED, CONV_2D)",
    "DEQUANTIZE": "converts back to float: the op after it runs in float on the CPU",
    "DIV": "no division on the Edge TPU",
    "EXP": "no EXP kernel (only SOFTMAX, LOGISTIC and TANH exponentiate internally)",
    "NEG": "not in the Edge TPU op set",
    "SQRT": "not in the Edge TPU op set (RSQRT is)",
    "SQUARE": "not in the Edge TPU op set (SQUARED_DIFFERENCE and MUL are)",
    "UNPACK": "not in the Edge TPU op set (SPLIT and STRIDED_SLICE are)",
}


@dataclass(frozen=True)
class EdgeTpuMapping:
    """Which operations run on the Edge TPU.

    Attributes:
        source: ``"edgetpu_compiler"`` (its log) or ``"op table"`` (predicted here).
        total_ops: operations in the int8 model.
        on_tpu: operations mapped (or predicted to be mapped) to the Edge TPU.
        on_cpu: operations left to the CPU.
        unsupported: op name -> {"count", "reason"}, for ops the Edge TPU cannot run.
        first_unsupported: ``(index, op name)`` of the first such op in execution order.
        compiled: the compiled ``*_edgetpu.tflite``, when the compiler ran.
        log: the compiler's summary lines, when it ran.
    """

    source: str
    total_ops: int
    on_tpu: int
    on_cpu: int
    unsupported: dict[str, dict[str, Any]] = field(default_factory=dict)
    first_unsupported: tuple[int, str] | None = None
    compiled: str | None = None
    log: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The JSON form."""
        first = self.first_unsupported
        return {
            "source": self.source,
            "total_ops": self.total_ops,
            "on_tpu": self.on_tpu,
            "on_cpu": self.on_cpu,
            "unsupported": self.unsupported,
            "first_unsupported": None if first is None else {"index": first[0], "op": first[1]},
            "compiled": self.compiled,
            "log": self.log,
        }


def compiled_path(path: str | Path) -> Path:
    """Where ``edgetpu_compiler`` writes the compiled model of ``path``."""
    path = Path(path)
    return path.with_name(f"{path.stem}_edgetpu{path.suffix}")


def export_edgetpu(
    model: Any,
    path: str | Path,
    metadata: ModelMetadata,
    *,
    quantization: Quantization | None = None,
) -> Path:
    """Write the full-integer int8 ``.tflite`` for the Edge TPU; compile it if the compiler is here.

    The int8 file itself runs on any CPU (LiteRT) and is what verification measures;
    ``<stem>_edgetpu.tflite`` and its ``.log`` appear beside it when ``edgetpu_compiler``
    is on PATH.

    Returns:
        The int8 model's path.

    Raises:
        CapsedgeError: the compiler is installed but fails.
    """
    if quantization is None or quantization.mode != "int8":
        raise ValueError("the Edge TPU needs int8 quantization with calibration images")
    path = export_tflite(model, path, metadata, quantization=quantization)
    compiler = shutil.which(COMPILER)
    if compiler is not None:
        done = subprocess.run(
            [compiler, "--show_operations", "--out_dir", str(path.parent), str(path)],
            capture_output=True, text=True, check=False,
        )
        if done.returncode != 0:
            last = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise CapsedgeError(f"{COMPILER} failed on {path.name}: {last[0]}")
        compiled = compiled_path(path)
        if compiled.is_file():  # the compiler rewrites the flatbuffer: store the metadata again
            stamp_tflite(compiled, metadata)
    return path


def describe(path: str | Path) -> str:
    """What the ``edgetpu`` export wrote, said plainly for its output line."""
    compiled = compiled_path(path)
    if compiled.is_file():
        return f"the int8 flatbuffer; compiled for the Edge TPU: {compiled}"
    return (f"the full-integer int8 flatbuffer, NOT compiled for the Edge TPU ({COMPILER} is not "
            "installed): it runs on a CPU; compile it to use the TPU")


def edgetpu_mapping(path: str | Path) -> EdgeTpuMapping:
    """How the int8 model at ``path`` maps onto the Edge TPU.

    From the compiler's log when :func:`export_edgetpu` compiled it; otherwise
    predicted from the op list against :data:`EDGETPU_OPS`.
    """
    log = compiled_path(path).with_suffix(".log")
    if log.is_file():
        return _from_compiler_log(log)
    return predict_mapping(path)


def _from_compiler_log(log: Path) -> EdgeTpuMapping:
    """Read the operation log ``edgetpu_compiler`` writes beside the compiled model.

    Its table has one row per op type and status, e.g.
    ``CONV_2D   4   Mapped to Edge TPU`` or ``EXP   2   Operation not supported``.
    """
    text = log.read_text(encoding="utf-8", errors="replace")
    on_tpu = on_cpu = 0
    unsupported: dict[str, dict[str, Any]] = {}
    rows = []
    for line in text.splitlines():
        match = re.match(r"^([A-Z][A-Z0-9_]*)\s+(\d+)\s+(\S.*?)\s*$", line)
        if match is None or match.group(1) == "Operator":
            continue
        name, count, status = match.group(1), int(match.group(2)), match.group(3)
        rows.append(line.strip())
        if status.startswith("Mapped to Edge TPU"):
            on_tpu += count
            continue
        on_cpu += count
        entry = unsupported.setdefault(name, {"count": 0, "reason": status})
        entry["count"] += count
    return EdgeTpuMapping(COMPILER, on_tpu + on_cpu, on_tpu, on_cpu, unsupported=unsupported,
                          compiled=str(log.with_suffix(".tflite")), log="\n".join(rows))


def predict_mapping(path: str | Path) -> EdgeTpuMapping:
    """Predict the mapping of an int8 ``.tflite`` from its operations and tensor types."""

    ops, tensors, inputs = tflite_graph(path)
    # Activations are the model's input and what some op produces; the rest are weights.
    produced = {i for op in ops for i in op["outputs"]} | set(inputs)
    activations = {i: t for i, t in tensors.items() if i in produced}
    unsupported: Counter[str] = Counter()
    reasons: dict[str, str] = {}
    first: tuple[int, str] | None = None
    for index, op in enumerate(ops):
        reason = _unsupported_reason(op, activations)
        if reason is None:
            continue
        unsupported[op["op_name"]] += 1
        reasons.setdefault(op["op_name"], reason)
        if first is None:
            first = (index, op["op_name"])
    on_tpu = len(ops) if first is None else first[0]
    return EdgeTpuMapping(
        source="op table",
        total_ops=len(ops),
        on_tpu=on_tpu,
        on_cpu=len(ops) - on_tpu,
        unsupported={name: {"count": n, "reason": reasons[name]} for name, n in unsupported.most_common()},
        first_unsupported=first,
    )


def _unsupported_reason(op: dict[str, Any], tensors: dict[int, dict[str, Any]]) -> str | None:
    """Why the Edge TPU cannot run ``op``; ``None`` when it can. ``tensors``: the activations."""
    name = op["op_name"]
    if name not in EDGETPU_OPS:
        return WHY_NOT.get(name, "not in the Edge TPU op set")
    activations = [tensors[i] for i in (*op["inputs"], *op["outputs"]) if i in tensors]
    if any(t["dtype"] == np.float32 for t in activations):
        # A float-to-int8 QUANTIZE included: only int8 <-> uint8 requantization maps.
        return "runs in float32 (the converter left it unquantized)"
    if any(t["dtype"] not in (np.int8, np.uint8) for t in activations):
        return "activations are neither int8 nor uint8"
    if any(any(d > 1 for d in t["shape"][:-3]) for t in activations):
        return "only the three innermost dimensions may be larger than 1"
    if name == "SOFTMAX" and activations:
        shape = [d for d in activations[0]["shape"] if d > 1]
        if len(shape) > 1 or (shape and shape[0] > 16_000):
            return "SOFTMAX takes a 1-D input of at most 16,000 elements"
    return None
