"""The one table of export formats: it drives the CLI's choices, validation and verification."""

from __future__ import annotations

import difflib
import importlib
import importlib.util
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from capsedge.errors import CapsedgeError, missing_extra


@dataclass(frozen=True)
class ExportFormat:
    """One row of the format table.

    Attributes:
        name: what ``--formats`` accepts.
        suffix: the model file's suffix.
        quantization: ``"float32"``, ``"float16"``, ``"dynamic"`` or ``"int8"``.
        exporter: ``"module:function"`` that writes it, called as
            ``function(model, path, metadata, quantization=...)``.
        requires: importable modules the exporter needs.
        extra: the pip extra that installs them.
        device: where the file is meant to run.
        float_reference: the float format whose file size this one's is compared with.
    """

    name: str
    suffix: str
    quantization: str
    exporter: str
    requires: tuple[str, ...]
    extra: str
    device: str
    float_reference: str | None = None

    @property
    def needs_calibration(self) -> bool:
        """Whether the format needs calibration images."""
        return self.quantization == "int8"

    def load_exporter(self) -> Callable[..., Any]:
        """The exporter function (its module is imported now, not before)."""
        module, function = self.exporter.split(":")
        return getattr(importlib.import_module(module), function)


_TFLITE = "capsedge.export.tflite_format:export_tflite"
_ONNX = "capsedge.export.onnx_format:export_onnx"
_EDGETPU = "capsedge.export.edgetpu_format:export_edgetpu"
_TF = ("tensorflow", "keras")
_TF2ONNX = ("tensorflow", "keras", "tf2onnx", "onnx", "onnxruntime")

FORMATS: dict[str, ExportFormat] = {
    f.name: f
    for f in (
        ExportFormat("tflite-f32", ".tflite", "float32", _TFLITE, _TF, "export", "any CPU (LiteRT)"),
        ExportFormat("tflite-f16", ".tflite", "float16", _TFLITE, _TF, "export",
                     "CPU, mobile GPU delegates", "tflite-f32"),
        ExportFormat("tflite-dynamic", ".tflite", "dynamic", _TFLITE, _TF, "export",
                     "CPU, smaller file", "tflite-f32"),
        ExportFormat("tflite-int8", ".tflite", "int8", _TFLITE, _TF, "export",
                     "CPU, Raspberry Pi, microcontrollers", "tflite-f32"),
        ExportFormat("onnx", ".onnx", "float32", _ONNX, _TF2ONNX, "export",
                     "onnxruntime: CPU, CUDA, TensorRT"),
        ExportFormat("onnx-int8", ".onnx", "int8", _ONNX, _TF2ONNX, "export",
                     "onnxruntime: the tflite-int8 graph in QDQ form (CPU)", "onnx"),
        ExportFormat("edgetpu", ".tflite", "int8", _EDGETPU, _TF, "export",
                     "Coral Edge TPU (compiled when edgetpu_compiler is installed)", "tflite-f32"),
    )
}


def parse_formats(names: Iterable[str]) -> list[ExportFormat]:
    """The table rows for ``names``, in order, without repeats.

    Raises:
        CapsedgeError: a name is not in the table (the message names the closest one).
    """
    chosen: list[ExportFormat] = []
    for name in names:
        if name not in FORMATS:
            close = difflib.get_close_matches(name, list(FORMATS), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise CapsedgeError(f"unknown format {name!r}; choose from {', '.join(FORMATS)}{hint}")
        if FORMATS[name] not in chosen:
            chosen.append(FORMATS[name])
    if not chosen:
        raise CapsedgeError(f"no format given; choose from {', '.join(FORMATS)}")
    return chosen


def check_requirements(formats: Iterable[ExportFormat]) -> None:
    """Fail early, before any conversion, when a format's tool is not installed.

    Raises:
        RuntimeMissingError: naming the format, the missing module and the extra to install.
    """
    for fmt in formats:
        for module in fmt.requires:
            if importlib.util.find_spec(module) is None:
                raise missing_extra(module, fmt.extra, needed_by=f"format {fmt.name!r}")
