"""The named model configurations: one explicit table for the CLI and the tests."""

from __future__ import annotations

import dataclasses
import difflib

from capsedge.models.config import ConvSpec, ModelConfig, ModelConfigError

IMPLANT_CLASSES = ("Cofield", "Depuy", "Tornier", "Zimmer")
MNIST_CLASSES = tuple(str(d) for d in range(10))

# 128 -> 64 -> 32 -> 16 -> 8: an 8x8x128 map for 16 primary capsules of 8D.
_IMPLANT_STEM = (
    ConvSpec(16, 3, 2, "same"),
    ConvSpec(32, 3, 2, "same"),
    ConvSpec(32, 3, 1, "same"),
    ConvSpec(64, 3, 2, "same"),
    ConvSpec(64, 3, 1, "same"),
    ConvSpec(128, 3, 2, "same"),
)

_EFFCAPS_IMPLANT = ModelConfig(
    name="effcaps_implant_128",
    input_shape=(128, 128, 1),
    num_classes=4,
    class_names=IMPLANT_CLASSES,
    stem=_IMPLANT_STEM,
    primary_caps=16,
    primary_dim=8,
    primary_kernel=8,
    decoder="lean",
    description="Efficient-CapsNet for 128x128 greyscale implant X-rays, 4 manufacturers",
)

# 192 -> 96 -> 48 -> 24 -> 12: the same stem at 1.5x the resolution (fins, holes: few pixels at 128).
_EFFCAPS_IMPLANT_192 = dataclasses.replace(
    _EFFCAPS_IMPLANT,
    name="effcaps_implant_192",
    input_shape=(192, 192, 1),
    primary_kernel=12,
    description="Efficient-CapsNet for 192x192 greyscale implant X-rays, 4 manufacturers",
)

# 128 -> 64 -> 32 -> 16 -> 8 with one strided convolution per scale and a quarter of the channels:
# ~4 M multiply-adds instead of ~33 M, and 8 primary capsules (an 8-step NCP instead of 16).
_EFFCAPS_NCP_IMPLANT_LITE = dataclasses.replace(
    _EFFCAPS_IMPLANT,
    name="effcaps_ncp_implant_lite",
    stem=(
        ConvSpec(8, 3, 2, "same"),
        ConvSpec(16, 3, 2, "same"),
        ConvSpec(32, 3, 2, "same"),
        ConvSpec(64, 3, 2, "same"),
    ),
    norm_order="bn_relu",
    primary_caps=8,
    primary_dim=8,
    use_ncp=True,
    ncp_units=16,
    fusion_weight=0.5,
    description="Light Efficient-CapsNet + CfC/AutoNCP head for 128x128 implant X-rays (edge default)",
)

# The same without the NCP head: the ablation that says what the head adds.
_EFFCAPS_IMPLANT_LITE = dataclasses.replace(
    _EFFCAPS_NCP_IMPLANT_LITE,
    name="effcaps_implant_lite",
    use_ncp=False,
    description="effcaps_ncp_implant_lite without its NCP head (ablation)",
)

#: Input sizes of the EfficientNet-Lite0 families (multiples of the trunk's stride, 32).
LITE0_SIZES = (224, 320, 384, 448, 512)


def _reconstruction_size(size: int) -> int:
    """The largest divisor of ``size`` that is a multiple of 16 and at most 160: the decoder
    redraws a pooled image, which keeps it under 0.3 M parameters at any input size."""
    return max(d for d in range(16, 161, 16) if size % d == 0)


