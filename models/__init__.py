"""Capsule networks for capsedge: Efficient-CapsNet, CapsNet, an NCP head, losses.

Training and export import this package; the edge runtime never does (it needs TensorFlow).
"""

from capsedge.models.build import BuiltModel, build_model, rebuild_classifier
from capsedge.models.config import ConvSpec, ModelConfig, ModelConfigError
from capsedge.models.decoder import perturb_capsule
from capsedge.models.registry import MODEL_CONFIGS, get_model_config, list_model_configs

__all__ = [
    "MODEL_CONFIGS",
    "BuiltModel",
    "ConvSpec",
    "ModelConfig",
    "ModelConfigError",
    "build_model",
    "get_model_config",
    "list_model_configs",
    "perturb_capsule",
    "rebuild_classifier",
]
