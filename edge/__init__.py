"""capsedge: identify a shoulder implant's manufacturer from an X-ray on edge hardware.

The runtime needs only numpy, Pillow and a model runtime (LiteRT)::

    from capsedge import Classifier
    classifier = Classifier.load()          # the bundled model
    prediction = classifier.classify("xray.png")
    print(prediction.label, prediction.probabilities)

Training (``capsedge.train``) and export (``capsedge.export``) need TensorFlow
and are never imported from here.
"""

__version__ = "0.3.0"

from .classifier import Classifier, Prediction, default_model_path
from .errors import CapsedgeError, ImageError, ModelError, RuntimeMissingError
from .metadata import ModelMetadata, read_metadata
from .preprocess import Preprocessing, preprocess

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