def _lite0_configs(size: int, head_conv: bool = False) -> tuple[ModelConfig, ...]:
    """The ImageNet-pretrained EfficientNet-Lite0 networks at ``size`` x ``size``; with
    ``head_conv``, on the trunk that keeps its 1x1 convolution to 1280 channels (``lite0h``)."""
    trunk_name = "lite0h" if head_conv else "lite0"
    trunk_text = "EfficientNet-Lite0" + (" (with its 1280-channel head convolution)" if head_conv else "")
    trunk = {
        "input_shape": (size, size, 1),
        "num_classes": 4,
        "class_names": IMPLANT_CLASSES,
        "stem": (),
        "trunk": "efficientnet_lite0",
        "trunk_stages": 7,
        "trunk_head_conv": head_conv,
        "input_normalization": "lite0",
    }
    capsules = ModelConfig(
        name=f"effcaps_ncp_{trunk_name}_{size}",
        **trunk,
        primary_caps=16,
        primary_dim=8,
        primary_kernel=size // 32,
        class_dim=16,
        use_ncp=True,
        ncp_units=16,
        fusion_weight=0.5,
        decoder="lean",
        reconstruction_size=_reconstruction_size(size),
        description=f"ImageNet {trunk_text} + Efficient-CapsNet + CfC/AutoNCP head, {size}x{size}",
    )
    return (
        capsules,
        dataclasses.replace(
            capsules, name=f"effcaps_{trunk_name}_{size}", use_ncp=False,
            description=f"effcaps_ncp_{trunk_name}_{size} without its NCP head (ablation)",
        ),
        ModelConfig(
            name=f"{trunk_name}_linear_{size}",
            **trunk,
            head="linear",
            dropout=0.2,
            decoder=None,
            description=f"ImageNet {trunk_text} + global pooling + dense, {size}x{size} (baseline)",
        ),
    )


_CONFIGS = (
    ModelConfig(
        name="effcaps_mnist",
        input_shape=(28, 28, 1),
        num_classes=10,
        class_names=MNIST_CLASSES,
        # Mazzia et al. 2021, efficient_capsnet_graph_mnist.py: 28 -> 24 -> 22 -> 20 -> 9.
        stem=(ConvSpec(32, 5), ConvSpec(64, 3), ConvSpec(64, 3), ConvSpec(128, 3, 2)),
        primary_caps=16,
        primary_dim=8,
        primary_kernel=9,
        decoder="dense",
        description="Efficient-CapsNet, MNIST (Mazzia et al. 2021), 161,824 parameters",
    ),
    _EFFCAPS_IMPLANT,
    _EFFCAPS_IMPLANT_192,
    dataclasses.replace(
        _EFFCAPS_IMPLANT,
        name="effcaps_ncp_implant_128",
        use_ncp=True,
        ncp_units=16,
        fusion_weight=0.5,
        description="effcaps_implant_128 + CfC/AutoNCP head on the primary capsules, fused",
    ),
    _EFFCAPS_NCP_IMPLANT_LITE,
    _EFFCAPS_IMPLANT_LITE,
    ModelConfig(
        name="capsnet_mnist",
        input_shape=(28, 28, 1),
        num_classes=10,
        class_names=MNIST_CLASSES,
        stem=(ConvSpec(256, 9),),
        batch_norm=False,
        routing="dynamic",
        primary_caps=32,
        primary_dim=8,
        primary_kernel=9,
        primary_strides=2,
        squash="hinton",
        decoder="dense",
        description="CapsNet with dynamic routing, MNIST (Sabour et al. 2017) baseline",
    ),
    ModelConfig(
        name="capsnet_implant_128",
        input_shape=(128, 128, 1),
        num_classes=4,
        class_names=IMPLANT_CLASSES,
        # A strided stem first: CapsNet's 9x9 convolutions on 128x128 would give ~100k capsules.
        stem=(ConvSpec(32, 3, 2, "same"), ConvSpec(64, 3, 2, "same"), ConvSpec(128, 3, 2, "same")),
        batch_norm=True,
        routing="dynamic",
        primary_caps=8,
        primary_dim=8,
        primary_kernel=3,
        primary_strides=2,
        squash="hinton",
        decoder="lean",
        description="CapsNet (dynamic routing) baseline for 128x128 implant X-rays",
    ),
    *(config for size in LITE0_SIZES for config in _lite0_configs(size)),
    # The trunk as the ImageNet classifier ends it (as timm's ``efficientnet_lite0`` features do).
    *_lite0_configs(512, head_conv=True),
)

MODEL_CONFIGS: dict[str, ModelConfig] = {cfg.name: cfg for cfg in _CONFIGS}


def list_model_configs() -> list[str]:
    """Names of the registered model configurations, sorted."""
    return sorted(MODEL_CONFIGS)


def get_model_config(name: str) -> ModelConfig:
    """Look up a registered configuration by name.

    Raises:
        ModelConfigError: (a ``ValueError``) for an unknown name; the message lists the valid
            names and the closest match.
    """
    try:
        return MODEL_CONFIGS[name]
    except (KeyError, TypeError):
        close = difflib.get_close_matches(str(name), list(MODEL_CONFIGS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ModelConfigError(
            f"unknown model config {name!r}; valid names: {', '.join(list_model_configs())}{hint}"
        ) from None
