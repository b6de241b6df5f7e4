"""What an exported file holds: its operations, tensors, input shape and stored constants.

Read without running the model (LiteRT's op list, the ONNX graph, the flatbuffer's buffers).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from capsedge.backends import native_stderr_silenced

#: Operations no artifact may contain: loops and control flow, and TensorFlow ops
#: that need the Flex (select-TF) delegate or a custom kernel.
FORBIDDEN_TFLITE = frozenset({"WHILE", "IF", "CALL_ONCE", "CUSTOM", "DELEGATE"})
FORBIDDEN_ONNX = frozenset({"Loop", "Scan", "If", "SequenceMap"})


def tflite_graph(path: str | Path) -> tuple[list[dict[str, Any]], dict[int, dict[str, Any]], list[int]]:
    """The operations (in execution order), tensors and input indices of a ``.tflite`` file.

    The interpreter is built without its default delegate, which would otherwise
    replace most operations by one ``DELEGATE`` node.
    """
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    with native_stderr_silenced():
        interpreter = Interpreter(
            model_path=str(path),
            experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
        )
    ops = interpreter._get_ops_details()  # the only API that lists a model's operations
    tensors = {t["index"]: t for t in interpreter.get_tensor_details()}
    return ops, tensors, [d["index"] for d in interpreter.get_input_details()]


def tflite_input(path: str | Path) -> list[int]:
    """The input's shape signature (-1 for a dynamic dimension)."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    with native_stderr_silenced():
        interpreter = Interpreter(
            model_path=str(path),
            experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
        )
    (detail,) = interpreter.get_input_details()
    return [int(d) for d in detail.get("shape_signature", detail["shape"])]


def onnx_nodes(graph: Any) -> list[Any]:
    """Every node of an ONNX graph, those in subgraphs (If/Loop/Scan bodies) included."""
    import onnx

    nodes = []
    for node in graph.node:
        nodes.append(node)
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                nodes.extend(onnx_nodes(attribute.g))
            elif attribute.type == onnx.AttributeProto.GRAPHS:
                for subgraph in attribute.graphs:
                    nodes.extend(onnx_nodes(subgraph))
    return nodes


def onnx_input(path: str | Path) -> list[int]:
    """The input's shape (-1 for a symbolic or unknown dimension)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    initializers = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    dims = inputs[0].type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else -1 for d in dims]


def op_counts(path: str | Path) -> Counter[str]:
    """How many of each operation a ``.tflite`` or ``.onnx`` model holds (ONNX: subgraphs too)."""
    if Path(path).suffix.lower() == ".onnx":
        import onnx

        model = onnx.load(str(path), load_external_data=False)
        return Counter(
            n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}"
            for n in onnx_nodes(model.graph)
        )
    ops, _, _ = tflite_graph(path)
    return Counter(op["op_name"] for op in ops)


def forbidden_ops(counts: Counter[str], suffix: str) -> list[str]:
    """The operations of ``counts`` that no artifact may hold."""
    if suffix == ".onnx":
        return sorted(op for op in counts if op in FORBIDDEN_ONNX or "." in op)
    return sorted(op for op in counts if op in FORBIDDEN_TFLITE or op.upper().startswith("FLEX"))


def input_shape(path: str | Path) -> list[int]:
    """The model input's shape, -1 where it is not fixed."""
    return onnx_input(path) if Path(path).suffix.lower() == ".onnx" else tflite_input(path)


def constant_bytes(path: str | Path) -> int:
    """Bytes of a model's stored constants (weights, biases, folded tensors), graph excluded.

    Beside the file size this shows where an int8 file's bytes go: a small network with an
    unrolled recurrent head is mostly graph (operators, tensors, quantization parameters).
    """
    if Path(path).suffix.lower() == ".onnx":
        import onnx
        from onnx import numpy_helper

        graph = onnx.load(str(path)).graph
        return int(sum(numpy_helper.to_array(t).nbytes for t in graph.initializer))
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model(str(path))
    return int(sum(len(b.data) for b in model.buffers if b.data is not None))
