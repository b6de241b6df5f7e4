"""Inference backends: each runs one preprocessed batch-1 tensor through a model file.

Every backend takes float32 input and returns float32 class probabilities;
quantization at the model's boundary is handled here, in one place each way.
``.tflite`` files run on LiteRT, ``.onnx`` files on onnxruntime (the ``onnx``
extra); each runtime is imported only when a model of its kind is opened.
"""

from __future__ import annotations

import ctypes
import importlib
import os
import sys
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .errors import ModelError, RuntimeMissingError
from .limits import MAX_MODEL_BYTES
from .model_guard import check_tflite
from .onnx_runtime import onnxruntime_options
from .quiet import native_stderr_silenced


class Backend(Protocol):
    """What the classifier needs from a runtime."""

    name: str

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The model's input shape, batch included."""
        ...

    @property
    def num_outputs(self) -> int:
        """Number of values in the model's output."""
        ...

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Run a float32 ``(1, H, W, C)`` batch; return float32 ``(K,)`` outputs."""
        ...


def is_readable_file(path: Path) -> bool:
    """A regular file this process may open; ``False`` also when the path cannot be examined."""
    try:
        return path.is_file() and os.access(path, os.R_OK)
    except OSError:  # a name too long, a folder we may not search
        return False


def quantize(values: np.ndarray, scale: float, zero_point: int, dtype: np.dtype) -> np.ndarray:
    """Float to integer with the tensor's affine parameters (round half to even, then clip)."""
    info = np.iinfo(dtype)
    quantized = np.round(values / scale) + zero_point
    return np.clip(quantized, info.min, info.max).astype(dtype)


def dequantize(values: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    """Integer to float with the tensor's affine parameters.

    The cast to int32 comes first: subtracting the zero point in int8/uint8
    arithmetic would wrap around.
    """
    return (values.astype(np.int32) - zero_point).astype(np.float32) * np.float32(scale)


def load_litert_interpreter_class() -> Any:
    """The LiteRT ``Interpreter`` class: ``ai_edge_litert``, else legacy ``tflite_runtime``.

    ``tflite_runtime`` 2.14 cannot run models from TensorFlow 2.21 and breaks on
    numpy 2; it is only a fallback for old devices where LiteRT has no wheel.
    """
    for module in ("ai_edge_litert.interpreter", "tflite_runtime.interpreter"):
        try:
            return importlib.import_module(module).Interpreter
        except ImportError:
            continue
    raise RuntimeMissingError(
        "no TFLite runtime is installed; install it with: pip install ai-edge-litert"
    )


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (never its class name: "no details" when empty)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else "no details"


class LiteRTBackend:
    """Runs ``.tflite`` models with LiteRT (``ai_edge_litert``)."""

    name = "litert"

    def __init__(self, model_path: str | Path, threads: int | None = None) -> None:
        """Load the model.

        Args:
            model_path: a ``.tflite`` file.
            threads: CPU threads for the interpreter; ``None`` lets LiteRT choose.

        Raises:
            ModelError: the file is not a model LiteRT can run.
            RuntimeMissingError: no TFLite runtime is installed.
        """
        interpreter_class = load_litert_interpreter_class()
        check_tflite(Path(model_path))  # a corrupt file must not abort the process inside LiteRT
        delegates = self._delegates()
        try:
            with native_stderr_silenced():
                self._interpreter = interpreter_class(
                    model_path=str(model_path), num_threads=threads, experimental_delegates=delegates
                )
                self._interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            reason = first_line(exc)
            raise ModelError(f"not a valid TFLite model ({reason})") from None
        inputs = self._interpreter.get_input_details()
        outputs = self._interpreter.get_output_details()
        if len(inputs) != 1 or len(outputs) != 1:
            raise ModelError(
                f"expected a model with one input and one output, got {len(inputs)} and {len(outputs)}"
            )
        self._input, self._output = inputs[0], outputs[0]

    def _delegates(self) -> list[Any] | None:
        """Hardware delegates to attach; none for the CPU."""
        return None

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The model's input shape, batch included."""
        return tuple(int(d) for d in self._input["shape"])

    @property
    def num_outputs(self) -> int:
        """Number of values in the model's output."""
        return int(np.prod(self._output["shape"]))

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Run a float32 ``(1, H, W, C)`` batch; return float32 ``(K,)`` outputs."""
        dtype = self._input["dtype"]
        if np.issubdtype(dtype, np.integer):
            scale, zero_point = self._input["quantization"]
            batch = quantize(batch, scale, zero_point, dtype)
        self._interpreter.set_tensor(self._input["index"], batch.astype(dtype, copy=False))
        try:
            self._interpreter.invoke()
        except (RuntimeError, ValueError) as exc:
            raise ModelError(f"inference failed ({first_line(exc)})") from None
        result = self._interpreter.get_tensor(self._output["index"])
        if np.issubdtype(result.dtype, np.integer):
            scale, zero_point = self._output["quantization"]
            result = dequantize(result, scale, zero_point)
        return result.reshape(-1).astype(np.float32, copy=False)


class OnnxBackend:
    """Runs ``.onnx`` models with onnxruntime.

    TensorRT and CUDA come first when this onnxruntime build has them, the CPU
    last. A QDQ-quantized model still takes and returns float32 (its
    QuantizeLinear/DequantizeLinear nodes sit inside the graph), so no
    quantization happens here.
    """

    name = "onnxruntime"
    PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")

    def __init__(self, model_path: str | Path, threads: int | None = None) -> None:
        """Load the model.

        Args:
            model_path: an ``.onnx`` file.
            threads: intra-op CPU threads; ``None`` lets onnxruntime choose.

        Raises:
            ModelError: the file is not a model onnxruntime can run, or not a one-in, one-out
                float model.
            RuntimeMissingError: onnxruntime is not installed.
        """
        ort, options = onnxruntime_options()
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        available = ort.get_available_providers()
        providers = [p for p in self.PREFERRED_PROVIDERS if p in available] or list(available)
        try:
            with native_stderr_silenced():
                self._session = ort.InferenceSession(str(model_path), sess_options=options,
                                                     providers=providers)
        except Exception as exc:  # noqa: BLE001 - onnxruntime's pybind errors share no base class
            reason = first_line(exc)
            raise ModelError(f"not a valid ONNX model ({reason})") from None
        inputs, outputs = self._session.get_inputs(), self._session.get_outputs()
        if len(inputs) != 1 or len(outputs) != 1:
            raise ModelError(
                f"expected a model with one input and one output, got {len(inputs)} and {len(outputs)}"
            )
        if inputs[0].type != "tensor(float)":
            raise ModelError(f"expected a float32 model input, got {inputs[0].type}")
        self._input, self._output = inputs[0], outputs[0]

    @property
    def metadata_props(self) -> dict[str, str]:
        """The model's ``metadata_props`` (onnxruntime's ``custom_metadata_map``)."""
        return dict(self._session.get_modelmeta().custom_metadata_map)

    @property
    def providers(self) -> list[str]:
        """The execution providers in use, in priority order."""
        return list(self._session.get_providers())

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The model's input shape, batch included; a symbolic dimension reads as -1."""
        return tuple(d if isinstance(d, int) else -1 for d in self._input.shape)

    @property
    def num_outputs(self) -> int:
        """Number of values in the model's output (-1 when a dimension is symbolic)."""
        dims = self._output.shape
        return int(np.prod(dims)) if all(isinstance(d, int) for d in dims) else -1

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Run a float32 ``(1, H, W, C)`` batch; return float32 ``(K,)`` outputs."""
        feed = {self._input.name: np.ascontiguousarray(batch, dtype=np.float32)}
        try:
            (result,) = self._session.run([self._output.name], feed)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise ModelError(f"inference failed ({first_line(exc)})") from None
        return np.asarray(result).reshape(-1).astype(np.float32, copy=False)


EDGETPU_LIBRARY = {"linux": "libedgetpu.so.1", "darwin": "libedgetpu.1.dylib", "win32": "edgetpu.dll"}
EDGETPU_CUSTOM_OP = b"edgetpu-custom-op"


class EdgeTpuBackend(LiteRTBackend):
    """Runs ``edgetpu_compiler`` output on a Coral Edge TPU through LiteRT's delegate."""

    name = "edgetpu"

    def _delegates(self) -> list[Any] | None:
        library = EDGETPU_LIBRARY.get(sys.platform, "libedgetpu.so.1")
        try:
            # Checked first: LiteRT's Delegate, failing to open the library, leaves a
            # half-built object whose __del__ prints a traceback at exit.
            ctypes.CDLL(library)
        except OSError:
            raise RuntimeMissingError(
                f"the Edge TPU runtime ({library}) is not installed: install libedgetpu "
                "(Coral's edgetpu runtime package) and connect the device"
            ) from None
        try:
            module = importlib.import_module("ai_edge_litert.interpreter")
        except ImportError:
            module = importlib.import_module("tflite_runtime.interpreter")
        try:
            with native_stderr_silenced():
                return [module.load_delegate(library)]
        except (ValueError, OSError, RuntimeError):
            raise RuntimeMissingError(
                f"the Edge TPU delegate could not be loaded from {library}: is the Coral device connected?"
            ) from None


