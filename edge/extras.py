"""Optional dependencies, imported lazily through one helper whose error names the extra.

Every part of capsedge beyond numpy, Pillow, click and LiteRT comes with a pip extra
(``serve``, ``dicom``, ``onnx``, ``train``, ``export``). Code that needs one imports it with
:func:`require`; a missing package is a :class:`~capsedge.errors.RuntimeMissingError` with one
line that says what to install (the CLI prints it and exits 1)::

    ort = require("onnxruntime", extra="onnx", needed_by="an ONNX model")
    # RuntimeMissingError: an ONNX model needs onnxruntime: pip install 'capsedge[onnx]'

Nothing is ever installed at run time.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import EXTRAS, missing_extra, pip_install

__all__ = ["EXTRAS", "missing_extra", "missing_package", "pip_install", "require"]


def missing_package(exc: ImportError) -> str | None:
    """The top-level package an ``ImportError`` could not find; ``None`` when it is capsedge's
    own module (a bug to show, not an extra to install)."""
    name = exc.name or ""
    top = name.split(".")[0]
    if top == "capsedge":
        return None
    return top or "a required package"


def require(module: str, *, extra: str, needed_by: str | None = None) -> ModuleType:
    """Import ``module`` (which may itself import the extra's packages, e.g. ``capsedge.serve``).

    Args:
        module: the dotted module name to import.
        extra: the pip extra that installs what it needs.
        needed_by: what needs it, for the message (``"'capsedge serve'"``, ``"DICOM files"``).

    Raises:
        RuntimeMissingError: a package it needs is not installed; the message names the first
            missing package and the extra.
        ImportError: a capsedge module itself is missing (a broken install, not an extra).
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        package = missing_package(exc)
        if package is None:
            raise
        raise missing_extra(package, extra, needed_by) from None
