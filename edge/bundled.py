"""The model bundled with the package: where it is and the SHA-256 it must have."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

DEFAULT_MODEL_NAME = "default.tflite"


def default_model_path() -> Path:
    """The model bundled with the package."""
    return Path(str(resources.files("capsedge") / "assets" / DEFAULT_MODEL_NAME))


def bundled_digest() -> str:
    """The SHA-256 (hex) the bundled model must have (``assets/default.sha256``); ``""`` when
    that file is missing."""
    try:
        return default_model_path().with_suffix(".sha256").read_text(encoding="ascii").split()[0]
    except (OSError, UnicodeDecodeError, IndexError):
        return ""
