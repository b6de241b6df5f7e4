"""Model options as small frozen dataclasses: what to build, never how to train it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

from capsedge.errors import CapsedgeError

if TYPE_CHECKING:
    from capsedge.preprocess import Preprocessing

ROUTINGS = ("self_attention", "dynamic")
DECODERS = ("dense", "lean")
SQUASHES = ("efficient", "hinton")
PADDINGS = ("valid", "same")
NORM_ORDERS = ("relu_bn", "bn_relu")
TRUNKS = ("efficientnet_lite0",)
HEADS = ("capsules", "linear")
PRIMARY_SOURCES = ("spatial", "pooled")
#: How the network normalises its input before the first convolution: ``(mean, std)`` of
#: ``(255 x - mean) / std`` for ``x`` in [0, 1]. ``"unit"`` keeps ``x``; ``"lite0"`` is
#: EfficientNet-Lite's ImageNet normalisation of 8-bit pixels. The model applies it itself (a
#: ``Rescaling`` layer), so every runtime feeds [0, 1].
INPUT_NORMALIZATIONS: dict[str, tuple[float, float]] = {
    "unit": (0.0, 255.0),
    "lite0": (127.0, 128.0),
}


class ModelConfigError(CapsedgeError, ValueError):
    """A model configuration name or option is not valid."""


@dataclass(frozen=True)
class ConvSpec:
    """One stem convolution: ``Conv2D(filters, kernel_size, strides, padding)`` + ReLU.

    Args:
        filters: output channels.
        kernel_size: square kernel size.
        strides: stride in both directions.
        padding: ``"valid"`` or ``"same"``.
    """

    filters: int
    kernel_size: int
    strides: int = 1
    padding: str = "valid"

    def __post_init__(self) -> None:
        for name in ("filters", "kernel_size", "strides"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ModelConfigError(f"ConvSpec.{name} must be a positive int, received {value!r}")
        if self.padding not in PADDINGS:
            raise ModelConfigError(f"ConvSpec.padding must be one of {PADDINGS}, received {self.padding!r}")


@dataclass(frozen=True)
class ModelConfig:
    """Everything ``build_model`` needs; switch parts with ``dataclasses.replace``.

    Args:
        name: registry name.
        input_shape: ``(H, W, C)`` of images scaled to [0, 1].
        num_classes: number of classes K (= class capsules).
        class_names: K names in label order.
        stem: convolutions before the primary capsules (ReLU, he_normal).
        batch_norm: BatchNormalization after each stem convolution.
        norm_order: ``"relu_bn"`` (Efficient-CapsNet's reference code: ReLU, then batch norm) or
            ``"bn_relu"`` (batch norm folded into the convolution at export, then ReLU; int8
            quantization keeps per-channel scales, where a batch norm after the ReLU becomes a
            per-tensor int8 multiply-add that loses the channels with small ranges).
        routing: ``"self_attention"`` (Efficient-CapsNet: depthwise ``PrimaryCaps`` +
            ``FCCaps``) or ``"dynamic"`` (CapsNet: ``PrimaryConvCaps`` + ``DigitCaps``).
        primary_caps: number of primary capsules (self-attention) or of primary capsule
            channels (dynamic).
        primary_dim: primary capsule dimension.
        primary_kernel: primary capsule kernel; for self-attention routing it must equal the
            stem's output map size.
        primary_strides: stride of the primary convolution (dynamic routing only).
        class_dim: class capsule dimension.
        squash: ``"efficient"`` or ``"hinton"``.
        attention_scale: ``"d_out"`` (reference code) or ``"d_in"`` (paper), see ``FCCaps``.
        routing_iterations: dynamic routing iterations.
        use_ncp: add the neural-circuit-policy head and fuse its probabilities.
        ncp_units: neurons of the ``AutoNCP`` wiring (motor neurons = K).
        fusion_weight: w in ``p = w * p_caps + (1 - w) * p_ncp``.
        decoder: ``"dense"`` (the papers' 512-1024 MLP), ``"lean"`` (dense + transposed
            convolutions) or ``None`` for no reconstruction branch.
        trunk: a pretrained backbone instead of ``stem`` (``"efficientnet_lite0"``), or ``None``.
        trunk_stages: how many of the trunk's 7 stages to keep (the ``cut``).
        trunk_head_conv: end the trunk with its pretrained 1x1 convolution to 1280 channels
            (the features the ImageNet classifier pools); needs all 7 stages.
        head: ``"capsules"`` (PrimaryCaps, routing, class capsules) or ``"linear"`` (global
            average pooling, dropout, dense softmax: the transfer-learning baseline).
        primary_source: with a trunk, where the primary capsules come from: ``"spatial"`` (a
            1x1 convolution to ``primary_caps * primary_dim`` channels, then the depthwise
            ``PrimaryCaps`` over the whole map) or ``"pooled"`` (global average pooling and a
            dense layer to the capsules).
        input_normalization: a key of :data:`INPUT_NORMALIZATIONS`, applied inside the network.
        reconstruction_size: side of the image the decoder reconstructs (the input, average-
            pooled); ``None``: the input size.
        dropout: dropout before the linear head's dense layer.
        readout_weight: ``v`` in ``p = (1 - v) * p_head + v * p_readout``: the share of a linear
            read-out beside the capsule head (its own copy of the trunk's head convolution, global
            average pooling and a dense softmax: the linear head of a stage-1 run, whose weights
            it takes, see ``capsedge train --stage1-readout``); 0: none. Needs a capsule head on
            a trunk with its head convolution.
        description: one line for listings.
    """

    name: str
    input_shape: tuple[int, int, int]
    num_classes: int
    stem: tuple[ConvSpec, ...]
    class_names: tuple[str, ...] = ()
    batch_norm: bool = True
    norm_order: str = "relu_bn"
    routing: str = "self_attention"
    primary_caps: int = 16
    primary_dim: int = 8
    primary_kernel: int = 9
    primary_strides: int = 1
    class_dim: int = 16
    squash: str = "efficient"
    attention_scale: str = "d_out"
    routing_iterations: int = 3
    use_ncp: bool = False
    ncp_units: int = 16
    fusion_weight: float = 0.5
    decoder: str | None = "dense"
    trunk: str | None = None
    trunk_stages: int = 7
    trunk_head_conv: bool = False
    head: str = "capsules"
    primary_source: str = "spatial"
    input_normalization: str = "unit"
    reconstruction_size: int | None = None
    dropout: float = 0.0
    readout_weight: float = 0.0
    description: str = ""

    def __post_init__(self) -> None:
        if len(self.input_shape) != 3 or any(n < 1 for n in self.input_shape):
            raise ModelConfigError(f"input_shape must be (H, W, C), received {self.input_shape!r}")
        if self.num_classes < 2:
            raise ModelConfigError(f"num_classes must be >= 2, received {self.num_classes!r}")
        if self.class_names and len(self.class_names) != self.num_classes:
            raise ModelConfigError(
                f"class_names must have num_classes={self.num_classes} entries, received {self.class_names!r}"
            )
        for name, value, choices in (
            ("routing", self.routing, ROUTINGS),
            ("squash", self.squash, SQUASHES),
            ("decoder", self.decoder, (*DECODERS, None)),
            ("norm_order", self.norm_order, NORM_ORDERS),
            ("trunk", self.trunk, (*TRUNKS, None)),
            ("head", self.head, HEADS),
            ("primary_source", self.primary_source, PRIMARY_SOURCES),
            ("input_normalization", self.input_normalization, tuple(INPUT_NORMALIZATIONS)),
        ):
            if value not in choices:
                raise ModelConfigError(f"{name} must be one of {choices}, received {value!r}")
        if not 1 <= self.trunk_stages <= 7:
            raise ModelConfigError(f"trunk_stages must be in [1, 7], received {self.trunk_stages!r}")
        if self.trunk_head_conv and (self.trunk is None or self.trunk_stages != 7):
            raise ModelConfigError("trunk_head_conv needs a trunk with all 7 stages")
        if self.head == "linear" and (self.trunk is None or self.use_ncp or self.decoder is not None):
            raise ModelConfigError("head='linear' needs a trunk, and no NCP head or decoder")
        size = self.reconstruction_size
        if size is not None and (size < 1 or self.input_shape[0] % size or self.input_shape[1] % size):
            raise ModelConfigError(
                f"reconstruction_size must divide the input size {self.input_shape[:2]}, received {size!r}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ModelConfigError(f"dropout must be in [0, 1), received {self.dropout!r}")
        if not 0.0 <= self.readout_weight < 1.0:
            raise ModelConfigError(f"readout_weight must be in [0, 1), received {self.readout_weight!r}")
        if self.readout_weight and (self.head != "capsules" or not self.trunk_head_conv):
            raise ModelConfigError("readout_weight needs a capsule head on a trunk with its head convolution "
                                   "(trunk_head_conv)")
        if not 0.0 <= self.fusion_weight <= 1.0:
            raise ModelConfigError(f"fusion_weight must be in [0, 1], received {self.fusion_weight!r}")
        if self.use_ncp and self.ncp_units < self.num_classes + 3:
            raise ModelConfigError(
                f"ncp_units must be >= num_classes + 3 = {self.num_classes + 3} for an AutoNCP "
                f"wiring, received {self.ncp_units!r}"
            )

    @property
    def labels(self) -> tuple[str, ...]:
        """The class names in output order: ``class_names``, else ``"0"`` to ``"K-1"``."""
        return self.class_names or tuple(str(k) for k in range(self.num_classes))

    @property
    def preprocessing(self) -> Preprocessing:
        """How an image becomes this network's input (stored with every model exported from it):
        the runtime's :class:`~capsedge.preprocess.Preprocessing` at ``input_shape``'s size.

        Raises:
            ModelConfigError: the input is not square (the runtime letterboxes to a square).
        """
        from capsedge.preprocess import Preprocessing

        height, width, channels = self.input_shape
        if height != width:
            raise ModelConfigError(f"the runtime feeds square inputs, {self.name!r} takes {height}x{width}")
        return Preprocessing(input_size=height, channels=channels)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples become lists); ``from_dict`` reverses it."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Rebuild a configuration from ``to_dict`` output (e.g. a run's ``config.json``).

        Raises:
            ModelConfigError: for keys that are not fields, or invalid values.
        """
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ModelConfigError(f"unknown ModelConfig fields {unknown}; valid: {sorted(names)}")
        values = dict(data)
        values["stem"] = tuple(
            spec if isinstance(spec, ConvSpec) else ConvSpec(**spec) for spec in values.get("stem", ())
        )
        for name in ("input_shape", "class_names"):
            if name in values:
                values[name] = tuple(values[name])
        return cls(**values)
