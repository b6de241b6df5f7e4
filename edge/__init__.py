"""capsedge: identify a shoulder implant's manufacturer from an X-ray on edge hardware.

The runtime needs only numpy, Pillow and a model runtime (LiteRT)::

    from capsedge import Classifier
    classifier = Classifier.load()          # the bundled model
    prediction = classifier.classify("xray.png")
    print(prediction.label, prediction.probabilities)

Training (``capsedge.train``) and export (``capsedge.export``) need TensorFlow
and are never imported from here.
"""

__version__ = "0.9.0"

from typing import TYPE_CHECKING, Any

#: Public name -> the module that defines it. Imported on first use (PEP 562), so that
#: ``import capsedge.models`` (or ``capsedge.errors``) loads nothing of the runtime.
_EXPORTS = {
    "Classifier": "classifier",
    "Prediction": "classifier",
    "default_model_path": "bundled",
    "CapsedgeError": "errors",
    "ImageError": "errors",
    "ModelError": "errors",
    "RuntimeMissingError": "errors",
    "ModelMetadata": "metadata",
    "read_metadata": "metadata",
    "Preprocessing": "preprocess",
    "preprocess": "preprocess",
}

__all__ = [
    "CapsedgeError",
    "Classifier",
    "ImageError",
    "ModelError",
    "ModelMetadata",
    "Prediction",
    "Preprocessing",
    "RuntimeMissingError",
    "__version__",
    "default_model_path",
    "preprocess",
    "read_metadata",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'capsedge' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


if TYPE_CHECKING:
    from .bundled import default_model_path
    from .classifier import Classifier, Prediction
    from .errors import CapsedgeError, ImageError, ModelError, RuntimeMissingError
    from .metadata import ModelMetadata, read_metadata
    from .preprocess import Preprocessing, preprocess