def is_edgetpu_compiled(path: Path) -> bool:
    """An ``edgetpu_compiler`` output carries its custom op's name in the flatbuffer."""
    overlap = len(EDGETPU_CUSTOM_OP) - 1
    try:
        with path.open("rb") as handle:
            tail = b""
            while chunk := handle.read(1 << 20):  # a megabyte at a time, not the whole file
                if EDGETPU_CUSTOM_OP in tail + chunk:
                    return True
                tail = chunk[-overlap:]
    except OSError:
        return False
    return False


BACKENDS = {
    "litert": (LiteRTBackend, (".tflite",)),
    "edgetpu": (EdgeTpuBackend, ()),
    "onnxruntime": (OnnxBackend, (".onnx",)),
}
ALIASES = {"onnx": "onnxruntime", "tflite": "litert"}


def open_backend(model_path: str | Path, backend: str = "auto", threads: int | None = None) -> Backend:
    """Open a model file with the named backend, or the one its suffix calls for.

    Raises:
        ModelError: the file is missing or no backend reads its kind.
    """
    path = Path(model_path)
    if not is_readable_file(path):
        raise ModelError(f"model file not found or not readable: {path}")
    if path.stat().st_size > MAX_MODEL_BYTES:
        raise ModelError(f"model file too large (over {MAX_MODEL_BYTES // 2**20} MiB)")
    backend = ALIASES.get(backend, backend)
    if backend == "auto" and path.suffix.lower() == ".tflite" and is_edgetpu_compiled(path):
        backend = "edgetpu"
    if backend == "auto":
        for name, (_, suffixes) in BACKENDS.items():
            if path.suffix.lower() in suffixes:
                backend = name
                break
        else:
            known = sorted({s for _, suffixes in BACKENDS.values() for s in suffixes})
            raise ModelError(f"unknown model file type {path.suffix!r}; expected one of {known}")
    if backend not in BACKENDS:
        raise ModelError(f"unknown backend {backend!r}; choose from {['auto', *BACKENDS, *ALIASES]}")
    backend_class, _ = BACKENDS[backend]
    return backend_class(path, threads=threads)
